"""``opscore``: the command line. Serve, simulate, and talk to a running server through ``opscore.client``.

Commands (``opscore COMMAND --help`` for each; docs/cli.md is generated from that help)::

    opscore serve | simulate                                      run Ops-Core / a stand-in AgentKit
    opscore agents list | show | report | trigger | register      agents            (client)
    opscore runs list | show | start | pause | resume | cancel | retry   runs       (client)
    opscore definitions upload | list | show                      workflow definitions (client)
    opscore audit list | tail [-f]                                the audit log     (client)
    opscore audit export | verify                                 the database, a file, or --server
    opscore diagram                                               machines, agents and runs drawn
    opscore keys create | signing-key                             keys for OPSCORE_KEYS_FILE

Every default comes from the one ``Settings`` (environment, then ``.env``, then defaults),
built once per command and only by commands that need it: the CLI, the server and the
simulator read the same configuration, and ``opscore --help`` starts without reading it.
Client commands print for people (aligned tables, states coloured on a terminal) and, with
``--json``, for programs. A failure is one line on stderr and an exit status: 1 the server
refused or found nothing (its ``detail``), 2 a usage or configuration error, 3 Ops-Core could
not be reached or was unavailable. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import click

from opscore import __version__
from opscore import terminal as term

if TYPE_CHECKING:
    from opscore import audit
    from opscore.checkpoints import Checkpoints
    from opscore.client import Client
    from opscore.config import Settings
    from opscore.errors import OpsCoreError
    from opscore.wire import AgentView, AuditRecord, RunView, StateReportAnswer, WorkflowDefinition

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
Order = Literal["asc", "desc"]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class Failure(Exception):
    """A one-line error and the exit status of the command (see the module docstring)."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def show(self) -> None:
        click.echo(f"opscore: {self.message}", err=True)


def describe(exc: OpsCoreError) -> str:
    """An API error in one line: its code, the server's detail, and the fields that help."""
    from opscore.errors import IllegalTransition, Invalid, InvalidDefinition, UnknownState, UnknownTrigger

    text = f"{exc.code}: {exc.detail}"

    def add(label: str, values: list[Any]) -> str:
        listed = ", ".join(str(v) for v in values)
        return "" if not values or listed in exc.detail else f" ({label}: {listed})"

    if isinstance(exc, IllegalTransition):
        triggers = exc.extra.get("allowedTriggers")
        if isinstance(triggers, list):
            text += add("triggers allowed now", triggers)
        else:
            text += add("allowed now", exc.allowed)
    elif isinstance(exc, (UnknownState, UnknownTrigger)):
        text += add("valid", exc.valid)
    elif isinstance(exc, InvalidDefinition):
        text += add("problems", exc.problems)
    elif isinstance(exc, Invalid):
        text += add("problems", [f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.errors])
    request_id = exc.extra.get("requestId")
    if isinstance(request_id, str):
        text += f" [request id {request_id}]"
    return " ".join(text.split())


def failure_of(exc: OpsCoreError) -> Failure:
    from opscore.errors import Unavailable

    return Failure(describe(exc), EXIT_UNREACHABLE if isinstance(exc, Unavailable) else EXIT_REFUSED)


# -- the command's one Settings, and its client -------------------------------------------------


@dataclass
class State:
    """What every command of one invocation shares: the settings (read once, when needed), the URL."""

    url: str | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from pydantic import ValidationError

            from opscore.config import Settings

            try:
                self._settings = Settings()
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise Failure(f"configuration (environment or .env): {problems}", EXIT_USAGE) from exc
        return self._settings

    @property
    def base_url(self) -> str:
        return (self.url or self.settings.opscore_url).rstrip("/")

    @contextmanager
    def client(self) -> Iterator[Client]:
        """A client for ``OPSCORE_API_URL`` with the first ``OPSCORE_API_KEY``; API errors become one line."""
        from opscore.client import Client
        from opscore.config import first_secret
        from opscore.errors import OpsCoreError

        key = first_secret(self.settings.api_key)
        if not key:
            raise Failure(
                "OPSCORE_API_KEY is not set (environment or .env): client commands send it as their bearer key",
                EXIT_USAGE,
            )
        try:
            with Client(self.base_url, key) as client:
                yield client
        except OpsCoreError as exc:
            raise failure_of(exc) from exc


pass_state = click.make_pass_decorator(State, ensure=True)


def settings() -> Settings:
    """The one ``Settings`` of this command (environment, then ``.env``, then defaults)."""
    from opscore.config import Settings

    return Settings()


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON for programs instead of text")(fn)


def json_object(text: str | None, what: str) -> dict[str, Any] | None:
    """A JSON object given on the command line (``--details '{"k": 1}'``); a usage error otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=what) from exc
    if not isinstance(value, dict):
        raise click.BadParameter('must be a JSON object such as \'{"key": "value"}\'', param_hint=what)
    return value


# -- the group ----------------------------------------------------------------------------------

HELP = """Ops-Core: explicit state machines and a hash-chained audit log for fleets of AI agents.

