"""``opscore runs`` and ``opscore definitions``: workflow runs and the definitions they start from."""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING, Any

import click

from opscore import terminal as term

if TYPE_CHECKING:
    from opscore.wire import RunView, WorkflowDefinition
from opscore.cli.base import Order, State, cli, json_object, json_option, pass_state

# -- runs ---------------------------------------------------------------------------------------


@cli.group()
def runs() -> None:
    """Workflow runs: list, show, start, pause, resume, cancel, retry (client)."""


def run_fields(run: RunView) -> None:
    term.fields(
        [
            ("run", run.sessionId),
            ("workflow", f"{run.workflowId} v{run.workflowVersion}" if run.workflowId else None),
            ("state", run.state),
            ("revision", run.revision),
            ("started by", run.agentId),
            ("current task", run.currentTaskId),
            ("path", " -> ".join(run.path) or None),
            ("reason", run.reason),
            ("created", run.createdAt),
            ("updated", run.updatedAt),
        ]
    )
    click.echo()
    term.table(
        [
            term.Column("TASK"),
            term.Column("STATE", coloured=True),
            term.Column("ATTEMPT", right=True),
            term.Column("AGENT"),
            term.Column("RESULT / ERROR"),
        ],
        [
            (
                t.taskId,
                t.state,
                t.attempt,
                t.agentId,
                short(t.error if t.error is not None else t.result),
            )
            for t in run.tasks
        ],
        empty="no tasks",
    )


def short(value: Any, width: int = 60) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


@runs.command("list")
@click.option("--state", "state_name", metavar="STATE", help="only runs in this state")
@click.option("--workflow", metavar="ID", help="only runs of this definition")
@click.option("--agent", metavar="ID", help="only runs started by this agent")
@click.option("--oldest-first", is_flag=True, help="oldest first (default: newest first)")
@json_option
@pass_state
def runs_list(
    state: State, state_name: str | None, workflow: str | None, agent: str | None, oldest_first: bool, as_json: bool
) -> None:
    """Every run (every page), newest first."""
    order: Order = "asc" if oldest_first else "desc"
    with state.client() as client:
        items = list(client.runs.list(state_name, workflow_id=workflow, agent_id=agent, order=order, limit=1000))
    if as_json:
        term.emit_json({"items": items})
        return
    term.table(
        [
            term.Column("RUN"),
            term.Column("WORKFLOW"),
            term.Column("STATE", coloured=True),
            term.Column("CURRENT TASK"),
            term.Column("AGENT"),
            term.Column("CREATED"),
        ],
        [
            (r.sessionId, f"{r.workflowId} v{r.workflowVersion}", r.state, r.currentTaskId, r.agentId, r.createdAt)
            for r in items
        ],
        empty="no runs",
    )


@runs.command("show")
@click.argument("session_id")
@json_option
@pass_state
def runs_show(state: State, session_id: str, as_json: bool) -> None:
    """One run: its state, its tasks, their attempts and results."""
    with state.client() as client:
        run = client.runs.get(session_id)
    if as_json:
        term.emit_json(run)
    else:
        run_fields(run)


@runs.command("start")
@click.argument("agent_id")
@click.option("--definition", "definition_id", metavar="ID", help="a stored workflow definition")
@click.option("--version", "version", metavar="VERSION", help="its version (default: the one stored last)")
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    help="a definition in JSON or YAML ('-': standard input), uploaded, then started",
)
@click.option("--payload", metavar="JSON", help="the run's initial payload (a JSON object)")
@json_option
@pass_state
def runs_start(
    state: State,
    agent_id: str,
    definition_id: str | None,
    version: str | None,
    file: IO[bytes] | None,
    payload: str | None,
    as_json: bool,
) -> None:
    """Start a run of a workflow on behalf of AGENT_ID (give --definition or --file)."""
    if (definition_id is None) == (file is None):
        raise click.UsageError("give one of --definition ID and --file FILE")
    initial = json_object(payload, "--payload")
    with state.client() as client:
        if file is not None:
            stored = client.definitions.upload(file.read())
            definition_id, version = str(stored.id), str(stored.version)
        started = client.runs.start(agent_id, definition_id, version=version, payload=initial)
    if as_json:
        term.emit_json(started)
    else:
        shown = term.state(started.state, term.colour_enabled())
        click.echo(f"run {started.sessionId} of {started.workflowId} v{started.version}: {shown}")


