"""ONE table from errors to HTTP, and the one JSON shape every error answers with.

Every error body is ``{"detail": str, "code": str, ...}``: AgentKit's SDK reads
``response.json()["detail"]``, programs read ``code``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from opscore import errors

log = logging.getLogger("opscore.api")

STATUS: dict[type[errors.OpsCoreError], int] = {
    errors.NotFound: 404,
    errors.Invalid: 422,
    errors.Refused: 409,
    errors.PreconditionFailed: 412,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.PayloadTooLarge: 413,
    errors.RendererMissing: 501,
    errors.Unavailable: 503,
    errors.StorageError: 500,
}
"""Each family of the tree and its status; every class reaches one row through its bases
(``tests/unit/test_errors.py`` fails for a class that does not)."""

INPUT_CODES = frozenset(cls.code for cls in errors.UnacceptableInput.__subclasses__())
"""Codes of :mod:`opscore.inputs` refusals, raised inside pydantic validation as error types."""

_HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def status_of(exc: errors.OpsCoreError | type[errors.OpsCoreError]) -> int:
    """The HTTP status of an error: the first class in its MRO that the table names (500 if none)."""
    for cls in (exc if isinstance(exc, type) else type(exc)).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


GENERIC_DETAIL = {
    500: "internal error; the server log has the details under this request id",
    503: "the service is unavailable (storage unreachable); retry later; the server log has the details",
}
"""What a 5xx body says instead of the exception's text (which can carry a database's own words)."""


def render_error(exc: errors.OpsCoreError, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error. A 500 or 503 body is generic; its detail goes to the log instead.

    Every answer goes through here (single requests, each report of a batch, stored idempotent
    answers), so no path shows a client an internal exception's text.
    """
    status = status_of(exc)
    if status not in GENERIC_DETAIL:
        return status, exc.to_dict()
    log.error(
        "request failed", extra={"code": exc.code, "detail": exc.detail, "status": status, "requestId": request_id}
    )
    body: dict[str, Any] = {"detail": GENERIC_DETAIL[status], "code": exc.code}
    if request_id is not None:
        body["requestId"] = request_id
    return status, body


def _headers(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else None


def _request_id(request: Request) -> str | None:
    rid = request.scope.get("opscore.request_id")
    return rid if isinstance(rid, str) else None


async def _opscore_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.OpsCoreError)
    status, body = render_error(exc, _request_id(request))
    headers = _headers(status) or {}
    if "revision" in exc.extra and isinstance(exc.extra["revision"], int):
        headers["ETag"] = f'"{exc.extra["revision"]}"'
    return JSONResponse(body, status_code=status, headers=headers or None)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def validation_body(errors: Any) -> dict[str, Any]:
    """The 422 body for pydantic's error list (also used per report of a batch)."""
    problems = [
        {"loc": _plain(list(e.get("loc", ()))), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems) or "invalid request"
    # a problem opscore.inputs named (lone_surrogate, invalid_id, ...) names the whole answer
    code = next((p["type"] for p in problems if p["type"] in INPUT_CODES), "validation_error")
    return {"detail": f"invalid request: {summary}", "code": code, "errors": problems}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_body(exc.errors()), status_code=422)


UNREADABLE_BODY = {
    "detail": "invalid request: body: not JSON in UTF-8",
    "code": "validation_error",
    "errors": [{"loc": ["body"], "msg": "not JSON in UTF-8", "type": "json_invalid"}],
}
"""FastAPI answers 400 when a JSON body does not even decode (bytes that are not UTF-8): a
body the route cannot read is a validation error like any other, so 422, as invalid JSON is."""


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI's "There was an error parsing the body", its only 400
        return JSONResponse(UNREADABLE_BODY, status_code=422)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"detail": str(exc.detail), "code": code},
        status_code=exc.status_code,
        headers={**(exc.headers or {}), **(_headers(exc.status_code) or {})} or None,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    route = request.scope.get("route")
    rid = _request_id(request)
    log.exception("unexpected error", extra={"route": getattr(route, "path", None), "requestId": rid})
    body = {"detail": GENERIC_DETAIL[500], "code": "internal_error", "requestId": rid}
    headers = {"x-request-id": rid} if rid else None
    return JSONResponse(body, status_code=500, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(errors.OpsCoreError, _opscore_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
