"""The console's routes: sign in and out, and the Fleet, Agent, Runs, Run and Audit pages.

Each page is parse, read, render: it reads through the store and the engine exactly as the
API's GET routes do (and with their view functions, so a page shows what the API answers),
and renders a template. A page's live region has a fragment route of its own
(``/console/fragments/...``) that the page's script re-fetches when the stream says
something in it changed. Pages need a signed-in session whose key holds ``read``; what a
page shows as buttons needs ``operate`` too (and the API refuses a forged action with 403
anyway, whatever the page showed).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from opscore import history
from opscore.api import sessions
from opscore.api.deps import parse_moment
from opscore.api.paging import decode_cursor, encode_cursor
from opscore.api.views import agent_view, run_summary, run_view
from opscore.engine import Engine
from opscore.errors import OpsCoreError
from opscore.inputs import check_id
from opscore.keys import Scope, match
from opscore.machines import MACHINES
from opscore.models import AuditQuery, EntityQuery
from opscore.storage.base import Store
from opscore.workflows.state import TASK, WORKFLOW, task_entity_id

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE.parent / "static" / "console"
ASSET_VERSION = "2"
"""Part of every asset URL: bump it when console.js/console.css change, so no browser keeps a stale copy."""

PAGE_SIZE = 100
TIMELINE_SIZE = 50
FEED_SIZE = 50
RUN_TRIGGERS = ("pause", "resume", "cancel", "retry")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""Nothing from another origin, no inline script or style: what an injected string could run, it cannot."""
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


def _when(value: str | None) -> str:
    """Stored UTC ISO text as ``2026-11-23 10:00:00`` (the page says UTC once)."""
    if not value:
        return "—"
    return value[:19].replace("T", " ")


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["when"] = _when
ENV.filters["compact"] = _compact
ENV.globals["asset_version"] = ASSET_VERSION


def install(app: FastAPI) -> None:
    """Serve the console's pages and assets on ``app``."""
    app.include_router(router)
    app.mount("/static/console", StaticFiles(directory=STATIC_DIR), name="console-static")


# -- sessions and rendering ------------------------------------------------------------------------


class SignIn(Exception):
    """The page needs a session: answered by a redirect to the sign-in page."""


