"""HTTP scenarios: http-state (ours vs the ceiling, interleaved), batch, startup, memory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks import _proc

LUA = Path(__file__).resolve().parent / "state.lua"
STATE_PATH = "/v1/opscore/agent/{}/state"
BATCH_PATH = "/v1/opscore/state-reports"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


async def _post_batches(client: httpx.AsyncClient, reports: list[dict[str, Any]], size: int, parallel: int) -> int:
    """Send ``reports`` in batches over ``parallel`` connections; the number of non-200 results."""
    batches = [reports[i : i + size] for i in range(0, len(reports), size)]
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    bad = 0

    async def worker() -> None:
        nonlocal bad
        while not queue.empty():
            batch = queue.get_nowait()
            answer = await client.post(BATCH_PATH, json={"reports": batch})
            if answer.status_code == 404:  # no batch endpoint: one request each
                for r in batch:
                    a = await client.post(STATE_PATH.format(r["agentId"]), json=r)
                    bad += a.status_code != 200
                continue
            answer.raise_for_status()
            bad += sum(1 for r in answer.json()["results"] if r["status"] != 200)

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return bad


def register_idle(server: _proc.Proc, prefix: str, agents: int, at: datetime) -> None:
    """Bring agents PREFIX0..PREFIX(n-1) to ``idle`` with a report timestamped ``at``."""
    reports = [{"agentId": f"{prefix}{i}", "timestamp": iso(at), "state": "idle", "details": {}} for i in range(agents)]

    async def go() -> int:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
            return await _post_batches(client, reports, 1000, 4)

    bad = asyncio.run(go())
    if bad:
        raise RuntimeError(f"{bad} registrations were refused")


def wrk(
    url: str, key: str, prefix: str, agents: int, *, threads: int, connections: int, seconds: float
) -> dict[str, Any]:
    base = time.time()
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(LUA),
        url,
        "--",
        key,
        prefix,
        str(agents),
        f"{base:.6f}",
        str(threads),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    errors = r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": errors,
        "requests": r["requests"],
    }


def _load(server: _proc.Proc, prefix: str, agents: int, **kw: Any) -> dict[str, Any]:
    """One wrk run against ``server``, with the server's CPU per request (µs, all its threads)."""
    before = server.cpu_seconds()
    r = wrk(server.url, server.api_key, prefix, agents, **kw)
    r["cpu_us"] = (server.cpu_seconds() - before) / max(r["requests"], 1) * 1e6
    return r


CONNECTIONS = (1, 4, 16, 64)
"""The connection counts http-state sweeps: one client waiting on each answer, a few, many."""


