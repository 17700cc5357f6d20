"""``opscore serve`` as a process: its log after SIGTERM, and the HTTP limits a public service needs.

Real server processes, because these are about processes and sockets: a signal and what stdout
holds afterwards, headers that never end, clients that trickle, connections held open.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from opscore.config import anonymous_name
from tests.api.helpers import report
from tests.servers import Server, free_port

pytestmark = pytest.mark.slow

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")
STATE_ROUTE = "/v1/opscore/agent/{agent_id}/state"


def test_sigterm_exits_0_and_every_stdout_line_is_one_json_style(database_url: str, tmp_path: Path) -> None:
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    server = Server(database_url=database_url, log_path=out, stderr_path=err).start()
    with server.client() as client:
        assert report(client, "s1", "idle").status_code == 200
        assert client.get("/v1/opscore/agent/s1/state").status_code == 200
        assert client.get("/v1/opscore/agent/s2/state").status_code == 404
        assert client.get("/no/such/path").status_code == 404
        traced = client.get("/health", headers={"X-Request-Id": 'client "id" \\ 7'})
        assert traced.headers["x-client-request-id"] == 'client "id" \\ 7'
        assert traced.headers["x-request-id"] != 'client "id" \\ 7'
    assert httpx.get(server.url + "/v1/opscore/agents", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert server.stop() == 0  # not 143: the signal is handled, not re-raised

    stdout, stderr = out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8")
    assert "\x1b[" not in stdout and "\x1b[" not in stderr
    assert server.api_key not in stdout
    lines = [json.loads(raw) for raw in stdout.splitlines()]  # every line, none skipped
    assert len(lines) >= 12
    for line in lines:
        assert list(line)[:4] == ["time", "level", "logger", "message"], line
        assert ISO_UTC.match(line["time"]), line["time"]
    messages = [line["message"] for line in lines]
    for expected in ("Started server process", "Application startup complete.", "Shutting down"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    # the last lines, lost before (uvicorn re-raised SIGTERM before the log thread flushed)
    assert "Application shutdown complete." in messages
    assert messages[-1].startswith("Finished server process")
    assert [line["keyNames"] for line in lines if line["message"] == "api keys"] == [
        [anonymous_name(server.api_key.encode())]
    ]

    access = [line for line in lines if line["logger"] == "opscore.access"]
    assert all(line["message"] == "request" for line in access)
    seen = {(a["method"], a["route"], a["status"], a["keyName"]) for a in access}
    key_name = anonymous_name(server.api_key.encode())
    assert ("POST", STATE_ROUTE, 200, key_name) in seen
    assert ("GET", STATE_ROUTE, 200, key_name) in seen
    assert ("GET", STATE_ROUTE, 404, key_name) in seen  # the route template, never /agent/s2/state
    assert ("GET", None, 404, None) in seen  # no route matched: no path either
    assert ("GET", "/v1/opscore/agents", 401, None) in seen
    assert not any("s1" in json.dumps(a) or "/no/such" in json.dumps(a) for a in access)
    assert any(a.get("clientRequestId") == 'client "id" \\ 7' for a in access)
    for line in access:
        assert isinstance(line["durationMs"], float) and line["durationMs"] >= 0
        assert set(line) - {"clientRequestId"} == {
            "time",
            "level",
            "logger",
            "message",
            "method",
            "route",
            "status",
            "durationMs",
            "requestId",
            "keyName",
        }
    transitions = [line for line in lines if line["message"] == "transition"]
    assert len(transitions) == 1 and transitions[0]["requestId"] in {a["requestId"] for a in access}


def _recv_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _json_body(raw: bytes) -> dict[str, object]:
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


def test_a_huge_header_is_refused_early_and_memory_stays_flat(sqlite_url: str, tmp_path: Path) -> None:
    server = Server(database_url=sqlite_url, log_path=tmp_path / "server.log").start()
    try:
        # just over the default limit (64 KiB): 431 with the error shape
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
            answer = _recv_all(sock)
        assert _status(answer) == 431, answer[:200]
        assert _json_body(answer)["code"] == "headers_too_large"

        # 100 MiB of one header value: refused after the limit, not buffered (65 → 270 MB before)
        before = server.rss_mb()
        sent = 0
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ")
            chunk = b"a" * (1 << 20)
            with pytest.raises(OSError):  # broken pipe / reset: the server closed the connection
                while sent < 100 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
        assert sent < 16 << 20, f"the server read {sent >> 20} MiB of one header"
        assert server.rss_mb() - before < 20
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        assert server.stop() == 0


def test_slow_clients_are_dropped_and_health_answers_meanwhile(sqlite_url: str, tmp_path: Path) -> None:
    server = Server(
        database_url=sqlite_url, log_path=tmp_path / "server.log", env={"OPSCORE_READ_TIMEOUT_SECONDS": "2"}
    ).start()
    slow: list[socket.socket] = []
    body_trickle: list[socket.socket] = []
    silent: list[socket.socket] = []
    try:
        for _ in range(300):  # headers trickled a line at a time
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
            slow.append(sock)
        for _ in range(5):  # a body that never arrives whole
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(
                b"POST /v1/opscore/agent/x/state HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                + server.api_key.encode()
                + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"agentId"'
            )
            body_trickle.append(sock)
        silent += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]  # never send a byte
        started = time.monotonic()
        worst = 0.0
        while time.monotonic() - started < 1.5:  # before the deadline: everyone is still connected
            for sock in slow:
                sock.sendall(b"X-Slow: 1\r\n")
            asked = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            worst = max(worst, time.monotonic() - asked)
            time.sleep(0.2)
        assert worst < 1.0, f"/health took {worst:.2f} s with 310 slow connections open"

        time.sleep(max(0.0, started + 3.5 - time.monotonic()))  # 2 s deadline + a sweep (0.5 s) + slack
        answers = [_recv_all(sock, timeout=3) for sock in slow + body_trickle + silent]
        assert all(_status(a) == 408 for a in answers), {_status(a) for a in answers}
        assert _json_body(answers[0]) == {
            "detail": "the request did not arrive whole within 2 s",
            "code": "read_timeout",
        }
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        for sock in slow + body_trickle + silent:
            sock.close()
        assert server.stop() == 0
    log = [json.loads(raw) for raw in (tmp_path / "server.log").read_text().splitlines() if raw.startswith("{")]
    refused = [line for line in log if line["message"] == "refused requests"]
    assert sum(line["refusals"].get("read_timeout", 0) for line in refused) == 310


def test_over_the_connection_limit_a_json_503(sqlite_url: str, tmp_path: Path) -> None:
    server = Server(
        database_url=sqlite_url, log_path=tmp_path / "server.log", env={"OPSCORE_MAX_CONNECTIONS": "5"}
    ).start()
    idle: list[socket.socket] = []
    try:
        idle += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]
        time.sleep(0.3)  # accepted by the event loop
        busy = httpx.get(server.url + "/health")
        assert busy.status_code == 503
        assert busy.json() == {
            "detail": "the server is at its connection limit; retry shortly",
            "code": "too_many_connections",
        }
        assert busy.headers["retry-after"] == "1"
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        for sock in idle:
            sock.close()
        assert server.stop() == 0


@pytest.mark.parametrize("how", ["opscore serve", "uvicorn opscore.api:app"])
def test_max_body_bytes_from_the_environment_is_enforced(how: str, sqlite_url: str, tmp_path: Path) -> None:
    """Before, the limit was fixed when ``create_app()`` built the middleware, ahead of any settings."""
    port = free_port()
    argv = None
    if how.startswith("uvicorn"):
        argv = [sys.executable, "-m", "uvicorn", "opscore.api:app", "--host", "127.0.0.1", "--port", str(port)]
    server = Server(
        database_url=sqlite_url,
        port=port,
        argv=argv,
        log_path=tmp_path / "server.log",
        env={"OPSCORE_MAX_BODY_BYTES": "1000"},
    ).start()
    try:
        path = "/v1/opscore/agent/b1/state"
        big = {"agentId": "b1", "timestamp": "2026-01-01T00:00:00Z", "state": "idle", "details": {"x": "y" * 5000}}
        with server.client() as client:
            declared = client.post(path, json=big)
            assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large", declared.text
            chunked = client.post(path, content=iter([json.dumps(big).encode()]))
            assert chunked.status_code == 413 and chunked.json()["code"] == "payload_too_large", chunked.text
            assert report(client, "b1", "idle").status_code == 200  # a small body still passes
    finally:
        server.stop()
