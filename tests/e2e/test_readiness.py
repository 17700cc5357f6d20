"""A server whose disk is full says so: /health and /ready answer 503, and recover with the disk.

The full disk is real as far as the server can tell: its file-size limit (RLIMIT_FSIZE, set
on the running process with ``prlimit``) makes every write past the current end of its files
fail with EFBIG, as ENOSPC would, while the test process and everything else are unaffected.
"""

from __future__ import annotations

import os
import resource
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from tests.servers import Server


def fill(client: httpx.Client, prefix: str, start: int) -> tuple[int, int]:
    """Send batches of first reports (new agents: new pages) until one fails; (sent, status)."""
    base = datetime.now(UTC) - timedelta(minutes=5)
    for n in range(start, start + 400):
        stamp = (base + timedelta(microseconds=n)).isoformat()
        reports = [{"agentId": f"{prefix}-{n}-{i}", "timestamp": stamp, "state": "idle"} for i in range(200)]
        answer = client.post("/v1/opscore/state-reports", json={"reports": reports})
        if answer.status_code != 200:
            return n, answer.status_code
        statuses = {r["status"] for r in answer.json()["results"]}
        if statuses != {200}:
            return n, max(statuses)
    raise AssertionError("the size limit never made a write fail")


def test_a_full_disk_makes_health_and_ready_answer_503_until_it_has_room(tmp_path: Path) -> None:
    db = tmp_path / "opscore.db"
    server = Server(database_url=f"sqlite:///{db}")
    server.start()
    try:
        assert server.process is not None
        pid = server.process.pid
        with server.client() as client:
            assert client.get("/ready").json()["status"] == "ready"
            sizes = [f.stat().st_size for f in tmp_path.glob("opscore.db*") if f.is_file()]
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (max(sizes) + 2 * 1024 * 1024, resource.RLIM_INFINITY))
            sent, status = fill(client, "full", 0)
            assert status in (500, 503), status
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["code"] == "storage_not_writable", health.text
            time.sleep(1.1)  # past the probe's reuse window
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["code"] == "storage_not_writable", ready.text
            assert "detail" in ready.json()

            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            again = client.post(
                "/v1/opscore/agent/after-full/state",
                json={"timestamp": datetime.now(UTC).isoformat(), "state": "idle"},
            )
            assert again.status_code == 200, again.text  # the disk has room again: writes work at once
            assert client.get("/health").status_code == 200
            time.sleep(1.1)
            assert client.get("/ready").status_code == 200
            verified = client.get("/v1/opscore/audit/verify").json()
            assert verified["ok"], verified["problems"][:5]
            assert sent > 0
    finally:
        server.stop()
    assert os.path.exists(db)