def http_state(
    *,
    rounds: int = 3,
    seconds: float = 10,
    agents: int = 4000,
    connections: tuple[int, ...] | int = CONNECTIONS,
    threads: int = 2,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Ours (``opscore serve``) vs the ceiling, A/B interleaved ``rounds`` times per connection count; medians.

    For each count in ``connections`` the two servers are loaded in turn (ceiling, ours,
    ceiling, ours, ...), each time on a fresh slice of agents brought to ``idle`` first. The
    top-level ``ours_*``/``ceiling_*``/``ratio`` keys are those of the largest count; ``by_c``
    holds every count's medians. ``env`` is added to the environment of ``opscore serve``.
    """
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (make bench installs it with apt-get)")
    counts = (connections,) if isinstance(connections, int) else tuple(connections)
    tmp = Path(tempfile.mkdtemp(prefix="opscore-bench-"))
    url = database_url or f"sqlite:///{tmp / 'opscore.db'}"
    ours = _proc.opscore(url, log_path=tmp / "server.log", **(env or {}))
    ceil = _proc.ceiling()
    ours.start()
    ceil.api_key = ours.api_key
    ceil.start()
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {"ceiling": [], "ours": []} for c in counts}
    try:
        for c in counts:
            wrk_threads = min(threads, c)
            for n in range(rounds):
                prefix = f"bench-{os.getpid()}-c{c}-r{n}-"
                runs[c]["ceiling"].append(
                    _load(ceil, prefix, agents, threads=wrk_threads, connections=c, seconds=seconds)
                )
                register_idle(ours, prefix, agents, datetime.now(UTC) - timedelta(seconds=1))
                runs[c]["ours"].append(_load(ours, prefix, agents, threads=wrk_threads, connections=c, seconds=seconds))
        with open(tmp / "server.log", "rb") as fh:
            log_lines = sum(1 for _ in fh)
        with httpx.Client(base_url=ours.url, headers=ours.headers, timeout=600) as client:
            verified = client.get("/v1/opscore/audit/verify").json()
    finally:
        ours.stop()
        ceil.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(c: int) -> dict[str, Any]:
        def med(side: str, k: str) -> float:
            return statistics.median(r[k] for r in runs[c][side])

        return {
            "connections": c,
            "ours_rps": med("ours", "rps"),
            "ceiling_rps": med("ceiling", "rps"),
            "ratio": med("ours", "rps") / med("ceiling", "rps"),
            "ours_p50_ms": med("ours", "p50_ms"),
            "ours_p99_ms": med("ours", "p99_ms"),
            "ceiling_p50_ms": med("ceiling", "p50_ms"),
            "ceiling_p99_ms": med("ceiling", "p99_ms"),
            "ours_cpu_us": med("ours", "cpu_us"),
            "ceiling_cpu_us": med("ceiling", "cpu_us"),
            "ours_errors": sum(r["errors"] for r in runs[c]["ours"]),
            "ceiling_errors": sum(r["errors"] for r in runs[c]["ceiling"]),
        }

    by_c = {c: summary(c) for c in counts}
    return {
        **by_c[max(counts)],
        "by_c": by_c,
        "rounds": {str(c): runs[c] for c in counts},
        "log_lines": log_lines,
        "verify_ok": verified["ok"],
        "audit_records": verified["records"],
    }


if __name__ == "__main__":
    print(json.dumps(http_state(rounds=1, seconds=5), indent=1))


BATCH_LUA = Path(__file__).resolve().parent / "batch.lua"


def batch(
    *,
    seconds: float = 10,
    agents: int = 4000,
    size: int = 100,
    connections: int = 16,
    threads: int = 2,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Transitions/s over HTTP through POST /v1/opscore/state-reports, ``size`` reports a request."""
    tmp = Path(tempfile.mkdtemp(prefix="opscore-bench-"))
    server = _proc.opscore(database_url or f"sqlite:///{tmp / 'opscore.db'}", log_path=tmp / "server.log").start()
    try:
        prefix = f"batch-{os.getpid()}-"
        register_idle(server, prefix, agents, datetime.now(UTC) - timedelta(seconds=1))
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(BATCH_LUA),
            server.url,
            "--",
            server.api_key,
            prefix,
            str(agents),
            f"{time.time():.6f}",
            str(threads),
            str(size),
        ]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    duration = r["duration_us"] / 1e6
    return {
        "transitions_per_s": r["ok_reports"] / duration,
        "requests_per_s": r["requests"] / duration,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "refused_reports": r["bad_reports"],
        "errors": r["connect"] + r["read"] + r["write"] + r["timeout"],
    }


def startup(*, runs: int = 5) -> dict[str, Any]:
    """Seconds from process start to /health answering 200 (fresh SQLite file each run)."""
    times = []
    for _ in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix="opscore-bench-"))
        server = _proc.opscore(f"sqlite:///{tmp / 'opscore.db'}").start()
        times.append(server.started)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"median_s": statistics.median(times), "max_s": max(times), "runs": times}


def cli_help(*, runs: int = 5) -> dict[str, Any]:
    """Seconds ``opscore --help`` takes as a process (the CLI must feel instant: well under 0.5 s)."""
    import subprocess
    import sys

    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "opscore", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return {"best_s": min(times), "median_s": statistics.median(times), "runs": times}


def memory(*, agents: int = 100_000) -> dict[str, Any]:
    """RSS of ``opscore serve`` after ``agents`` agents registered and moved once (registered → idle).

    Their first report registers each agent and applies ``ready``; sent through the batch
    endpoint, 1000 at a time.
    """
    tmp = Path(tempfile.mkdtemp(prefix="opscore-bench-"))
    server = _proc.opscore(f"sqlite:///{tmp / 'opscore.db'}", log_path=tmp / "server.log").start()
    try:
        t0 = time.perf_counter()
        register_idle(server, "m-", agents, datetime.now(UTC))
        elapsed = time.perf_counter() - t0
        with httpx.Client(base_url=server.url, headers=server.headers) as client:
            assert client.get("/v1/opscore/agent/m-0").json()["state"] == "idle"
        rss = server.rss_mb()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rss_mb": rss, "agents": agents, "register_seconds": elapsed}
