"""The ceiling: the bare framework doing what every state report needs, and nothing more.

Same route path, same pydantic body model, same bearer-key check (constant-time compare of
``OPSCORE_API_KEY``), the same uvicorn settings as ``opscore serve``; no state, no storage,
no audit, no log line. The key check is an ``async def`` dependency: a plain ``def`` one makes
FastAPI hop to its thread pool for every request, which measured 4,800 against 8,200
requests/s here; the ceiling is the well-written bare app, not the slow one. ``http-state``
runs it beside ``opscore serve`` so the ratio ours/ceiling says what Ops-Core's own work costs.

    OPSCORE_API_KEY=k python -m benchmarks.ceiling --port 8100
"""

from __future__ import annotations

import argparse
import os
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException

from opscore.api.schemas import StateReport
from opscore.config import parse_api_keys
from opscore.keys import match as match_key

KEYS = parse_api_keys(os.environ.get("OPSCORE_API_KEY", ""))

app = FastAPI(title="ceiling")


async def caller(authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    key = match_key(KEYS, token.strip().encode()) if scheme.lower() == "bearer" else None
    if key is None:
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return f"key:{key.name}"


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/opscore/agent/{agent_id}/state")
async def report_state(agent_id: str, body: StateReport, actor: Annotated[str, Depends(caller)]) -> dict[str, object]:
    return {
        "status": "success",
        "agentId": agent_id,
        "state": body.state,
        "previousState": body.state,
        "changed": True,
        "revision": 1,
        "auditId": 1,
    }


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(
        "benchmarks.ceiling:app",
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
