"""A/B of two (or more) Ops-Core trees on SQLite: servers side by side, the ceiling between them, round by round.

    python -m benchmarks.ab 4 --tree /tmp/before --tree . [--rounds 8] [--seconds 5]

Each ``--tree`` is a checkout whose ``opscore`` package a server imports (``.`` is this
one); all of them and the ceiling start once, then every round loads the ceiling and each
server in turn (the servers' order alternating), each on a fresh slice of agents brought to
``idle``. Medians per tree and their ratio to the ceiling's median: a change worth a few per
cent shows up here, where two separate ``http-state`` runs minutes apart differ by more than
that on a shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks import _proc
from benchmarks.http import register_idle, wrk

AGENTS = 4000


def server(tree: Path, directory: Path) -> _proc.Proc:
    """``opscore serve`` importing ``tree``'s package first, on a fresh SQLite file in ``directory``."""
    proc = _proc.opscore(f"sqlite:///{directory / 'opscore.db'}", log_path=directory / "server.log")
    boot = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); import runpy; "
        "runpy.run_module('opscore', run_name='__main__', alter_sys=True)"
    )
    proc.argv = [sys.executable, "-c", boot, "serve"]
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("connections", type=int)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    c, threads = args.connections, min(2, args.connections)
    dirs = [Path(tempfile.mkdtemp(prefix="opscore-ab-")) for _ in args.tree]
    servers = [server(tree.resolve(), d).start() for tree, d in zip(args.tree, dirs, strict=True)]
    ceiling = _proc.ceiling()
    ceiling.api_key = servers[0].api_key
    ceiling.start()
    rps: list[list[float]] = [[] for _ in servers]
    ceiling_rps: list[float] = []
    try:
        for n in range(args.rounds):
            ceiling_rps.append(wrk(ceiling.url, ceiling.api_key, "c-", AGENTS, threads=threads, connections=c,
                                   seconds=args.seconds)["rps"])  # fmt: skip
            order = list(enumerate(servers))
            for i, s in order if n % 2 == 0 else order[::-1]:
                prefix = f"ab-r{n}-"
                register_idle(s, prefix, AGENTS, datetime.now(UTC) - timedelta(seconds=1))
                rps[i].append(wrk(s.url, s.api_key, prefix, AGENTS, threads=threads, connections=c,
                                  seconds=args.seconds)["rps"])  # fmt: skip
    finally:
        for s in [*servers, ceiling]:
            s.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    ceil = statistics.median(ceiling_rps)
    print(f"{c} connections, {args.rounds} rounds; ceiling median {ceil:,.0f} req/s")
    for tree, runs in zip(args.tree, rps, strict=True):
        median = statistics.median(runs)
        print(f"  {tree!s:40s} {median:8,.0f} req/s  {median / ceil:.3f} x ceiling  {[round(r) for r in runs]}")


if __name__ == "__main__":
    main()
