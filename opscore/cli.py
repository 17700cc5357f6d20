"""``opscore``: serve, verify and export the audit log, and talk to a running server.

Every default comes from the one ``Settings`` (environment, then ``.env``, then defaults),
built once per command: the CLI, the server and the simulator read the same configuration.

opscore serve [--host H] [--port P] [--generate-key]
opscore diagram (--machine NAME | --all) [--format mermaid|svg] [--out DIR]
opscore diagram --agent ID [--last N] [--at ISO] [--format ...] [--out DIR]   (client)
opscore audit verify [--file FILE.jsonl] [--checkpoints FILE --public-key PEM ...]
opscore audit export --out FILE.jsonl
opscore keys signing-key --out FILE
opscore agents [--state S]            (client: OPSCORE_API_URL, OPSCORE_API_KEY)
opscore agent ID
opscore report ID STATE
opscore simulate [--port P] [--agents N] [--latency S] [--failure-rate F]   (stand-in AgentKit)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opscore import audit

if TYPE_CHECKING:
    from opscore.config import Settings


def settings() -> Settings:
    """The one ``Settings`` of this command (environment, then ``.env``, then defaults)."""
    from opscore.config import Settings

    return Settings()


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


def cmd_serve(args: argparse.Namespace) -> int:
    from opscore import logs
    from opscore.api import create_app, server
    from opscore.config import InvalidApiKeys

    generated = ensure_env() if args.generate_key else {}
    conf = settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
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
    if args.generate_key or sys.stderr.isatty():
        print(banner(conf, generated), file=sys.stderr, flush=True)
    logs.configure(conf.log_level)
    logging.captureWarnings(True)  # Python warnings become JSON lines too, not stderr text
    try:
        return server.run(create_app(conf), conf)
    except SystemExit as exc:  # uvicorn exits on a failed start-up (port in use, lifespan error)
        return exc.code if isinstance(exc.code, int) else server.STARTUP_FAILURE
    finally:
        logs.shutdown()


async def _verify_db(signed: Any = None) -> audit.Verification:
    from opscore import checkpoints
    from opscore.storage import open_store

    conf = settings()
    store = open_store(
        conf.database_url,
        readonly=True,
        pool_min=conf.pg_pool_min,
        pool_max=conf.pg_pool_max,
        pool_timeout=conf.pg_pool_timeout,
    )
    await store.open()
    try:
        return await checkpoints.verify_database(store, signed)
    finally:
        await store.close()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """The database, or an export (``--file``); with ``--checkpoints`` and ``--public-key``, against signed heads."""
    from opscore import checkpoints

    signed = None
    if args.checkpoints or args.public_key:
        if not (args.checkpoints and args.public_key):
            print("opscore audit verify: --checkpoints FILE needs --public-key PEM (and the reverse)", file=sys.stderr)
            return 2
        try:
            signed = checkpoints.read_checkpoint_file(args.checkpoints, args.public_key)
        except (OSError, ValueError) as exc:  # unreadable file or key (InvalidSigningKey is a ValueError)
            print(f"opscore audit verify: {exc}", file=sys.stderr)
            return 2
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                result = checkpoints.verify_export(fh, signed)
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8
            print(f"opscore audit verify: {args.file}: {exc}", file=sys.stderr)
            return 1
    else:
        result = asyncio.run(_verify_db(signed))
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


async def _export(out: Path) -> int:
    from opscore import checkpoints
    from opscore.storage import open_store

    conf = settings()
    store = open_store(
        conf.database_url,
        readonly=True,
        pool_min=conf.pg_pool_min,
        pool_max=conf.pg_pool_max,
        pool_timeout=conf.pg_pool_timeout,
    )
    await store.open()
    try:
        with out.open("w", encoding="utf-8") as fh:
            count, _ = await checkpoints.export_database(store, fh.write)
    finally:
        await store.close()
    return count


def cmd_audit_export(args: argparse.Namespace) -> int:
    count = asyncio.run(_export(Path(args.out)))
    print(json.dumps({"exported": count, "file": args.out}))
    return 0


def cmd_keys_signing_key(args: argparse.Namespace) -> int:
    from opscore import checkpoints

    try:
        private, public, key_id = checkpoints.make_signing_key(args.out)
    except (FileExistsError, OSError) as exc:
        print(f"opscore keys signing-key: {exc} (never overwritten: move it away first)", file=sys.stderr)
        return 1
    print(json.dumps({"privateKey": str(private), "publicKey": str(public), "keyId": key_id}))
    print(
        f"Set OPSCORE_SIGNING_KEY={private} on every replica; keep {public} where the database's writers cannot "
        "reach it, for `opscore audit verify --checkpoints FILE --public-key PEM`.",
        file=sys.stderr,
    )
    return 0


def _client() -> Any:
    """An HTTP client for Ops-Core at ``Settings.opscore_url`` with the first configured key."""
    import httpx

    from opscore.config import first_secret

    conf = settings()
    key = first_secret(conf.api_key)
    return httpx.Client(base_url=conf.opscore_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _show(response: Any) -> int:
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.status_code < 400 else 1


def cmd_agents(args: argparse.Namespace) -> int:
    with _client() as client:
        params = {"state": args.state} if args.state else {}
        return _show(client.get("/v1/opscore/agents", params=params))


def cmd_agent(args: argparse.Namespace) -> int:
    with _client() as client:
        return _show(client.get(f"/v1/opscore/agent/{args.agent_id}"))


def cmd_report(args: argparse.Namespace) -> int:
    body = {"agentId": args.agent_id, "timestamp": datetime.now(UTC).isoformat(), "state": args.state, "details": {}}
    with _client() as client:
        return _show(client.post(f"/v1/opscore/agent/{args.agent_id}/state", json=body))


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


def _fetch_diagram(args: argparse.Namespace) -> tuple[int, str, str]:
    """(status, text, file stem) of an agent's or workflow run's diagram from a running server."""
    from urllib.parse import quote

    params: dict[str, Any] = {"format": args.format, "last": args.last}
    if args.at:
        params["at"] = args.at
    if args.agent is not None:
        path, stem = f"/v1/opscore/agent/{quote(args.agent, safe='')}/diagram", f"agent-{args.agent}"
    else:
        path, stem = f"/v1/opscore/workflows/{quote(args.workflow, safe='')}/diagram", f"workflow-{args.workflow}"
    with _client() as client:
        response = client.get(path, params=params)
    return response.status_code, response.text, stem


def cmd_diagram(args: argparse.Namespace) -> int:
    from opscore import diagrams
    from opscore.errors import OpsCoreError
    from opscore.machines import MACHINES

    out = Path(args.out) if args.out else None
    if args.agent is not None or args.workflow is not None:
        import httpx

        try:
            status, text, stem = _fetch_diagram(args)
        except httpx.HTTPError as exc:
            print(f"cannot reach Ops-Core at {settings().opscore_url}: {exc}", file=sys.stderr)
            return 2
        if status >= 400:
            print(text, file=sys.stderr)
            return 1
        if out is None:
            sys.stdout.write(text)
        else:
            out.mkdir(parents=True, exist_ok=True)
            target = out / f"{stem}.{diagrams.EXTENSIONS[args.format]}"
            target.write_text(text, encoding="utf-8")
            print(target)
        return 0
    names = list(MACHINES) if args.all else [args.machine]
    if args.machine is not None and args.machine not in MACHINES:
        print(f"no machine called {args.machine!r}; machines: {', '.join(MACHINES)}", file=sys.stderr)
        return 2
    if out is None and args.format == "svg" and len(names) > 1:
        print("--all --format svg writes one file per machine: add --out DIR", file=sys.stderr)
        return 2
    try:
        written = write_diagrams(names, args.format, out)
    except OpsCoreError as exc:
        print(exc.detail, file=sys.stderr)
        return 2
    for target in written:
        print(target)
    return 0


def simulator_config(args: argparse.Namespace, conf: Settings) -> tuple[str, int, Any]:
    """(host, port, SimConfig) of ``opscore simulate``: each option, else the one ``Settings``.

    The simulator stands in for AgentKit, so by default it listens where Ops-Core's
    ``AGENTKIT_API_URL`` points and calls Ops-Core where the server's own settings say it is
    (``OPSCORE_API_URL``, else ``OPSCORE_HOST``:``OPSCORE_PORT``), with the same key and webhook
    secret, all read from the same environment and ``.env``.
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


