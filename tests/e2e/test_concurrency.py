"""Many threads, one agent, conflicting reports over HTTP: a gap-free chain and an exact revision."""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from datetime import UTC, datetime

import httpx

from opscore import audit
from tests.api.helpers import all_pages
from tests.servers import Server

V1 = "/v1/opscore"
THREADS = 16
REPORTS_PER_THREAD = 25
TARGETS = ["initializing", "idle", "active", "error", "offline"]


def test_many_threads_one_agent(server: Server) -> None:
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
            start.wait()
            for i in range(REPORTS_PER_THREAD):
                body = {
                    "timestamp": datetime.now(UTC).isoformat(),
                    "state": rng.choice(TARGETS),
                    "details": {"t": seed},
                }
                headers = {"Idempotency-Key": f"t{seed}-{i}"} if i % 5 == 0 else {}
                try:
                    answer = client.post(f"{V1}/agent/hot/state", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    with lock:
                        problems.append(repr(exc))
                    continue
                with lock:
                    statuses[answer.status_code] += 1
                    if answer.status_code not in (200, 409):
                        problems.append(f"{answer.status_code} {answer.text}")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not problems, problems[:5]
    assert sum(statuses.values()) == THREADS * REPORTS_PER_THREAD
    assert statuses[200] > 0 and statuses[409] > 0  # they really did conflict

    with server.client() as client:
        records, _ = all_pages(client, f"{V1}/agent/hot/audit", limit=500)
        agent = client.get(f"{V1}/agent/hot").json()
        verdict = client.get(f"{V1}/audit/verify").json()
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    applied = [r for r in records if r["outcome"] == "applied"]
    assert agent["revision"] == len(applied)
    assert agent["state"] == audit.replay(records, "registered")
    for before, after in itertools.pairwise(applied):
        assert after["source"] == before["dest"], "two transitions applied from the same state"
    assert verdict["ok"] is True and verdict["records"] == len(records), verdict
