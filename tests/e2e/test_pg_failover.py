"""A failover under load, over HTTP against a real ``opscore serve`` on PostgreSQL.

A TCP proxy this test controls stands between Ops-Core and PostgreSQL, as a managed
database's endpoint does: while agents report, it cuts every connection and refuses new ones
for a few seconds, then accepts again (the real cluster is never touched). During the outage
``/ready`` answers 503 and reports answer 503 with a ``code``, never 500; afterwards, without
restarting Ops-Core, reports succeed again within seconds; and every answer told the truth:
each report answered 200 is in the audit log, each answered 503 ``unavailable`` is not, and a
report whose COMMIT was cut is either found committed (200) or answered
``commit_outcome_unknown`` (counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import PG_URL
from tests.e2e.test_replicas import assert_consistent, report
from tests.servers import Server
from tests.storage.test_pg_commit_outcome import through

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set"),
]


class FailoverProxy:
    """A TCP proxy on a fixed port, in its own thread: ``outage()`` cuts everything and refuses for a while."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.connections = 0

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> FailoverProxy:
        self.thread.start()
        self._run(self._listen())
        return self

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        pair = (client_w, server_w)
        self.pairs.add(pair)
        self.connections += 1

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w), return_exceptions=True)
        self.pairs.discard(pair)

    async def _cut(self) -> int:
        if self.server is not None:
            self.server.close()  # new connections are refused from now on
            self.server = None
        cut = len(self.pairs)
        for pair in list(self.pairs):
            for writer in pair:
                writer.transport.abort()  # a reset, as when the old primary's host goes away
        return cut

    def cut(self) -> int:
        """Cut every connection and stop listening: connecting is refused until :meth:`resume`."""
        return int(self._run(self._cut()))

    def resume(self, target: tuple[str, int] | None = None) -> None:
        """Listen again on the same port, optionally forwarding to another address (the new primary)."""
        if target is not None:
            self.target = target
        self._run(self._listen())

    def stop(self) -> None:
        self._run(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Answer:
    agent: str
    state: str
    status: int
    body: dict[str, Any]
    request_id: str
    at: float

    @classmethod
    def of(cls, agent: str, state: str, answer: httpx.Response) -> Answer:
        """What ``answer`` told about ``agent``'s report of ``state``, and when it came."""
        return cls(agent, state, answer.status_code, answer.json(), answer.headers["x-request-id"], time.monotonic())


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Server, FailoverProxy]]:
    from tests.pg import fresh_schema

    parts = urlsplit(PG_URL)
    with fresh_schema(PG_URL) as url:
        proxy = FailoverProxy((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
        server = Server(
            database_url=through(url, proxy.port),
            log_path=tmp_path / "server.log",
            env={"OPSCORE_PG_POOL_TIMEOUT": "2", "OPSCORE_PG_POOL_MIN": "2", "OPSCORE_PG_POOL_MAX": "8"},
        )
        try:
            server.start()
            yield server, proxy
        finally:
            server.stop()
            proxy.stop()


def test_reports_across_a_failover_answer_the_truth_and_recover(proxied: tuple[Server, FailoverProxy]) -> None:
    server, proxy = proxied
    assert server.process is not None
    pid = server.process.pid
    agents = 6
    answers: list[Answer] = []
    ready: list[tuple[float, int, dict[str, Any]]] = []
    lock = threading.Lock()
    phase: dict[str, Any] = {"stop": False, "cut_at": None, "resumed_at": None}

    def reporter(n: int) -> None:
        agent, states, i = f"fo-{n}", ["idle", "active"], 0
        with server.client() as client:
            while not phase["stop"]:
                state = states[i % 2]
                i += 1
                answer = report(client, agent, state, datetime.now(UTC))
                with lock:
                    answers.append(Answer.of(agent, state, answer))
                if answer.status_code >= 500:
                    time.sleep(0.05)

    late: list[Answer] = []

    def late_reporter() -> None:
        """New agents, one report each, sent only while the database is away.

        The reporters above may all be waiting, for the whole outage, on changes they sent just
        before the cut (a COMMIT cut is settled once the database is back, and what was queued
        behind it waits too). A new agent is in no cache: its report must ask the database,
        and the outage answers it.
        """
        n = 0
        with server.client() as client:
            while not phase["stop"] and phase["resumed_at"] is None:
                if phase["cut_at"] is None:
                    time.sleep(0.01)
                    continue
                agent = f"fo-late-{n}"
                n += 1
                answer = report(client, agent, "idle", datetime.now(UTC))
                with lock:
                    late.append(Answer.of(agent, "idle", answer))
                time.sleep(0.1)

    def prober() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not phase["stop"]:
                answer = client.get("/ready")
                with lock:
                    ready.append((time.monotonic(), answer.status_code, answer.json()))
                time.sleep(0.1)

    with ThreadPoolExecutor(agents + 2) as pool:
        futures = [pool.submit(reporter, n) for n in range(agents)] + [pool.submit(prober), pool.submit(late_reporter)]
        try:
            time.sleep(1.5)  # load on a healthy database first
            cut_at = time.monotonic()
            assert proxy.cut() > 0  # the server's pooled connections were open, and are gone
            phase["cut_at"] = cut_at
            time.sleep(4.0)  # the outage: connecting is refused
            proxy.resume()
            resumed_at = time.monotonic()
            phase["resumed_at"] = resumed_at
            # every agent succeeds again, without restarting Ops-Core (a generous bound, not a timing)
            deadline = resumed_at + 30
            while time.monotonic() < deadline:
                with lock:
                    recovered = {a.agent for a in answers if a.at > resumed_at and a.status == 200}
                if len(recovered) == agents:
                    break
                time.sleep(0.1)
            time.sleep(1.0)
        finally:
            phase["stop"] = True
            for future in futures:
                future.result()
    assert server.process.poll() is None and server.process.pid == pid  # never restarted

    during = [a for a in answers if cut_at < a.at < resumed_at]
    after = [a for a in answers if a.at > resumed_at]
    statuses = Counter(a.status for a in answers)
    codes = Counter(a.body.get("code") for a in answers if a.status >= 500)
    first_ok = min((a.at for a in after if a.status == 200), default=None)
    print(
        f"answers: {dict(statuses)}; 5xx codes: {dict(codes)}; during the outage: "
        f"{dict(Counter(a.status for a in during))}; first 200 after resume: "
        f"{None if first_ok is None else round(first_ok - resumed_at, 2)} s; "
        f"/ready: {dict(Counter(s for _, s, _ in ready))}; proxy connections: {proxy.connections}"
    )
    late_during = [a for a in late if a.at < resumed_at]
    print(f"new agents during the outage: {dict(Counter((a.status, a.body.get('code')) for a in late))}")
    assert set(statuses) <= {200, 503}, statuses  # never a 500
    assert set(codes) <= {"unavailable", "commit_outcome_unknown"}, codes
    assert any(a.status == 503 for a in during + late_during), "no report saw the outage"
    assert all(a.status in (200, 503) for a in late), late
    assert {a.agent for a in after if a.status == 200} == {f"fo-{n}" for n in range(agents)}
    assert any(status == 503 and body["code"] == "storage_not_writable" for t, status, body in ready
               if cut_at < t < resumed_at)  # fmt: skip
    assert ready[-1][1] == 200, ready[-5:]

    # The truth of every answer, against the audit log read after the failover.
    with server.client() as client:
        applied_by_request: dict[str, dict[str, Any]] = {}
        for n in range(agents):
            records = assert_consistent(client, f"fo-{n}")  # seq gap-free, revision = applied, all verify
            for record in records:
                applied_by_request[record["requestId"]] = record
        for a in late:  # a new agent answered 503 unavailable was never created
            if a.status == 503 and a.body["code"] == "unavailable":
                assert client.get(f"/v1/opscore/agent/{a.agent}").status_code == 404, a
    told: Counter[str] = Counter()
    for a in answers:
        record = applied_by_request.get(a.request_id)
        if a.status == 200 and a.body["changed"]:
            assert record is not None and record["id"] == a.body["auditId"], a  # acknowledged: it is there
            told["200 applied"] += 1
        elif a.status == 200:
            assert record is None or record["outcome"] != "applied", a
            told["200 unchanged"] += 1
        elif a.body["code"] == "unavailable":
            assert record is None, f"answered 503 unavailable but applied: {a}"
            told["503 not applied"] += 1
        else:  # commit_outcome_unknown: the answer says it may have committed
            told["503 unknown, applied" if record is not None else "503 unknown, not applied"] += 1
    assert server.log_path is not None
    settled = server.log_path.read_text().count("a COMMIT lost its connection but had committed")
    print(f"answers against the audit log: {dict(told)}; COMMITs cut and found committed (200): {settled}")
    assert told["200 applied"] > 0 and told["503 not applied"] + told["503 unknown, not applied"] > 0