def run_transition(trigger: str, summary: str) -> click.Command:
    @click.argument("session_id")
    @click.option("--details", metavar="JSON", help="a JSON object recorded with the transition")
    @click.option("--if-match", type=int, metavar="REVISION", help="apply only at this revision (else 412)")
    @json_option
    @pass_state
    def command(state: State, session_id: str, details: str | None, if_match: int | None, as_json: bool) -> None:
        body = json_object(details, "--details")
        with state.client() as client:
            run = client.runs.transition(session_id, trigger, body, if_match=if_match)
        if as_json:
            term.emit_json(run)
        else:
            click.echo(f"run {run.sessionId}: {term.state(run.state, term.colour_enabled())}")

    command.__doc__ = summary
    return runs.command(trigger)(command)


run_transition("pause", "Pause a running run (its current task finishes; nothing new is dispatched).")
run_transition("resume", "Resume a paused run.")
run_transition("cancel", "Cancel a run.")
run_transition("retry", "Run a failed run again from its failed task.")


# -- definitions --------------------------------------------------------------------------------


@cli.group()
def definitions() -> None:
    """Workflow definitions: upload, list, show (client)."""


def definition_fields(definition: WorkflowDefinition) -> None:
    term.fields(
        [
            ("definition", definition.id),
            ("version", definition.version),
            ("name", definition.name),
            ("description", definition.description),
        ]
    )
    click.echo()
    term.table(
        [
            term.Column("TASK"),
            term.Column("CAPABILITY / AGENT"),
            term.Column("NEXT"),
            term.Column("FALLBACK"),
            term.Column("RETRIES", right=True),
            term.Column("TIMEOUT", right=True),
        ],
        [
            (
                t.taskId,
                t.agentCapability or (f"agent {t.agentId}" if t.agentId else None),
                t.nextTaskId,
                t.fallbackTaskId,
                t.maxRetries,
                f"{t.timeoutSeconds:g}s",
            )
            for t in definition.tasks
        ],
    )


@definitions.command("upload")
@click.argument("file", type=click.File("rb"))
@json_option
@pass_state
def definitions_upload(state: State, file: IO[bytes], as_json: bool) -> None:
    """Publish a definition from a JSON or YAML FILE ('-': standard input)."""
    with state.client() as client:
        stored = client.definitions.upload(file.read())
    if as_json:
        term.emit_json(stored)
    else:
        click.echo(f"stored {stored.id} v{stored.version} ({len(stored.tasks)} tasks)")


@definitions.command("list")
@json_option
@pass_state
def definitions_list(state: State, as_json: bool) -> None:
    """Every stored definition (every page), oldest first."""
    with state.client() as client:
        items = list(client.definitions.list(limit=1000))
    if as_json:
        term.emit_json({"items": items})
        return
    term.table(
        [term.Column("DEFINITION"), term.Column("VERSION"), term.Column("TASKS", right=True), term.Column("NAME")],
        [(d.id, d.version, len(d.tasks), d.name) for d in items],
        empty="no definitions",
    )


@definitions.command("show")
@click.argument("definition_id")
@click.option("--version", "version", metavar="VERSION", help="this version (default: the one stored last)")
@json_option
@pass_state
def definitions_show(state: State, definition_id: str, version: str | None, as_json: bool) -> None:
    """One definition and its tasks."""
    with state.client() as client:
        definition = client.definitions.get(definition_id, version)
    if as_json:
        term.emit_json(definition)
    else:
        definition_fields(definition)