def cmd_simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from opscore import logs
    from opscore.api import server
    from opscore.simulator import create_app

    conf = settings()
    host, port, config = simulator_config(args, conf)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opscore", description="Ops-Core: state machines and audit for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None, help="listen address (default: OPSCORE_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default: OPSCORE_PORT, 8000)")
    serve.add_argument(
        "--generate-key",
        action="store_true",
        help="create an API key and a webhook secret in .env when none is set (what `make run` does)",
    )
    serve.set_defaults(func=cmd_serve)

    diagram = sub.add_parser(
        "diagram",
        help="draw machines (Mermaid or SVG), or an agent's/workflow run's position and path (client)",
        description="Machines are drawn locally from opscore/machines.py; --agent/--workflow ask a running "
        "server (OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT; OPSCORE_API_KEY). SVG needs Graphviz's dot.",
    )
    which = diagram.add_mutually_exclusive_group(required=True)
    which.add_argument("--machine", help="one declared machine: agent, workflow or task")
    which.add_argument("--all", action="store_true", help="every declared machine")
    which.add_argument("--agent", metavar="ID", help="an agent on a running server: highlighted, with its path")
    which.add_argument("--workflow", metavar="SESSION_ID", help="a workflow run on a running server")
    diagram.add_argument("--format", choices=["mermaid", "svg"], default="mermaid")
    diagram.add_argument("--out", metavar="DIR", help="write <name>.mmd / <name>.svg into DIR instead of stdout")
    diagram.add_argument("--last", type=int, default=10, help="(--agent/--workflow) transitions to number; 0 = none")
    diagram.add_argument("--at", help="(--agent/--workflow) draw it as it was at this ISO-8601 time")
    diagram.set_defaults(func=cmd_diagram)

    audit_p = sub.add_parser("audit", help="verify or export the audit log")
    audit_sub = audit_p.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="recompute every hash chain (database, or --file)")
    verify.add_argument("--file", help="an exported JSON Lines file; needs no database")
    verify.add_argument(
        "--checkpoints", metavar="FILE", help="signed checkpoints (OPSCORE_CHECKPOINT_FILE) to check against"
    )
    verify.add_argument(
        "--public-key",
        metavar="PEM",
        action="append",
        help="public key of the checkpoints' signing key (repeat for each key used, e.g. across a rotation)",
    )
    verify.set_defaults(func=cmd_audit_verify)
    export = audit_sub.add_parser("export", help="write every record as JSON Lines")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_audit_export)

    keys_p = sub.add_parser("keys", help="signing keys of checkpoints")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True)
    signing = keys_sub.add_parser(
        "signing-key", help="make an Ed25519 key for OPSCORE_SIGNING_KEY (public key: FILE.pub)"
    )
    signing.add_argument("--out", required=True, metavar="FILE")
    signing.set_defaults(func=cmd_keys_signing_key)

    agents = sub.add_parser("agents", help="list agents (client)")
    agents.add_argument("--state")
    agents.set_defaults(func=cmd_agents)
    agent = sub.add_parser("agent", help="show one agent (client)")
    agent.add_argument("agent_id")
    agent.set_defaults(func=cmd_agent)
    report = sub.add_parser("report", help="report an agent's state (client)")
    report.add_argument("agent_id")
    report.add_argument("state")
    report.set_defaults(func=cmd_report)

    sim = sub.add_parser(
        "simulate",
        help="a stand-in AgentKit playing N simulated agents",
        description="Defaults come from the same settings as the server (environment, then .env): it listens "
        "where AGENTKIT_API_URL points and calls Ops-Core at OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT, "
        "with OPSCORE_API_KEY and OPSCORE_WEBHOOK_SECRET.",
    )
    sim.add_argument("--host", default=None, help="listen address (default: the host of AGENTKIT_API_URL)")
    sim.add_argument("--port", type=int, default=None, help="listen port (default: the port of AGENTKIT_API_URL)")
    sim.add_argument(
        "--opscore-url",
        default=None,
        help="Ops-Core's URL (default: OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT); "
        "several replicas comma separated (reports go to each in turn)",
    )
    sim.add_argument("--agents", type=int, default=None, help="simulated agents (default: SIMULATOR_AGENTS, 3)")
    sim.add_argument("--prefix", default="sim-agent", help="simulated agents are <prefix>-0, <prefix>-1, ...")
    sim.add_argument(
        "--capabilities",
        default=None,
        help="comma-separated capabilities of every simulated agent (default: SIMULATOR_CAPABILITIES)",
    )
    sim.add_argument("--latency", type=float, default=None, help="seconds per task (default: SIMULATOR_LATENCY, 0.2)")
    sim.add_argument(
        "--failure-rate", type=float, default=None, help="share of failed tasks (default: SIMULATOR_FAILURE_RATE, 0)"
    )
    sim.add_argument("--heartbeat", type=float, default=30.0, help="seconds between heartbeats of idle agents")
    sim.add_argument("--echo-task-id", action="store_true", help="put opscore_task_id in report details")
    sim.add_argument("--seed", type=int, default=None)
    sim.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
