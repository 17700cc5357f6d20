"""The engine: load an entity, ask its machine, build the audit record, commit both at once.

``transitions`` is the authority on legality. One ``Machine`` is built per declaration at
start-up (``model=None``, ``auto_transitions=False``) and every decision is
``machine.events[trigger].trigger(probe)`` on a two-slot probe holding the loaded state: the
library's own answer to per-model memory costs. ``python -m benchmarks.machine_patterns``
measured 5.2 µs a decision this way against 32 µs for ``add_model``/``remove_model`` per
request and 89 µs for a ``Machine`` per request, and 58 bytes kept per agent against 7.4 KB
(attached to a shared machine) or 25 KB (a machine each). When a declaration has no
conditions or callbacks, the machine's answer for a (trigger, state) pair cannot change, so
:class:`Fsm` remembers it after asking once (0.1 µs). Side effects happen after the machine
decided, never in its callbacks, because ``transitions`` keeps a new state when a callback
raises.

Within one process, requests for the same entity are serialised by a per-entity lock, so
they never race; across processes (several replicas on PostgreSQL) the store's revision
compare-and-set decides, and the engine retries a lost race from a fresh read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from transitions import Machine, MachineError

from opscore import audit
from opscore.errors import (
    Conflict,
    IdempotencyKeyReused,
    IllegalTransition,
    Invalid,
    OpsCoreError,
    PreconditionFailed,
    RevisionConflict,
    StaleReport,
    TimestampInFuture,
    UnknownEntity,
    UnknownState,
    UnknownTrigger,
    from_dict,
)
from opscore.fastcopy import replacer
from opscore.machines import MACHINES, Declaration
from opscore.models import Change, Committed, Entity, IdempotencyEntry, Timer, TransitionResult
from opscore.storage.base import Store

logging.getLogger("transitions").setLevel(logging.WARNING)
audit_log = logging.getLogger("opscore.audit")

MAX_CAS_RETRIES = 16
DEFAULT_CLOCK_SKEW = 300.0

# What the engine adds to a decided change before the store gets it (see opscore.fastcopy).
_finish = replacer(Change, "create", "expected_revision", "record")
SYSTEM_ACTOR = "system"


class _Probe:
    """The smallest model ``transitions`` can move: just the loaded state."""

    __slots__ = ("state",)

    def __init__(self, state: str) -> None:
        self.state = state


def _without_callbacks(machine: Machine) -> bool:
    """Whether firing a trigger depends on nothing but (trigger, state): no conditions or callbacks.

    Then the machine's first answer for a pair is its answer forever, and :meth:`Fsm.fire`
    remembers it (0.1 against 5.5 µs a decision, measured); any condition or callback
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


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An ``Idempotency-Key`` with the fingerprint of its request and how to render answers."""

    scope: str
    key: str
    fingerprint: str
    render: Callable[[TransitionResult], tuple[int, dict[str, Any]]]
    render_error: Callable[[OpsCoreError], tuple[int, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Context:
    """Who asks, and the request's preconditions."""

    actor: str
    request_id: str | None = None
    if_match: int | None = None
    idempotency: Idempotency | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """One state report of a batch (:meth:`Engine.report_many`)."""

    entity_id: str
    target: str
    reported_at: datetime | str | None = None
    details: dict[str, Any] | None = None
    create: Entity | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored first answer returned for a repeated ``Idempotency-Key``."""

    status: int
    body: dict[str, Any]


Decision = tuple[Change, str | None, str | None, OpsCoreError | None]
"""What a decision yields: the change, the trigger (event), the destination, the refusal."""


class _KeyedLocks:
    """FIFO locks by key, dropped when nobody holds or waits for them.

    A key is held while it is in ``_held``; its value is the queue of waiters (``None``
    until someone waits). Taking a free key is a dict insert with no await
    (:meth:`try_acquire`): no ``asyncio.Lock``, no generator-based context manager, which
    cost ~2 µs a transition together. A waiter gets the key handed over by
    :meth:`release`, in arrival order, as ``asyncio.Lock`` would.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[Any, deque[asyncio.Future[None]] | None] = {}

    def try_acquire(self, key: Any) -> bool:
        """Take ``key`` if nobody holds it; never waits."""
        if key in self._held:
            return False
        self._held[key] = None
        return True

    async def acquire(self, key: Any) -> None:
        """Take ``key``, waiting behind its holder and earlier waiters."""
        if self.try_acquire(key):
            return
        waiters = self._held[key]
        if waiters is None:
            waiters = self._held[key] = deque()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    waiters.remove(future)
            raise

    def release(self, key: Any) -> None:
        """Hand ``key`` to its next live waiter, or drop it."""
        waiters = self._held[key]
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        del self._held[key]

    @asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)


