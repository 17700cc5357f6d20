"""``GET /health``: open to everyone, 503 when storage is unreachable."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from opscore import __version__
from opscore.api.deps import StoreDep
from opscore.errors import OpsCoreError

log = logging.getLogger("opscore.api")
router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness and storage reachability")
async def health(store: StoreDep) -> JSONResponse:
    """200 `{"status": "ok"}` when the store answers; 503 with `detail` and `code` when it does not."""
    try:
        await store.ping()
    except OpsCoreError as exc:  # /health is open: the database's own words go to the log only
        log.warning("storage unavailable", extra={"detail": exc.detail, "store": store.backend})
        detail = "storage is unreachable; the server log has the details"
        return JSONResponse(
            {"status": "unavailable", "detail": detail, "code": "storage_unavailable", "store": store.backend},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "version": __version__, "store": store.backend})
