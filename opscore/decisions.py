"""What a request does to an entity, decided from its machine and its current state. Pure.

A :class:`Decision` says which trigger fires (``event``), the state recorded as its ``dest``,
the new ``state`` if it applies, or the ``refusal``; plus the liveness and metadata the
change carries. The engine turns it into one :class:`~opscore.models.Change` with its audit
record; nothing here touches a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opscore.errors import IllegalTransition, OpsCoreError, StaleReport, TimestampInFuture
from opscore.fsm import Fsm
from opscore.models import Entity, Timer


@dataclass(slots=True)
class Decision:
    """Never changed once made; not frozen, as the other per-transition values (``opscore.models``)."""

    event: str | None = None
    """The trigger (the record's ``event``)."""
    dest: str | None = None
    """The record's ``dest``: the state moved to, or the one asked for when refused."""
    state: str | None = None
    """The new state when the transition applies (revision + 1); ``None`` moves nothing."""
    refusal: OpsCoreError | None = None
    """Why it is refused (recorded with ``outcome: "rejected"``), or ``None``."""
    seen_at: str | None = None
    report_at: str | None = None
    details: dict[str, Any] | None = None
    """The newest accepted report's details (the entity's ``last_details``), when accepted."""
    data: dict[str, Any] | None = None
    timers: tuple[Timer, ...] = ()
    cancel_timers: tuple[str, ...] = ()

    @property
    def heartbeat(self) -> bool:
        """Accepted but moving nothing: liveness only, no audit record."""
        return self.refusal is None and self.state is None


def report(
    fsm: Fsm,
    current: Entity,
    target: str,
    at: str | None,
    details: dict[str, Any],
    now: str,
    latest: str,
) -> Decision:
    """A report that ``current`` is now in ``target`` (DESIGN §3).

    ``at`` is the report's time and ``latest`` the newest time accepted now (the server's
    clock plus the allowed skew). A report dated after ``latest`` is refused and never
    becomes the newest accepted one: one agent's bad clock must not make every later report
    stale. For the same reason a stored newest time beyond ``latest`` (written before this
    rule existed) makes nothing stale. The same state is a heartbeat; otherwise the one
    declared trigger from the current state to ``target`` fires, or the report is refused.
    """
    if at is not None and at > latest:
        future = TimestampInFuture(
            f"report dated {at} is more than the allowed clock skew after the server's time; check the agent's clock",
            **{"from": current.state, "to": target},
            reportedAt=at,
            latestAccepted=latest,
        )
        return Decision(fsm.trigger_for(current.state, target), target, refusal=future, seen_at=now)
    newest = current.last_report_at
    if at is not None and newest is not None and at < newest <= latest:
        stale = StaleReport(
            f"report from {at} is older than the newest accepted one ({newest})",
            source=current.state,
            to=target,
            newest=newest,
        )
        return Decision(fsm.trigger_for(current.state, target), target, refusal=stale, seen_at=now)
    accepted = None if at is None else details
    if current.state == target:
        return Decision(seen_at=now, report_at=at, details=accepted)
    trigger = fsm.trigger_for(current.state, target)
    if trigger is None:
        illegal = IllegalTransition(
            f"{current.entity_type} {current.entity_id!r} cannot go from {current.state!r} to {target!r}",
            source=current.state,
            to=target,
            allowed=fsm.allowed(current.state),
        )
        return Decision(None, target, refusal=illegal, seen_at=now)
    try:
        dest = fsm.fire(trigger, current.state)
    except IllegalTransition as exc:
        exc.extra["to"] = target
        return Decision(trigger, target, refusal=exc, seen_at=now)
    return Decision(trigger, dest, dest, seen_at=now, report_at=at, details=accepted)


def trigger(
    fsm: Fsm,
    current: Entity,
    name: str,
    data: dict[str, Any] | None = None,
    timers: tuple[Timer, ...] = (),
    cancel_timers: tuple[str, ...] = (),
) -> Decision:
    """An explicit trigger by name; ``data`` and timers go with it only when it applies."""
    try:
        dest = fsm.fire(name, current.state)
    except IllegalTransition as exc:
        return Decision(name, None, refusal=exc)
    return Decision(name, dest, dest, data=data, timers=timers, cancel_timers=cancel_timers)
