"""Workflow definitions: parse JSON or YAML, validate, and freeze into :class:`Definition`.

The format is ``examples/two_step_workflow.json``: ``id``, ``name``, ``version``,
``description``, ``tasks[taskId, name, agentCapability, parameters, nextTaskId]`` plus the
optional per-task ``agentId``, ``maxRetries`` (default 3), ``timeoutSeconds`` (default
``OPSCORE_TASK_TIMEOUT_SECONDS``), ``retryBackoffSeconds`` (default 1) and ``fallbackTaskId``.

Validation collects *every* problem before answering (one 422 that lists them all is worth
more to an author than a fix-one-resubmit loop). The graph rules: unique task ids, every
``nextTaskId``/``fallbackTaskId`` resolves, exactly one start task (one no other task points
to), every task reachable from it, and no cycle along next or fallback edges, so every run
ends after at most ``len(tasks)`` tasks.

Defaults are applied when a run reads the definition, not stored: the stored body is the
author's, byte for byte what "same body → 200, other body → 409" compares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from opscore.errors import InvalidDefinition, InvalidId
from opscore.inputs import check_id, check_json

DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_SECONDS = 1.0
MAX_TASKS = 1000


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of a definition, defaults applied."""

    task_id: str
    name: str
    capability: str | None
    parameters: dict[str, Any]
    next_task_id: str | None
    fallback_task_id: str | None
    agent_id: str | None
    max_retries: int
    timeout_seconds: float
    retry_backoff_seconds: float


@dataclass(frozen=True, slots=True)
class Definition:
    """A validated definition: ``body`` as stored, ``tasks`` by id, ``start`` the first task."""

    definition_id: str
    version: str
    name: str
    body: dict[str, Any]
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    start: str = ""


MAX_DEFINITION_BYTES = 256 * 1024
"""The largest definition accepted, in bytes of its JSON or YAML text."""


class _JsonYaml(yaml.SafeLoader):
    """YAML saying no more than JSON can: no aliases, and (checked after loading) JSON types only.

    An alias makes a few hundred bytes expand into gigabytes (nested aliases: the "billion
    laughs"), and a stored definition can never be deleted; dates, binary and sets are not
    JSON and could not be stored or served back as written.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: yaml.AliasEvent = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            raise InvalidDefinition(
                "YAML aliases (*name) are not accepted in a workflow definition: write the value out",
                problems=[
                    f"alias *{event.anchor}" + (f" at line {mark.line + 1}" if (mark := event.start_mark) else "")
                ],
            )
        return super().compose_node(parent, index)


def _json_types(value: Any, where: str = "definition") -> None:
    """Refuse what YAML loaded that JSON has no type for (dates, bytes, sets, non-string keys)."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidDefinition(
                        f"{at}: the key {key!r} is not a string (quote it)", problems=[f"{at}: non-string key {key!r}"]
                    )
                stack.append((child, f"{at}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{n}]") for n, child in enumerate(item))
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            kind = type(item).__name__
            raise InvalidDefinition(
                f"{at}: a YAML {kind} is not a JSON value (quote dates; binary and sets are not accepted)",
                problems=[f"{at}: {kind} is not a JSON type"],
            )


def parse(raw: bytes, content_type: str | None) -> Any:
    """JSON or YAML (by ``Content-Type``; YAML is a superset, so anything else tries YAML).

    Either way the result is plain JSON data that :func:`opscore.inputs.check_json` accepts,
    or the client gets a 422 naming the problem.
    """
    if len(raw) > MAX_DEFINITION_BYTES:
        raise InvalidDefinition(
            f"a workflow definition may be at most {MAX_DEFINITION_BYTES} bytes; this one is {len(raw)}",
            problems=[f"size: {len(raw)} bytes, at most {MAX_DEFINITION_BYTES}"],
        )
    kind = (content_type or "").split(";")[0].strip().lower()
    try:
        body: Any = None
        parsed = False
        if kind in ("application/json", "") or kind.endswith("+json"):
            try:
                body, parsed = json.loads(raw), True
            except ValueError:
                if kind:
                    raise
        if not parsed:
            body = yaml.load(raw, Loader=_JsonYaml)
    except (ValueError, RecursionError, yaml.YAMLError) as exc:
        raise InvalidDefinition(
            f"the definition is neither valid JSON nor valid YAML: {exc}", problems=[f"unparseable: {exc}"]
        ) from exc
    _json_types(body)
    check_json(body, "definition")
    return body


