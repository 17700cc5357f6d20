"""Profile ``opscore serve`` under the http-state load with py-spy; print the hot frames.

    python -m benchmarks.profile_http [SECONDS] [CONNECTIONS] [DATABASE_URL]

Writes benchmarks/results/profile.txt (collapsed stacks) and prints the top frames by own
samples and by inclusive samples (%, of all samples of the event-loop thread).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks import _proc, http

RESULTS = Path(__file__).resolve().parent / "results"


def summarise(collapsed: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"total samples: {total}", "", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top * 2)]
    return "\n".join(out)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 8
    connections = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    url = sys.argv[3] if len(sys.argv) > 3 else ""
    tmp = Path(tempfile.mkdtemp(prefix="opscore-prof-"))
    server = _proc.opscore(url or f"sqlite:///{tmp / 'p.db'}", log_path=tmp / "server.log").start()
    try:
        http.register_idle(server, "p-", 4000, datetime.now(UTC) - timedelta(seconds=1))
        load = threading.Thread(
            target=http.wrk,
            args=(server.url, server.api_key, "p-", 4000),
            kwargs={"threads": 2, "connections": connections, "seconds": seconds + 2},
        )
        load.start()
        out = RESULTS / "profile.txt"
        assert server.process is not None
        subprocess.run(
            [
                "py-spy",
                "record",
                "-p",
                str(server.process.pid),
                "-d",
                str(int(seconds)),
                "-r",
                "250",
                "--format",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
                "--gil",
            ],
            check=True,
            capture_output=True,
        )
        load.join()
        print(summarise(out))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
