"""engine: transitions/s in-process (no HTTP), many agents reporting concurrently.

    python -m benchmarks.engine sqlite|memory|postgresql [--agents N] [--rounds R] [--tasks T]

Runs as its own process with the production logging and GC settings (one JSON line per transition,
to a temp file instead of stdout) and prints one ``RESULT {json}`` line on stderr. Agents are
first registered by their first report (registered → idle), then every agent alternates
idle → active → idle ... ``rounds`` times; only that phase is timed. ``tasks`` asyncio
tasks share the agents, each walking its own slice in order (same-agent reports in order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


async def run(url: str, agents: int, rounds: int, tasks: int) -> dict[str, Any]:
    from opscore.api.app import tune_gc
    from opscore.engine import Context, Engine
    from opscore.models import Entity
    from opscore.storage import open_store

    store = open_store(url)
    await store.open()
    engine = Engine(store)
    tune_gc()  # as the app's lifespan does in production
    ctx = Context(actor="key:bench", request_id="bench")
    base = datetime.now(UTC) - timedelta(hours=1)
    ids = [f"e{i}" for i in range(agents)]
    slices = [ids[k::tasks] for k in range(tasks)]

    async def walk(mine: list[str], targets: list[str], first: int) -> None:
        for r, target in enumerate(targets):
            at = base + timedelta(microseconds=first + r)
            for agent in mine:
                await engine.report(
                    "agent",
                    agent,
                    target,
                    ctx=ctx,
                    reported_at=at,
                    details={},
                    create=Entity("agent", agent, "registered"),
                )

    await asyncio.gather(*(walk(s, ["idle"], 0) for s in slices))
    targets = ["active" if r % 2 == 0 else "idle" for r in range(rounds)]
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(walk(s, targets, 1) for s in slices))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = agents * rounds
    result = {"transitions": n, "seconds": elapsed, "per_s": n / elapsed, "cpu_us_per_transition": 1e6 * cpu / n}
    batched = getattr(store, "batched", 0)
    if batched:
        result["mean_batch"] = batched / max(1, getattr(store, "batches", 1))
    verification = await store.verify()
    result["verify_ok"] = verification.ok
    result["records"] = verification.records
    await store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=["sqlite", "memory", "postgresql"])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--url", default="", help="postgresql: the database URL (default OPSCORE_TEST_DATABASE_URL)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="opscore-engine-"))
    if args.backend == "sqlite":
        url = f"sqlite:///{tmp / 'engine.db'}"
    elif args.backend == "memory":
        url = "memory://"
    else:
        url = args.url or os.environ["OPSCORE_TEST_DATABASE_URL"]
    log = open(tmp / "log.jsonl", "w")  # noqa: SIM115 - the process's stdout for its lifetime
    real_stderr = sys.stderr
    sys.stdout = log
    from opscore.logs import configure

    configure("INFO")
    result = asyncio.run(run(url, args.agents, args.rounds, args.tasks))
    from opscore import logs

    getattr(logs, "flush", lambda: None)()
    log.flush()
    with open(tmp / "log.jsonl", "rb") as fh:
        result["log_lines"] = sum(1 for _ in fh)
    real_stderr.write("RESULT " + json.dumps(result) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)  # the database and the log: hundreds of MB per run


if __name__ == "__main__":
    main()