def _text(value: Any) -> str | None:
    """Ids and versions as text: ``1.0`` written unquoted in YAML is still version "1.0"."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def normalise(body: dict[str, Any]) -> dict[str, Any]:
    """The body as stored: ``id`` and ``version`` as strings, everything else untouched."""
    out = dict(body)
    for key in ("id", "version"):
        text = _text(body.get(key))
        if text is not None:
            out[key] = text
    return out


def _is_id(text: str) -> bool:
    try:
        check_id(text)
    except InvalidId:
        return False
    return True


def validate(body: Any, *, default_timeout: float) -> Definition:
    """A :class:`Definition`, or ``InvalidDefinition`` whose ``problems`` lists every fault."""
    problems: list[str] = []
    if not isinstance(body, dict):
        raise InvalidDefinition("a workflow definition must be an object", problems=["the body is not an object"])
    body = normalise(body)
    definition_id = _text(body.get("id"))
    version = _text(body.get("version"))
    if definition_id is None:
        problems.append("id: required, a non-empty string")
    elif len(definition_id) > 200 or not _is_id(definition_id):
        problems.append("id: at most 200 characters, no '/' and no control characters")
    if version is None:
        problems.append("version: required, a non-empty string")
    name = body.get("name", definition_id)
    if name is not None and not isinstance(name, str):
        problems.append("name: must be a string")
    if "description" in body and body["description"] is not None and not isinstance(body["description"], str):
        problems.append("description: must be a string")
    raw_tasks = body.get("tasks")
    specs: list[TaskSpec] = []
    if not isinstance(raw_tasks, list) or not raw_tasks:
        problems.append("tasks: required, a non-empty list")
        raw_tasks = []
    elif len(raw_tasks) > MAX_TASKS:
        problems.append(f"tasks: at most {MAX_TASKS}")
        raw_tasks = []
    for index, raw in enumerate(raw_tasks):
        spec = _task(raw, index, problems, default_timeout)
        if spec is not None:
            specs.append(spec)
    tasks: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.task_id in tasks:
            problems.append(f"tasks: duplicate taskId {spec.task_id!r}")
        else:
            tasks[spec.task_id] = spec
    start = _graph(tasks, problems) if tasks and len(specs) == len(raw_tasks) else None
    if problems:
        listing = "; ".join(problems)
        raise InvalidDefinition(f"invalid workflow definition ({len(problems)} problems): {listing}", problems=problems)
    assert definition_id is not None and version is not None and start is not None
    return Definition(definition_id, version, name or definition_id, body, tasks, start)


def _task(raw: Any, index: int, problems: list[str], default_timeout: float) -> TaskSpec | None:
    where = f"tasks[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object")
        return None
    before = len(problems)
    task_id = raw.get("taskId")
    if not isinstance(task_id, str) or not task_id.strip():
        problems.append(f"{where}.taskId: required, a non-empty string")
        task_id = None
    elif ":" in task_id or len(task_id) > 200 or not _is_id(task_id):
        problems.append(f"{where}.taskId: at most 200 characters, no ':', '/' or control characters")
    else:
        where = f"task {task_id!r}"
    name = raw.get("name", task_id)
    if not isinstance(name, str):
        problems.append(f"{where}.name: must be a string")
    capability = raw.get("agentCapability")
    agent_id = raw.get("agentId")
    if capability is not None and (not isinstance(capability, str) or not capability):
        problems.append(f"{where}.agentCapability: must be a non-empty string")
    if agent_id is not None and (not isinstance(agent_id, str) or not agent_id):
        problems.append(f"{where}.agentId: must be a non-empty string")
    if capability is None and agent_id is None:
        problems.append(f"{where}: needs agentCapability or agentId")
    parameters = raw.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        problems.append(f"{where}.parameters: must be an object")
    refs: dict[str, str | None] = {}
    for key in ("nextTaskId", "fallbackTaskId"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            problems.append(f"{where}.{key}: must be a taskId or null")
            value = None
        refs[key] = value
    max_retries = raw.get("maxRetries", DEFAULT_MAX_RETRIES)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 100:
        problems.append(f"{where}.maxRetries: an integer from 0 to 100")
    timeout = raw.get("timeoutSeconds", default_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 7 * 86400:
        problems.append(f"{where}.timeoutSeconds: a number of seconds above 0 (at most a week)")
    backoff = raw.get("retryBackoffSeconds", DEFAULT_BACKOFF_SECONDS)
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 <= backoff <= 86400:
        problems.append(f"{where}.retryBackoffSeconds: a number of seconds from 0 to 86400")
    if len(problems) > before or task_id is None:
        return None
    return TaskSpec(
        task_id=task_id,
        name=str(name),
        capability=capability,
        parameters=parameters,
        next_task_id=refs["nextTaskId"],
        fallback_task_id=refs["fallbackTaskId"],
        agent_id=agent_id,
        max_retries=max_retries,
        timeout_seconds=float(timeout),
        retry_backoff_seconds=float(backoff),
    )


def _graph(tasks: dict[str, TaskSpec], problems: list[str]) -> str | None:
    """Check references, the single start, reachability and acyclicity; the start task id."""
    edges: dict[str, list[str]] = {t: [] for t in tasks}
    referenced: set[str] = set()
    for spec in tasks.values():
        for key, target in (("nextTaskId", spec.next_task_id), ("fallbackTaskId", spec.fallback_task_id)):
            if target is None:
                continue
            if target not in tasks:
                problems.append(f"task {spec.task_id!r}.{key}: {target!r} is not a taskId of this workflow")
                continue
            edges[spec.task_id].append(target)
            referenced.add(target)
    starts = [t for t in tasks if t not in referenced]
    if len(starts) != 1:
        if starts:
            problems.append(f"exactly one start task (one no other task points to) is needed; found {starts}")
        else:
            problems.append("no start task: every task is some task's next or fallback (a cycle)")
    start = starts[0] if len(starts) == 1 else None
    if start is not None:
        seen = {start}
        stack = [start]
        while stack:
            for nxt in edges[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        unreachable = [t for t in tasks if t not in seen]
        if unreachable:
            problems.append(f"unreachable from the start task {start!r}: {unreachable}")
    cycle = _find_cycle(edges)
    if cycle:
        problems.append(f"cycle: {' -> '.join(cycle)}")
    return start


def _find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """One cycle as a path ``a -> b -> a``, or ``None`` (iterative three-colour DFS)."""
    colour = dict.fromkeys(edges, 0)
    for root in edges:
        if colour[root]:
            continue
        path: list[str] = [root]
        iters = [iter(edges[root])]
        colour[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(edges[nxt]))
    return None