Client commands talk to the server at OPSCORE_API_URL (else http://OPSCORE_HOST:OPSCORE_PORT)
with OPSCORE_API_KEY, read from the environment, then .env. Exit status: 0 done, 1 refused or
not found (the server's detail on stderr), 2 usage or configuration error, 3 Ops-Core
unreachable or unavailable."""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="opscore", message="%(prog)s %(version)s")
@click.option("--url", metavar="URL", help="Ops-Core's URL for client commands (default: OPSCORE_API_URL)")
@click.pass_context
def cli(ctx: click.Context, url: str | None) -> None:
    ctx.obj = State(url=url)


# -- serve and simulate (unchanged behaviour; see tests/test_cli_serve.py) -----------------------


def ensure_env(env_file: Path = Path(".env")) -> dict[str, str]:
    """Create what a first ``make run`` needs in ``.env``: an API key and a webhook secret.

    Only what is not configured yet (in the environment or ``.env``) is generated; the new
    values are appended to ``.env`` (mode 600) and put in this process's environment. Returns
    the generated ``{variable: value}``.
    """
    conf = settings()
    wanted = {
        "OPSCORE_API_KEY": conf.api_key,
        "OPSCORE_WEBHOOK_SECRET": conf.webhook_secret,
    }
    generated = {name: secrets.token_urlsafe(32) for name, value in wanted.items() if not value.strip()}
    if not generated:
        return {}
    existing = env_file.read_text() if env_file.exists() else ""
    with env_file.open("a") as fh:
        if existing and not existing.endswith("\n"):
            fh.write("\n")
        for name, value in generated.items():
            fh.write(f"{name}={value}\n")
    env_file.chmod(0o600)
    os.environ.update(generated)
    return generated


def banner(conf: Settings, generated: dict[str, str], env_file: Path = Path(".env")) -> str:
    """What ``opscore serve`` prints on stderr at start: where it is and commands that work when pasted.

    The commands read the key from the shell (``"$OPSCORE_API_KEY"``, double quotes), loaded
    from ``.env`` by the line above them, so the same banner works on every start; the key
    itself is printed only on the start that generated it.
    """
    from opscore.config import connectable, first_secret, url_host

    base = f"http://{url_host(connectable(conf.host))}:{conf.port}"
    lines = [f"Ops-Core on {base}  (API docs: {base}/docs; logs: JSON lines on stdout)"]
    if "OPSCORE_API_KEY" in generated:
        lines.append(f"Generated an API key and saved it in {env_file} (shown once): {generated['OPSCORE_API_KEY']}")
    if "OPSCORE_WEBHOOK_SECRET" in generated:
        lines.append(f"Generated a webhook secret (OPSCORE_WEBHOOK_SECRET) for AgentKit and saved it in {env_file}")
    keys = [p.strip() for p in conf.api_key.split(",") if p.strip()]
    if len(keys) == 1 and first_secret(keys[0]) == keys[0]:
        auth = '"Authorization: Bearer $OPSCORE_API_KEY"'
        load = "set -a; . ./.env; set +a" if env_file.exists() else "export OPSCORE_API_KEY=<your key>"
    else:  # several keys or a named one: the variable is not itself a bearer token
        auth = '"Authorization: Bearer $KEY"'
        load = "KEY=<the secret of one of your OPSCORE_API_KEY keys>"
    report = '\'{"agentId":"agent-1","timestamp":"\'"$(date -u +%Y-%m-%dT%H:%M:%SZ)"\'","state":"idle","details":{}}\''
    lines += [
        "Try it from another shell in this directory:",
        f"  {load}",
        f"  curl -s -w '\\n' {base}/health",
        f"  curl -s -w '\\n' -X POST {base}/v1/opscore/agent/agent-1/state -H {auth} "
        f"-H 'Content-Type: application/json' -d {report}",
        f"  curl -s -w '\\n' {base}/v1/opscore/agent/agent-1 -H {auth}",
        "",
    ]
    return "\n".join(lines)


@cli.command()
@click.option("--host", default=None, help="listen address (default: OPSCORE_HOST, 127.0.0.1)")
@click.option("--port", type=int, default=None, help="listen port (default: OPSCORE_PORT, 8000)")
@click.option(
    "--generate-key",
    is_flag=True,
    help="create an API key and a webhook secret in .env when none is set (what `make run` does)",
)
def serve(host: str | None, port: int | None, generate_key: bool) -> int:
    """Run the HTTP service (JSON log lines on stdout, a banner on stderr)."""
    from opscore import logs
    from opscore.api import create_app, server
    from opscore.config import InvalidApiKeys

    generated = ensure_env() if generate_key else {}
    conf = settings()
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        conf = conf.model_copy(update=overrides)
    if not conf.api_key.strip() and not conf.keys_file.strip():
        print("OPSCORE_API_KEY is not set. Set it, or run `opscore serve --generate-key`.", file=sys.stderr)
        return 2
    try:
        conf.api_keys  # noqa: B018 - refuse bad keys here, with the message, before anything starts
    except InvalidApiKeys as exc:
        print(f"opscore serve: {exc}", file=sys.stderr)
        return 2
    # stdout carries JSON log lines only; the banner is for the person at the terminal
    if generate_key or sys.stderr.isatty():
        print(banner(conf, generated), file=sys.stderr, flush=True)
    logs.configure(conf.log_level)
    logging.captureWarnings(True)  # Python warnings become JSON lines too, not stderr text
    try:
        return server.run(create_app(conf), conf)
    except SystemExit as exc:  # uvicorn exits on a failed start-up (port in use, lifespan error)
        return exc.code if isinstance(exc.code, int) else server.STARTUP_FAILURE
    finally:
        logs.shutdown()


def simulator_config(args: Any, conf: Settings) -> tuple[str, int, Any]:
    """(host, port, SimConfig) of ``opscore simulate``: each option, else the one ``Settings``.

    The simulator stands in for AgentKit, so by default it listens where Ops-Core's
    ``AGENTKIT_API_URL`` points and calls Ops-Core where the server's own settings say it is
    (``OPSCORE_API_URL``, else ``OPSCORE_HOST``:``OPSCORE_PORT``), with the same key and webhook
    secret, all read from the same environment and ``.env``. ``args`` holds the options
    (:func:`parse` gives them for a command line).
    """
    from opscore.config import first_secret
    from opscore.simulator import SimConfig

    listen_host, listen_port = conf.agentkit_listen
    capabilities = args.capabilities if args.capabilities is not None else conf.simulator_capabilities
    config = SimConfig(
        opscore_url=args.opscore_url or conf.opscore_url,
        api_key=first_secret(conf.api_key),
        webhook_secret=conf.webhook_secret,
        agents=args.agents if args.agents is not None else conf.simulator_agents,
        prefix=args.prefix,
        capabilities=[c.strip() for c in capabilities.split(",") if c.strip()],
        latency=args.latency if args.latency is not None else conf.simulator_latency,
        failure_rate=args.failure_rate if args.failure_rate is not None else conf.simulator_failure_rate,
        heartbeat=args.heartbeat,
        echo_task_id=args.echo_task_id,
        seed=args.seed,
    )
    host = args.host if args.host is not None else listen_host
    port = args.port if args.port is not None else listen_port
    return host, port, config


@cli.command(
    epilog="Defaults come from the same settings as the server (environment, then .env): it listens where "
    "AGENTKIT_API_URL points and calls Ops-Core at OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT, "
    "with OPSCORE_API_KEY and OPSCORE_WEBHOOK_SECRET."
)
@click.option("--host", default=None, help="listen address (default: the host of AGENTKIT_API_URL)")
@click.option("--port", type=int, default=None, help="listen port (default: the port of AGENTKIT_API_URL)")
@click.option(
    "--opscore-url",
    default=None,
    help="Ops-Core's URL (default: OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT); "
    "several replicas comma separated (reports go to each in turn)",
)
@click.option("--agents", type=int, default=None, help="simulated agents (default: SIMULATOR_AGENTS, 3)")
@click.option("--prefix", default="sim-agent", show_default=True, help="simulated agents are <prefix>-0, <prefix>-1")
@click.option(
    "--capabilities", default=None, help="comma-separated capabilities of every agent (default: SIMULATOR_CAPABILITIES)"
)
@click.option("--latency", type=float, default=None, help="seconds per task (default: SIMULATOR_LATENCY, 0.2)")
@click.option(
    "--failure-rate", type=float, default=None, help="share of failed tasks (default: SIMULATOR_FAILURE_RATE)"
)
@click.option("--heartbeat", type=float, default=30.0, show_default=True, help="seconds between idle heartbeats")
@click.option("--echo-task-id", is_flag=True, help="put opscore_task_id in report details")
@click.option("--seed", type=int, default=None, help="random seed (failures, latencies)")
def simulate(**options: Any) -> int:
    """A stand-in AgentKit playing N simulated agents against Ops-Core."""
    import uvicorn

    from opscore import logs
    from opscore.api import server
    from opscore.simulator import create_app

    conf = settings()
    host, port, config = simulator_config(argparse.Namespace(**options), conf)
    if not config.api_key:
        print("the simulator needs OPSCORE_API_KEY (the same as Ops-Core's; .env is read)", file=sys.stderr)
        return 2
    logs.configure(conf.log_level)
    logging.getLogger("opscore.simulator").info(
        "simulating AgentKit",
        extra={
            "listen": f"http://{host}:{port}",
            "opscoreUrl": config.opscore_url,
            "agents": config.agents,
            "registration": "webhook"
            if config.webhook_secret
            else "POST /v1/opscore/agents (no OPSCORE_WEBHOOK_SECRET)",
        },
    )
    uv_config = uvicorn.Config(create_app(config), host=host, port=port, log_config=None, access_log=False)
    try:
        server.Server(uv_config).run()
    finally:
        logs.shutdown()
    return 0


# -- agents -------------------------------------------------------------------------------------


@cli.group()
def agents() -> None:
    """Agents: list, show, report a state, fire a trigger, register (client)."""


def agent_fields(agent: AgentView) -> None:
    term.fields(
        [
            ("agent", agent.agentId),
            ("state", agent.state),
            ("revision", agent.revision),
            ("name", agent.agentName),
            ("version", agent.version),
            ("capabilities", ", ".join(agent.capabilities) or None),
            ("endpoint", agent.contactEndpoint),
            ("metadata", json.dumps(agent.metadata) if agent.metadata else None),
            ("last seen", agent.lastSeenAt),
            ("last report", agent.lastReportAt),
            ("registered", agent.registeredAt),
            ("updated", agent.updatedAt),
        ]
    )


def moved(answer: StateReportAnswer) -> None:
    """A transition's answer in one line."""
    colour = term.colour_enabled()
    if answer.changed:
        audit_id = "" if answer.auditId is None else f", audit record {answer.auditId}"
        click.echo(
            f"{answer.agentId}: {term.state(answer.previousState, colour)} -> {term.state(answer.state, colour)}"
            f"  (revision {answer.revision}{audit_id})"
        )
    else:
        click.echo(f"{answer.agentId}: {term.state(answer.state, colour)}  (unchanged: a heartbeat)")


@agents.command("list")
@click.option("--state", "state_name", metavar="STATE", help="only agents in this state")
@click.option("--capability", help="only agents with this capability")
@json_option
@pass_state
def agents_list(state: State, state_name: str | None, capability: str | None, as_json: bool) -> None:
    """Every agent (every page), ordered by id.

    --json prints {"items": [agent, ...]}, every page walked.
    """
    with state.client() as client:
        items = list(client.agents.list(state=state_name, capability=capability, limit=1000))
    if as_json:
        term.emit_json({"items": items})
        return
    columns = [
        term.Column("AGENT"),
        term.Column("STATE", coloured=True),
        term.Column("REV", right=True),
        term.Column("LAST SEEN"),
        term.Column("CAPABILITIES"),
    ]
    rows = [(a.agentId, a.state, a.revision, a.lastSeenAt, ", ".join(a.capabilities)) for a in items]
    term.table(columns, rows, empty="no agents")


@agents.command("show")
@click.argument("agent_id")
@click.option("--at", metavar="ISO", help="the state at this moment instead, replayed from the audit chain")
@json_option
@pass_state
def agents_show(state: State, agent_id: str, at: str | None, as_json: bool) -> None:
    """One agent: state, revision, metadata, last seen."""
    with state.client() as client:
        if at is not None:
            snapshot = client.agents.state(agent_id, at=at)
            if as_json:
                term.emit_json(snapshot)
                return
            term.fields(
                [
                    ("agent", snapshot.agentId),
                    ("at", snapshot.at),
                    ("state", snapshot.state),
                    ("since", snapshot.since),
                    ("previous state", snapshot.previousState),
                    ("revision", snapshot.revision),
                    ("seq", snapshot.seq),
                ]
            )
            return
        agent = client.agents.get(agent_id)
    if as_json:
        term.emit_json(agent)
    else:
        agent_fields(agent)


@agents.command("report")
@click.argument("agent_id")
@click.argument("state_name", metavar="STATE")
@click.option("--details", metavar="JSON", help="a JSON object sent as the report's details")
@click.option("--timestamp", metavar="ISO", help="when the agent was in this state (default: now)")
@click.option("--if-match", type=int, metavar="REVISION", help="apply only at this revision (else 412)")
@json_option
@pass_state
def agents_report(
    state: State,
    agent_id: str,
    state_name: str,
    details: str | None,
    timestamp: str | None,
    if_match: int | None,
    as_json: bool,
) -> None:
    """Report an agent's state, as AgentKit's SDK does.

    An agent never seen before is registered on the spot. Exit 1 with the states allowed now
    when the move is illegal.
    """
    body = json_object(details, "--details")
    with state.client() as client:
        answer = client.agents.report(agent_id, state_name, body, timestamp=timestamp, if_match=if_match)
    if as_json:
        term.emit_json(answer)
    else:
        moved(answer)


@agents.command("trigger")
@click.argument("agent_id")
@click.argument("trigger")
@click.option("--details", metavar="JSON", help="a JSON object recorded with the transition")
@click.option("--if-match", type=int, metavar="REVISION", help="apply only at this revision (else 412)")
@json_option
@pass_state
def agents_trigger(
    state: State, agent_id: str, trigger: str, details: str | None, if_match: int | None, as_json: bool
) -> None:
    """Fire a trigger by name (recover, restart, go_offline, deregister, ...)."""
    body = json_object(details, "--details")
    with state.client() as client:
        answer = client.agents.trigger(agent_id, trigger, body, if_match=if_match)
    if as_json:
        term.emit_json(answer)
    else:
        moved(answer)


@agents.command("register")
@click.argument("agent_id")
@click.option("--name", help="the agent's name")
@click.option("--agent-version", "version", metavar="VERSION", help="the agent's version")
@click.option("--capability", "capabilities", multiple=True, help="a capability (repeat for several)")
@click.option("--endpoint", help="the agent's contact endpoint (URL)")
@click.option("--metadata", metavar="JSON", help="a JSON object of metadata")
@json_option
@pass_state
def agents_register(
    state: State,
    agent_id: str,
    name: str | None,
    version: str | None,
    capabilities: tuple[str, ...],
    endpoint: str | None,
    metadata: str | None,
    as_json: bool,
) -> None:
    """Register an agent, or update a known agent's metadata (its state is kept)."""
    meta = json_object(metadata, "--metadata")
    with state.client() as client:
        agent = client.agents.register(
            agent_id, name=name, version=version, capabilities=capabilities, contact_endpoint=endpoint, metadata=meta
        )
    if as_json:
        term.emit_json(agent)
    else:
        agent_fields(agent)


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


# -- audit --------------------------------------------------------------------------------------


@cli.group("audit")
def audit_group() -> None:
    """The audit log: list, tail [-f], export, verify.

    list and tail ask the server; export and verify read the database (OPSCORE_DATABASE_URL,
    read-only), a file, or with --server the server.
    """


AUDIT_COLUMNS = [
    term.Column("ID", right=True),
    term.Column("RECORDED"),
    term.Column("ENTITY"),
    term.Column("SEQ", right=True),
    term.Column("EVENT"),
    term.Column("FROM"),
    term.Column("TO"),
    term.Column("OUTCOME", coloured=True),
    term.Column("ACTOR"),
]


def audit_row(r: AuditRecord) -> tuple[Any, ...]:
    outcome = r.outcome if r.reason is None else f"{r.outcome} ({r.reason})"
    return (r.id, r.recordedAt, f"{r.entityType} {r.entityId}", r.seq, r.event, r.source, r.dest, outcome, r.actor)


def audit_line(r: AuditRecord) -> str:
    """One record in one line, for ``audit tail``."""
    colour = term.colour_enabled()
    outcome = term.state(r.outcome, colour) + ("" if r.reason is None else f" ({r.reason})")
    move = f"{r.source or '-'} -> {r.dest or '-'}"
    return (
        f"{r.recordedAt}  #{r.id}  {r.entityType} {r.entityId} seq {r.seq}  {r.event or '-'}  {move}  {outcome}"
        f"  {r.actor}"
    )


def entity_options(fn: F) -> F:
    """``--agent`` / ``--run`` / ``--entity-type`` and ``--outcome``: which records."""
    for option in reversed(
        [
            click.option("--agent", metavar="ID", help="only this agent's records"),
            click.option("--run", metavar="SESSION_ID", help="only this run's records (the run and its tasks)"),
            click.option("--entity-type", type=click.Choice(["agent", "workflow", "task"]), help="only these"),
            click.option("--outcome", type=click.Choice(["applied", "rejected"]), help="only applied or rejected"),
        ]
    ):
        fn = option(fn)
    return fn


@audit_group.command("list")
@entity_options
@click.option("--since", metavar="ISO", help="records recorded at or after this time")
@click.option("--until", metavar="ISO", help="records recorded at or before this time")
@click.option("--newest-first", is_flag=True, help="newest first (default: oldest first)")
@click.option("--limit", type=click.IntRange(min=1), help="at most this many records (default: every record)")
@json_option
@pass_state
def audit_list(
    state: State,
    agent: str | None,
    run: str | None,
    entity_type: str | None,
    outcome: Any,
    since: str | None,
    until: str | None,
    newest_first: bool,
    limit: int | None,
    as_json: bool,
) -> None:
    """Audit records (every page), oldest first.

    --json prints {"items": [record, ...]}.
    """
    if agent is not None and run is not None:
        raise click.UsageError("give at most one of --agent and --run")
    order: Order = "desc" if newest_first else "asc"
    page = min(limit or 1000, 1000)
    with state.client() as client:
        if agent is not None:
            records = client.agents.audit(agent, outcome=outcome, since=since, until=until, order=order, limit=page)
        elif run is not None:
            records = client.runs.audit(run, outcome=outcome, since=since, until=until, order=order, limit=page)
        else:
            records = client.audit.list(
                entity_type=entity_type, outcome=outcome, since=since, until=until, order=order, limit=page
            )
        items = list(islice(records, limit))
    if as_json:
        term.emit_json({"items": items})
    else:
        term.table(AUDIT_COLUMNS, [audit_row(r) for r in items], empty="no records")


@audit_group.command("tail")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=10, show_default=True, help="last records")
@click.option("-f", "--follow", is_flag=True, help="then print each new record as it is committed (Ctrl+C stops)")
@click.option("--agent", metavar="ID", help="only this agent's records")
@click.option("--entity-type", type=click.Choice(["agent", "workflow", "task"]), help="only these")
@click.option("--outcome", type=click.Choice(["applied", "rejected"]), help="only applied or rejected")
@json_option
@pass_state
def audit_tail(
    state: State, count: int, follow: bool, agent: str | None, entity_type: str | None, outcome: Any, as_json: bool
) -> None:
    """The last records, one a line; -f follows the live stream.

    --json prints one JSON record a line (JSON Lines). Ctrl+C ends -f.
    """
    show = term.emit_json_line if as_json else (lambda r: click.echo(audit_line(r)))
    if agent is not None:
        entity_type = "agent"
    with state.client() as client:
        stream = client.stream_audit(entity_type=entity_type, entity_id=agent, outcome=outcome) if follow else None
        if stream is not None:
            stream.open()  # first, so that nothing committed while the last records are read is lost
        try:
            shown: set[int] = set()
            if count:
                if agent is not None:
                    latest = client.agents.audit(agent, outcome=outcome, order="desc", limit=min(count, 1000))
                else:
                    latest = client.audit.list(entity_type=entity_type, outcome=outcome, order="desc", limit=count)
                for record in reversed(list(islice(latest, count))):
                    show(record)
                    shown.add(record.id)
            sys.stdout.flush()
            if stream is None:
                return
            for record in stream:
                if record.id not in shown:  # committed after the stream opened, and listed too
                    show(record)
                    sys.stdout.flush()
        finally:
            if stream is not None:
                stream.close()


def sqlite_missing(conf: Settings) -> str | None:
    """The path of a SQLite database that does not exist (a read-only command cannot create it)."""
    if not conf.database_url.startswith("sqlite:"):
        return None
    from opscore.storage.sqlite import path_from_url

    path = path_from_url(conf.database_url)
    return None if path == ":memory:" or Path(path).exists() else path


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, imported when a command needs the database (not for ``--help``)."""
    import asyncio

    return asyncio.run(coro)


def redact(url: str) -> str:
    """A database URL without its password (error messages never show a secret)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def _open_store(conf: Settings) -> Any:
    from opscore.errors import OpsCoreError
    from opscore.storage import open_store

    missing = sqlite_missing(conf)
    if missing is not None:
        raise Failure(
            f"no database at {missing}: run this in the folder holding opscore.db, set OPSCORE_DATABASE_URL, "
            "or add --server to ask a running Ops-Core (audit verify --file checks an export offline)",
            EXIT_USAGE,
        )
    # the driver's own warnings would print as stray lines: the one-line error below says it
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    logging.getLogger("psycopg").propagate = False
    store = open_store(
        conf.database_url,
        readonly=True,
        pool_min=conf.pg_pool_min,
        pool_max=conf.pg_pool_max,
        pool_timeout=conf.pg_pool_timeout,
        pooler=conf.pg_pooler,
    )
    try:
        await store.open()
    except OpsCoreError as exc:
        raise Failure(f"cannot open the database {redact(conf.database_url)}: {exc.detail}", EXIT_UNREACHABLE) from exc
    except Exception as exc:  # a driver's error: one line, never a traceback
        raise Failure(f"cannot open the database {redact(conf.database_url)}: {exc}", EXIT_UNREACHABLE) from exc
    return store


async def _verify_db(conf: Settings, signed: Checkpoints | None = None) -> audit.Verification:
    from opscore import checkpoints

    store = await _open_store(conf)
    try:
        with term.progress("verifying the database"):
            result: audit.Verification = await checkpoints.verify_database(store, signed)
        return result
    finally:
        await store.close()


async def _export_db(conf: Settings, out: IO[str]) -> int:
    """The database's records up to the heads read first, then the trailer (opscore.checkpoints.export_database)."""
    from opscore import checkpoints

    store = await _open_store(conf)
    try:
        with term.progress("exporting") as bar:

            def write(line: str) -> None:
                out.write(line)
                bar.advance(1)

            count, _ = await checkpoints.export_database(store, write)
    finally:
        await store.close()
    return count


def export_server(state: State, out: IO[str]) -> int:
    """Every record through the API, written exactly as served (so it verifies offline), then the heads.

    The heads are read first (``GET /audit/heads``) and each chain is written up to its head,
    so the file is consistent while the server keeps writing (:func:`opscore.audit.export_records`).
    """
    from opscore import audit as audit_log

    count = 0
    with state.client() as client, term.progress("exporting") as bar:
        heads: dict[tuple[str, str], audit_log.Head] = {}
        for page in client.audit.heads():
            for h in page:
                heads[(h["entityType"], h["entityId"])] = audit_log.Head(
                    h["entityType"], h["entityId"], h["seq"], h["hash"], h["state"], h["revision"]
                )
        for page in client.audit.records(limit=1000):
            for line in audit_log.export_records(page, heads):
                out.write(line + "\n")
                count += 1
            bar.advance(len(page))
        for line in audit_log.export_trailer(heads, count):
            out.write(line + "\n")
    return count


@contextmanager
def output(path: str) -> Iterator[IO[str]]:
    """``-`` is standard output; anything else a file, written whole or not at all."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as fh:
            yield fh
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


@audit_group.command("export")
@click.option("--out", "out", required=True, metavar="FILE", help="the JSON Lines file to write ('-': standard output)")
@click.option("--server", is_flag=True, help="read through a running Ops-Core's API instead of the database")
@json_option
@pass_state
def audit_export(state: State, out: str, server: bool, as_json: bool) -> None:
    """Write every audit record as JSON Lines, one canonical record a line, verifiable offline.

    Reads the database (OPSCORE_DATABASE_URL, read-only: safe beside a running server), or with
    --server the API of OPSCORE_API_URL. A summary goes to stdout, or to stderr when --out is '-'.
    """
    try:
        with output(out) as fh:
            count = export_server(state, fh) if server else run_async(_export_db(state.settings, fh))
    except OSError as exc:
        raise Failure(f"cannot write {out}: {exc.strerror or exc}", EXIT_USAGE) from exc
    summary = {"exported": count, "file": out}
    stream = sys.stderr if out == "-" else sys.stdout
    if as_json:
        term.emit_json(summary, stream=stream)
    else:
        click.echo(f"exported {count} records to {'standard output' if out == '-' else out}", file=stream)


def verify_file(path: str, signed: Checkpoints | None = None) -> audit.Verification:
    """An export: its records, its trailer of heads and end line, and the signed heads when given."""
    from opscore import checkpoints

    try:
        size = os.path.getsize(path)
        with open(path, encoding="utf-8") as fh, term.progress(f"verifying {path}", size, unit="bytes") as bar:

            def lines() -> Iterator[str]:
                for line in fh:
                    bar.advance(len(line.encode("utf-8")))
                    yield line

            return checkpoints.verify_export(lines(), signed)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise Failure(f"audit verify: {path}: {reason}", EXIT_REFUSED) from exc


def show_verdict(verdict: dict[str, Any], as_json: bool) -> None:
    if as_json:
        term.emit_json(verdict)
        return
    colour = term.colour_enabled()
    totals = f"{verdict['entities']} entities, {verdict['records']} records"
    if verdict["ok"]:
        click.echo(f"{term.state('ok', colour)}: every chain verified ({totals})")
        return
    problems = verdict["problems"]
    click.echo(f"{term.state('FAILED', colour)}: {len(problems)} problems in {totals}")
    for p in problems:
        seq = "" if p.get("seq") is None else f" seq {p['seq']}"
        click.echo(f"  {p.get('entityType')} {p.get('entityId')}{seq}: {p.get('problem')}")


def read_signed(path: str, public_keys: tuple[str, ...]) -> Checkpoints:
    """The checkpoint file, every line's signature and chain checked (opscore.checkpoints)."""
    from opscore import checkpoints

    try:
        return checkpoints.read_checkpoint_file(path, public_keys)
    except (OSError, ValueError) as exc:  # unreadable file, or a key that is not an Ed25519 PEM
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise Failure(f"audit verify: {reason}", EXIT_USAGE) from exc


@audit_group.command("verify")
@click.option("--file", "file", metavar="FILE", help="an exported JSON Lines file: needs no database and no server")
@click.option("--server", is_flag=True, help="ask a running Ops-Core to verify its database (GET /audit/verify)")
@click.option(
    "--checkpoints", "checkpoint_file", metavar="FILE", help="signed checkpoints (OPSCORE_CHECKPOINT_FILE) to hold to"
)
@click.option(
    "--public-key",
    "public_keys",
    metavar="PEM",
    multiple=True,
    help="public key of the checkpoints' signing key (repeat for every key that signed, e.g. across a rotation)",
)
@json_option
@pass_state
def audit_verify(
    state: State,
    file: str | None,
    server: bool,
    checkpoint_file: str | None,
    public_keys: tuple[str, ...],
    as_json: bool,
) -> None:
    """Recompute every hash chain and replay it against each entity's head, state and revision; exit 1 if wrong.

    Checks the database (OPSCORE_DATABASE_URL, read-only), an export (--file), or asks the
    server (--server). With --checkpoints FILE --public-key PEM, also every signed checkpoint:
    a record a checkpoint covers that was edited, deleted, reordered or rewritten with every
    hash recomputed, or a chain that ends before its signed head, is named (entity and seq).
    """
    if file is not None and server:
        raise click.UsageError("give at most one of --file and --server")
    if bool(checkpoint_file) != bool(public_keys):
        raise click.UsageError("--checkpoints FILE needs --public-key PEM, and the reverse")
    if server and checkpoint_file:
        raise click.UsageError("--checkpoints checks the database or an export (--file), not --server")
    signed = read_signed(checkpoint_file, public_keys) if checkpoint_file else None
    if file is not None:
        verdict = verify_file(file, signed).to_dict()
    elif server:
        with state.client() as client:
            verdict = client.audit.verify().model_dump(mode="json")
    else:
        verdict = run_async(_verify_db(state.settings, signed)).to_dict()
    show_verdict(verdict, as_json)
    if not verdict["ok"]:
        raise click.exceptions.Exit(EXIT_REFUSED)


# -- diagrams -----------------------------------------------------------------------------------


def write_diagrams(names: list[str], fmt: str, out: Path | None) -> list[Path]:
    """Render the named machines; into ``out/<name>.<ext>``, or to stdout without ``out``."""
    from opscore import diagrams
    from opscore.machines import MACHINES

    written: list[Path] = []
    texts = [(name, diagrams.render(MACHINES[name], fmt)) for name in names]
    for name, text in texts:
        if out is None:
            sys.stdout.write(text)
            continue
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{name}.{diagrams.EXTENSIONS[fmt]}"
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


@cli.command(
    epilog="Machines are drawn locally from opscore/machines.py; --agent/--workflow ask a running server "
    "(OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT; OPSCORE_API_KEY). SVG needs Graphviz's dot."
)
@click.option("--machine", metavar="NAME", help="one declared machine: agent, workflow or task")
@click.option("--all", "all_", is_flag=True, help="every declared machine")
@click.option("--agent", metavar="ID", help="an agent on a running server: highlighted, with its path")
@click.option("--workflow", metavar="SESSION_ID", help="a workflow run on a running server")
@click.option("--view", type=click.Choice(["lifecycle", "tasks"]), default="lifecycle", show_default=True,
              help="(--workflow) the run on the workflow machine, or its task graph")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["mermaid", "svg"]), default="mermaid", show_default=True)
