"""The audit stream against a real ``opscore serve``: dropped connections, resumption, SIGTERM, a client
that stops reading its socket (DESIGN §10). The contract in detail is tested in process
(``tests/api/test_stream.py``); this is what only a real server and real sockets show.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.servers import Server
from tests.sse import Event, Parser

V1 = "/v1/opscore"
WRITERS = {"sqlite": 4, "postgresql": 4}
"""Concurrent writers per backend. On PostgreSQL they write through two replicas (two writers each)
and the reader alternates between the replicas: positions are (transaction id, record id) served
below the oldest running transaction (opscore/storage/postgres.py), so no record that commits
late behind a higher id is skipped, whichever replica wrote it."""


def all_positions(server: Server) -> list[int]:
    """Every record id, in the order the audit listing gives (SQLite: commit order)."""
    ids: list[int] = []
    cursor = None
    with server.client() as client:
        while True:
            page = client.get(f"{V1}/audit", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
            ids.extend(int(r["id"]) for r in page["items"])
            cursor = page["nextCursor"]
            if cursor is None:
                return ids


def read_some(server: Server, last: str, wanted: int, deadline: float) -> tuple[list[Event], bool]:
    """Open the stream after ``last``, take up to ``wanted`` records, then drop the connection."""
    got: list[Event] = []
    parser = Parser()
    headers = {**server.headers, "Last-Event-ID": last}
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(5, read=2)) as client:
        try:
            with client.stream("GET", f"{V1}/audit/stream", headers=headers) as answer:
                assert answer.status_code == 200, answer.read()
                for chunk in answer.iter_raw():
                    for event in parser.feed(chunk):
                        if event.event == "audit":
                            got.append(event)
                    if len(got) >= wanted or time.monotonic() > deadline:
                        return got, False  # leaving the with-blocks drops the connection mid-stream
        except httpx.ReadTimeout:
            return got, True  # nothing more for 2 s: caught up
    return got, False


@pytest.mark.slow
def test_a_reader_resuming_after_random_drops_gets_every_record_once_in_order(
    database_url: str, tmp_path: Path
) -> None:
    backend = database_url.split(":")[0]
    server = Server(database_url=database_url, log_path=tmp_path / "server.log").start()
    servers = [server]
    try:
        if backend == "postgresql":
            servers.append(Server(database_url=database_url, log_path=tmp_path / "server-2.log").start())
        writers = WRITERS[backend]
        per_writer = 600 // writers
        errors: list[str] = []

        def write(n: int) -> None:
            with servers[n % len(servers)].client() as client:
                for i in range(per_writer):
                    agent = f"w{n}-{i % 10}"
                    state = ("idle", "active")[(i // 10) % 2]
                    body = {"timestamp": datetime.now(UTC).isoformat(), "state": state}
                    answer = client.post(f"{V1}/agent/{agent}/state", json=body)
                    if answer.status_code not in (200, 409):
                        errors.append(answer.text)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        rng = random.Random(7)
        received: list[Event] = []
        last, drops = "0", 0
        deadline = time.monotonic() + 120
        while True:
            got, idle = read_some(servers[drops % len(servers)], last, rng.randint(1, 60), deadline)
            received.extend(got)
            if got:
                last = got[-1].id or last
            drops += 1
            if idle and not any(t.is_alive() for t in threads):
                break
            assert time.monotonic() < deadline, "the reader never caught up"
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        expected = all_positions(server)
        ids = [int(json.loads(e.data)["id"]) for e in received]  # positions are opaque; records carry ids
        assert len(expected) >= writers * per_writer  # refusals are records too
        duplicates = len(ids) - len(set(ids))
        missing = sorted(set(expected) - set(ids))
        print(
            f"stream over {backend} ({len(servers)} replica(s), {writers} writers): delivered {len(ids)}, "
            f"expected {len(expected)}, duplicates {duplicates}, missing {len(missing)}, reconnections {drops}"
        )
        assert duplicates == 0 and not missing and len(ids) == len(expected)
        positions = [e.id or "" for e in received]
        assert len(set(positions)) == len(positions)
        if backend == "sqlite":
            assert ids == expected  # one writer: commit order is id order
            assert positions == [str(i) for i in ids]
        else:  # one order across replicas: (transaction, id), growing
            keys = [tuple(int(part) for part in p.split("-")) for p in positions]
            assert keys == sorted(keys)
    finally:
        for srv in servers:
            srv.stop()


def raw_stream(server: Server, path: str, extra: str = "", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.api_key}\r\n{extra}\r\n".encode()
    )
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def sse_events(raw: bytes) -> list[Event]:
    """Events in a raw chunked HTTP/1.1 answer (headers and chunk sizes dropped)."""
    _, _, body = raw.partition(b"\r\n\r\n")
    payload = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line, 16)
        except ValueError:
            break
        if size == 0:
            break
        payload += rest[:size]
        body = rest[size + 2 :]
    return Parser().feed(payload)


@pytest.mark.slow
def test_a_client_that_stops_reading_is_dropped_with_memory_flat_and_resumes(tmp_path: Path) -> None:
    server = Server(
        database_url=f"sqlite:///{tmp_path / 'slow.db'}",
        log_path=tmp_path / "server.log",
        env={"OPSCORE_STREAM_SEND_TIMEOUT_SECONDS": "1"},
    ).start()
    try:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
            for start in range(0, 20_000, 1000):  # ~10 MB of events the client never reads
                reports = [
                    {"agentId": f"slow-{n}", "timestamp": datetime.now(UTC).isoformat(), "state": "idle",
                     "details": {"padding": "x" * 200}}
                    for n in range(start, start + 1000)
                ]  # fmt: skip
                assert client.post(f"{V1}/state-reports", json={"reports": reports}).status_code == 200
        rss_before = server.rss_mb()  # the records are written: what follows is the stream's own cost
        sock = raw_stream(server, f"{V1}/audit/stream?after=0", rcvbuf=4096)  # ~10 MB to send, none read
        time.sleep(3)  # past the send timeout and the final event's grace
        rss_after = server.rss_mb()
        raw = read_until_closed(sock)
        sock.close()
        events = sse_events(raw)
        audit = [e for e in events if e.event == "audit"]
        print(
            f"slow client: {len(audit)} records taken before the drop, RSS {rss_before:.0f} -> {rss_after:.0f} MB, "
            f"final end event delivered: {any(e.event == 'end' for e in events)}"
        )
        assert rss_after - rss_before < 8, (rss_before, rss_after)  # a page and a socket buffer, not the backlog
        assert 0 < len(audit) < 20_000
        log = (tmp_path / "server.log").read_text()
        assert '"reason":"slow_consumer"' in log
        # it resumes where it stopped and gets the rest, once
        last = audit[-1].id
        seen = {int(e.id or 0) for e in audit}
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(10, read=3)) as client:
            rest: list[int] = []
            parser = Parser()
            try:
                with client.stream(
                    "GET", f"{V1}/audit/stream", headers={**server.headers, "Last-Event-ID": last or "0"}
                ) as answer:
                    for chunk in answer.iter_raw():
                        rest.extend(int(e.id or 0) for e in parser.feed(chunk) if e.event == "audit")
                        if len(seen) + len(rest) >= 20_000:
                            break
            except httpx.ReadTimeout:
                pass
        assert not seen & set(rest)
        assert sorted(seen | set(rest)) == all_positions(server)
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_ends_open_streams_with_a_reason_and_exits_promptly(tmp_path: Path) -> None:
    server = Server(database_url=f"sqlite:///{tmp_path / 'term.db'}", log_path=tmp_path / "server.log").start()
    sock = raw_stream(server, f"{V1}/audit/stream")
    time.sleep(0.3)
    started = time.monotonic()
    status = server.stop()
    took = time.monotonic() - started
    raw = read_until_closed(sock, timeout=5)
    sock.close()
    ends = [e for e in sse_events(raw) if e.event == "end"]
    assert status == 0
    assert took < 5, took  # not the 10 s graceful timeout an open response would hold it for
    assert len(ends) == 1 and ends[0].json["reason"] == "shutdown"


@pytest.mark.slow
def test_a_dropped_connection_frees_its_slot(tmp_path: Path) -> None:
    server = Server(
        database_url=f"sqlite:///{tmp_path / 'slots.db'}",
        log_path=tmp_path / "server.log",
        env={"OPSCORE_MAX_STREAMS_PER_KEY": "1"},
    ).start()
    try:
        first = raw_stream(server, f"{V1}/audit/stream")
        time.sleep(0.3)
        with server.client() as client:
            refused = client.get(f"{V1}/audit/stream")
            assert refused.status_code == 429 and refused.json()["code"] == "too_many_streams"
        first.close()
        deadline = time.monotonic() + 5
        while True:
            second = raw_stream(server, f"{V1}/audit/stream")
            second.settimeout(3)
            head = second.recv(200)
            second.close()
            if head.startswith(b"HTTP/1.1 200"):
                break
            assert time.monotonic() < deadline, head
            time.sleep(0.1)
    finally:
        server.stop()


@pytest.mark.slow
def test_the_python_client_follows_the_real_stream_across_its_ends(tmp_path: Path) -> None:
    """``opscore.client`` against this server: streams ended by age are resumed, nothing lost or repeated."""
    from opscore.client import Client

    server = Server(
        database_url=f"sqlite:///{tmp_path / 'client.db'}",
        log_path=tmp_path / "server.log",
        env={"OPSCORE_STREAM_MAX_SECONDS": "1"},
    ).start()
    try:

        def write() -> None:
            with server.client() as client:
                for i in range(24):
                    state = ("idle", "active")[i % 2]
                    client.post(
                        f"{V1}/agent/c-{i % 3}/state", json={"timestamp": datetime.now(UTC).isoformat(), "state": state}
                    )
                    time.sleep(0.2)

        writer = threading.Thread(target=write)
        writer.start()
        seen: list[int] = []

        def read() -> None:
            with Client(server.url, server.api_key) as ops:
                for record in ops.stream_audit(after=0):
                    seen.append(int(record.id))
                    if len(seen) >= 24:  # each report below leaves one record (no report repeats a state)
                        return

        reader = threading.Thread(target=read, daemon=True)  # a daemon: a reader left waiting cannot hang the run
        reader.start()
        writer.join()
        reader.join(60)
        assert not reader.is_alive(), f"the client got {len(seen)} of {len(all_positions(server))} records in 60 s"
        assert len(all_positions(server)) == 24 and seen == all_positions(server)
        assert '"reason":"max_age"' in (tmp_path / "server.log").read_text()  # it was ended, and resumed
    finally:
        server.stop()
