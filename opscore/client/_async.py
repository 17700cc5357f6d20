"""``AsyncClient``: Ops-Core's HTTP API for asyncio programs, one method per route.

This file is the source of both clients: ``scripts/unasync.py`` writes ``_sync.py`` from it
(``Client``), and ``tests/client/test_unasync.py`` fails when that file is stale. Write it so
that dropping ``async``/``await`` and the ``Async`` prefixes leaves correct synchronous code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from opscore.client._base import (
    AGENT,
    AGENT_AUDIT,
    AGENT_DIAGRAM,
    AGENT_STATE,
    AGENT_TRANSITIONS,
    AGENT_WORKFLOW,
    AGENTS,
    AUDIT,
    AUDIT_CHECKPOINTS,
    AUDIT_HEADS,
    AUDIT_STREAM,
    AUDIT_VERIFY,
    DEFINITION,
    DEFINITIONS,
    HEALTH,
    MACHINE,
    MACHINE_DIAGRAM,
    MACHINES,
    METRICS,
    OPENAPI,
    READY,
    RETRYABLE_ERRORS,
    RUN,
    RUN_AUDIT,
    RUN_DIAGRAM,
    RUN_TRANSITIONS,
    RUNS,
    STATE_REPORTS,
    TASK_DIAGRAM,
    USER_AGENT,
    WEBHOOK,
    EventDecoder,
    Retry,
    UnexpectedResponse,
    error_from,
    fill,
    if_match_header,
    new_idempotency_key,
    now_iso,
    params,
    route,
    settings_of,
    should_retry,
    signed_webhook,
    unreachable,
)
from opscore.wire import (
    AgentStateAtView,
    AgentView,
    AuditRecord,
    HealthAnswer,
    MachineList,
    MachineView,
    ReadyAnswer,
    RunStarted,
    RunSummary,
    RunView,
    StateReportAnswer,
    StateReportBatchAnswer,
    VerifyAnswer,
    WebhookDeregistered,
    WebhookRegistered,
    WorkflowDefinition,
)

if TYPE_CHECKING:
    from opscore.config import Settings

M = TypeVar("M", bound=BaseModel)

Json = dict[str, Any]
Page = list[Json]
MachineViews = list[MachineView]
Order = Literal["asc", "desc"]
Format = Literal["mermaid", "svg"]

STREAM_READ_TIMEOUT = 45.0
"""Seconds without a byte before a stream counts as dropped (the server pings every 15 s)."""


class AsyncClient:
    """Ops-Core over HTTP: ``agents``, ``runs``, ``definitions``, ``audit``, ``machines``, ``webhooks``.

    >>> async with AsyncClient("http://127.0.0.1:8000", "my-key") as ops:
    ...     answer = await ops.agents.report("agent-7", "idle")
    ...     answer.state, answer.previousState, answer.changed
    ('idle', 'registered', True)

    Every answer is the pydantic model the server declares for it (``opscore.wire``); every
    error answer raises the ``opscore.errors`` class of its ``code`` with its fields
    (``IllegalTransition.allowed``); no answer at all raises :class:`ServerUnreachable`.
    Transition calls (``agents.report``, ``agents.trigger``, ``runs.pause`` ...) send an
    ``Idempotency-Key`` and retry on their own (see :class:`Retry`); nothing else retries.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry: Retry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry if retry is not None else Retry()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT, **(headers or {})},
            timeout=timeout,
            transport=transport,
        )
        self.agents = AsyncAgents(self)
        self.runs = AsyncRuns(self)
        self.definitions = AsyncDefinitions(self)
        self.audit = AsyncAudit(self)
        self.machines = AsyncMachines(self)
        self.webhooks = AsyncWebhooks(self)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **options: Any) -> AsyncClient:
        """A client for the server the settings name: ``OPSCORE_API_URL`` and ``OPSCORE_API_KEY``
        (environment, then ``.env``), as the CLI and the simulator find it."""
        base_url, api_key = settings_of(settings)
        return cls(base_url, api_key, **options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (``async with`` does it)."""
        await self._http.aclose()

    # -- sending ---------------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        transition: bool = False,
    ) -> httpx.Response:
        """One request; the answer when it is a success, else the error of its ``code`` raised.

        A ``transition`` call gets an ``Idempotency-Key`` (unless ``headers`` has one) and is
        sent again, with the same key, after a failed connection, a 503 or a 409
        ``idempotency_key_in_use``, as :attr:`retry` says.
        """
        sent = dict(headers or {})
        if transition:
            sent.setdefault("Idempotency-Key", new_idempotency_key())
        attempts = self.retry.attempts if transition else 0
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method, path, params=query, json=body, content=content, headers=sent
                )
            except RETRYABLE_ERRORS as exc:
                if attempt >= attempts:
                    raise unreachable(self.base_url, exc) from exc
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            except httpx.HTTPError as exc:
                raise unreachable(self.base_url, exc) from exc
            if attempt < attempts and should_retry(response):
                await asyncio.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                attempt += 1
                continue
            if response.status_code >= 400:
                raise error_from(response)
            return response

    async def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        response = await self.send(method, path, **kwargs)
        return parse(model, response)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise UnexpectedResponse(f"{method} {path} did not answer JSON: {response.text[:200]!r}") from exc

    async def _text(self, path: str, query: Mapping[str, Any]) -> str:
        response = await self.send("GET", path, query=query)
        return response.text

    async def _pages(self, path: str, query: Mapping[str, Any]) -> AsyncIterator[Page]:
        """Every page of a listing, following ``nextCursor`` until there is none."""
        cursor = None
        while True:
            page = await self._json("GET", path, query={**query, **params(cursor=cursor)})
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise UnexpectedResponse(f"GET {path} did not answer a page: {str(page)[:200]}")
            yield page["items"]
            cursor = page.get("nextCursor")
            if not cursor:
                return

    async def _items(self, model: type[M], path: str, query: Mapping[str, Any]) -> AsyncIterator[M]:
        async for page in self._pages(path, query):
            for item in page:
                yield validate(model, item)

    # -- routes of the service itself ------------------------------------------------------------

    @route("GET", HEALTH)
    async def health(self) -> HealthAnswer:
        """Liveness (no key needed): ``HealthAnswer(status='ok', version='0.1.0', store='sqlite')``."""
        return await self._model(HealthAnswer, "GET", HEALTH)

    @route("GET", READY)
    async def ready(self) -> ReadyAnswer:
        """Readiness, a write committed: ``ReadyAnswer(status='ready', version='0.1.0', store='sqlite')``."""
        return await self._model(ReadyAnswer, "GET", READY)

    @route("GET", OPENAPI)
    async def openapi(self) -> Json:
        """The OpenAPI document: ``{"openapi": "3.1.0", "paths": {...}, ...}``."""
        document: Json = await self._json("GET", OPENAPI)
        return document

    @route("GET", METRICS)
    async def metrics(self) -> str:
        """The Prometheus text exposition: ``'# HELP opscore_transitions_total ...'``."""
        return await self._text(METRICS, {})

    @route("GET", AUDIT_STREAM)
    def stream_audit(
        self,
        after: str | int | None = None,
        *,
        entity_type: str | None = None,
        entity_id: str | None = None,
        outcome: Literal["applied", "rejected"] | None = None,
    ) -> AsyncAuditStream:
        """The live audit stream: every record committed after ``after``, in commit order.

        >>> async for record in ops.stream_audit(entity_type="agent"):
        ...     print(record.id, record.entityId, record.event, record.dest)
        1043 agent-7 finish_task idle

        ``after=None``: only records committed from now on; ``after=0``: from the first record;
        any other position is one this stream handed out (``stream.position``). A dropped
        connection is resumed by itself (``Last-Event-ID``), without losing or repeating a record.
        """
        query = params(entityType=entity_type, entityId=entity_id, outcome=outcome)
        return AsyncAuditStream(self, None if after is None else str(after), query)


def parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise UnexpectedResponse(
            f"{response.request.method} {response.request.url.path}: the answer is not a {model.__name__}: {exc}"
        ) from exc


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UnexpectedResponse(f"an item is not a {model.__name__}: {exc}") from exc


class AsyncAgents:
    """Agents: ``client.agents``."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    @route("POST", AGENTS)
    async def register(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        version: str | None = None,
        capabilities: Iterable[str] = (),
        contact_endpoint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AgentView:
        """Register an agent, or update a known agent's metadata (its state is kept).

        >>> (await ops.agents.register("agent-7", capabilities=["summarise_text"])).state
        'registered'
        """
        body = {
            "agentId": agent_id,
            "agentName": name,
            "version": version,
            "capabilities": list(capabilities),
            "contactEndpoint": contact_endpoint,
            "metadata": dict(metadata or {}),
        }
        return await self._c._model(AgentView, "POST", AGENTS, body=body)

    @route("GET", AGENTS)
    def list(
        self, state: str | None = None, capability: str | None = None, limit: int | None = None
    ) -> AsyncIterator[AgentView]:
        """Every agent (ordered by id), walking every page; ``limit`` agents per request.

        >>> [a.agentId async for a in ops.agents.list(state="idle")]
        ['agent-7', 'agent-8']
        """
        return self._c._items(AgentView, AGENTS, params(state=state, capability=capability, limit=limit))

    @route("GET", AGENT)
    async def get(self, agent_id: str) -> AgentView:
        """One agent: ``AgentView(agentId='agent-7', state='idle', revision=3, lastSeenAt='...', ...)``."""
        return await self._c._model(AgentView, "GET", fill(AGENT, agent_id=agent_id))

    @route("POST", AGENT_STATE, transition=True)
    async def report(
        self,
        agent_id: str,
        state: str,
        details: Mapping[str, Any] | None = None,
        *,
        timestamp: datetime | str | None = None,
        if_match: int | None = None,
        idempotency_key: str | None = None,
    ) -> StateReportAnswer:
        """Report the agent's state (what AgentKit's SDK sends); ``timestamp`` defaults to now.

        >>> await ops.agents.report("agent-7", "active", {"opscore_task_id": "t-1"})
        StateReportAnswer(status='success', agentId='agent-7', state='active', previousState='idle',
                          changed=True, revision=4, auditId=1042)

        An illegal move raises :class:`~opscore.errors.IllegalTransition` (``.allowed`` lists
        the states reachable now); an out-of-order report :class:`~opscore.errors.StaleReport`.
        """
        when = timestamp.isoformat() if isinstance(timestamp, datetime) else timestamp or now_iso()
        body = {"agentId": agent_id, "timestamp": when, "state": state, "details": dict(details or {})}
        headers = {**if_match_header(if_match), **key_header(idempotency_key)}
        path = fill(AGENT_STATE, agent_id=agent_id)
        return await self._c._model(StateReportAnswer, "POST", path, body=body, headers=headers, transition=True)

    @route("POST", STATE_REPORTS)
    async def report_many(self, reports: Iterable[Mapping[str, Any]]) -> StateReportBatchAnswer:
        """Up to 1000 reports in one request, each answered in its place (never retried).

        >>> (await ops.agents.report_many([{"agentId": "a1", "state": "idle"}])).results[0].status
        200

        A report without ``timestamp`` is dated now.
        """
        stamped = [{"timestamp": now_iso(), "details": {}, **report} for report in reports]
        return await self._c._model(StateReportBatchAnswer, "POST", STATE_REPORTS, body={"reports": stamped})

    @route("GET", AGENT_STATE)
    async def state(self, agent_id: str, at: datetime | str | None = None) -> AgentStateAtView:
        """The state now, or replayed from the audit chain ``at`` a past moment.

        >>> (await ops.agents.state("agent-7", at="2026-11-23T10:00:00Z")).state
        'initializing'
        """
        moment = at.isoformat() if isinstance(at, datetime) else at
        path = fill(AGENT_STATE, agent_id=agent_id)
        return await self._c._model(AgentStateAtView, "GET", path, query=params(at=moment))

    @route("POST", AGENT_TRANSITIONS, transition=True)
    async def trigger(
        self,
        agent_id: str,
        trigger: str,
        details: Mapping[str, Any] | None = None,
        *,
        if_match: int | None = None,
        idempotency_key: str | None = None,
    ) -> StateReportAnswer:
        """Fire a trigger by name (operators).

        >>> (await ops.agents.trigger("agent-7", "recover")).state
        'idle'
        """
        body = {"trigger": trigger, "details": None if details is None else dict(details)}
        headers = {**if_match_header(if_match), **key_header(idempotency_key)}
        path = fill(AGENT_TRANSITIONS, agent_id=agent_id)
        return await self._c._model(StateReportAnswer, "POST", path, body=body, headers=headers, transition=True)

    @route("GET", AGENT_AUDIT)
    def audit(
        self,
        agent_id: str,
        *,
        outcome: Literal["applied", "rejected"] | None = None,
        since: str | None = None,
        until: str | None = None,
        order: Order = "asc",
        limit: int | None = None,
    ) -> AsyncIterator[AuditRecord]:
        """The agent's audit records in ``seq`` order (``order="desc"``: newest first), every page.

        >>> [(r.seq, r.event, r.outcome) async for r in ops.agents.audit("agent-7")]
        [(1, 'ready', 'applied'), (2, 'begin_task', 'applied'), (3, None, 'rejected')]
        """
        query = params(outcome=outcome, since=since, until=until, order=order, limit=limit)
        return self._c._items(AuditRecord, fill(AGENT_AUDIT, agent_id=agent_id), query)

    @route("GET", AGENT_DIAGRAM)
    async def diagram(
        self, agent_id: str, *, format: Format = "mermaid", last: int | None = None, at: str | None = None
    ) -> str:
        """The agent machine with this agent highlighted: Mermaid text (or SVG).

        >>> print(await ops.agents.diagram("agent-7", last=2))
        stateDiagram-v2 ...
        """
        query = params(format=format, last=last, at=at)
        return await self._c._text(fill(AGENT_DIAGRAM, agent_id=agent_id), query)


class AsyncRuns:
    """Workflow runs: ``client.runs``."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    @route("POST", AGENT_WORKFLOW)
    async def start(
        self,
        agent_id: str,
        definition_id: str | None = None,
        *,
        version: str | None = None,
        definition: Mapping[str, Any] | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> RunStarted:
        """Start a run of a stored definition (or of an inline ``definition``), on behalf of an agent.

        >>> await ops.runs.start("agent-7", "summarise-and-review", payload={"document": "..."})
        RunStarted(sessionId='6f1c...', workflowId='summarise-and-review', version='1.0', state='running')
        """
        body: Json = {"initialPayload": dict(payload or {})}
        if definition_id is not None:
            body["workflowDefinitionId"] = definition_id
        if version is not None:
            body["version"] = version
        if definition is not None:
            body["workflowDefinition"] = dict(definition)
        return await self._c._model(RunStarted, "POST", fill(AGENT_WORKFLOW, agent_id=agent_id), body=body)

    @route("GET", RUNS)
    def list(
        self,
        state: str | None = None,
        *,
        workflow_id: str | None = None,
        agent_id: str | None = None,
        order: Order = "desc",
        limit: int | None = None,
    ) -> AsyncIterator[RunSummary]:
        """Every run, newest first (``order="asc"``: oldest first), walking every page.

        >>> [(r.sessionId, r.state) async for r in ops.runs.list(state="running")]
        [('6f1c...', 'running')]
        """
        query = params(state=state, workflowId=workflow_id, agentId=agent_id, order=order, limit=limit)
        return self._c._items(RunSummary, RUNS, query)

    @route("GET", RUN)
    async def get(self, session_id: str) -> RunView:
        """One run with its tasks: ``RunView(sessionId='6f1c...', state='running', tasks=[TaskView(...)], ...)``."""
        return await self._c._model(RunView, "GET", fill(RUN, session_id=session_id))

    @route("POST", RUN_TRANSITIONS, transition=True)
    async def transition(
        self,
        session_id: str,
        trigger: str,
        details: Mapping[str, Any] | None = None,
        *,
        if_match: int | None = None,
        idempotency_key: str | None = None,
    ) -> RunView:
        """``pause``, ``resume``, ``cancel`` or ``retry`` a run; the run as it is afterwards.

        >>> (await ops.runs.transition("6f1c...", "pause")).state
        'paused'
        """
        body = {"trigger": trigger, "details": None if details is None else dict(details)}
        headers = {**if_match_header(if_match), **key_header(idempotency_key)}
        path = fill(RUN_TRANSITIONS, session_id=session_id)
        return await self._c._model(RunView, "POST", path, body=body, headers=headers, transition=True)

    async def pause(self, session_id: str, details: Mapping[str, Any] | None = None) -> RunView:
        """``transition(session_id, "pause")``."""
        return await self.transition(session_id, "pause", details)

    async def resume(self, session_id: str, details: Mapping[str, Any] | None = None) -> RunView:
        """``transition(session_id, "resume")``."""
        return await self.transition(session_id, "resume", details)

    async def cancel(self, session_id: str, details: Mapping[str, Any] | None = None) -> RunView:
        """``transition(session_id, "cancel")``."""
        return await self.transition(session_id, "cancel", details)

    async def retry(self, session_id: str, details: Mapping[str, Any] | None = None) -> RunView:
        """``transition(session_id, "retry")`` (a failed run runs again)."""
        return await self.transition(session_id, "retry", details)

    @route("GET", RUN_AUDIT)
    def audit(
        self,
        session_id: str,
        *,
        outcome: Literal["applied", "rejected"] | None = None,
        since: str | None = None,
        until: str | None = None,
        order: Order = "asc",
        limit: int | None = None,
    ) -> AsyncIterator[AuditRecord]:
        """The run's and its tasks' audit records, in ``id`` order, every page.

        >>> [(r.entityType, r.event) async for r in ops.runs.audit("6f1c...")]
        [('workflow', 'start'), ('task', 'dispatch'), ...]
        """
        query = params(outcome=outcome, since=since, until=until, order=order, limit=limit)
        return self._c._items(AuditRecord, fill(RUN_AUDIT, session_id=session_id), query)

    @route("GET", RUN_DIAGRAM)
    async def diagram(
        self,
        session_id: str,
        *,
        format: Format = "mermaid",
        last: int | None = None,
        at: str | None = None,
        view: Literal["lifecycle", "tasks"] = "lifecycle",
    ) -> str:
        """The run on the workflow machine, or (``view="tasks"``) its task graph: Mermaid or SVG text.

        >>> print(await ops.runs.diagram("6f1c...", view="tasks"))
        flowchart LR ...
        """
        query = params(format=format, last=last, at=at, view=view)
        return await self._c._text(fill(RUN_DIAGRAM, session_id=session_id), query)

    @route("GET", TASK_DIAGRAM)
    async def task_diagram(
        self,
        session_id: str,
        task_id: str,
        *,
        format: Format = "mermaid",
        last: int | None = None,
        at: str | None = None,
    ) -> str:
        """One task of a run on the task machine: Mermaid or SVG text.

        >>> print(await ops.runs.task_diagram("6f1c...", "summarise"))
        stateDiagram-v2 ...
        """
        query = params(format=format, last=last, at=at)
        return await self._c._text(fill(TASK_DIAGRAM, session_id=session_id, task_id=task_id), query)


class AsyncDefinitions:
    """Workflow definitions: ``client.definitions``."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    @route("POST", DEFINITIONS)
    async def upload(self, definition: Mapping[str, Any] | str | bytes) -> WorkflowDefinition:
        """Publish a definition: a mapping, or JSON or YAML text as written in a file.

        >>> (await ops.definitions.upload(open("two_step.yaml").read())).id
        'summarise-and-review'

        Every problem at once in :class:`~opscore.errors.InvalidDefinition` ``.problems``; the
        same id and version with another body: :class:`~opscore.errors.Conflict`.
        """
        if isinstance(definition, Mapping):
            return await self._c._model(WorkflowDefinition, "POST", DEFINITIONS, body=dict(definition))
        raw = definition.encode("utf-8") if isinstance(definition, str) else definition
        kind = "application/json" if raw.lstrip().startswith(b"{") else "application/yaml"
        headers = {"Content-Type": kind}
        return await self._c._model(WorkflowDefinition, "POST", DEFINITIONS, content=raw, headers=headers)

    @route("GET", DEFINITIONS)
    def list(self, limit: int | None = None) -> AsyncIterator[WorkflowDefinition]:
        """Every stored definition, oldest first, walking every page.

        >>> [(d.id, d.version) async for d in ops.definitions.list()]
        [('summarise-and-review', '1.0')]
        """
        return self._c._items(WorkflowDefinition, DEFINITIONS, params(limit=limit))

    @route("GET", DEFINITION)
    async def get(self, definition_id: str, version: str | None = None) -> WorkflowDefinition:
        """One definition (the version stored last, unless ``version``).

        >>> (await ops.definitions.get("summarise-and-review")).tasks[0].taskId
        'summarise'
        """
        path = fill(DEFINITION, definition_id=definition_id)
        return await self._c._model(WorkflowDefinition, "GET", path, query=params(version=version))


class AsyncAudit:
    """The audit log: ``client.audit`` (the live stream is ``client.stream_audit``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    @route("GET", AUDIT)
    def list(
        self,
        *,
        entity_type: str | None = None,
        outcome: Literal["applied", "rejected"] | None = None,
        since: str | None = None,
        until: str | None = None,
        order: Order = "asc",
        limit: int | None = None,
    ) -> AsyncIterator[AuditRecord]:
        """Every record of every entity in ``id`` order, walking every page.

        >>> [(r.id, r.entityId, r.event) async for r in ops.audit.list(entity_type="agent", outcome="rejected")]
        [(17, 'agent-7', None)]
        """
        return self._c._items(AuditRecord, AUDIT, audit_query(entity_type, outcome, since, until, order, limit))

    def records(
        self,
        *,
        entity_type: str | None = None,
        outcome: Literal["applied", "rejected"] | None = None,
        since: str | None = None,
        until: str | None = None,
        order: Order = "asc",
        limit: int | None = None,
    ) -> AsyncIterator[Page]:
        """The pages of :meth:`list` as the server sent them, plain dicts, for exports.

        A record must be written exactly as it was hashed for offline verification to hold,
        fields a newer server added included: no model in between.
        """
        return self._c._pages(AUDIT, audit_query(entity_type, outcome, since, until, order, limit))

    @route("GET", AUDIT_VERIFY)
    async def verify(self) -> VerifyAnswer:
        """Recompute every hash chain on the server.

        >>> await ops.audit.verify()
        VerifyAnswer(ok=True, entities=12, records=1042, problems=[])
        """
        return await self._c._model(VerifyAnswer, "GET", AUDIT_VERIFY)

    @route("GET", AUDIT_CHECKPOINTS)
    def checkpoints(self, *, limit: int | None = None) -> AsyncIterator[Page]:
        """The signed checkpoint lines, oldest first, a page at a time, as plain dicts (as signed).

        Check them offline with the public key (``opscore.checkpoints.read_checkpoints``):
        ``[{"v": 1, "n": 1, "position": "42", "full": True, "heads": {...}, "sig": "..."}, ...]``
        """
        return self._c._pages(AUDIT_CHECKPOINTS, params(limit=limit))

    @route("GET", AUDIT_HEADS)
    def heads(self, *, limit: int | None = None) -> AsyncIterator[Page]:
        """Every entity's chain head, state and revision, a page at a time (an export's trailer).

        ``[{"entityType": "agent", "entityId": "agent-7", "seq": 12, "hash": "...", "state": "idle",
        "revision": 9}, ...]``
        """
        return self._c._pages(AUDIT_HEADS, params(limit=limit))


def audit_query(
    entity_type: str | None, outcome: str | None, since: str | None, until: str | None, order: str, limit: int | None
) -> Json:
    return params(entityType=entity_type, outcome=outcome, since=since, until=until, order=order, limit=limit)


class AsyncMachines:
    """The machine declarations: ``client.machines``."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    @route("GET", MACHINES)
    async def list(self) -> MachineViews:
        """Every declaration: ``[MachineView(name='agent', initial='registered', ...), ...]``."""
        return (await self._c._model(MachineList, "GET", MACHINES)).items

    @route("GET", MACHINE)
    async def get(self, name: str) -> MachineView:
        """One declaration: states, terminal states and one transition per (trigger, source).

        >>> (await ops.machines.get("agent")).initial
        'registered'
        """
        return await self._c._model(MachineView, "GET", fill(MACHINE, name=name))

    @route("GET", MACHINE_DIAGRAM)
    async def diagram(self, name: str, *, format: Format = "mermaid") -> str:
        """The machine drawn as Mermaid text (or SVG).

        >>> print(await ops.machines.diagram("agent"))
        stateDiagram-v2 ...
        """
        return await self._c._text(fill(MACHINE_DIAGRAM, name=name), params(format=format))


class AsyncWebhooks:
    """AgentKit's registration webhook, signed as AgentKit signs it (for stand-ins and tests)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    @route("POST", WEBHOOK)
    async def notify(
        self, event_type: Literal["REGISTER", "DEREGISTER"], agent_details: Mapping[str, Any], *, secret: str
    ) -> WebhookRegistered | WebhookDeregistered:
        """Send a REGISTER or DEREGISTER event signed with ``secret`` (``OPSCORE_WEBHOOK_SECRET``).

        >>> (await ops.webhooks.notify("REGISTER", {"agentId": "agent-7"}, secret=s)).created
        True
        """
        content, headers = signed_webhook(event_type, agent_details, secret)
        response = await self._c.send("POST", WEBHOOK, content=content, headers=headers)
        if event_type == "REGISTER":
            return parse(WebhookRegistered, response)
        return parse(WebhookDeregistered, response)


def key_header(idempotency_key: str | None) -> dict[str, str]:
    return {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}


class AsyncAuditStream:
    """The live audit stream (DESIGN §10): iterate it for records; it reconnects by itself.

    ``position`` is where it is (opaque; give it as ``after`` to resume in another process).
    ``open()`` (or ``async with``) connects at once, so that records committed from then on
    are received even before iterating starts.
    """

    def __init__(self, client: AsyncClient, after: str | None, query: Json) -> None:
        self.position = after
        self._client = client
        self._query = query
        self._response: httpx.Response | None = None
        self._decoder = EventDecoder(after)

    async def __aenter__(self) -> AsyncAuditStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[AuditRecord]:
        return self._records()

    async def open(self) -> None:
        """Connect now, unless connected (a 4xx answer raises its error)."""
        if self._response is None:
            self._response = await self._connect()

    async def aclose(self) -> None:
        """Close the connection (iterating again reconnects from :attr:`position`)."""
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()

    async def _connect(self) -> httpx.Response:
        client, retry = self._client, self._client.retry
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if self.position is not None:
                headers["Last-Event-ID"] = self.position
            request = client._http.build_request(
                "GET",
                AUDIT_STREAM,
                params=self._query,
                headers=headers,
                timeout=httpx.Timeout(client.timeout, read=STREAM_READ_TIMEOUT),
            )
            try:
                response = await client._http.send(request, stream=True)
            except RETRYABLE_ERRORS as exc:
                if failures >= retry.attempts:
                    raise unreachable(client.base_url, exc) from exc
                await asyncio.sleep(retry.delay(failures))
                failures += 1
                continue
            except httpx.HTTPError as exc:
                raise unreachable(client.base_url, exc) from exc
            if response.status_code < 400:
                return response
            await response.aread()
            await response.aclose()
            if response.status_code == 503 and failures < retry.attempts:
                await asyncio.sleep(retry.delay(failures, response.headers.get("retry-after")))
                failures += 1
                continue
            raise error_from(response)

    async def _records(self) -> AsyncIterator[AuditRecord]:
        try:
            while True:
                await self.open()
                response = self._response
                assert response is not None
                try:
                    async for line in response.aiter_lines():
                        event = self._decoder.feed(line)
                        self.position = self._decoder.last_id
                        if event is not None and event.event == "audit":
                            yield parse_record(event.data)
                except RETRYABLE_ERRORS:
                    pass  # dropped: resumed below from the last position
                await self.aclose()
                self._decoder.reset()
                wait = self._decoder.retry_ms
                await asyncio.sleep(0.1 if wait is None else wait / 1000)
        finally:
            await self.aclose()


def parse_record(data: str) -> AuditRecord:
    try:
        return AuditRecord.model_validate_json(data)
    except ValidationError as exc:
        raise UnexpectedResponse(f"an audit stream event is not a record: {exc}") from exc
