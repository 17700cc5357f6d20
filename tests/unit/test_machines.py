"""The declarations are the DESIGN §3 table, exactly, and the engine's machines obey them."""

from __future__ import annotations

import pytest

from opscore.errors import IllegalTransition, UnknownTrigger
from opscore.fsm import Fsm
from opscore.machines import AGENT, MACHINES, TASK, WORKFLOW, declaration, public_view, transition_rows

# DESIGN §3, copied by hand: the declaration must not drift from the contract.
DESIGN_AGENT_TABLE = {
    "start": ({"registered", "offline"}, "initializing"),
    "ready": ({"registered", "initializing", "offline"}, "idle"),
    "begin_task": ({"idle"}, "active"),
    "finish_task": ({"active"}, "idle"),
    "fail": ({"initializing", "idle", "active"}, "error"),
    "recover": ({"error"}, "idle"),
    "restart": ({"idle", "active", "error"}, "initializing"),
    "go_offline": ({"initializing", "idle", "active", "error"}, "offline"),
    "deregister": ({"registered", "initializing", "idle", "active", "error", "offline"}, "deregistered"),
}
AGENT_STATES = {"registered", "initializing", "idle", "active", "error", "offline", "deregistered"}

REQUIRED_FLOW = ["registered", "initializing", "idle", "active", "idle", "active", "error", "idle"]


def as_table(decl: dict) -> dict[str, tuple[set[str], str]]:
    table: dict[str, tuple[set[str], str]] = {}
    for t in decl["transitions"]:
        assert t["trigger"] not in table, f"trigger {t['trigger']} declared twice"
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        table[t["trigger"]] = (set(sources), t["dest"])
    return table


def test_agent_declaration_is_the_design_table() -> None:
    assert AGENT["name"] == "agent"
    assert AGENT["initial"] == "registered"
    assert AGENT["terminal"] == ["deregistered"]
    assert set(AGENT["states"]) == AGENT_STATES
    assert len(AGENT["states"]) == len(AGENT_STATES)
    assert as_table(AGENT) == DESIGN_AGENT_TABLE


def test_terminal_states_have_no_way_out() -> None:
    for decl in MACHINES.values():
        for row in transition_rows(decl):
            assert row["source"] not in decl["terminal"], (decl["name"], row)


def test_workflow_declaration_has_the_design_states_and_triggers() -> None:
    assert set(WORKFLOW["states"]) == {"pending", "running", "paused", "completed", "failed", "cancelled"}
    assert set(as_table(WORKFLOW)) == {"start", "pause", "resume", "complete", "fail", "retry", "cancel"}
    assert as_table(WORKFLOW)["retry"] == ({"failed"}, "running")
    assert {"pending", "dispatched", "running", "succeeded", "failed", "retrying"} <= set(TASK["states"])


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_auto_transitions_are_off(name: str) -> None:
    decl = MACHINES[name]
    assert decl["auto_transitions"] is False
    fsm = Fsm(decl)
    assert not [t for t in fsm.machine.events if t.startswith("to_")]
    assert set(fsm.triggers) == {t["trigger"] for t in decl["transitions"]}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_no_source_dest_pair_has_two_triggers(name: str) -> None:
    seen: dict[tuple[str, str], str] = {}
    for row in transition_rows(MACHINES[name]):
        pair = (row["source"], row["dest"])
        assert seen.setdefault(pair, row["trigger"]) == row["trigger"], f"{pair}: {seen[pair]} and {row['trigger']}"


def test_fsm_refuses_a_declaration_with_two_triggers_for_one_pair() -> None:
    bad = {
        "name": "bad",
        "initial": "a",
        "states": ["a", "b"],
        "terminal": [],
        "auto_transitions": False,
        "transitions": [{"trigger": "x", "source": ["a"], "dest": "b"}, {"trigger": "y", "source": "a", "dest": "b"}],
    }
    with pytest.raises(ValueError, match="reached by"):
        Fsm(bad)


def test_the_required_flow_is_legal() -> None:
    fsm = Fsm(AGENT)
    state = fsm.initial
    assert state == REQUIRED_FLOW[0]
    for target in REQUIRED_FLOW[1:]:
        trigger = fsm.trigger_for(state, target)
        assert trigger is not None, f"{state} -> {target} must stay legal"
        state = fsm.fire(trigger, state)
        assert state == target


def test_error_to_active_and_anything_from_deregistered_are_illegal() -> None:
    fsm = Fsm(AGENT)
    assert fsm.trigger_for("error", "active") is None
    assert "active" not in fsm.allowed("error")
    for target in AGENT_STATES - {"deregistered"}:
        assert fsm.trigger_for("deregistered", target) is None
    assert fsm.allowed("deregistered") == []
    for trigger in fsm.triggers:
        with pytest.raises(IllegalTransition) as info:
            fsm.fire(trigger, "deregistered")
        assert info.value.extra["from"] == "deregistered" and info.value.extra["allowed"] == []


def test_fire_refuses_an_unknown_trigger() -> None:
    with pytest.raises(UnknownTrigger) as info:
        Fsm(AGENT).fire("to_active", "idle")
    assert "begin_task" in info.value.extra["valid"]


def test_public_view_lists_one_row_per_trigger_and_source() -> None:
    view = public_view(declaration("agent"))
    assert view["name"] == "agent" and view["initial"] == "registered" and view["terminal"] == ["deregistered"]
    rows = {(r["trigger"], r["source"], r["dest"]) for r in view["transitions"]}
    expected = {(t, s, d) for t, (sources, d) in DESIGN_AGENT_TABLE.items() for s in sources}
    assert rows == expected
    assert len(view["transitions"]) == len(expected)
    with pytest.raises(KeyError):
        declaration("nope")
