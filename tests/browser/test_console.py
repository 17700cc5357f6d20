"""The operator console (DESIGN §13) in Debian's Chromium, driven by Playwright, against a real server.

Every request to another host is aborted and counted (none may happen), and the pages'
Content-Security-Policy violations are recorded (none may happen). Screenshots land in the
test's temporary directory, and in ``$OPSCORE_SCREENSHOTS`` when set: ``make screenshots``
sets it to ``docs/console`` (the README's pictures).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.test_docs import ARGS, CHROMIUM, RECORD_CSP_VIOLATIONS, Visit, _browser_or_reason
from tests.servers import Server

WAIT_MS = 15_000
READER_SECRET = "reader-secret-for-the-console-0123"
KEYS = [{"name": "reader", "sha256": hashlib.sha256(READER_SECRET.encode()).hexdigest(), "scopes": ["read"]}]
V1 = "/v1/opscore"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _browser_or_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps(KEYS), encoding="utf-8")
    srv = Server(
        database_url=f"sqlite:///{tmp / 'console.db'}",
        log_path=tmp / "server.log",
        env={
            "OPSCORE_KEYS_FILE": str(keys),
            "AGENTKIT_API_URL": "http://127.0.0.1:9",  # nobody: dispatches fail and back off
            "OPSCORE_ACCESS_LOG": "false",
        },
    )
    srv.start()
    yield srv
    srv.stop()


def stamp(offset: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat()


def report(server: Server, agent_id: str, state: str, status: int = 200) -> dict[str, Any]:
    with server.client() as client:
        answer = client.post(f"{V1}/agent/{agent_id}/state", json={"timestamp": stamp(), "state": state})
    assert answer.status_code == status, answer.text
    return dict(answer.json())


def register(server: Server, agent_id: str, capabilities: list[str], name: str = "") -> None:
    body = {"agentId": agent_id, "agentName": name or agent_id, "version": "1.4.2", "capabilities": capabilities}
    with server.client() as client:
        assert client.post(f"{V1}/agents", json=body).is_success


class Console:
    """One browser context on the console: its page, what it asked for, what it was refused."""

    def __init__(self, browser: Any, server: Server) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1360, "height": 900})
        self.page = self.context.new_page()
        self.visit = Visit(origin=server.url)
        self.page.route("**/*", self._route)
        self.page.add_init_script(RECORD_CSP_VIOLATIONS)
        self.page.on("pageerror", lambda exc: self.visit.errors.append(str(exc)))

    def _route(self, request_route: Any) -> None:
        url = request_route.request.url
        if url == self.server.url or url.startswith(self.server.url + "/"):
            self.visit.local.append(url)
            request_route.continue_()
        else:
            self.visit.aborted.append(url)
            request_route.abort()

    def goto(self, path: str) -> Any:
        self.page.goto(self.server.url + path, wait_until="load")
        return self.page

    def sign_in(self, secret: str) -> None:
        self.goto("/console/")
        assert "/console/login" in self.page.url
        self.page.fill("#key", secret)
        self.page.click("#sign-in")
        self.page.wait_for_selector("#key-name", timeout=WAIT_MS)

    def clean(self) -> None:
        """Nothing left the machine, nothing was refused by the CSP, no script error."""
        assert self.visit.aborted == [], f"requests to other hosts: {self.visit.aborted}"
        assert set(self.page.evaluate("window.__csp || []")) == set()
        assert self.visit.errors == []

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def admin(browser: Any, server: Server) -> Iterator[Console]:
    console = Console(browser, server)
    console.sign_in(server.api_key)
    yield console
    console.clean()
    console.close()


def wait_until(page: Any, expression: str, timeout: float = WAIT_MS) -> None:
    """Poll ``expression`` in the page until it is truthy (``wait_for_function`` evaluates it with
    ``eval``, which the console's Content-Security-Policy rightly refuses)."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} ms: {expression}")
        time.sleep(0.03)


def shot(page: Any, tmp_path: Path, name: str, *, full: bool = False) -> Path:
    target = tmp_path / f"{name}.png"
    page.screenshot(path=str(target), full_page=full)
    keep = os.environ.get("OPSCORE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(target, Path(keep) / target.name)
    return target


# -- sign in and out -------------------------------------------------------------------------------


def test_sign_in_sets_an_httponly_strict_cookie_and_sign_out_ends_it(
    browser: Any, server: Server, tmp_path: Path
) -> None:
    console = Console(browser, server)
    page = console.goto("/")
    assert page.url == server.url + "/console/login?next=%2Fconsole%2F"
    shot(page, tmp_path, "console-sign-in")
    page.fill("#key", "not-a-key")
    page.click("#sign-in")
    assert page.locator("[role=alert]").inner_text() == "That key is not valid."
    page.fill("#key", server.api_key)
    page.click("#sign-in")
    page.wait_for_selector("#key-name", timeout=WAIT_MS)
    assert page.url == server.url + "/console/"
    (cookie,) = console.context.cookies()
    assert cookie["name"] == "opscore_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert server.api_key not in cookie["value"]
    # the key is in no URL asked for, and in no browser storage
    assert not [url for url in console.visit.local if server.api_key in url]
    storage = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert storage == "[[],[]]"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
    # the session stands for the key on the API too (a GET needs no CSRF token)
    assert page.evaluate(f"fetch('{V1}/agents').then(r => r.status)") == 200

    page.click("#sign-out")
    page.wait_for_selector("#key", timeout=WAIT_MS)
    assert console.context.cookies() == []
    assert page.evaluate(f"fetch('{V1}/agents').then(r => r.status)") == 401
    # a copy of the cookie taken before signing out is refused by this server too
    with httpx.Client(base_url=server.url, cookies={"opscore_session": cookie["value"]}) as stolen:
        assert stolen.get(f"{V1}/agents").status_code == 401
    page = console.goto("/console/runs")
    assert "/console/login" in page.url
    console.clean()
    console.close()


# -- fleet -------------------------------------------------------------------------------------------


def test_the_fleet_shows_a_new_state_within_2_s_without_a_reload(admin: Console, tmp_path: Path) -> None:
    server = admin.server
    for n in range(6):
        register(server, f"fleet-{n}", ["summarise_text"] if n % 2 else ["review_text"], name=f"Worker {n}")
        report(server, f"fleet-{n}", "idle")
    report(server, "fleet-3", "active")
    report(server, "fleet-4", "error")
    page = admin.goto("/console/")
    row = page.locator("tr[data-agent='fleet-1']")
    assert row.locator("[data-state]").inner_text() == "idle"
    page.evaluate("window.__sameDocument = true")
    wait_until(page, "document.getElementById('live-status').textContent === 'live'", timeout=WAIT_MS)
    idle_before = int(page.locator("[data-count='idle']").inner_text())

    started = time.monotonic()
    report(server, "fleet-1", "active")
    wait_until(
        page, "document.querySelector(\"tr[data-agent='fleet-1'] [data-state]\").textContent === 'active'", timeout=2000
    )
    shown_after = time.monotonic() - started
    assert shown_after < 2.0
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert int(page.locator("[data-count='idle']").inner_text()) == idle_before - 1
    print(f"fleet: new state shown {shown_after * 1000:.0f} ms after the report was answered")
    page.wait_for_timeout(2700)  # the changed row's highlight fades
    shot(page, tmp_path, "console-fleet")

    # filters: state and capability, from the store
    page = admin.goto("/console/?state=active&capability=summarise_text")
    ids = page.locator("tr[data-agent]").evaluate_all("rows => rows.map(r => r.dataset.agent)")
    assert ids == ["fleet-1", "fleet-3"]


def test_the_fleet_pages_10_000_agents_and_counts_them_from_the_store(admin: Console, tmp_path: Path) -> None:
    server = admin.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
        for start in range(0, 10_000, 500):
            reports = [
                {"agentId": f"bulk-{n:05d}", "timestamp": stamp(), "state": "idle" if n % 3 else "initializing"}
                for n in range(start, start + 500)
            ]
            answer = client.post(f"{V1}/state-reports", json={"reports": reports})
            assert answer.status_code == 200, answer.text[:300]
    page = admin.page
    started = time.monotonic()
    admin.goto("/console/?q=bulk-")
    loaded = time.monotonic() - started
    assert page.locator("tr[data-agent]").count() == 100
    total = int(page.locator("[data-count='all']").inner_text())
    assert total >= 10_000
    page.click("#next-page")
    page.wait_for_selector("tr[data-agent='bulk-00100']", timeout=WAIT_MS)
    assert loaded < 3.0, loaded
    print(f"fleet with {total} agents: first page loaded in {loaded * 1000:.0f} ms")


def test_fleet_page_weight(admin: Console) -> None:
    """Bytes the browser received for the fleet page (document and every asset), measured by Chromium."""
    page = admin.page
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
    sizes: dict[str, int] = {}
    urls: dict[str, str] = {}
    cdp.on("Network.responseReceived", lambda e: urls.__setitem__(e["requestId"], e["response"]["url"]))
    cdp.on("Network.loadingFinished", lambda e: sizes.__setitem__(e["requestId"], int(e["encodedDataLength"])))
    admin.goto("/console/")
    wait_until(page, "document.getElementById('live-status').textContent === 'live'", timeout=WAIT_MS)
    page.wait_for_timeout(300)
    finished = {urls.get(k, k): v for k, v in sizes.items()}
    total = sum(finished.values())
    print("fleet page weight:", total, "bytes;", json.dumps(finished))
    assert any(u.endswith("/console/") for u in finished) and any("console.js" in u for u in finished)
    assert total < 100_000


# -- agent ---------------------------------------------------------------------------------------------


def test_the_agent_page_marks_a_refused_report_and_travels_in_time(admin: Console, tmp_path: Path) -> None:
    server = admin.server
    register(server, "agent-7", ["summarise_text", "review_text"], name="Summariser")
    report(server, "agent-7", "initializing")
    report(server, "agent-7", "idle")
    time.sleep(1.1)  # the time-travel control has a one-second step
    between = datetime.now(UTC).isoformat(timespec="seconds")[:19]
    time.sleep(1.1)
    report(server, "agent-7", "active")
    refused = report(server, "agent-7", "registered", status=409)
    assert refused["code"] == "illegal_transition"

    page = admin.goto("/console/agents/agent-7")
    assert page.locator("#agent-state").inner_text() == "active"
    first = page.locator("#timeline tbody tr").first  # newest first: the refusal
    assert "refused" in (first.get_attribute("class") or "")
    assert "refused: illegal_transition" in first.inner_text()
    assert page.locator("#timeline tbody tr.refused").count() == 1
    diagram = page.locator("img[data-diagram]")
    diagram.wait_for(timeout=WAIT_MS)
    wait_until(page, "document.querySelector('img[data-diagram]').naturalWidth > 0", timeout=WAIT_MS)
    shot(page, tmp_path, "console-agent", full=True)

    # a live refusal shows up too, marked, without a reload
    report(server, "agent-7", "registered", status=409)
    wait_until(page, "document.querySelectorAll('#timeline tbody tr.refused').length === 2", timeout=3000)

    # time travel: the moment between idle and active shows idle
    page.fill("#at", between)
    page.click("#travel")
    page.wait_for_selector("#now", timeout=WAIT_MS)
    assert page.locator("#agent-state").inner_text() == "idle"
    assert "at=" in (page.locator("img[data-diagram]").get_attribute("src") or "")
    assert page.locator("#timeline tbody tr.refused").count() == 0  # nothing refused before then
    wait_until(page, "document.querySelector('img[data-diagram]').naturalWidth > 0", timeout=WAIT_MS)
    shot(page, tmp_path, "console-agent-time-travel", full=True)


# -- runs ----------------------------------------------------------------------------------------------


def start_run(server: Server, agent_id: str) -> str:
    register(server, agent_id, ["summarise_text", "review_text"])
    report(server, agent_id, "idle")
    definition = {
        "id": "summarise-and-review",
        "name": "Summarise, then review",
        "version": "1",
        "tasks": [
            {"taskId": "summarise", "agentCapability": "summarise_text", "nextTaskId": "review",
             "fallbackTaskId": "escalate", "maxRetries": 5, "retryBackoffSeconds": 120},
            {"taskId": "review", "agentCapability": "review_text"},
            {"taskId": "escalate", "agentCapability": "review_text"},
        ],
    }  # fmt: skip
    with server.client() as client:
        answer = client.post(f"{V1}/agent/{agent_id}/workflow", json={"workflowDefinition": definition})
        assert answer.status_code == 202, answer.text
        return str(answer.json()["sessionId"])


def test_a_run_page_draws_its_task_graph_and_pauses_it(admin: Console, tmp_path: Path) -> None:
    server = admin.server
    session_id = start_run(server, "runner-1")
    page = admin.goto("/console/runs")
    page.locator(f"tr[data-run='{session_id}'] a").first.click()
    page.wait_for_selector("#run-state", timeout=WAIT_MS)
    assert page.locator("#run-state").inner_text() == "running"
    wait_until(page, "document.getElementById('task-graph').naturalWidth > 0", timeout=WAIT_MS)
    assert "view=tasks" in (page.locator("#task-graph").get_attribute("src") or "")
    assert page.locator("#tasks tr[data-task]").count() == 3
    shot(page, tmp_path, "console-run", full=True)

    # a refused action shows the server's 409 detail
    page.click("#run-resume")
    wait_until(page, "document.getElementById('answer').textContent.startsWith('409')", timeout=WAIT_MS)
    assert "illegal_transition" in page.locator("#answer").inner_text()

    page.click("#run-pause")
    wait_until(page, "document.getElementById('answer').textContent.startsWith('200')", timeout=WAIT_MS)
    wait_until(page, "document.getElementById('run-state').textContent === 'paused'", timeout=WAIT_MS)
    with server.client() as client:
        assert client.get(f"{V1}/workflows/{session_id}").json()["state"] == "paused"
    shot(page, tmp_path, "console-run-paused")

    page = admin.goto("/console/runs?state=paused")
    assert page.locator(f"tr[data-run='{session_id}']").count() == 1


def test_a_key_without_operate_sees_no_buttons_and_a_forged_action_gets_403(
    browser: Any, server: Server, tmp_path: Path
) -> None:
    session_id = start_run(server, "runner-2")
    console = Console(browser, server)
    console.sign_in(READER_SECRET)
    page = console.goto(f"/console/runs/{session_id}")
    page.wait_for_selector("#run-state", timeout=WAIT_MS)
    assert page.locator("button[data-action]").count() == 0
    assert "read only" in page.locator("header").inner_text()
    page = console.goto("/console/agents/runner-2")
    assert page.locator("button[data-action]").count() == 0
    forged = page.evaluate(
        """async (url) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const answer = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json',
                'X-CSRF-Token': csrf}, body: JSON.stringify({trigger: 'pause'})});
            return [answer.status, await answer.json()];
        }""",
        f"{V1}/workflows/{session_id}/transitions",
    )
    assert forged[0] == 403 and forged[1]["code"] == "forbidden" and "operate" in forged[1]["detail"]
    with server.client() as client:
        assert client.get(f"{V1}/workflows/{session_id}").json()["state"] == "running"
    # and without the page's CSRF token, even an operator's cookie gets nothing done
    console.clean()
    console.close()


def test_an_action_without_the_csrf_token_is_refused(admin: Console) -> None:
    session_id = start_run(admin.server, "runner-3")
    page = admin.goto(f"/console/runs/{session_id}")
    status = page.evaluate(
        """async (url) => (await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({trigger: 'pause'})})).status""",
        f"{V1}/workflows/{session_id}/transitions",
    )
    assert status == 403
    with admin.server.client() as client:
        assert client.get(f"{V1}/workflows/{session_id}").json()["state"] == "running"


# -- audit ---------------------------------------------------------------------------------------------


def test_the_audit_page_follows_the_log_and_shows_verification(admin: Console, tmp_path: Path) -> None:
    server = admin.server
    report(server, "audited", "idle")
    page = admin.goto("/console/audit")
    wait_until(
        page,
        "document.querySelector('#verify .verify-result').textContent.includes('every chain verifies')",
        timeout=WAIT_MS,
    )
    wait_until(page, "document.getElementById('live-status').textContent === 'live'", timeout=WAIT_MS)
    checkpoint = page.locator("#checkpoint .checkpoint-result").inner_text()
    assert re.search(r"[Nn]o checkpoints? (configured|signed)", checkpoint), checkpoint
    rows_before = page.locator("#feed tbody tr").count()
    report(server, "audited", "active")
    report(server, "audited", "registered", status=409)
    wait_until(page, f"document.querySelectorAll('#feed tbody tr').length === {rows_before + 2}", timeout=3000)
    newest = page.locator("#feed tbody tr").first
    assert "refused" in (newest.get_attribute("class") or "") and "audited" in newest.inner_text()
    page.wait_for_timeout(2700)  # the new rows' highlight fades
    shot(page, tmp_path, "console-audit")
    page = admin.goto("/console/runs")
    shot(page, tmp_path, "console-runs")
