"""The operator console's HTTP behaviour in process, on every store: sign-in, the cookie, CSRF, pages.

What a browser does with it (live updates, buttons, time travel) is in ``tests/browser/test_console.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from opscore.api import sessions
from opscore.checkpoints import make_signing_key
from opscore.keys import ApiKey
from tests.inproc import API_KEY, serve

Body = Callable[[FastAPI, httpx.AsyncClient, httpx.AsyncClient], Awaitable[None]]
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


def run(store_url: str, body: Body, **settings: Any) -> None:
    async def main() -> None:
        async with serve(store_url, **settings) as (app, client):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://opscore.test") as browser:
                await body(app, client, browser)

    asyncio.run(main())


async def report(client: httpx.AsyncClient, agent_id: str, state: str) -> httpx.Response:
    body = {"timestamp": datetime.now(UTC).isoformat(), "state": state}
    return await client.post(f"/v1/opscore/agent/{agent_id}/state", json=body)


async def sign_in(browser: httpx.AsyncClient, key: str = API_KEY) -> str:
    answer = await browser.post("/console/login", data={"key": key, "next": "/console/runs"}, headers=SAME_ORIGIN)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/runs", answer.text
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert key not in cookie
    page = await browser.get("/console/")
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return found.group(1)


def test_the_root_redirects_and_pages_need_a_session(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        answer = await browser.get("/")
        assert answer.status_code == 307 and answer.headers["location"] == "/console/"
        for path in ["/console/", "/console/runs", "/console/audit", "/console/agents/a", "/console/runs/x"]:
            answer = await browser.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login?next="), path
        assert (await browser.get("/console/fragments/fleet")).status_code == 401
        login = await browser.get("/console/login")
        assert login.status_code == 200 and 'type="password"' in login.text
        csp = login.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert login.headers["x-frame-options"] == "DENY" and login.headers["cache-control"] == "no-store"

    run(store_url, body)


def test_sign_in_refuses_a_bad_key_another_site_and_an_open_redirect(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        bad = await browser.post("/console/login", data={"key": "nope"}, headers=SAME_ORIGIN)
        assert bad.status_code == 401 and "not valid" in bad.text and "set-cookie" not in bad.headers
        cross = await browser.post("/console/login", data={"key": API_KEY}, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403 and "set-cookie" not in cross.headers
        foreign = await browser.post(
            "/console/login", data={"key": API_KEY}, headers={"Origin": "http://evil.example", "Host": "opscore.test"}
        )
        assert foreign.status_code == 403
        for target in ["https://evil.example/", "//evil.example/", "/v1/opscore/agents", "/console/\\\\evil"]:
            answer = await browser.post("/console/login", data={"key": API_KEY, "next": target}, headers=SAME_ORIGIN)
            assert answer.status_code == 303 and answer.headers["location"] == "/console/", target

    run(store_url, body)


def test_the_cookie_is_the_key_with_csrf_for_unsafe_methods_and_sign_out_revokes_it(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        assert (await report(client, "c-1", "idle")).status_code == 200
        csrf = await sign_in(browser)
        assert (await browser.get("/v1/opscore/agents")).status_code == 200
        # an unsafe request needs the page's token
        trigger = {"trigger": "begin_task"}
        refused = await browser.post("/v1/opscore/agent/c-1/transitions", json=trigger)
        assert refused.status_code == 403 and refused.json()["code"] == "csrf_failed"
        wrong = await browser.post("/v1/opscore/agent/c-1/transitions", json=trigger, headers={"X-CSRF-Token": "x"})
        assert wrong.status_code == 403
        done = await browser.post("/v1/opscore/agent/c-1/transitions", json=trigger, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200 and done.json()["state"] == "active"
        records = (await client.get("/v1/opscore/agent/c-1/audit")).json()["items"]
        assert records[-1]["actor"] == f"key:{app.state.api_keys[0].name}"  # the key's actor, as with a bearer
        # a forged or altered cookie is nobody
        value = browser.cookies[sessions.COOKIE]
        head, _, tail = value.partition(".")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://opscore.test") as other:
            for forged in [head + "." + tail[:-2] + "AA", head[:-2] + "AA." + tail, "x.y", "nodot"]:
                other.cookies.set(sessions.COOKIE, forged)
                answer = await other.get("/v1/opscore/agents")
                assert answer.status_code == 401 and answer.json()["code"] == "unauthorized", forged
        # signing out clears the cookie and the session is refused from then on, even replayed
        out = await browser.post("/console/logout", data={"csrf": csrf}, headers=SAME_ORIGIN)
        assert out.status_code == 303 and 'opscore_session=""' in out.headers["set-cookie"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://opscore.test") as thief:
            thief.cookies.set(sessions.COOKIE, value)
            assert (await thief.get("/v1/opscore/agents")).status_code == 401

    run(store_url, body)


def test_sign_out_needs_the_page_token_and_sessions_expire(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        await sign_in(browser)
        forged = await browser.post("/console/logout", data={"csrf": "guess"}, headers=SAME_ORIGIN)
        assert forged.status_code == 403
        assert (await browser.get("/v1/opscore/agents")).status_code == 200  # still signed in
        time.sleep(2.1)  # OPSCORE_SESSION_SECONDS=1, its expiry a whole second rounded up: gone within 2 s
        assert (await browser.get("/v1/opscore/agents")).status_code == 401
        assert (await browser.get("/console/")).status_code == 303

    run(store_url, body, session_seconds=1)


def test_a_session_lasts_at_least_its_configured_seconds() -> None:
    key = ApiKey("k", b"d" * 32)
    book = sessions.Sessions(b"s" * 32, (key,), 1)
    for _ in range(10):  # issued at different fractions of a second
        before = time.time()
        _, session = book.issue(key)
        assert session.expires >= before + 1
        time.sleep(0.09)


def test_the_cookie_outlives_the_session_on_a_clock_in_whole_seconds() -> None:
    """``http.cookiejar`` adds Max-Age to ``int(now)``: Max-Age=1 dropped a 1-second cookie the server still took."""
    key = ApiKey("k", b"d" * 32)
    book = sessions.Sessions(b"s" * 32, (key,), 1)
    checked = 0
    while checked < 10:  # issued at different fractions of a second, each within one whole second
        before = time.time()
        _, session = book.issue(key)
        max_age = sessions.cookie_max_age(session)
        if int(time.time()) == int(before):
            assert session.expires <= int(before) + max_age <= session.expires + 1
            checked += 1
        time.sleep(0.09)


def test_every_page_renders_on_every_store(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        await client.post("/v1/opscore/agents", json={"agentId": "p-1", "capabilities": ["cap"]})
        assert (await report(client, "p-1", "idle")).status_code == 200
        assert (await report(client, "p-1", "registered")).status_code == 409  # refused, recorded
        definition = {"id": "wf", "name": "wf", "version": "1", "tasks": [{"taskId": "t", "agentCapability": "cap"}]}
        started = await client.post("/v1/opscore/agent/p-1/workflow", json={"workflowDefinition": definition})
        assert started.status_code == 202, started.text
        session_id = started.json()["sessionId"]
        await sign_in(browser)
        pages = {
            "/console/": ["p-1", 'data-count="idle"'],
            "/console/?state=idle&capability=cap&q=p-": ["p-1"],
            "/console/?state=bogus": ["is not an agent state"],
            "/console/agents/p-1": ["refused: illegal_transition", "/v1/opscore/agent/p-1/diagram?format=svg"],
            "/console/agents/p-1?at=2000-01-01T00:00:00Z": ["did not exist yet"],
            "/console/agents/p-1?at=not-a-time": ["ISO-8601"],
            "/console/runs": [session_id[:8]],
            "/console/runs?state=running": [session_id[:8]],
            f"/console/runs/{session_id}": ["view=tasks", 'id="run-pause"'],
            "/console/audit": ["data-feed", "data-verify"],
            "/console/fragments/fleet": ["p-1"],
            "/console/fragments/agent/p-1": ["timeline"],
            "/console/fragments/runs": [session_id[:8]],
            f"/console/fragments/run/{session_id}": ["task-graph"],
        }
        for path, expected in pages.items():
            answer = await browser.get(path)
            assert answer.status_code == 200, (path, answer.status_code)
            for text in expected:
                assert text in answer.text, (path, text)
        assert (await browser.get("/console/agents/nobody")).status_code == 404
        assert (await browser.get("/console/runs/nothing")).status_code == 404

    run(store_url, body)


def test_the_audit_page_shows_the_last_signed_checkpoint(store_url: str, tmp_path: Path) -> None:
    private, _, key_id = make_signing_key(tmp_path / "signing.pem")

    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        await sign_in(browser)
        page = await browser.get("/console/audit")
        assert "none signed yet" in page.text or "last-checkpoint" in page.text
        assert (await report(client, "k-1", "idle")).status_code == 200
        for _ in range(100):
            page = await browser.get("/console/audit")
            if 'id="last-checkpoint"' in page.text:
                break
            await asyncio.sleep(0.05)
        assert 'id="last-checkpoint"' in page.text and key_id in page.text
        assert "k-1" in page.text  # the head it pins

    run(
        store_url,
        body,
        signing_key=str(private),
        checkpoint_file=str(tmp_path / "checkpoints.jsonl"),
        checkpoint_records=1,
        checkpoint_seconds=0.1,
    )


def test_without_a_signing_key_the_audit_page_says_no_checkpoints(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient, browser: httpx.AsyncClient) -> None:
        await sign_in(browser)
        page = await browser.get("/console/audit")
        assert "No checkpoints configured" in page.text and "OPSCORE_SIGNING_KEY" in page.text

    run(store_url, body)
