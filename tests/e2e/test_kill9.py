"""kill -9 a real server on a real SQLite file mid-load: every acknowledged transition survives."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.helpers import all_pages
from tests.servers import Server

V1 = "/v1/opscore"
NEXT = {"registered": "initializing", "initializing": "idle", "idle": "active", "error": "idle"}
THREADS = 4
AGENTS_PER_THREAD = 6


def next_state(state: str, step: int) -> str:
    if state == "active":
        return "error" if step % 3 == 0 else "idle"
    return NEXT[state]


def post_reports(server: Server, agents: list[str], acks: list[tuple[str, dict[str, Any]]], stop: threading.Event):
    states = dict.fromkeys(agents, "registered")
    step = 0
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
        while not stop.is_set():
            for agent in agents:
                step += 1
                target = next_state(states[agent], step)
                body = {"agentId": agent, "timestamp": datetime.now(UTC).isoformat(), "state": target, "details": {}}
                try:
                    answer = client.post(f"{V1}/agent/{agent}/state", json=body)
                except httpx.HTTPError:
                    return  # the server is gone
                if answer.status_code != 200:
                    raise AssertionError(f"{agent} {states[agent]} -> {target}: {answer.status_code} {answer.text}")
                acks.append((agent, answer.json()))
                states[agent] = target


def read_records(server: Server, seen: dict[int, dict[str, Any]], stop: threading.Event) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
        after = None
        while not stop.is_set():
            try:
                params: dict[str, Any] = {"limit": 200}
                if after:
                    params["cursor"] = after
                page = client.get(f"{V1}/audit", params=params).json()
            except (httpx.HTTPError, ValueError):
                return
            for record in page["items"]:
                seen[record["id"]] = record
            after = page["nextCursor"] or after
            time.sleep(0.02)


@pytest.mark.slow
def test_acknowledged_transitions_survive_kill_9(sqlite_url: str, tmp_path: Path) -> None:
    server = Server(database_url=sqlite_url, log_path=tmp_path / "first.log").start()
    acks: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(THREADS)]
    seen: dict[int, dict[str, Any]] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    workers = [
        threading.Thread(
            target=guarded,
            args=(post_reports, server, [f"k{t}-{i}" for i in range(AGENTS_PER_THREAD)], acks[t], stop),
        )
        for t in range(THREADS)
    ]
    workers.append(threading.Thread(target=guarded, args=(read_records, server, seen, stop)))
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 10
    while sum(map(len, acks)) < 400 and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    server.kill()  # mid-load: the workers are still posting
    stop.set()
    for worker in workers:
        worker.join(15)
    assert not errors, errors
    acknowledged = [ack for per_thread in acks for ack in per_thread]
    assert len(acknowledged) >= 50
    print(f"{len(acknowledged)} acknowledged, {len(seen)} records read before kill -9")

    again = Server(database_url=sqlite_url, log_path=tmp_path / "second.log").start()
    try:
        with again.client() as client:
            records, _ = all_pages(client, f"{V1}/audit", limit=1000)
            by_id = {r["id"]: r for r in records}
            for agent, ack in acknowledged:
                record = by_id.get(ack["auditId"])
                assert record is not None, f"acknowledged {ack} is gone"
                assert (record["entityId"], record["outcome"]) == (agent, "applied")
                assert (record["source"], record["dest"]) == (ack["previousState"], ack["state"])
            for record_id, before in seen.items():
                assert by_id[record_id] == before, "a record read before the kill changed"
            last_ack: dict[str, dict[str, Any]] = {}
            for per_thread in acks:
                for agent, ack in per_thread:
                    last_ack[agent] = ack  # each agent belongs to one thread: in order
            for agent, ack in last_ack.items():
                now = client.get(f"{V1}/agent/{agent}").json()
                assert now["revision"] >= ack["revision"], (agent, now, ack)
                if now["revision"] == ack["revision"]:
                    assert now["state"] == ack["state"]
                applied = [r for r in records if r["entityId"] == agent and r["outcome"] == "applied"]
                assert len(applied) == now["revision"]
            verdict = client.get(f"{V1}/audit/verify").json()
            assert verdict["ok"] is True, verdict["problems"][:5]
            # and the server keeps working on the recovered file
            agent, ack = acknowledged[-1]
            state = client.get(f"{V1}/agent/{agent}").json()["state"]
            answer = client.post(
                f"{V1}/agent/{agent}/state",
                json={"timestamp": datetime.now(UTC).isoformat(), "state": next_state(state, 1)},
            )
            assert answer.status_code == 200, answer.text
    finally:
        again.stop()
