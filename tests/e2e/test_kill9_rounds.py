"""Several rounds of kill -9 under a mixed load: single reports, batches, idempotent triggers.

Each round starts a real server on the same database, loads it from several threads, and
kills it with SIGKILL mid-load. After every restart: every acknowledged transition is there,
every acknowledged Idempotency-Key replays its first answer byte for byte and adds nothing,
the request that was in flight when the server died is retried with its key and applied
exactly once, and every chain verifies.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.helpers import all_pages
from tests.servers import Server

V1 = "/v1/opscore"
ROUNDS = 4
_clock = itertools.count()
_T0 = datetime.now(UTC) - timedelta(minutes=30)


def ts() -> str:
    return (_T0 + timedelta(microseconds=next(_clock))).isoformat()


class Load:
    """What the clients were told, kept across rounds."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}  # agent -> highest acknowledged revision
        self.audit_ids: set[int] = set()
        self.replies: dict[
            str, tuple[str, dict[str, Any], int, dict[str, Any]]
        ] = {}  # key -> (agent, body, status, answer)
        self.in_flight: dict[str, tuple[str, str, dict[str, Any]]] = {}  # worker -> (key, agent, body)
        self.keys = itertools.count()
        self.lock = threading.Lock()

    def ack(self, agent: str, answer: dict[str, Any]) -> None:
        with self.lock:
            self.acked[agent] = max(self.acked.get(agent, 0), answer["revision"])
            if answer.get("auditId") is not None:
                self.audit_ids.add(answer["auditId"])


def reporter(server: Server, load: Load, agents: list[str], stop: threading.Event) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
        states = {a: client.get(f"{V1}/agent/{a}").json().get("state", "registered") for a in agents}
        while not stop.is_set():
            for agent in agents:
                target = "idle" if states[agent] in ("registered", "active") else "active"
                try:
                    answer = client.post(f"{V1}/agent/{agent}/state", json={"timestamp": ts(), "state": target})
                except httpx.HTTPError:
                    return
                assert answer.status_code == 200, answer.text
                load.ack(agent, answer.json())
                states[agent] = target


def batcher(server: Server, load: Load, agents: list[str], stop: threading.Event) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
        states = {a: client.get(f"{V1}/agent/{a}").json().get("state", "registered") for a in agents}
        while not stop.is_set():
            targets = {a: "idle" if states[a] in ("registered", "active") else "active" for a in agents}
            reports = [{"agentId": a, "timestamp": ts(), "state": t} for a, t in targets.items()]
            try:
                answer = client.post(f"{V1}/state-reports", json={"reports": reports})
            except httpx.HTTPError:
                return
            assert answer.status_code == 200, answer.text
            for agent, result in zip(targets, answer.json()["results"], strict=True):
                assert result["status"] == 200, result
                load.ack(agent, result["body"])
                states[agent] = targets[agent]


def operator(server: Server, load: Load, name: str, agent: str, stop: threading.Event) -> None:
    """Alternates fail/recover on one agent, every request with its own Idempotency-Key."""
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
        pending = load.in_flight.pop(name, None)
        if pending is not None:  # the request the last kill interrupted: retried with its key
            key, agent_, body = pending
            answer = client.post(f"{V1}/agent/{agent_}/transitions", json=body, headers={"Idempotency-Key": key})
            assert answer.status_code == 200, answer.text
            load.replies[key] = (agent_, body, answer.status_code, answer.json())
            load.ack(agent_, answer.json())
        state = client.get(f"{V1}/agent/{agent}").json()["state"]
        while not stop.is_set():
            body = {"trigger": "fail" if state == "idle" else "recover"}
            key = f"{name}-{next(load.keys)}"
            load.in_flight[name] = (key, agent, body)
            try:
                answer = client.post(f"{V1}/agent/{agent}/transitions", json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError:
                return
            del load.in_flight[name]
            assert answer.status_code == 200, answer.text
            load.replies[key] = (agent, body, answer.status_code, answer.json())
            load.ack(agent, answer.json())
            state = answer.json()["state"]


def check(server: Server, load: Load) -> None:
    with server.client() as client:
        records, _ = all_pages(client, f"{V1}/audit", limit=1000)
        ids = {r["id"] for r in records}
        missing = load.audit_ids - ids
        assert not missing, f"{len(missing)} acknowledged records are gone"
        for agent, revision in load.acked.items():
            now = client.get(f"{V1}/agent/{agent}").json()
            assert now["revision"] >= revision, (agent, now, revision)
            applied = [r for r in records if r["entityId"] == agent and r["outcome"] == "applied"]
            assert len(applied) == now["revision"], agent
        before = len(records)
        for key, (agent, body, status, first) in list(load.replies.items())[-40:]:
            again = client.post(f"{V1}/agent/{agent}/transitions", json=body, headers={"Idempotency-Key": key})
            assert (again.status_code, again.json()) == (status, first), key
        after, _ = all_pages(client, f"{V1}/audit", limit=1000)
        assert len(after) == before, "a replayed Idempotency-Key applied something"
        verdict = client.get(f"{V1}/audit/verify").json()
        assert verdict["ok"] is True, verdict["problems"][:5]


def guard(errors: list[BaseException]) -> Any:
    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    return guarded


@pytest.mark.slow
def test_rounds_of_kill_9_lose_nothing_acknowledged_and_apply_nothing_twice(database_url: str, tmp_path: Path) -> None:
    load = Load()
    key = "kill9-rounds-key-0123456789"  # Idempotency-Keys belong to the key that sent them
    for round_ in range(ROUNDS):
        server = Server(database_url=database_url, api_key=key, log_path=tmp_path / f"round{round_}.log").start()
        if round_ > 0:
            check(server, load)  # what the previous round's kill left behind
        stop = threading.Event()
        errors: list[BaseException] = []
        guarded = guard(errors)

        workers = [
            threading.Thread(target=guarded, args=(reporter, server, load, [f"r{t}-{i}" for i in range(5)], stop))
            for t in range(2)
        ]
        workers.append(
            threading.Thread(target=guarded, args=(batcher, server, load, [f"b-{i}" for i in range(40)], stop))
        )
        workers.extend(
            threading.Thread(target=guarded, args=(operator, server, load, f"op{t}", f"o-{t}", stop)) for t in range(3)
        )
        if round_ == 0:
            with server.client() as client:  # operators' agents start idle
                for t in range(3):
                    client.post(f"{V1}/agent/o-{t}/state", json={"timestamp": ts(), "state": "idle"})
        acked_before = len(load.audit_ids)
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 10
        while len(load.audit_ids) < acked_before + 300 and time.monotonic() < deadline and not errors:
            time.sleep(0.02)
        server.kill()
        stop.set()
        for worker in workers:
            worker.join(15)
        assert not errors, errors
        assert len(load.audit_ids) > acked_before, f"round {round_} acknowledged nothing"
    final = Server(database_url=database_url, api_key=key, log_path=tmp_path / "final.log").start()
    try:
        check(final, load)
        # the requests the last kill interrupted, retried with their keys: applied exactly once
        with final.client() as client:
            for key, agent, body in list(load.in_flight.values()):
                first = client.post(f"{V1}/agent/{agent}/transitions", json=body, headers={"Idempotency-Key": key})
                assert first.status_code == 200, first.text
                second = client.post(f"{V1}/agent/{agent}/transitions", json=body, headers={"Idempotency-Key": key})
                assert second.json() == first.json()
                load.replies[key] = (agent, body, 200, first.json())
                load.ack(agent, first.json())
        check(final, load)
    finally:
        final.stop()
