"""``opscore serve`` and ``opscore simulate``: the service and a stand-in AgentKit, from the one ``Settings``."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from opscore.config import Settings
from opscore.cli.base import cli, settings

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
