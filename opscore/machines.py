"""THE machine declarations: every machine Ops-Core runs, as data, in one place.

Nothing else in the code base holds a copy of these rules. The engine builds one
``transitions.Machine`` per declaration from these dicts (``auto_transitions`` off, so
``to_<state>`` never makes every jump legal), ``GET /v1/opscore/machines`` serves them
verbatim and the diagrams are drawn from them.

Each declaration is the ``transitions`` dict configuration plus two keys of ours:
``name`` and ``terminal`` (states no trigger leaves).
"""

from __future__ import annotations

from typing import Any, Final

Declaration = dict[str, Any]

_AGENT_STATES: Final = ["registered", "initializing", "idle", "active", "error", "offline", "deregistered"]

AGENT: Final[Declaration] = {
    "name": "agent",
    "initial": "registered",
    "auto_transitions": False,
    "states": _AGENT_STATES,
    "terminal": ["deregistered"],
    "transitions": [
        {"trigger": "start", "source": ["registered", "offline"], "dest": "initializing"},
        {"trigger": "ready", "source": ["registered", "initializing", "offline"], "dest": "idle"},
        {"trigger": "begin_task", "source": ["idle"], "dest": "active"},
        {"trigger": "finish_task", "source": ["active"], "dest": "idle"},
        {"trigger": "fail", "source": ["initializing", "idle", "active"], "dest": "error"},
        {"trigger": "recover", "source": ["error"], "dest": "idle"},
        {"trigger": "restart", "source": ["idle", "active", "error"], "dest": "initializing"},
        {"trigger": "go_offline", "source": ["initializing", "idle", "active", "error"], "dest": "offline"},
        {
            "trigger": "deregister",
            "source": [s for s in _AGENT_STATES if s != "deregistered"],
            "dest": "deregistered",
        },
    ],
}

WORKFLOW: Final[Declaration] = {
    "name": "workflow",
    "initial": "pending",
    "auto_transitions": False,
    "states": ["pending", "running", "paused", "completed", "failed", "cancelled"],
    "terminal": ["completed", "cancelled"],
    "transitions": [
        {"trigger": "start", "source": ["pending"], "dest": "running"},
        {"trigger": "pause", "source": ["running"], "dest": "paused"},
        {"trigger": "resume", "source": ["paused"], "dest": "running"},
        {"trigger": "complete", "source": ["running"], "dest": "completed"},
        {"trigger": "fail", "source": ["pending", "running", "paused"], "dest": "failed"},
        {"trigger": "retry", "source": ["failed"], "dest": "running"},
        {"trigger": "cancel", "source": ["pending", "running", "paused", "failed"], "dest": "cancelled"},
    ],
}

TASK: Final[Declaration] = {
    "name": "task",
    "initial": "pending",
    "auto_transitions": False,
    "states": [
        "pending",
        "waiting",
        "dispatched",
        "running",
        "retrying",
        "succeeded",
        "failed",
        "skipped",
        "cancelled",
    ],
    "terminal": ["succeeded", "skipped", "cancelled"],
    "transitions": [
        {"trigger": "wait", "source": ["pending", "retrying"], "dest": "waiting"},
        {"trigger": "dispatch", "source": ["pending", "waiting", "retrying"], "dest": "dispatched"},
        {"trigger": "begin", "source": ["dispatched"], "dest": "running"},
        {"trigger": "succeed", "source": ["dispatched", "running"], "dest": "succeeded"},
        {"trigger": "fail_attempt", "source": ["dispatched", "running", "waiting"], "dest": "retrying"},
        {"trigger": "fail", "source": ["pending", "waiting", "dispatched", "running", "retrying"], "dest": "failed"},
        {"trigger": "retry", "source": ["failed"], "dest": "retrying"},
        {"trigger": "skip", "source": ["pending", "waiting"], "dest": "skipped"},
        {
            "trigger": "cancel",
            "source": ["pending", "waiting", "dispatched", "running", "retrying", "failed"],
            "dest": "cancelled",
        },
    ],
}

MACHINES: Final[dict[str, Declaration]] = {d["name"]: d for d in (AGENT, WORKFLOW, TASK)}


def declaration(name: str) -> Declaration:
    """The declaration called ``name``; ``KeyError`` when there is none."""
    return MACHINES[name]


def transition_rows(decl: Declaration) -> list[dict[str, str]]:
    """One ``{"trigger", "source", "dest"}`` row per (trigger, source) pair, in declaration order."""
    rows: list[dict[str, str]] = []
    for t in decl["transitions"]:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        rows.extend({"trigger": t["trigger"], "source": s, "dest": t["dest"]} for s in sources)
    return rows


def public_view(decl: Declaration) -> dict[str, Any]:
    """The shape served by ``GET /v1/opscore/machines/{name}`` (DESIGN §5)."""
    return {
        "name": decl["name"],
        "initial": decl["initial"],
        "states": list(decl["states"]),
        "terminal": list(decl["terminal"]),
        "transitions": transition_rows(decl),
    }
