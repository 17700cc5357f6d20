"""``GET /metrics``: Prometheus text format (DESIGN §11); a bearer key, or open with ``OPSCORE_METRICS_PUBLIC``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from opscore.api.deps import Permit, caller
from opscore.config import Settings
from opscore.keys import Scope
from opscore.metrics import Metrics
from opscore.storage.base import Store

router = APIRouter(tags=["metrics"])
READ = Permit(Scope.READ)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Every metric, with ``opscore_entities`` counted by the store now (one aggregate query) and its batch counts."""
    settings: Settings = request.app.state.settings
    if not settings.metrics_public:
        # Prometheus sends `Authorization: Bearer <key>` (its `authorization` config); scope `read`
        await READ(request, await caller(request))
    store: Store = request.app.state.engine.store
    registry: Metrics = request.app.state.metrics
    body = registry.render(await store.count_states(), store.batch_counts())
    return Response(body, media_type=CONTENT_TYPE_LATEST)