def _session(request: Request) -> sessions.Session:
    session = sessions.current(request)
    if session is None:
        raise SignIn
    return session


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    session = sessions.current(request)
    csrf = ""
    if session is not None:
        csrf = request.app.state.sessions.csrf_token(session)
    context.setdefault("nav", None)
    html = ENV.get_template(template).render(
        key_name=None if session is None else session.key.name,
        operate=session is not None and sessions.may_operate(session.key),
        csrf=csrf,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _fragment(request: Request, template: str, **context: Any) -> HTMLResponse:
    return render(request, template, **context)


def _read_or_refuse(request: Request, session: sessions.Session, page: str) -> HTMLResponse | None:
    if session.key.holds(Scope.READ):
        return None
    return render(
        request,
        "error.html",
        status=403,
        title="Not allowed",
        detail=f"key {session.key.name!r} does not hold the scope read, which {page} needs",
    )


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/console/login?" + urlencode({"next": target}), status_code=303)


def _state(request: Request) -> tuple[Engine, Store]:
    engine: Engine = request.app.state.engine
    return engine, engine.store


def _valid_id(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return check_id(value)
    except OpsCoreError:
        return None


def _states(machine: str) -> list[str]:
    return list(MACHINES[machine]["states"])


# -- sign in, sign out -----------------------------------------------------------------------------


def _same_origin(request: Request) -> bool:
    """A sign-in or sign-out form posted from another site is refused (login CSRF).

    Browsers say where a request comes from in ``Sec-Fetch-Site``; older ones in ``Origin``.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def _safe_next(value: str | None) -> str:
    """Only a path of the console itself (never another site: an open redirect)."""
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/"


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/login")
async def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", title="Sign in", next=_safe_next(next), error=None, nav=None)


@router.post("/console/login")
async def login(request: Request) -> Response:
    """The key arrives in the form's body (never a URL); a valid one sets the session cookie."""
    if not _same_origin(request):
        return render(request, "error.html", status=403, title="Refused", detail="sign-in from another site")
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    secret = (form.get("key") or [""])[0].strip()
    target = _safe_next((form.get("next") or [""])[0])
    key = match(request.app.state.api_keys, secret.encode()) if secret else None
    if key is None:
        request.app.state.metrics.auth_denied("console_sign_in")
        return render(
            request, "login.html", status=401, title="Sign in", next=target, error="That key is not valid.", nav=None
        )
    value, session = request.app.state.sessions.issue(key)
    answer = RedirectResponse(target, status_code=303)
    answer.set_cookie(
        sessions.COOKIE,
        value,
        max_age=sessions.cookie_max_age(session),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return answer


@router.post("/console/logout")
async def logout(request: Request) -> Response:
    """Clears the cookie and revokes the session (CSRF-checked: a form field holds the page's token)."""
    session = sessions.current(request)
    if session is not None:
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        token = (form.get("csrf") or [""])[0] or request.headers.get(sessions.CSRF_HEADER)
        if not _same_origin(request) or not request.app.state.sessions.check_csrf(session, token):
            return render(
                request, "error.html", status=403, title="Refused", detail="sign-out without this page's token"
            )
        request.app.state.sessions.revoke(session)
    answer = RedirectResponse("/console/login", status_code=303)
    answer.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict")
    return answer


# -- Fleet -----------------------------------------------------------------------------------------


async def _fleet(
    request: Request, state: str | None, capability: str | None, q: str | None, cursor: str | None
) -> dict[str, Any]:
    _, store = _state(request)
    states = _states("agent")
    problems = []
    if state and state not in states:
        problems.append(f"{state!r} is not an agent state")
        state = None
    capability = _valid_id(capability)
    prefix = _valid_id(q)
    after = None
    if cursor:
        try:
            after = decode_cursor(cursor)
        except OpsCoreError:
            after = None
        if not isinstance(after, str):
            after = None
    page = await store.list_entities(
        EntityQuery("agent", state=state, capability=capability, id_prefix=prefix, after_id=after, limit=PAGE_SIZE + 1)
    )
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    counts = await store.count_states()
    per_state = {s: counts.get(("agent", s), 0) for s in states}
    filters = {k: v for k, v in (("state", state), ("capability", capability), ("q", prefix)) if v}
    now = datetime.now(UTC).isoformat()
    return {
        "agents": [agent_view(e) for e in page],
        "counts": per_state,
        "total": sum(per_state.values()),
        "filters": filters,
        "query": urlencode(filters),
        "page_query": urlencode({**filters, **({"cursor": cursor} if cursor else {})}),
        "next_query": urlencode({**filters, "cursor": encode_cursor(page[-1].entity_id)}) if more else None,
        "first_page": cursor is not None,
        "problems": problems,
        "states": states,
        "fresh_after": _seconds_before(now, 3),
    }


def _seconds_before(iso: str, seconds: float) -> str:
    moment = datetime.fromisoformat(iso).timestamp() - seconds
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="microseconds")


Text = Annotated[str | None, Query(max_length=200)]


@router.get("/console/")
async def fleet_page(
    request: Request, state: Text = None, capability: Text = None, q: Text = None, cursor: Text = None
) -> Response:
    try:
        session = _session(request)
    except SignIn:
        return _login_redirect(request)
    if (refused := _read_or_refuse(request, session, "the fleet")) is not None:
        return refused
    data = await _fleet(request, state, capability, q, cursor)
    return render(request, "fleet.html", title="Fleet", nav="fleet", **data)


@router.get("/console/fragments/fleet")
async def fleet_fragment(
    request: Request, state: Text = None, capability: Text = None, q: Text = None, cursor: Text = None
) -> Response:
    session = sessions.current(request)
    if session is None or not session.key.holds(Scope.READ):
        return Response(status_code=401)
    data = await _fleet(request, state, capability, q, cursor)
    return _fragment(request, "_fleet.html", **data)


# -- Agent -----------------------------------------------------------------------------------------


async def _agent(request: Request, agent_id: str, at: str | None, cursor: str | None) -> dict[str, Any]:
    engine, store = _state(request)
    entity = await engine.get("agent", agent_id)
    moment = None
    problems: list[str] = []
    if at:
        try:
            moment = parse_moment(at.replace("Z", "+00:00") if at.endswith("Z") else at)
        except OpsCoreError as exc:
            problems.append(exc.detail)
    snapshot = None
    if moment is not None:
        try:
            snapshot = await history.at(store, entity, engine.fsm("agent").initial, moment, last=0)
        except OpsCoreError as exc:
            problems.append(exc.detail)
            moment = None
    after = None
    if cursor:
        try:
            found = decode_cursor(cursor, "desc")
            after = found if isinstance(found, int) and not isinstance(found, bool) else None
        except OpsCoreError:
            after = None
    rows = await store.list_audit(
        AuditQuery(
            entity_type="agent",
            entity_id=agent_id,
            until=moment,
            descending=True,
            after_id=after,
            limit=TIMELINE_SIZE + 1,
        )
    )
    more = len(rows) > TIMELINE_SIZE
    rows = rows[:TIMELINE_SIZE]
    view = agent_view(entity)
    state = snapshot.state if snapshot is not None else entity.state
    triggers = [] if snapshot is not None else _triggers_from("agent", entity.state)
    diagram = f"/v1/opscore/agent/{_q(agent_id)}/diagram?" + urlencode(
        {"format": "svg", **({"at": moment} if moment else {})}
    )
    return {
        "agent": view,
        "agent_id": agent_id,
        "state": state,
        "snapshot": snapshot,
        "moment": moment,
        "at_input": (moment or "")[:19],
        "records": rows,
        "older_query": urlencode(
            {**({"at": moment} if moment else {}), "cursor": encode_cursor(rows[-1]["id"], "desc")}
        )
        if more
        else None,
        "triggers": triggers,
        "diagram": diagram,
        "problems": problems,
        "metadata": json.dumps(view["metadata"], indent=2, sort_keys=True, ensure_ascii=False),
    }


def _q(value: str) -> str:
    return quote(value, safe="")


def _triggers_from(machine: str, state: str) -> list[str]:
    return [t["trigger"] for t in MACHINES[machine]["transitions"] if state in t["source"]]


@router.get("/console/agents/{agent_id}")
async def agent_page(request: Request, agent_id: str, at: Text = None, cursor: Text = None) -> Response:
    try:
        session = _session(request)
    except SignIn:
        return _login_redirect(request)
    if (refused := _read_or_refuse(request, session, "an agent's page")) is not None:
        return refused
    try:
        data = await _agent(request, agent_id, at, cursor)
    except OpsCoreError as exc:
        return render(request, "error.html", status=404, title="Unknown agent", detail=exc.detail, nav="fleet")
    return render(request, "agent.html", title=f"Agent {agent_id}", nav="fleet", **data)


@router.get("/console/fragments/agent/{agent_id}")
async def agent_fragment(request: Request, agent_id: str, at: Text = None, cursor: Text = None) -> Response:
    session = sessions.current(request)
    if session is None or not session.key.holds(Scope.READ):
        return Response(status_code=401)
    try:
        data = await _agent(request, agent_id, at, cursor)
    except OpsCoreError:
        return Response(status_code=404)
    return _fragment(request, "_agent.html", **data)


# -- Runs ------------------------------------------------------------------------------------------


async def _runs(request: Request, state: str | None, cursor: str | None) -> dict[str, Any]:
    _, store = _state(request)
    states = _states("workflow")
    problems = []
    if state and state not in states:
        problems.append(f"{state!r} is not a run state")
        state = None
    position = None
    if cursor:
        try:
            position = decode_cursor(cursor, "desc")
        except OpsCoreError:
            position = None
        if not (isinstance(position, list) and len(position) == 2 and all(isinstance(p, str) for p in position)):
            position = None
    page = await store.list_entities(
        EntityQuery(
            WORKFLOW,
            state=state,
            by_created=True,
            descending=True,
            after_created=None if position is None else position[0],
            after_id=None if position is None else position[1],
            limit=PAGE_SIZE + 1,
        )
    )
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    counts = await store.count_states()
    per_state = {s: counts.get((WORKFLOW, s), 0) for s in states}
    filters = {"state": state} if state else {}
    return {
        "runs": [run_summary(r) for r in page],
        "counts": per_state,
        "total": sum(per_state.values()),
        "filters": filters,
        "query": urlencode(filters),
        "page_query": urlencode({**filters, **({"cursor": cursor} if cursor else {})}),
        "next_query": urlencode({**filters, "cursor": encode_cursor([page[-1].created_at, page[-1].entity_id], "desc")})
        if more
        else None,
        "first_page": cursor is not None,
        "problems": problems,
        "states": states,
    }


@router.get("/console/runs")
async def runs_page(request: Request, state: Text = None, cursor: Text = None) -> Response:
    try:
        session = _session(request)
    except SignIn:
        return _login_redirect(request)
    if (refused := _read_or_refuse(request, session, "the runs")) is not None:
        return refused
    return render(request, "runs.html", title="Runs", nav="runs", **await _runs(request, state, cursor))


@router.get("/console/fragments/runs")
async def runs_fragment(request: Request, state: Text = None, cursor: Text = None) -> Response:
    session = sessions.current(request)
    if session is None or not session.key.holds(Scope.READ):
        return Response(status_code=401)
    return _fragment(request, "_runs.html", **await _runs(request, state, cursor))


# -- Run -------------------------------------------------------------------------------------------


async def _run(request: Request, session_id: str) -> dict[str, Any]:
    engine, store = _state(request)
    run = await engine.get(WORKFLOW, session_id)
    view = await run_view(store, run)
    ids = [task_entity_id(session_id, t) for t in run.data.get("taskIds", [])]
    records = await store.list_audit(
        AuditQuery(entity_ids=(session_id, *ids), entity_types=(WORKFLOW, TASK), descending=True, limit=TIMELINE_SIZE)
    )
    return {
        "run": view,
        "session_id": session_id,
        "records": records,
        "graph": f"/v1/opscore/workflows/{_q(session_id)}/diagram?format=svg&view=tasks",
        "run_triggers": RUN_TRIGGERS,
        "action": f"/v1/opscore/workflows/{_q(session_id)}/transitions",
        "results": json.dumps(view["results"], indent=2, sort_keys=True, ensure_ascii=False),
        "payload": json.dumps(view["initialPayload"], indent=2, sort_keys=True, ensure_ascii=False),
    }


@router.get("/console/runs/{session_id}")
async def run_page(request: Request, session_id: str) -> Response:
    try:
        session = _session(request)
    except SignIn:
        return _login_redirect(request)
    if (refused := _read_or_refuse(request, session, "a run's page")) is not None:
        return refused
    try:
        data = await _run(request, session_id)
    except OpsCoreError as exc:
        return render(request, "error.html", status=404, title="Unknown run", detail=exc.detail, nav="runs")
    return render(request, "run.html", title=f"Run {session_id}", nav="runs", **data)


@router.get("/console/fragments/run/{session_id}")
async def run_fragment(request: Request, session_id: str) -> Response:
    session = sessions.current(request)
    if session is None or not session.key.holds(Scope.READ):
        return Response(status_code=401)
    try:
        data = await _run(request, session_id)
    except OpsCoreError:
        return Response(status_code=404)
    return _fragment(request, "_run.html", **data)


# -- Audit -----------------------------------------------------------------------------------------


@router.get("/console/audit")
async def audit_page(request: Request) -> Response:
    try:
        session = _session(request)
    except SignIn:
        return _login_redirect(request)
    if (refused := _read_or_refuse(request, session, "the audit log")) is not None:
        return refused
    _, store = _state(request)
    head = await store.stream_head()  # before the listing: the feed may repeat a record, never miss one
    records = await store.list_audit(AuditQuery(descending=True, limit=FEED_SIZE))
    return render(request, "audit.html", title="Audit", nav="audit", records=records, head=head, **_checkpoint(request))


def _checkpoint(request: Request) -> dict[str, Any]:
    """The last signed checkpoint line this server holds (``OPSCORE_CHECKPOINT_FILE``), if it signs any."""
    runner = getattr(request.app.state, "checkpointer", None)
    if runner is None:
        return {"checkpoint_configured": False, "checkpoint": None, "checkpoint_key": None, "checkpoint_halted": None}
    count = len(runner.file)
    last = json.loads(runner.file.read(count - 1, 1)[0]) if count else None
    return {
        "checkpoint_configured": True,
        "checkpoint": None if last is None else json.dumps(last, indent=2, sort_keys=True, ensure_ascii=False),
        "checkpoint_count": count,
        "checkpoint_key": runner.signer.key_id,
        "checkpoint_halted": runner.halted,
    }
