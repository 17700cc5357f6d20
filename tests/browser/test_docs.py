"""``/docs`` and ``/redoc`` in a real headless browser with no network but the server (DESIGN §5).

Debian's Chromium (``apt-get install chromium``; ``.ci/run`` installs it) driven by Playwright
(never ``playwright install``: nothing is downloaded). Every request to another host is
aborted and counted, and a Content-Security-Policy violation is recorded too (a request the
browser refused to make). Swagger UI must show every operation and the Authorize button, and
an authorized "Try it out" must answer 200; ReDoc must show every operation and no error.
Screenshots land in the test's temporary directory (or ``$OPSCORE_SCREENSHOTS``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
WAIT_MS = 60_000
KNOWN_CSP_BLOCKS = {"https://cdn.redoc.ly/redoc/logo-mini.svg"}
"""ReDoc 2's sidebar footer always tries Redocly's logo; the page's CSP refuses it (the image
hides itself on error), so no request leaves the browser. Anything else blocked fails the test."""


RECORD_CSP_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.blockedURI));
"""


def _browser_or_reason() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is missing: apt-get install chromium (Debian's; .ci/run does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -r requirements-test.txt"
    return None


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


@pytest.fixture
def docs_server(tmp_path: Path) -> Iterator[Server]:
    server = Server(database_url=f"sqlite:///{tmp_path / 'docs.db'}", log_path=tmp_path / "server.log")
    server.start()
    yield server
    server.stop()


@dataclass
class Visit:
    """One page load: what was asked of the server, what was aborted, what the CSP refused."""

    origin: str
    local: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def open_page(browser: Any, server: Server, path: str) -> tuple[Any, Visit]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    visit = Visit(origin=server.url)

    def route(request_route: Any) -> None:
        url = request_route.request.url
        if url == server.url or url.startswith(server.url + "/") or url.startswith(("data:", "blob:")):
            visit.local.append(url)
            request_route.continue_()
        else:
            visit.aborted.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.add_init_script(RECORD_CSP_VIOLATIONS)
    page.on("pageerror", lambda exc: visit.errors.append(str(exc)))
    page.goto(server.url + path, wait_until="load")
    return page, visit


def csp_blocks(page: Any) -> set[str]:
    return set(page.evaluate("window.__csp"))


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    target = tmp_path / f"{name}.png"
    page.screenshot(path=str(target))
    keep = os.environ.get("OPSCORE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(target, Path(keep) / target.name)
    return target


def operation_count(server: Server) -> int:
    spec = httpx.get(server.url + "/openapi.json").json()
    return sum(1 for item in spec["paths"].values() for method in item if method in ("get", "post", "put", "delete"))


def test_swagger_ui_works_offline_and_authorizes(browser: Any, docs_server: Server, tmp_path: Path) -> None:
    expected = operation_count(docs_server)
    page, visit = open_page(browser, docs_server, "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=WAIT_MS)
    assert page.locator(".swagger-ui .opblock").count() == expected
    authorize = page.locator("button.authorize")
    assert authorize.is_visible()

    # the state report's example is a request that works (it said "state": "string" before)
    report = page.locator(".opblock-post", has_text="/v1/opscore/agent/{agent_id}/state")
    report.locator(".opblock-summary").click()
    example = report.get_by_text('"state": "idle"').first
    example.wait_for(timeout=WAIT_MS)
    example.scroll_into_view_if_needed()
    shot(page, tmp_path, "docs-state-report")

    # Authorize with the key, then "Try it out" on a route that needs it
    authorize.click()
    dialog = page.locator(".dialog-ux .modal-ux")
    dialog.locator("input").first.fill(docs_server.api_key)
    dialog.get_by_role("button", name="Apply credentials").click()
    dialog.get_by_role("button", name="Remove authorization").wait_for(timeout=WAIT_MS)  # "Logout": accepted
    shot(page, tmp_path, "docs-authorize-dialog")
    dialog.locator("button.btn-done").click()
    # the case: "Try it out" on the state report, sent as Swagger fills it in
    report.get_by_role("button", name="Try it out").click()
    report.get_by_role("button", name="Execute").click()
    status = report.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for(timeout=WAIT_MS)
    assert status.inner_text().strip() == "200", report.locator(".live-responses-table").inner_text()
    status.scroll_into_view_if_needed()
    shot(page, tmp_path, "docs-state-report-executed")
    agents = page.locator(".opblock-get", has_text="/v1/opscore/agents").first
    agents.locator(".opblock-summary").click()
    agents.get_by_role("button", name="Try it out").click()
    agents.get_by_role("button", name="Execute").click()
    agents.locator(".live-responses-table tr.response .response-col_status").first.wait_for(timeout=WAIT_MS)
    assert agents.locator(".live-responses-table tr.response .response-col_status").first.inner_text().strip() == "200"
    shot(page, tmp_path, "docs-authorized")
    page.goto(docs_server.url + "/docs", wait_until="load")
    page.wait_for_selector(".swagger-ui .opblock", timeout=WAIT_MS)
    shot(page, tmp_path, "docs")

    assert visit.aborted == [], f"requests to other hosts: {visit.aborted}"
    assert csp_blocks(page) == set(), csp_blocks(page)
    assert visit.errors == []
    assert any("/static/docs/swagger-ui/swagger-ui-bundle.js" in url for url in visit.local)
    page.context.close()


def test_redoc_works_offline(browser: Any, docs_server: Server, tmp_path: Path) -> None:
    expected = operation_count(docs_server)
    page, visit = open_page(browser, docs_server, "/redoc")
    page.wait_for_selector("[data-section-id*='/operation/']", timeout=WAIT_MS)
    page.get_by_role("heading", name="Ops-Core (0.1.0)", exact=False).first.wait_for(timeout=WAIT_MS)
    assert page.locator("[data-section-id*='/operation/']").count() == expected
    text = page.locator("body").inner_text()
    assert "Something went wrong" not in text and "Invalid reference token" not in text
    shot(page, tmp_path, "redoc")
    heading = page.locator("[data-section-id*='/operation/'] h2", has_text="Report an agent's state").first
    heading.scroll_into_view_if_needed()
    shot(page, tmp_path, "redoc-state-report")

    assert visit.aborted == [], f"requests to other hosts: {visit.aborted}"
    assert csp_blocks(page) <= KNOWN_CSP_BLOCKS, csp_blocks(page)
    assert visit.errors == []
    assert any("/static/docs/redoc/redoc.standalone.js" in url for url in visit.local)
    page.context.close()
