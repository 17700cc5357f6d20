"""Several real ``opscore serve`` processes on one PostgreSQL schema, as behind a load balancer.

Correctness must not depend on which replica a request lands on: conflicting reports spread
over the replicas lose no update and leave gap-free, verifiable chains; an Idempotency-Key
or a webhook signature used on one replica holds on the others; killing one replica with
``kill -9`` mid-load loses nothing it acknowledged. Workflows on three replicas (one
``/run`` per task attempt) are in ``test_workflow_replicas.py``.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from opscore.agentkit import sign
from tests.conftest import PG_URL
from tests.servers import Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set"),
]


def start_replicas(n: int, url: str, tmp_path: Path) -> list[Server]:
    """``n`` servers on one database with one API key, as one deployment would run them."""
    key = secrets.token_urlsafe(16)
    servers = [Server(database_url=url, api_key=key, log_path=tmp_path / f"replica{i}.log") for i in range(n)]
    try:
        for srv in servers:
            srv.start()
    except BaseException:
        for srv in servers:
            srv.stop()
        raise
    return servers


@pytest.fixture
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Server]]:
    from tests.pg import fresh_schema

    count = getattr(request, "param", 2)
    with fresh_schema(PG_URL) as url:
        servers = start_replicas(count, url, tmp_path)
        try:
            yield servers
        finally:
            for srv in servers:
                srv.stop()


def report(client: httpx.Client, agent: str, state: str, at: datetime, **headers: str) -> httpx.Response:
    body = {"agentId": agent, "timestamp": at.isoformat(), "state": state, "details": {}}
    return client.post(f"/v1/opscore/agent/{agent}/state", json=body, headers=headers)


def all_records(client: httpx.Client, agent: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/opscore/agent/{agent}/audit", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        records += body["items"]
        cursor = body["nextCursor"]
        if cursor is None:
            return records


def assert_consistent(client: httpx.Client, agent: str) -> list[dict[str, Any]]:
    """Revision == applied records, seq 1..n without gaps, and the whole store verifies."""
    records = all_records(client, agent)
    entity = client.get(f"/v1/opscore/agent/{agent}").json()
    applied = [r for r in records if r["outcome"] == "applied"]
    assert entity["revision"] == len(applied)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    if applied:
        assert entity["state"] == applied[-1]["dest"]
    verification = client.get("/v1/opscore/audit/verify").json()
    assert verification["ok"] is True, verification["problems"]
    return records


@pytest.mark.parametrize("replicas", [pytest.param(3, id="3-replicas")], indirect=True)
def test_conflicting_reports_across_replicas_lose_no_update(replicas: list[Server]) -> None:
    threads, per_thread = 9, 30
    targets = ["idle", "active", "error", "initializing", "offline"]
    answers: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(n)
        srv = replicas[n % len(replicas)]
        with srv.client() as client:
            for _ in range(per_thread):
                answer = report(client, "hot", rng.choice(targets), datetime.now(UTC))
                with lock:
                    answers.append((answer.status_code, answer.json()))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))

    statuses = {status for status, _ in answers}
    assert all(s < 500 for s in statuses), [a for a in answers if a[0] >= 500][:3]
    assert statuses <= {200, 409}
    codes = {body.get("code") for status, body in answers if status == 409}
    assert codes <= {"illegal_transition", "stale_report", "revision_conflict"}
    with replicas[0].client() as client:
        records = assert_consistent(client, "hot")
    applied_ids = {r["id"] for r in records if r["outcome"] == "applied"}
    acknowledged = {body["auditId"] for status, body in answers if status == 200 and body["changed"]}
    assert acknowledged == applied_ids  # every applied transition was answered once, and only those
    assert len(applied_ids) > 10  # the load really moved the agent, from every replica
    refused_ids = {body["auditId"] for status, body in answers if status == 409 and body.get("auditId")}
    assert refused_ids <= {r["id"] for r in records if r["outcome"] == "rejected"}


def test_an_idempotency_key_holds_across_replicas(replicas: list[Server]) -> None:
    a, b = replicas
    at = datetime.now(UTC)
    with a.client() as ca, b.client() as cb:
        first = report(ca, "a1", "idle", at, **{"Idempotency-Key": "key-1"})
        again = report(cb, "a1", "idle", at, **{"Idempotency-Key": "key-1"})
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        assert first.json()["changed"] is True and first.json()["auditId"] is not None
        other = report(cb, "a1", "active", at, **{"Idempotency-Key": "key-1"})
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
        assert len(all_records(cb, "a1")) == 1

    # The same key raced on both replicas at once: one transition, one answer for all.
    barrier = threading.Barrier(6)

    def send(n: int) -> tuple[int, str]:
        srv = replicas[n % 2]
        with srv.client() as client:
            barrier.wait()
            answer = report(client, "a2", "idle", at, **{"Idempotency-Key": "key-2"})
            return answer.status_code, answer.text

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(6)))
    assert {status for status, _ in results} == {200}
    bodies = {json.dumps(json.loads(text), sort_keys=True) for _, text in results}
    assert len(bodies) == 1
    with a.client() as client:
        records = assert_consistent(client, "a2")
        assert len(records) == 1 and json.loads(bodies.pop())["auditId"] == records[0]["id"]


def test_a_webhook_replayed_on_another_replica_is_refused(replicas: list[Server]) -> None:
    a, b = replicas

    def signed(agent: str) -> tuple[bytes, dict[str, str]]:
        details = {
            "agentId": agent,
            "agentName": agent,
            "version": "1",
            "capabilities": ["search"],
            "contactEndpoint": "http://127.0.0.1:9/",
            "metadata": {},
        }
        raw = json.dumps({"event_type": "REGISTER", "agent_details": details}).encode()
        stamp = str(int(time.time()))
        return raw, {
            "X-AgentKit-Timestamp": stamp,
            "X-AgentKit-Signature": sign(a.webhook_secret.encode(), stamp, raw),
            "Content-Type": "application/json",
        }

    path = "/v1/opscore/internal/agent/notify"
    raw, headers = signed("w1")
    assert httpx.post(a.url + path, content=raw, headers=headers).status_code == 200
    replay = httpx.post(b.url + path, content=raw, headers=headers)
    assert replay.status_code == 401 and replay.json()["code"] == "replayed"

    raw, headers = signed("w2")
    barrier = threading.Barrier(4)

    def send(n: int) -> int:
        barrier.wait()
        return httpx.post(replicas[n % 2].url + path, content=raw, headers=headers).status_code

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(send, range(4))) == [200, 401, 401, 401]


@pytest.mark.parametrize("replicas", [pytest.param(3, id="3-replicas")], indirect=True)
def test_kill_9_of_one_replica_loses_nothing_acknowledged(replicas: list[Server]) -> None:
    """Each thread owns agents and toggles them idle/active over every live replica."""
    threads, agents_per_thread, per_thread = 6, 3, 60
    victim = replicas[0]
    acknowledged: list[tuple[str, int, int]] = []  # (agent, auditId, revision)
    after_kill = 0
    killed = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal after_kill
        clients = [srv.client() for srv in replicas]
        start = datetime.now(UTC)
        try:
            for i in range(per_thread):
                agent = f"t{n}-a{i % agents_per_thread}"
                state = "idle" if (i // agents_per_thread) % 2 == 0 else "active"
                at = start + timedelta(milliseconds=i)
                index = (n + i) % len(replicas)
                try:
                    answer = report(clients[index], agent, state, at)
                except httpx.TransportError:
                    assert index == 0 and killed.is_set()  # only the killed replica may fail
                    continue
                assert answer.status_code == 200, answer.text
                body = answer.json()
                with lock:
                    if body["changed"]:
                        acknowledged.append((agent, body["auditId"], body["revision"]))
                    if killed.is_set():
                        after_kill += 1
        finally:
            for client in clients:
                client.close()

    def killer() -> None:
        while True:
            with lock:
                if len(acknowledged) >= threads * per_thread // 4:
                    break
            time.sleep(0.01)
        killed.set()  # first: a request failing from now on may have met the dying replica
        victim.kill()

    with ThreadPoolExecutor(threads + 1) as pool:
        kill = pool.submit(killer)
        list(pool.map(worker, range(threads)))
        kill.result()

    assert victim.process is not None and victim.process.returncode == -9
    assert after_kill > 0  # the others carried on
    survivor = replicas[1]
    with survivor.client() as client:
        for n in range(threads):
            for k in range(agents_per_thread):
                agent = f"t{n}-a{k}"
                records = assert_consistent(client, agent)
                stored = {r["id"]: r for r in records}
                mine = [(audit_id, rev) for a, audit_id, rev in acknowledged if a == agent]
                assert mine, agent
                for audit_id, _ in mine:
                    assert stored[audit_id]["outcome"] == "applied" and stored[audit_id]["entityId"] == agent
                revision = client.get(f"/v1/opscore/agent/{agent}").json()["revision"]
                assert revision >= max(rev for _, rev in mine)
