"""checkpoints: what signing costs with a large fleet.

    python -m benchmarks.checkpoints [--agents 100000] [--per-agent 2]

Builds a SQLite database of ``agents`` agents with ``per-agent`` sealed records each (the
store's own ``audit.seal``, as ``benchmarks.audit_query`` does), then measures with the real
:class:`opscore.checkpointer.Checkpointer`:

- the first checkpoint (every head): reading the whole stream, signing, writing, fsync;
- a regular checkpoint: 1,000 new records over 1,000 agents of the fleet (1,000 heads);
- its line size, and loading the file again (a restart, or a new leader);
- verification with checkpoints against verification without them.

The state-report throughput while checkpoints are taken is ``benchmarks.run --only
http-state`` with and without ``OPSCORE_SIGNING_KEY`` (README, docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.audit_query import grow
from opscore import checkpoints
from opscore.checkpointer import Checkpointer
from opscore.checkpoints import CheckpointFile, make_signing_key
from opscore.storage.sqlite import SQLiteStore


def signed_in(path: Path) -> float:
    """Seconds :func:`opscore.checkpoints.make_line` takes for the file's last line (JSON and signature)."""
    line = json.loads(path.read_text(encoding="utf-8").splitlines()[-1])
    heads = {(t, i): (h[0], h[1]) for t, ids in line["heads"].items() for i, h in ids.items()}
    signer = checkpoints.Signer.of(checkpoints.Ed25519PrivateKey.generate())
    t = time.perf_counter()
    checkpoints.make_line(n=2, position="1", at="x", records=1, full=False, heads=heads, prev="0" * 64, signer=signer)
    return time.perf_counter() - t


async def measure(path: str, tmp: Path, agents: int, heads: dict[str, tuple[int, str]], next_id: int) -> dict[str, Any]:
    private, public, _ = make_signing_key(tmp / "signing.pem")
    signer = checkpoints.load_signer(private)
    file = CheckpointFile(tmp / "checkpoints.jsonl")
    store = SQLiteStore(path)
    await store.open()
    out: dict[str, Any] = {}
    try:
        runner = Checkpointer(store, file, signer, records=1000, seconds=3600, poll=3600)
        file.open()
        t = time.perf_counter()
        while await runner.step():
            pass
        out["first_checkpoint_s"] = time.perf_counter() - t
        out["first_line_bytes"] = (tmp / "checkpoints.jsonl").stat().st_size
        out["first_line_sign_s"] = signed_in(tmp / "checkpoints.jsonl")
        await store.close()

        regular, signing = [], []
        for _ in range(5):
            next_id = grow(path, heads, next_id, 1000, agents)  # 1,000 records over 1,000 agents of the fleet
            store = SQLiteStore(path)
            await store.open()
            runner.store = store
            size = (tmp / "checkpoints.jsonl").stat().st_size
            t = time.perf_counter()
            while await runner.step():
                pass
            regular.append(time.perf_counter() - t)
            signing.append(signed_in(tmp / "checkpoints.jsonl"))
            await store.close()
        store = SQLiteStore(path)
        await store.open()
        out["regular_checkpoint_s"] = statistics.median(regular)
        out["regular_line_sign_s"] = statistics.median(signing)
        out["regular_line_bytes"] = (tmp / "checkpoints.jsonl").stat().st_size - size
        out["lines"] = len(file)

        reloaded = Checkpointer(store, CheckpointFile(tmp / "checkpoints.jsonl"), signer)
        reloaded.file.open()
        t = time.perf_counter()
        await reloaded._load()
        out["reload_s"] = time.perf_counter() - t

        t = time.perf_counter()
        signed = checkpoints.read_checkpoint_file(tmp / "checkpoints.jsonl", [public])
        out["read_checkpoints_s"] = time.perf_counter() - t
        t = time.perf_counter()
        plain = await checkpoints.verify_database(store)
        out["verify_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pinned = await checkpoints.verify_database(store, signed)
        out["verify_with_checkpoints_s"] = time.perf_counter() - t
        assert plain.ok and pinned.ok, (plain.problems[:3], pinned.problems[:3])
        out["records"] = plain.records
    finally:
        await store.close()
    return out


def run(agents: int = 100_000, per_agent: int = 2) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="opscore-checkpoints-"))
    path = str(tmp / "bench.db")

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(create())
    heads: dict[str, tuple[int, str]] = {}
    t = time.perf_counter()
    next_id = grow(path, heads, 1, agents * per_agent, agents)
    built = time.perf_counter() - t
    try:
        return {"agents": agents, "build_s": built, **asyncio.run(measure(path, tmp, agents, heads, next_id))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--per-agent", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(run(args.agents, args.per_agent), indent=1))


if __name__ == "__main__":
    main()