def normalise_time(value: datetime | str) -> str:
    """Any ISO-8601 time (naive means UTC) as the fixed-width UTC text the stores compare.

    ``Invalid`` (422) for text that is no ISO-8601 time and for a valid time with no UTC
    equivalent (``0001-01-01T00:00:00+05:00`` and ``9999-12-31T23:59:59-05:00`` overflow).
    """
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="microseconds")
    except (ValueError, OverflowError) as exc:
        raise Invalid(f"{value!s} is not a time between years 1 and 9999 in UTC", code="invalid_timestamp") from exc


def horizon(skew_seconds: float) -> str:
    """The latest report time accepted now: the server's clock plus the allowed skew (UTC text)."""
    return (datetime.now(UTC) + timedelta(seconds=skew_seconds)).isoformat(timespec="microseconds")


def _decide_report(
    fsm: Fsm,
    entity_type: str,
    entity_id: str,
    target: str,
    at: str | None,
    details: dict[str, Any],
    current: Entity,
    now: str,
    latest: str,
) -> Decision:
    """What a state report of ``target`` does to ``current`` (one :class:`Change` built, no copies).

    ``latest`` is the newest report time accepted now (:func:`horizon`). A report dated after
    it is refused and never becomes the newest accepted one: one agent's bad clock must not
    refuse every later report as stale (DESIGN §3). For the same reason a stored newest report
    time beyond ``latest`` (written before this rule existed) makes nothing stale.
    """
    if at is not None and at > latest:
        future = TimestampInFuture(
            f"report dated {at} is more than the allowed clock skew after the server's time; check the agent's clock",
            **{"from": current.state, "to": target},
            reportedAt=at,
            latestAccepted=latest,
        )
        return Change(entity_type, entity_id, seen_at=now), fsm.trigger_for(current.state, target), target, future
    newest = current.last_report_at
    if at is not None and newest is not None and at < newest <= latest:
        stale = StaleReport(
            f"report from {at} is older than the newest accepted one ({newest})",
            source=current.state,
            to=target,
            newest=newest,
        )
        return Change(entity_type, entity_id, seen_at=now), fsm.trigger_for(current.state, target), target, stale
    accepted = None if at is None else details
    if current.state == target:
        return Change(entity_type, entity_id, seen_at=now, report_at=at, details=accepted), None, None, None
    trigger = fsm.trigger_for(current.state, target)
    if trigger is None:
        illegal = IllegalTransition(
            f"{entity_type} {entity_id!r} cannot go from {current.state!r} to {target!r}",
            source=current.state,
            to=target,
            allowed=fsm.allowed(current.state),
        )
        return Change(entity_type, entity_id, seen_at=now), None, target, illegal
    try:
        dest = fsm.fire(trigger, current.state)
    except IllegalTransition as exc:
        exc.extra["to"] = target
        return Change(entity_type, entity_id, seen_at=now), trigger, target, exc
    return Change(entity_type, entity_id, state=dest, seen_at=now, report_at=at, details=accepted), trigger, dest, None


_TEMPLATE: dict[str, Any] = {}


