"""Diagrams: every declared machine, and one agent's or workflow run's position and recent path.

Parse, ask (the store through ``history``, then the pure ``diagrams``), answer text. Mermaid is
drawn in the request; SVG runs Graphviz's ``dot`` in a worker thread so the event loop never
waits on it. Without ``dot``, SVG answers 501 ``renderer_missing`` saying what to install.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from opscore import diagrams, history
from opscore.api.deps import EngineDep, Reads, ReadsAgent, parse_moment
from opscore.api.openapi import errors
from opscore.api.schemas import AgentIdPath, SessionIdPath, TaskIdPath
from opscore.engine import Engine
from opscore.errors import Invalid, UnknownMachine
from opscore.machines import MACHINES
from opscore.workflows.runs import Runs
from opscore.workflows.state import TASK, WORKFLOW, task_entity_id

router = APIRouter(prefix="/v1/opscore", tags=["diagrams"])

Format = Annotated[
    Literal["mermaid", "svg"],
    Query(description="`mermaid` (text, needs nothing installed) or `svg` (needs Graphviz's `dot` on the server)"),
]
Last = Annotated[
    int,
    Query(
        ge=0,
        le=diagrams.MAX_LAST,
        description="how many of the latest applied transitions to draw, numbered #1 (oldest) to #n; 0 = none",
    ),
]
At = Annotated[
    str | None,
    Query(description="draw it as it was at this ISO-8601 time, as its audit chain says; default: now"),
]
View = Annotated[
    Literal["lifecycle", "tasks"],
    Query(
        description="`lifecycle` (default): the run on the workflow machine; `tasks`: the run's definition as a "
        "graph of its tasks, each labelled and coloured by its state (and attempt), `nextTaskId` edges solid, "
        "`fallbackTaskId` edges dashed, the run's current task outlined (takes no `at` or `last`)"
    ),
]

DIAGRAM_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the diagram",
        "content": {
            "text/vnd.mermaid": {"schema": {"type": "string"}},
            "image/svg+xml": {"schema": {"type": "string"}},
        },
    }
}


async def draw(fmt: str, decl: dict[str, Any], **kwargs: Any) -> Response:
    if fmt == "svg":
        text = await asyncio.to_thread(diagrams.svg, decl, **kwargs)
    else:
        text = diagrams.mermaid(decl, **kwargs)
    return Response(content=text, media_type=diagrams.MEDIA_TYPES[fmt])


async def draw_entity(
    engine: Engine, entity_type: str, entity_id: str, fmt: str, last: int, at: str | None, label: str
) -> Response:
    """One entity on its machine: highlighted where it is (or was at ``at``), its path numbered."""
    moment = parse_moment(at)
    entity = await engine.get(entity_type, entity_id)
    fsm = engine.fsm(entity_type)
    if moment is None:
        snap = await history.now(engine.store, entity, last)
        subject = f"{label} {entity_id}"
    else:
        snap = await history.at(engine.store, entity, fsm.initial, moment, last)
        subject = f"{label} {entity_id} at {moment}"
    path = diagrams.path_steps(snap.path, last)
    return await draw(fmt, MACHINES[entity_type], current=snap.state, path=path, subject=subject)


@router.get(
    "/machines/{name}/diagram",
    summary="Diagram of one declared machine",
    response_class=Response,
    responses={**DIAGRAM_CONTENT, **errors(404, 501)},
)
async def machine_diagram(name: str, caller: Reads, format: Format = "mermaid") -> Response:
    """Mermaid `stateDiagram-v2` text or SVG, drawn from the declaration the engine runs."""
    if name not in MACHINES:
        raise UnknownMachine(f"no machine called {name!r}; machines: {', '.join(MACHINES)}", valid=list(MACHINES))
    return await draw(format, MACHINES[name])


@router.get(
    "/agent/{agent_id}/diagram",
    summary="An agent on the agent machine: where it is and how it got there",
    response_class=Response,
    responses={**DIAGRAM_CONTENT, **errors(404, 501, 503)},
)
async def agent_diagram(
    agent_id: AgentIdPath,
    engine: EngineDep,
    caller: ReadsAgent,
    format: Format = "mermaid",
    last: Last = diagrams.DEFAULT_LAST,
    at: At = None,
) -> Response:
    """The agent machine with the agent's state highlighted and its last `last` applied transitions
    numbered; `at` draws it as it was then (404 `not_yet_created` before the agent existed)."""
    return await draw_entity(engine, "agent", agent_id, format, last, at, "agent")


@router.get(
    "/workflows/{session_id}/diagram",
    summary="A workflow run: on the workflow machine, or as its task graph",
    response_class=Response,
    responses={**DIAGRAM_CONTENT, **errors(404, 501, 503)},
)
async def workflow_diagram(
    session_id: SessionIdPath,
    engine: EngineDep,
    request: Request,
    caller: Reads,
    format: Format = "mermaid",
    last: Last = diagrams.DEFAULT_LAST,
    at: At = None,
    view: View = "lifecycle",
) -> Response:
    """The run (`workflow` entity `sessionId`) highlighted, with its recent path; 404 `unknown_workflow`.

    `view=tasks` draws the run's definition instead: one node per task with its state and
    attempt, coloured by state, `nextTaskId` edges solid and `fallbackTaskId` edges dashed
    (Mermaid `flowchart`, or SVG). 422 when `at` is given with it (task graphs are drawn as now).
    """
    if view == "lifecycle":
        return await draw_entity(engine, "workflow", session_id, format, last, at, "workflow run")
    if at is not None:
        raise Invalid("view=tasks draws the run as it is now; leave out at")
    run = await engine.get(WORKFLOW, session_id)
    runs: Runs = request.app.state.runs
    definition = await runs.definition(str(run.data.get("workflowId")), str(run.data.get("workflowVersion")))
    order = list(definition.tasks)
    tasks = await engine.store.get_many(TASK, [task_entity_id(session_id, task_id) for task_id in order])
    nodes = [
        diagrams.TaskNode(
            task_id=task_id,
            name=spec.name,
            state="pending" if task is None else task.state,
            attempt=0 if task is None else int(task.data.get("attempt") or 0),
            next_task_id=spec.next_task_id,
            fallback_task_id=spec.fallback_task_id,
        )
        for task_id, spec, task in zip(order, definition.tasks.values(), tasks, strict=True)
    ]
    title = (
        f"workflow run {session_id}: {definition.definition_id} v{definition.version} ({run.state}), "
        "next solid, fallback dashed"
    )
    current = run.data.get("currentTaskId")
    kwargs: dict[str, Any] = {"start": definition.start, "current": current, "title": title}
    if format == "svg":
        text = await asyncio.to_thread(diagrams.task_graph, nodes, "svg", **kwargs)
    else:
        text = diagrams.task_graph(nodes, "mermaid", **kwargs)
    return Response(content=text, media_type=diagrams.MEDIA_TYPES[format])


@router.get(
    "/workflows/{session_id}/tasks/{task_id}/diagram",
    summary="One task of a workflow run on the task machine",
    response_class=Response,
    responses={**DIAGRAM_CONTENT, **errors(404, 501, 503)},
)
async def task_diagram(
    session_id: SessionIdPath,
    task_id: TaskIdPath,
    engine: EngineDep,
    caller: Reads,
    format: Format = "mermaid",
    last: Last = diagrams.DEFAULT_LAST,
    at: At = None,
) -> Response:
    """The task (`task` entity `<sessionId>:<taskId>`) highlighted, with its recent path; 404 `unknown_task`."""
    return await draw_entity(engine, "task", f"{session_id}:{task_id}", format, last, at, "task")