@click.option("--out", metavar="DIR", help="write <name>.mmd / <name>.svg into DIR instead of stdout")
@click.option("--last", type=int, default=10, show_default=True, help="(--agent/--workflow) transitions to number")
@click.option("--at", metavar="ISO", help="(--agent/--workflow) draw it as it was at this ISO-8601 time")
@pass_state
def diagram(
    state: State,
    machine: str | None,
    all_: bool,
    agent: str | None,
    workflow: str | None,
    view: str,
    fmt: str,
    out: str | None,
    last: int,
    at: str | None,
) -> int:
    """Draw a machine, an agent or a run (Mermaid or SVG).

    Machines are drawn from their declarations; an agent or a run (its position and recent
    path, or with --view tasks its task graph) is asked of the server.
    """
    from opscore import diagrams
    from opscore.errors import OpsCoreError
    from opscore.machines import MACHINES

    chosen = [x for x in (machine, all_ or None, agent, workflow) if x is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --machine NAME, --all, --agent ID and --workflow SESSION_ID")
    target_dir = Path(out) if out else None
    if agent is not None or workflow is not None:
        with state.client() as client:
            if agent is not None:
                text = client.agents.diagram(agent, format=fmt, last=last, at=at)  # type: ignore[arg-type]
                stem = f"agent-{agent}"
            else:
                assert workflow is not None
                if view == "tasks":
                    text = client.runs.diagram(workflow, format=fmt, view="tasks")  # type: ignore[arg-type]
                    stem = f"workflow-{workflow}-tasks"
                else:
                    text = client.runs.diagram(workflow, format=fmt, last=last, at=at)  # type: ignore[arg-type]
                    stem = f"workflow-{workflow}"
        if target_dir is None:
            sys.stdout.write(text)
        else:
            target_dir.mkdir(parents=True, exist_ok=True)
            target = target_dir / f"{stem}.{diagrams.EXTENSIONS[fmt]}"
            target.write_text(text, encoding="utf-8")
            click.echo(target)
        return 0
    names = list(MACHINES) if all_ else [str(machine)]
    if machine is not None and machine not in MACHINES:
        click.echo(f"no machine called {machine!r}; machines: {', '.join(MACHINES)}", err=True)
        return 2
    if target_dir is None and fmt == "svg" and len(names) > 1:
        click.echo("--all --format svg writes one file per machine: add --out DIR", err=True)
        return 2
    try:
        written = write_diagrams(names, fmt, target_dir)
    except OpsCoreError as exc:
        click.echo(exc.detail, err=True)
        return 2
    for target in written:
        click.echo(target)
    return 0


# -- keys ---------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Keys for OPSCORE_KEYS_FILE: a new secret and the entry to add."""


@keys.command("create")
@click.option("--name", required=True, help="the key's name (audit records show key:<name>)")
@click.option(
    "--scope",
    "scopes",
    required=True,
    multiple=True,
    type=click.Choice(["report", "read", "operate", "admin"]),
    help="a scope (repeat for several)",
)
@click.option("--agents", "agents_globs", multiple=True, metavar="GLOB", help="(report) only agent ids matching")
@json_option
def keys_create(name: str, scopes: tuple[str, ...], agents_globs: tuple[str, ...], as_json: bool) -> None:
    """Make a new key: print its secret once, and the entry to add to OPSCORE_KEYS_FILE (its hash only)."""
    from opscore.keys import InvalidApiKeys, new_key

    try:
        secret, entry = new_key(name, scopes, agents_globs)
    except InvalidApiKeys as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc
    if as_json:
        term.emit_json({"secret": secret, "entry": entry})
        return
    click.echo("Secret (shown once; its user sends it as Authorization: Bearer <secret>):")
    click.echo(f"  {secret}")
    click.echo("Add this entry to the list in OPSCORE_KEYS_FILE (JSON or YAML), then restart Ops-Core:")
    click.echo(f"  {json.dumps(entry)}")


@keys.command("signing-key")
@click.option("--out", "out", required=True, metavar="FILE", help="the private key's file (the public key: FILE.pub)")
@json_option
def keys_signing_key(out: str, as_json: bool) -> None:
    """Make an Ed25519 key for OPSCORE_SIGNING_KEY (mode 600) and its public key beside it; never overwrites."""
    from opscore.checkpoints import make_signing_key

    try:
        private, public, key_id = make_signing_key(out)
    except OSError as exc:  # FileExistsError included
        raise Failure(f"keys signing-key: {exc} (never overwritten: move it away first)", EXIT_REFUSED) from exc
    if as_json:
        term.emit_json({"privateKey": str(private), "publicKey": str(public), "keyId": key_id})
        return
    click.echo(f"Private key: {private} (mode 600; key id {key_id})")
    click.echo(f"Public key:  {public}")
    click.echo(f"Set OPSCORE_SIGNING_KEY={private} on every replica and restart; keep {public} with whoever")
    click.echo("verifies, out of the database's reach: opscore audit verify --checkpoints FILE --public-key PEM")


# -- entry point --------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    """The options a command line (``["simulate", "--port", "9"]``, command names first) gives its
    command, as attributes, defaults included; tests and tools read them."""
    command: click.Command = cli
    words = list(argv)
    name = "opscore"
    while isinstance(command, click.Group):
        if not words or words[0] not in command.commands:
            raise click.UsageError(f"no command {' '.join(argv)!r}")
        name = words.pop(0)
        command = command.commands[name]
    return argparse.Namespace(**command.make_context(name, words).params)


def main(argv: list[str] | None = None) -> int:
    """Run one command line; its exit status. Usage errors exit with status 2 (``SystemExit``)."""
    from opscore.errors import OpsCoreError

    try:
        result = cli.main(args=argv, prog_name="opscore", standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from exc
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):  # Ctrl+C (how `audit tail -f` ends): no traceback
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Failure as exc:
        exc.show()
        return exc.exit_code
    except OpsCoreError as exc:
        failure = failure_of(exc)
        failure.show()
        return failure.exit_code
    return result if isinstance(result, int) else 0
