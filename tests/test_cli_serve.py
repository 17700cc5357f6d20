"""``opscore serve`` and ``opscore simulate`` as a new user runs them: from a directory with a ``.env``.

The banner's commands are run by a real shell, as pasted; the simulator finds Ops-Core from the
same ``.env`` the server reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, Server, free_port
from tests.simulator import wait_for

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any Ops-Core setting: only ``.env`` configures the child."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPSCORE_", "AGENTKIT_", "SIMULATOR_"))}
    return {**base, "PYTHONPATH": str(ROOT), **extra}


def start(argv: list[str], cwd: Path, name: str) -> subprocess.Popen[bytes]:
    with open(cwd / f"{name}.out", "ab") as out, open(cwd / f"{name}.err", "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "opscore", *argv], cwd=cwd, env=clean_env(), stdout=out, stderr=err
        )


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 20, url + "/health")


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(20)


def serve_once(tmp_path: Path, port: int) -> str:
    """One ``opscore serve --generate-key`` (what ``make run`` runs) until it is up, then SIGTERM; its banner."""
    err = tmp_path / "serve.err"
    err.unlink(missing_ok=True)
    process = start(["serve", "--generate-key", "--port", str(port)], tmp_path, "serve")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        banner = err.read_text(encoding="utf-8")
        # the report is sent while the server runs, from a shell that only has the banner's lines
        script = "\n".join(line[2:] for line in banner.splitlines() if line.startswith("  "))
        pasted = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60
        )
        (tmp_path / "pasted.out").write_text(pasted.stdout + pasted.stderr, encoding="utf-8")
    finally:
        assert stop(process) == 0
    return banner


def test_the_banner_commands_work_when_pasted_on_every_start(tmp_path: Path) -> None:
    port = free_port()
    first = serve_once(tmp_path, port)
    env = (tmp_path / ".env").read_text()
    key = next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("OPSCORE_API_KEY="))
    assert "OPSCORE_WEBHOOK_SECRET=" in env  # make run creates the webhook secret too
    assert key in first  # shown once, on the start that generated it
    outputs = (tmp_path / "pasted.out").read_text().splitlines()
    assert json.loads(outputs[0])["status"] == "ok"
    assert json.loads(outputs[1])["state"] == "idle"

    second = serve_once(tmp_path, port)
    assert key not in second  # never again
    assert "set -a; . ./.env; set +a" in second and '"Authorization: Bearer $OPSCORE_API_KEY"' in second
    outputs = (tmp_path / "pasted.out").read_text().splitlines()
    assert json.loads(outputs[1])["state"] == "idle"  # a heartbeat now: the same paste works again
    assert json.loads(outputs[2])["agentId"] == "agent-1"
    for line in (tmp_path / "serve.out").read_text().splitlines():  # stdout: log lines only
        assert json.loads(line)["time"].endswith("+00:00")


def test_serve_refuses_a_key_that_would_be_cut_short(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPSCORE_API_KEY=Prod2024:xyz\n")
    result = subprocess.run(
        [sys.executable, "-m", "opscore", "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "name:secret" in result.stderr and "'Prod2024'" in result.stderr
    assert "xyz" not in result.stderr + result.stdout


@pytest.mark.parametrize("secret", [True, False], ids=["webhook", "no-webhook-secret"])
def test_simulate_reads_the_same_env_as_the_server(secret: bool, sqlite_url: str, tmp_path: Path) -> None:
    server = Server(database_url=sqlite_url, log_path=tmp_path / "server.log")
    if not secret:
        server.webhook_secret = ""
    server.start()
    agentkit_port = free_port()
    lines = [
        f"OPSCORE_API_KEY={server.api_key}",
        f"OPSCORE_PORT={server.port}",
        f"AGENTKIT_API_URL=http://127.0.0.1:{agentkit_port}",
        "SIMULATOR_AGENTS=2",
        "SIMULATOR_LATENCY=0.05",
    ]
    if secret:
        lines.append(f"OPSCORE_WEBHOOK_SECRET={server.webhook_secret}")
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    simulator = start(["simulate"], tmp_path, "simulate")
    try:
        wait_healthy(f"http://127.0.0.1:{agentkit_port}", simulator)  # listens where AGENTKIT_API_URL points

        def idle_with_capabilities() -> bool:
            with server.client() as client:
                items = client.get("/v1/opscore/agents", params={"state": "idle"}).json()["items"]
            return sum(1 for a in items if a["agentId"].startswith("sim-agent-") and a["capabilities"]) == 2

        wait_for(idle_with_capabilities, 30, "two simulated agents idle with capabilities in Ops-Core")
    finally:
        assert stop(simulator) == 0
        server.stop()
    log = [json.loads(line) for line in (tmp_path / "simulate.out").read_text().splitlines()]
    started = next(line for line in log if line["message"] == "simulating AgentKit")
    assert started["opscoreUrl"] == server.url
    assert started["registration"].startswith("webhook" if secret else "POST /v1/opscore/agents")
