"""``opscore``: serve, verify and export the audit log, and talk to a running server.

opscore serve [--host H] [--port P] [--generate-key]
opscore diagram (--machine NAME | --all) [--format mermaid|svg] [--out DIR]
opscore diagram --agent ID [--last N] [--at ISO] [--format ...] [--out DIR]   (client)
opscore audit verify [--file FILE.jsonl]
opscore audit export --out FILE.jsonl
opscore agents [--state S]            (client: OPSCORE_API_URL, OPSCORE_API_KEY)
opscore agent ID
opscore report ID STATE
opscore simulate [--port 8001] [--agents N] [--latency S] [--failure-rate F]   (stand-in AgentKit)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opscore import audit

DEFAULT_API_URL = "http://127.0.0.1:8000"


def _env_key() -> str:
    from opscore.config import Settings

    return Settings().api_key


def ensure_key(env_file: Path = Path(".env")) -> str | None:
    """Generate an API key into ``.env`` when none is configured; the new key, or ``None``."""
    if _env_key():
        return None
    key = secrets.token_urlsafe(32)
    existing = env_file.read_text() if env_file.exists() else ""
    with env_file.open("a") as fh:
        if existing and not existing.endswith("\n"):
            fh.write("\n")
        fh.write(f"OPSCORE_API_KEY={key}\n")
    env_file.chmod(0o600)
    os.environ["OPSCORE_API_KEY"] = key
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    generated = ensure_key() if args.generate_key else None
    if not _env_key():
        print("OPSCORE_API_KEY is not set. Set it, or run `opscore serve --generate-key`.", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    if generated:
        print(f"Generated an API key and saved it in .env (shown once):\n\n    OPSCORE_API_KEY={generated}\n")
    key_hint = generated or "$OPSCORE_API_KEY   # from .env"
    print(
        f"Ops-Core on {base}  (docs: {base}/docs)\n"
        f"  curl {base}/health\n"
        f"  curl -X POST {base}/v1/opscore/agent/agent-1/state -H 'Authorization: Bearer {key_hint}' \\\n"
        f"       -H 'Content-Type: application/json' "
        f'-d \'{{"agentId":"agent-1","timestamp":"{datetime.now(UTC).isoformat()}","state":"idle"}}\'\n',
        flush=True,
    )
    uvicorn.run(
        "opscore.api:app",
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


async def _verify_db() -> audit.Verification:
    from opscore.config import Settings
    from opscore.storage import open_store

    store = open_store(Settings().database_url, readonly=True)
    await store.open()
    try:
        return await store.verify()
    finally:
        await store.close()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                result = audit.verify(audit.read_jsonl(fh))
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, or not JSON Lines
            print(f"opscore audit verify: {args.file}: {exc}", file=sys.stderr)
            return 1
    else:
        result = asyncio.run(_verify_db())
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


async def _export(out: Path) -> int:
    from opscore.config import Settings
    from opscore.models import AuditQuery
    from opscore.storage import open_store

    store = open_store(Settings().database_url, readonly=True)
    await store.open()
    count = 0
    try:
        with out.open("w", encoding="utf-8") as fh:
            after = 0
            while True:
                page = await store.list_audit(AuditQuery(after_id=after, limit=5000))
                if not page:
                    break
                for record in page:
                    fh.write(audit.canonical(record).decode("utf-8") + "\n")
                count += len(page)
                after = page[-1]["id"]
    finally:
        await store.close()
    return count


def cmd_audit_export(args: argparse.Namespace) -> int:
    count = asyncio.run(_export(Path(args.out)))
    print(json.dumps({"exported": count, "file": args.out}))
    return 0


def _client() -> Any:
    import httpx

    base = os.environ.get("OPSCORE_API_URL", DEFAULT_API_URL)
    key = os.environ.get("OPSCORE_API_KEY") or _env_key()
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)


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
            print(
                f"cannot reach Ops-Core at {os.environ.get('OPSCORE_API_URL', DEFAULT_API_URL)}: {exc}", file=sys.stderr
            )
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


def cmd_simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from opscore.simulator import SimConfig, create_app

    api_key = os.environ.get("OPSCORE_API_KEY") or _env_key()
    secret = os.environ.get("OPSCORE_WEBHOOK_SECRET", "")
    if not api_key or not secret:
        print("the simulator needs OPSCORE_API_KEY and OPSCORE_WEBHOOK_SECRET (as Ops-Core has them)", file=sys.stderr)
        return 2
    config = SimConfig(
        opscore_url=args.opscore_url,
        api_key=api_key,
        webhook_secret=secret,
        agents=args.agents,
        prefix=args.prefix,
        capabilities=[c.strip() for c in args.capabilities.split(",") if c.strip()],
        latency=args.latency,
        failure_rate=args.failure_rate,
        heartbeat=args.heartbeat,
        echo_task_id=args.echo_task_id,
        seed=args.seed,
    )
    print(
        f"AgentKit stand-in on http://{args.host}:{args.port} playing {args.agents} agents "
        f"for Ops-Core at {config.opscore_url}",
        flush=True,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opscore", description="Ops-Core: state machines and audit for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=os.environ.get("OPSCORE_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("OPSCORE_PORT", "8000")))
    serve.add_argument("--generate-key", action="store_true", help="create an API key in .env when none is set")
    serve.set_defaults(func=cmd_serve)

    diagram = sub.add_parser(
        "diagram",
        help="draw machines (Mermaid or SVG), or an agent's/workflow run's position and path (client)",
        description="Machines are drawn locally from opscore/machines.py; --agent/--workflow ask a running "
        "server (OPSCORE_API_URL, default http://127.0.0.1:8000; OPSCORE_API_KEY). SVG needs Graphviz's dot.",
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
    verify.set_defaults(func=cmd_audit_verify)
    export = audit_sub.add_parser("export", help="write every record as JSON Lines")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_audit_export)

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

    sim = sub.add_parser("simulate", help="a stand-in AgentKit playing N simulated agents")
    sim.add_argument("--host", default=os.environ.get("SIMULATOR_HOST", "127.0.0.1"))
    sim.add_argument("--port", type=int, default=int(os.environ.get("SIMULATOR_PORT", "8001")))
    sim.add_argument(
        "--opscore-url",
        default=os.environ.get("OPSCORE_API_URL", "http://127.0.0.1:8000"),
        help="Ops-Core's URL; several replicas comma separated (reports go to each in turn)",
    )
    sim.add_argument("--agents", type=int, default=int(os.environ.get("SIMULATOR_AGENTS", "3")))
    sim.add_argument("--prefix", default="sim-agent", help="simulated agents are <prefix>-0, <prefix>-1, ...")
    sim.add_argument(
        "--capabilities",
        default=os.environ.get("SIMULATOR_CAPABILITIES", "summarise_text,review_text"),
        help="comma-separated capabilities of every simulated agent",
    )
    sim.add_argument("--latency", type=float, default=float(os.environ.get("SIMULATOR_LATENCY", "0.2")))
    sim.add_argument("--failure-rate", type=float, default=float(os.environ.get("SIMULATOR_FAILURE_RATE", "0")))
    sim.add_argument("--heartbeat", type=float, default=30.0, help="seconds between heartbeats of idle agents")
    sim.add_argument("--echo-task-id", action="store_true", help="put opscore_task_id in report details")
    sim.add_argument("--seed", type=int, default=None)
    sim.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
