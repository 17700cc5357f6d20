"""Server processes for benchmarks: ``opscore serve`` and the ceiling app on free ports."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A server process; ``argv`` gets ``--port`` appended. ``started`` is seconds to /health."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self, timeout: float = 30.0) -> Proc:
        env = {**os.environ, "OPSCORE_API_KEY": self.api_key, "PYTHONPATH": str(ROOT), **self.env}
        argv = [*self.argv, "--host", "127.0.0.1", "--port", str(self.port)]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        t0 = time.perf_counter()
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        if self.log_path:
            out.close()  # type: ignore[union-attr]
        deadline = t0 + timeout
        with httpx.Client(timeout=1) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{argv} exited with {self.process.returncode}; log: {self.log_path}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        self.started = time.perf_counter() - t0
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.005)
        raise RuntimeError(f"{argv} did not answer /health within {timeout} s")

    def rss_mb(self) -> float:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU the process has used so far (every thread), from /proc."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def opscore(database_url: str, log_path: Path | None = None, **env: str) -> Proc:
    return Proc(
        [sys.executable, "-m", "opscore", "serve"],
        env={"OPSCORE_DATABASE_URL": database_url, "OPSCORE_LOG_LEVEL": "INFO", **env},
        log_path=log_path,
    )


def ceiling() -> Proc:
    return Proc([sys.executable, "-m", "benchmarks.ceiling"])
