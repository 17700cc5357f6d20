"""The central declarations, served exactly as ``opscore/machines.py`` holds them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from opscore.api.deps import Reads
from opscore.api.openapi import errors
from opscore.api.schemas import MachineList, MachineView
from opscore.errors import UnknownMachine
from opscore.machines import MACHINES, public_view

router = APIRouter(prefix="/v1/opscore", tags=["machines"])


@router.get("/machines", summary="Every machine declaration", response_model=MachineList)
async def list_machines(caller: Reads) -> dict[str, list[dict[str, Any]]]:
    """`{"items": [declaration, ...]}` for the agent, workflow and task machines."""
    return {"items": [public_view(d) for d in MACHINES.values()]}


@router.get(
    "/machines/{name}",
    summary="One machine declaration",
    response_model=MachineView,
    responses=errors(404),
)
async def get_machine(name: str, caller: Reads) -> dict[str, Any]:
    """`name`, `initial`, `states`, `terminal` and one `transitions` row per (trigger, source)."""
    if name not in MACHINES:
        raise UnknownMachine(f"no machine called {name!r}; machines: {', '.join(MACHINES)}", valid=list(MACHINES))
    return public_view(MACHINES[name])
