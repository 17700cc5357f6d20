"""One declared machine, built once as a ``transitions.Machine``, asked for every decision.

``transitions`` is the authority on legality. Every decision is
``machine.events[trigger].trigger(probe)`` on a one-slot probe holding the loaded state: the
library's own answer to per-model memory costs, and the cheapest way measured
(``docs/performance.md``, "How to use transitions"). When a declaration has no conditions or
callbacks, the machine's answer for a (trigger, state) pair cannot change, so :class:`Fsm`
remembers it after asking once. Side effects happen after the machine decided, never in its
callbacks, because ``transitions`` keeps a new state when a callback raises.
"""

from __future__ import annotations

import logging

from transitions import Machine, MachineError

from opscore.errors import IllegalTransition, UnknownTrigger
from opscore.machines import Declaration

logging.getLogger("transitions").setLevel(logging.WARNING)


class _Probe:
    """The smallest model ``transitions`` can move: just the loaded state."""

    __slots__ = ("state",)

    def __init__(self, state: str) -> None:
        self.state = state


def _without_callbacks(machine: Machine) -> bool:
    """Whether firing a trigger depends on nothing but (trigger, state): no conditions or callbacks.

    Then the machine's first answer for a pair is its answer forever, and :meth:`Fsm.fire`
    remembers it (far cheaper than asking the machine: docs/performance.md); any condition or callback
    anywhere makes every decision go through the machine again.
    """
    if any(
        getattr(machine, name)
        for name in ("before_state_change", "after_state_change", "prepare_event", "finalize_event", "on_exception")
    ):
        return False
    if any(state.on_enter or state.on_exit for state in machine.states.values()):
        return False
    return not any(
        t.prepare or t.conditions or t.before or t.after
        for event in machine.events.values()
        for transitions in event.transitions.values()
        for t in transitions
    )


class Fsm:
    """One declared machine, built once, asked for every decision about its entities."""

    def __init__(self, decl: Declaration) -> None:
        self.name: str = decl["name"]
        self.initial: str = decl["initial"]
        self.states: tuple[str, ...] = tuple(decl["states"])
        self.machine = Machine(
            model=None,
            states=list(decl["states"]),
            transitions=decl["transitions"],
            initial=decl["initial"],
            auto_transitions=False,
        )
        self.triggers: tuple[str, ...] = tuple(self.machine.events)
        by_pair: dict[tuple[str, str], str] = {}
        for trigger, event in self.machine.events.items():
            for source, transitions in event.transitions.items():
                for t in transitions:
                    pair = (str(source), str(t.dest))
                    if pair in by_pair and by_pair[pair] != trigger:
                        raise ValueError(f"machine {self.name}: {pair} is reached by {by_pair[pair]} and {trigger}")
                    by_pair[pair] = trigger
        self._by_pair = by_pair
        # (trigger, state) -> destination, remembered from the machine's own answers when
        # nothing in the declaration (conditions, callbacks) can make a second answer differ.
        self._decided: dict[tuple[str, str], str] = {}
        self._pure = _without_callbacks(self.machine)

    def trigger_for(self, source: str, dest: str) -> str | None:
        """The one declared trigger from ``source`` to ``dest``, or ``None``."""
        return self._by_pair.get((source, dest))

    def allowed_triggers(self, state: str) -> list[str]:
        return list(self.machine.get_triggers(state))

    def allowed(self, state: str) -> list[str]:
        """The states reachable from ``state`` now, in declaration order."""
        reachable = {dest for (source, dest) in self._by_pair if source == state}
        return [s for s in self.states if s in reachable]

    def fire(self, trigger: str, state: str) -> str:
        """Ask the machine to run ``trigger`` from ``state``; the destination, or an error."""
        known = self._decided.get((trigger, state))
        if known is not None:
            return known
        event = self.machine.events.get(trigger)
        if event is None:
            raise UnknownTrigger(f"{trigger!r} is not a trigger of the {self.name} machine", valid=list(self.triggers))
        probe = _Probe(state)
        try:
            done = event.trigger(probe)
        except MachineError as exc:
            raise self.illegal_trigger(trigger, state) from exc
        if not done:
            raise self.illegal_trigger(trigger, state)
        if self._pure:
            self._decided[(trigger, state)] = probe.state
        return probe.state

    def illegal_trigger(self, trigger: str, state: str) -> IllegalTransition:
        return IllegalTransition(
            f"{self.name} cannot {trigger} from {state!r}",
            source=state,
            to=None,
            trigger=trigger,
            allowed=self.allowed(state),
            allowedTriggers=self.allowed_triggers(state),
        )
