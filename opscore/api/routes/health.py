"""``GET /health`` (liveness) and ``GET /ready`` (readiness), both open to everyone.

``/health`` answers from what the process already knows: the store answers a ping, and its
writes work (the latest write did not fail, or one succeeded since). ``/ready`` proves it by
committing a write that changes nothing, so a load balancer stops sending traffic to a
replica whose disk is full or whose database went read-only; the probe is shared by callers
arriving within a second, so probing cannot become a load of its own.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from opscore import __version__
from opscore.api.deps import StoreDep
from opscore.api.schemas import HealthAnswer, HealthUnavailable, ReadyAnswer
from opscore.errors import OpsCoreError
from opscore.singleflight import SingleFlight
from opscore.storage.base import Store

log = logging.getLogger("opscore.api")
router = APIRouter(tags=["health"])

PROBE_SECONDS = 1.0
"""A write probe is reused by every /ready call within this many seconds."""


def _unavailable(store: Store, detail: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"status": "unavailable", "detail": detail, "code": code, "store": store.backend}, status_code=503
    )


@router.get(
    "/health",
    summary="Liveness: the store answers and its writes work",
    response_model=HealthAnswer,
    responses={503: {"model": HealthUnavailable, "description": "the store does not answer, or its writes fail"}},
)
async def health(store: StoreDep) -> JSONResponse:
    """200 `{"status": "ok"}`; 503 with `detail` and `code` when the store is unreachable or its writes fail."""
    try:
        await store.ping()
    except OpsCoreError as exc:  # /health is open: the database's own words go to the log only
        log.warning("storage unavailable", extra={"detail": exc.detail, "store": store.backend})
        return _unavailable(store, "storage is unreachable; the server log has the details", "storage_unavailable")
    failing = store.recent_write_error()
    if failing is not None:
        log.warning("writes are failing", extra={"detail": failing, "store": store.backend})
        return _unavailable(store, "writes are failing; the server log has the details", "storage_not_writable")
    return JSONResponse({"status": "ok", "version": __version__, "store": store.backend})


@router.get(
    "/ready",
    summary="Readiness: a write commits now (for load balancers)",
    response_model=ReadyAnswer,
    responses={503: {"model": HealthUnavailable, "description": "a write does not commit now"}},
)
async def ready(request: Request, store: StoreDep) -> JSONResponse:
    """200 `{"status": "ready"}` when a write that changes nothing commits; 503 `storage_not_writable` otherwise."""
    probe: SingleFlight[str | None] | None = getattr(request.app.state, "write_probe", None)
    if probe is None:
        probe = request.app.state.write_probe = SingleFlight(reuse=PROBE_SECONDS)

    async def write() -> str | None:
        try:
            await store.probe_write()
        except OpsCoreError as exc:
            return exc.detail
        return None

    error = store.recent_write_error() or await probe.run(write)
    if error is not None:
        log.warning("not ready: a write does not commit", extra={"detail": error, "store": store.backend})
        return _unavailable(
            store, "a write does not commit now; the server log has the details", "storage_not_writable"
        )
    return JSONResponse({"status": "ready", "version": __version__, "store": store.backend})
