"""``GET /health`` (liveness) and ``GET /ready`` (readiness), both open to everyone.

``/health`` answers from what the process already knows: the store answers a ping, and its
writes work (the latest write did not fail, or one succeeded since). ``/ready`` proves it by
committing a write that changes nothing, so a load balancer stops sending traffic to a
replica whose disk is full or whose database went read-only; the probe is shared by callers
arriving within a second, so probing cannot become a load of its own.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from opscore import __version__
from opscore.api.deps import StoreDep
from opscore.errors import OpsCoreError
from opscore.storage.base import Store

router = APIRouter(tags=["health"])

PROBE_SECONDS = 1.0
"""A write probe is reused by every /ready call within this many seconds."""


def _unavailable(store: Store, detail: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"status": "unavailable", "detail": detail, "code": code, "store": store.backend}, status_code=503
    )


@router.get("/health", summary="Liveness: the store answers and its writes work")
async def health(store: StoreDep) -> JSONResponse:
    """200 `{"status": "ok"}`; 503 with `detail` and `code` when the store is unreachable or its writes fail."""
    try:
        await store.ping()
    except OpsCoreError as exc:
        return _unavailable(store, exc.detail, "storage_unavailable")
    failing = store.recent_write_error()
    if failing is not None:
        return _unavailable(store, f"writes are failing: {failing}", "storage_not_writable")
    return JSONResponse({"status": "ok", "version": __version__, "store": store.backend})


class _Probe:
    """One write probe at a time; its outcome reused for :data:`PROBE_SECONDS`."""

    def __init__(self) -> None:
        self.at = 0.0
        self.error: str | None = None
        self.running: asyncio.Task[None] | None = None

    async def check(self, store: Store) -> str | None:
        if time.monotonic() - self.at > PROBE_SECONDS:
            if self.running is None or self.running.done():
                self.running = asyncio.get_running_loop().create_task(self._run(store))
            await asyncio.shield(self.running)
        return self.error

    async def _run(self, store: Store) -> None:
        try:
            await store.probe_write()
            self.error = None
        except OpsCoreError as exc:
            self.error = exc.detail
        self.at = time.monotonic()


@router.get("/ready", summary="Readiness: a write commits now (for load balancers)")
async def ready(request: Request, store: StoreDep) -> JSONResponse:
    """200 `{"status": "ready"}` when a write that changes nothing commits; 503 `storage_not_writable` otherwise."""
    probe: _Probe | None = getattr(request.app.state, "write_probe", None)
    if probe is None:
        probe = request.app.state.write_probe = _Probe()
    error = store.recent_write_error() or await probe.check(store)
    if error is not None:
        return _unavailable(store, error, "storage_not_writable")
    return JSONResponse({"status": "ready", "version": __version__, "store": store.backend})
