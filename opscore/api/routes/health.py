"""``GET /health``: open to everyone, 503 when storage is unreachable."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from opscore import __version__
from opscore.api.deps import StoreDep
from opscore.api.schemas import HealthAnswer, HealthUnavailable
from opscore.errors import OpsCoreError

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Liveness and storage reachability",
    response_model=HealthAnswer,
    responses={503: {"model": HealthUnavailable, "description": "the store does not answer"}},
)
async def health(store: StoreDep) -> JSONResponse:
    """200 `{"status": "ok"}` when the store answers; 503 with `detail` and `code` when it does not."""
    try:
        await store.ping()
    except OpsCoreError as exc:
        return JSONResponse(
            {"status": "unavailable", "detail": exc.detail, "code": "storage_unavailable", "store": store.backend},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "version": __version__, "store": store.backend})
