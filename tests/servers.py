"""Real server processes for tests: ``opscore serve`` on a free port and a real database file."""

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
class Server:
    """One ``python -m opscore serve`` process; ``start``/``kill``/``stop`` as a user would."""

    database_url: str
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    webhook_secret: str = "test-webhook-secret"
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    stderr_path: Path | None = None
    """Keep stderr apart from the log on stdout (by default both go to ``log_path``)."""
    argv: list[str] | None = None
    """Another command than ``python -m opscore serve --host 127.0.0.1 --port <port>``."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def anonymous(self, **kwargs: object) -> httpx.Client:
        """A client holding no key."""
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 60.0) -> Server:
        env = {
            **os.environ,
            "OPSCORE_API_KEY": self.api_key,
            "OPSCORE_DATABASE_URL": self.database_url,
            "OPSCORE_WEBHOOK_SECRET": self.webhook_secret,
            "OPSCORE_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        argv = self.argv or [sys.executable, "-m", "opscore", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.log_path is None:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
        else:
            # the child keeps its own copies of the descriptors
            with open(self.log_path, "ab") as log, open(self.stderr_path or os.devnull, "ab") as err:
                stderr = err if self.stderr_path is not None else subprocess.STDOUT
                self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not answer /health in time")

    def kill(self) -> None:
        """``kill -9``: no shutdown hook runs, nothing is flushed on the way out."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, as a process manager stops a service; the exit status (``None`` if never started)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.process is None else self.process.returncode

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux ``/proc``)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")
