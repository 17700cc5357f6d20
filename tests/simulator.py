"""The stand-in AgentKit as a real process (``python -m opscore simulate``), for workflow tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import ROOT, Server, free_port


@dataclass
class Simulator:
    """One simulator process playing ``agents`` agents against ``server``."""

    server: Server
    agents: int = 2
    capabilities: str = "summarise_text,review_text"
    latency: float = 0.1
    failure_rate: float = 0.0
    prefix: str = "sim-agent"
    heartbeat: float = 30.0
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    opscore_urls: list[str] | None = None
    """Several replicas: the agents' reports go to each in turn (``server`` is still asked for state)."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, *, wait_ready: bool = True) -> Simulator:
        env = {
            **os.environ,
            "OPSCORE_API_KEY": self.server.api_key,
            "OPSCORE_WEBHOOK_SECRET": self.server.webhook_secret,
            "PYTHONPATH": str(ROOT),
        }
        argv = [
            sys.executable, "-m", "opscore", "simulate",
            "--port", str(self.port),
            "--opscore-url", ",".join(self.opscore_urls or [self.server.url]),
            "--agents", str(self.agents),
            "--prefix", self.prefix,
            "--capabilities", self.capabilities,
            "--latency", str(self.latency),
            "--failure-rate", str(self.failure_rate),
            "--seed", "7",
            "--heartbeat", str(self.heartbeat),
        ]  # fmt: skip
        if self.log_path is None:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        else:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
                self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.process.returncode}")
            try:
                health = httpx.get(self.url + "/health", timeout=1).json()
                if not wait_ready or health["ready"] >= self.agents:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("simulator did not become ready in time")
        if wait_ready:  # every agent is idle with its capabilities in Ops-Core
            wait_for(lambda: self.opscore_idle() >= self.agents, timeout, "simulated agents idle in Ops-Core")
        return self

    def opscore_idle(self) -> int:
        with self.server.client() as client:
            items = client.get("/v1/opscore/agents", params={"state": "idle", "limit": 1000}).json()["items"]
        return sum(1 for a in items if a["agentId"].startswith(self.prefix + "-") and a["capabilities"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def calls(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/calls", timeout=10).json()["items"])

    def control(self, **body: Any) -> dict[str, Any]:
        answer = httpx.post(self.url + "/control", json=body, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    def register(self, agent_id: str, capabilities: list[str], *, simulate: bool = True) -> None:
        answer = httpx.post(
            self.url + "/v1/agents/register",
            json={"agentId": agent_id, "agentName": agent_id, "capabilities": capabilities, "simulate": simulate},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (its value) or fail after ``timeout`` s: no timing assertions."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")