def _log_record(record: dict[str, Any]) -> logging.LogRecord:
    """The ``LogRecord`` ``audit_log.info("transition", extra=...)`` would make, made cheaply.

    ``makeRecord`` derives the same dozen fields every time (file name and module by
    ``os.path`` calls, level name, process and thread facts): 3 µs a line. The first record
    is made by ``makeRecord`` and kept as a template; later ones copy it and set what
    differs: the times and the two extras (``audit``, ``opscore_json``). No ``findCaller``
    walk either (the caller is always :meth:`Engine._emit`).
    """
    if not _TEMPLATE or logging.getLogRecordFactory() is not logging.LogRecord:
        made = audit_log.makeRecord(audit_log.name, logging.INFO, __file__, 0, "transition", (), None, "_emit")
        if logging.getLogRecordFactory() is not logging.LogRecord:
            made.audit = record
            made.opscore_json = audit.text_of(record)
            return made
        _TEMPLATE.update(made.__dict__)
    line = logging.LogRecord.__new__(logging.LogRecord)
    fields = line.__dict__
    fields.update(_TEMPLATE)
    fields["created"] = created = time.time()
    fields["msecs"] = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes them
    fields["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    fields["audit"] = record
    fields["opscore_json"] = audit.text_of(record)
    return line


class Engine:
    """Applies transitions. The only writer of entity state and audit records."""

    def __init__(
        self,
        store: Store,
        machines: dict[str, Declaration] | None = None,
        *,
        max_clock_skew: float = DEFAULT_CLOCK_SKEW,
    ) -> None:
        self.store = store
        self.max_clock_skew = max_clock_skew
        """Seconds a report's timestamp may lie after the server's clock (``OPSCORE_MAX_CLOCK_SKEW_SECONDS``)."""
        self.fsms = {name: Fsm(decl) for name, decl in (machines or MACHINES).items()}
        self._entity_locks = _KeyedLocks()
        self._key_locks = _KeyedLocks()
        self.listeners: list[Callable[[dict[str, Any], Entity], None]] = []
        """Called with every committed record and the entity as that commit left it."""

    def fsm(self, entity_type: str) -> Fsm:
        return self.fsms[entity_type]

    # -- entry points ---------------------------------------------------------------------

    async def report(
        self,
        entity_type: str,
        entity_id: str,
        target: str,
        *,
        ctx: Context,
        reported_at: datetime | str | None = None,
        details: dict[str, Any] | None = None,
        create: Entity | None = None,
    ) -> TransitionResult | Replay:
        """A report that ``entity_id`` is now in ``target``.

        Same state: a heartbeat (liveness only, no record). Otherwise the single declared
        trigger from the current state to ``target`` is fired, or the report is refused and
        recorded. ``create`` registers an unknown entity on the spot; ``reported_at`` older
        than the newest accepted report is refused as stale (``None`` skips that check).
        """
        fsm = self.fsms[entity_type]
        if target not in fsm.states:
            raise UnknownState(
                f"{target!r} is not a state of the {entity_type} machine; valid states: {', '.join(fsm.states)}",
                valid=list(fsm.states),
            )
        at = None if reported_at is None else normalise_time(reported_at)
        details = details or {}
        latest = horizon(self.max_clock_skew)

        async def decide(current: Entity, now: str) -> Decision:
            return _decide_report(fsm, entity_type, entity_id, target, at, details, current, now, latest)

        return await self._run(entity_type, entity_id, ctx, decide, details=details, reported_at=at, create=create)

    async def report_many(
        self, entity_type: str, reports: list[Report], *, ctx: Context
    ) -> list[TransitionResult | Replay | OpsCoreError]:
        """Many state reports: each answered as :meth:`report` would answer it alone.

        Reports of distinct entities run concurrently, so the store commits them together
        (SQLite: one group commit for the lot); the reports of one entity run in their
        order in the batch. A refusal is returned in its place, never raised.
        """
        results: list[TransitionResult | Replay | OpsCoreError | None] = [None] * len(reports)
        by_entity: dict[str, list[int]] = {}
        for i, r in enumerate(reports):
            by_entity.setdefault(r.entity_id, []).append(i)

        async def in_order(indices: list[int]) -> None:
            for i in indices:
                r = reports[i]
                try:
                    results[i] = await self.report(
                        entity_type,
                        r.entity_id,
                        r.target,
                        ctx=ctx,
                        reported_at=r.reported_at,
                        details=r.details,
                        create=r.create,
                    )
                except OpsCoreError as exc:
                    results[i] = exc

        if ctx.idempotency is not None or ctx.if_match is not None:
            await asyncio.gather(*(in_order(indices) for indices in by_entity.values()))
            return [r for r in results if r is not None]
        # Entities whose lock is free are taken now and applied together: one read of all,
        # one decision each, one store.apply_many (SQLite: one job, one future, one group
        # commit). Entities someone else holds go the single-report way, concurrently.
        locks = self._entity_locks
        mine: list[str] = []
        busy: list[list[int]] = []
        for entity_id, indices in by_entity.items():
            if locks.try_acquire((entity_type, entity_id)):
                mine.append(entity_id)
            else:
                busy.append(indices)

        async def together() -> None:
            try:
                depth = 0
                while True:
                    indices = [by_entity[e][depth] for e in mine if len(by_entity[e]) > depth]
                    if not indices:
                        return
                    await self._report_round(entity_type, reports, indices, ctx, results)
                    depth += 1
            finally:
                for entity_id in mine:
                    locks.release((entity_type, entity_id))

        if busy:
            await asyncio.gather(together(), *(in_order(indices) for indices in busy))
        else:
            await together()
        return [r for r in results if r is not None]

    async def _report_round(
        self,
        entity_type: str,
        reports: list[Report],
        indices: list[int],
        ctx: Context,
        results: list[TransitionResult | Replay | OpsCoreError | None],
    ) -> None:
        """Reports of distinct entities whose locks the caller holds: decided and committed together."""
        fsm = self.fsms[entity_type]
        currents = await self.store.get_many(entity_type, [reports[i].entity_id for i in indices])
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        latest = horizon(self.max_clock_skew)
        todo: list[tuple[int, Entity, str | None, dict[str, Any], Change, OpsCoreError | None]] = []
        for i, current in zip(indices, currents, strict=True):
            r = reports[i]
            try:
                if r.target not in fsm.states:
                    raise UnknownState(
                        f"{r.target!r} is not a state of the {entity_type} machine; "
                        f"valid states: {', '.join(fsm.states)}",
                        valid=list(fsm.states),
                    )
                at = None if r.reported_at is None else normalise_time(r.reported_at)
                seed = None
                if current is None:
                    if r.create is None:
                        raise UnknownEntity(entity_type, r.entity_id)
                    seed = current = r.create
            except OpsCoreError as exc:
                results[i] = exc
                continue
            details = r.details or {}
            decision = _decide_report(fsm, entity_type, r.entity_id, r.target, at, details, current, now, latest)
            change = self._change(ctx, current, seed, decision, details, at)
            todo.append((i, current, at, details, change, decision[3]))
        if not todo:
            return
        committed = await self.store.apply_many([t[4] for t in todo])
        for (i, current, at, details, change, err), outcome in zip(todo, committed, strict=True):
            r = reports[i]
            try:
                if isinstance(outcome, RevisionConflict):  # another replica moved it: the single-report way
                    target = r.target

                    async def decide(
                        entity: Entity, now: str, target: str = target, at: str | None = at, details: Any = details
                    ) -> Decision:
                        return _decide_report(
                            fsm, entity_type, entity.entity_id, target, at, details, entity, now, latest
                        )

                    results[i] = await self._attempt(entity_type, r.entity_id, ctx, decide, details, at, r.create)
                elif isinstance(outcome, Exception):
                    raise outcome
                else:
                    results[i] = self._conclude(current, change, outcome, err)
            except OpsCoreError as exc:
                results[i] = exc

    async def fire(
        self,
        entity_type: str,
        entity_id: str,
        trigger: str,
        *,
        ctx: Context,
        details: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        timers: tuple[Timer, ...] = (),
        cancel_timers: tuple[str, ...] = (),
    ) -> TransitionResult | Replay:
        """An explicit trigger by name (operators, workflows, the liveness sweep).

        ``timers``/``cancel_timers`` are armed/disarmed in the same atomic write as the
        transition, and only when it is applied (a refused trigger arms nothing): a workflow
        task's deadline exists exactly when the task is ``dispatched``.
        """
        fsm = self.fsms[entity_type]
        if trigger not in fsm.triggers:
            raise UnknownTrigger(
                f"{trigger!r} is not a trigger of the {entity_type} machine; valid triggers: {', '.join(fsm.triggers)}",
                valid=list(fsm.triggers),
            )
        details = details or {}

        async def decide(current: Entity, now: str) -> Decision:
            try:
                dest = fsm.fire(trigger, current.state)
            except IllegalTransition as exc:
                return Change(entity_type, entity_id), trigger, None, exc
            change = Change(entity_type, entity_id, state=dest, data=data, timers=timers, cancel_timers=cancel_timers)
            return change, trigger, dest, None

        return await self._run(entity_type, entity_id, ctx, decide, details=details, reported_at=None, create=None)

    async def upsert(
        self, entity_type: str, entity_id: str, data: dict[str, Any], *, ctx: Context
    ) -> tuple[Entity, bool]:
        """Create an entity in its machine's initial state, or change a known one's metadata.

        Never changes the state of a known entity (DESIGN §2: a late REGISTER must not reset
        an agent that already reported). A change of a known entity's metadata is audited: a
        record ``update_metadata`` in its chain (``source`` = ``dest`` = its state, each changed
        field's old and new value in ``details``), written with the change, compare-and-set on
        the old values so that two registrations racing on two replicas both leave a record.
        """
        fsm = self.fsms[entity_type]
        seed = Entity(entity_type, entity_id, fsm.initial, data=data)
        async with self._entity_locks.hold((entity_type, entity_id)):
            for _ in range(MAX_CAS_RETRIES):
                current = await self.store.get(entity_type, entity_id)
                if current is None:
                    committed = await self.store.apply(Change(entity_type, entity_id, create=seed))
                    if committed.created:
                        return committed.entity, True
                    continue  # created meanwhile by another replica: compare with what it wrote
                changed = {
                    key: {"old": current.data.get(key), "new": value}
                    for key, value in data.items()
                    if current.data.get(key) != value
                }
                if not changed:
                    return current, False
                record = audit.draft(
                    entity_type=entity_type,
                    entity_id=entity_id,
                    event=audit.METADATA_EVENT,
                    source=current.state,
                    dest=current.state,
                    outcome="applied",
                    reason=None,
                    actor=ctx.actor,
                    request_id=ctx.request_id,
                    details={"changed": changed},
                    reported_at=None,
                )
                expected = {key: current.data.get(key) for key in changed}
                change = Change(entity_type, entity_id, expected_data=expected, data=data, record=record)
                try:
                    committed = await self.store.apply(change)
                except RevisionConflict:
                    continue
                self._emit(committed)
                return committed.entity, False
        raise Conflict(
            f"{entity_type} {entity_id!r} kept changing under this request; try again", code="revision_conflict"
        )

    async def create(self, entity_type: str, entity_id: str, data: dict[str, Any], *, ctx: Context) -> Entity:
        """Create an entity in its initial state unless it exists; an existing one is left untouched.

        Unlike :meth:`upsert`, a second creator (another replica healing the same gap) can
        never overwrite what the first one has done with the entity since.
        """
        fsm = self.fsms[entity_type]
        seed = Entity(entity_type, entity_id, fsm.initial, data=data)
        async with self._entity_locks.hold((entity_type, entity_id)):
            committed = await self.store.apply(Change(entity_type, entity_id, create=seed))
        return committed.entity

    async def update(
        self,
        entity_type: str,
        entity_id: str,
        data: dict[str, Any],
        *,
        ctx: Context,
        expected_revision: int | None = None,
        expected_data: dict[str, Any] | None = None,
    ) -> Entity:
        """Merge ``data`` into a known entity, compare-and-set: no state change, no record.

        ``RevisionConflict`` when the entity moved (``expected_revision``) or its metadata no
        longer holds ``expected_data``; ``UnknownEntity`` when it does not exist. The caller
        re-reads and decides again: nothing here retries, because the decision was the caller's.
        """
        change = Change(
            entity_type, entity_id, expected_revision=expected_revision, expected_data=expected_data, data=data
        )
        async with self._entity_locks.hold((entity_type, entity_id)):
            committed = await self.store.apply(change)
        audit_log.debug("update", extra={"entityType": entity_type, "entityId": entity_id, "actor": ctx.actor})
        return committed.entity

    async def get(self, entity_type: str, entity_id: str) -> Entity:
        entity = await self.store.get(entity_type, entity_id)
        if entity is None:
            raise UnknownEntity(entity_type, entity_id)
        return entity

    # -- the one path every transition takes ---------------------------------------------

    async def _run(
        self,
        entity_type: str,
        entity_id: str,
        ctx: Context,
        decide: Callable[[Entity, str], Awaitable[Decision]],
        *,
        details: dict[str, Any],
        reported_at: str | None,
        create: Entity | None,
    ) -> TransitionResult | Replay:
        idem = ctx.idempotency
        if idem is None:
            locks, key = self._entity_locks, (entity_type, entity_id)
            if not locks.try_acquire(key):
                await locks.acquire(key)
            try:
                return await self._attempt(entity_type, entity_id, ctx, decide, details, reported_at, create)
            finally:
                locks.release(key)
        async with self._key_locks.hold((idem.scope, idem.key)):
            stored = await self.store.get_idempotency(idem.scope, idem.key)
            if stored is not None:
                return self._replay(stored, idem)
            try:
                async with self._entity_locks.hold((entity_type, entity_id)):
                    return await self._attempt(entity_type, entity_id, ctx, decide, details, reported_at, create)
            except Conflict as exc:
                if exc.code != "idempotency_key_in_use":
                    raise
                stored = await self.store.get_idempotency(idem.scope, idem.key)
                if stored is None:
                    raise
                return self._replay(stored, idem)

    @staticmethod
    def _replay(stored: IdempotencyEntry, idem: Idempotency) -> Replay:
        if stored.fingerprint != idem.fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was first used with a different request; use a new key for a new request"
            )
        if stored.status >= 400:
            raise from_dict(stored.body)
        return Replay(stored.status, stored.body)

    async def _attempt(
        self,
        entity_type: str,
        entity_id: str,
        ctx: Context,
        decide: Callable[[Entity, str], Awaitable[Decision]],
        details: dict[str, Any],
        reported_at: str | None,
        create: Entity | None,
    ) -> TransitionResult:
        for _ in range(MAX_CAS_RETRIES):
            current = await self.store.get(entity_type, entity_id)
            seed = None
            if current is None:
                if create is None:
                    raise UnknownEntity(entity_type, entity_id)
                seed = current = create
            now = datetime.now(UTC).isoformat(timespec="microseconds")
            err: OpsCoreError | None
            if ctx.if_match is not None and ctx.if_match != current.revision:
                change, trigger, dest = Change(entity_type, entity_id), None, None
                err = PreconditionFailed(
                    f"If-Match revision {ctx.if_match} is not the current revision {current.revision}",
                    revision=current.revision,
                )
            else:
                change, trigger, dest, err = await decide(current, now)
            change = self._change(ctx, current, seed, (change, trigger, dest, err), details, reported_at)
            try:
                committed = await self.store.apply(change)
            except RevisionConflict as exc:
                if ctx.if_match is not None:
                    raise PreconditionFailed(exc.detail, revision=exc.extra.get("revision")) from exc
                continue
            return self._conclude(current, change, committed, err)
        raise Conflict(
            f"{entity_type} {entity_id!r} kept changing under this request; try again", code="revision_conflict"
        )

    def _change(
        self,
        ctx: Context,
        current: Entity,
        seed: Entity | None,
        decision: Decision,
        details: dict[str, Any],
        reported_at: str | None,
    ) -> Change:
        """The decided change with its audit record draft, ready for the store."""
        change, trigger, dest, err = decision
        record = audit.draft(
            entity_type=change.entity_type,
            entity_id=change.entity_id,
            event=trigger,
            source=current.state,
            dest=dest,
            outcome="applied" if err is None else "rejected",
            reason=None if err is None else err.code,
            actor=ctx.actor,
            request_id=ctx.request_id,
            details=details,
            reported_at=reported_at,
        )
        applied = err is None and change.state is not None
        heartbeat = err is None and change.state is None
        change = _finish(change, seed, current.revision if applied else None, None if heartbeat else record)
        if ctx.idempotency is not None:
            change = replace(change, idempotency=self._answer(ctx.idempotency, current, change, err))
        return change

    def _conclude(
        self, current: Entity, change: Change, committed: Committed, err: OpsCoreError | None
    ) -> TransitionResult:
        """Log the committed change; the refusal raised (with its audit id), or the result."""
        self._emit(committed)
        if err is not None:
            assert committed.record is not None
            err.extra["auditId"] = committed.record["id"]
            raise err
        return TransitionResult(
            entity=committed.entity,
            previous_state=current.state,
            changed=change.expected_revision is not None,
            record=committed.record,
            created=committed.created,
        )

    @staticmethod
    def _answer(idem: Idempotency, current: Entity, change: Change, err: OpsCoreError | None) -> IdempotencyEntry:
        """The answer this request will get, saved with its effect (the store adds ``auditId``)."""
        if err is not None:
            status, body = idem.render_error(err)
            body = {**body, "auditId": None}
        else:
            revision = current.revision + (1 if change.state is not None else 0)
            provisional = replace(current, state=change.state or current.state, revision=revision)
            status, body = idem.render(
                TransitionResult(provisional, current.state, change.state is not None, record=None)
            )
        return IdempotencyEntry(idem.scope, idem.key, idem.fingerprint, status, body)

    def _emit(self, committed: Committed) -> None:
        """Log the committed record as one JSON line and tell listeners (workflows)."""
        record = committed.record
        if record is None:
            return
        if audit_log.isEnabledFor(logging.INFO):
            audit_log.handle(_log_record(record))
        for listener in self.listeners:
            listener(record, committed.entity)
