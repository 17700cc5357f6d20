"""The engine: load entities, ask their machines, build the audit records, commit each change at once.

Every transition takes ONE path, :meth:`Engine.apply`, for one request or a batch (a single
request is a batch of one): read the entities, decide each request
(:mod:`opscore.decisions`), build one :class:`~opscore.models.Change` per request with its
audit record draft, hand them to the store together (SQLite commits them in one group
commit), then log the committed records and tell the listeners. The pieces it uses each sit
in a module of their own: the machines (:mod:`opscore.fsm`), per-key locks
(:mod:`opscore.locks`), the clock (:mod:`opscore.clock`), ``Idempotency-Key`` answers
(:mod:`opscore.idempotency`) and the log line (:mod:`opscore.loglines`). The engine knows
nothing of HTTP.

Within one process, requests for the same entity are serialised by a per-entity lock, so
they never race; across processes (several replicas on PostgreSQL) the store's revision
compare-and-set decides, and a lost race is decided again from a fresh read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opscore import audit, clock, decisions, loglines
from opscore.decisions import Decision
from opscore.errors import (
    OpsCoreError,
    PreconditionFailed,
    RevisionConflict,
    UnknownEntity,
    UnknownState,
    UnknownTrigger,
)
from opscore.fsm import Fsm
from opscore.idempotency import Idempotency, Keys, Outcome, Replay, entry
from opscore.locks import KeyedLocks
from opscore.machines import MACHINES, Declaration
from opscore.models import Change, Committed, Entity, Timer, TransitionResult
from opscore.storage.base import Store

MAX_CAS_RETRIES = 16
DEFAULT_CLOCK_SKEW = 300.0
SYSTEM_ACTOR = "system"

__all__ = ["Context", "Engine", "Idempotency", "Replay", "Report", "Request"]

_Plan = tuple[int, Entity, Change, OpsCoreError | None]
"""A decided request: its place, the entity it was decided on, its change, its refusal."""


@dataclass(slots=True)
class Context:
    """Who asks, and the request's preconditions."""

    actor: str
    request_id: str | None = None
    if_match: int | None = None
    idempotency: Idempotency | None = None


@dataclass(slots=True)
class Request:
    """One transition asked of the engine: of which entity, how to decide it, what its record carries."""

    entity_type: str
    entity_id: str
    decide: Callable[[Entity, str], Decision]
    """``decide(current, now)``: pure, called again from a fresh read after a lost race."""
    details: dict[str, Any]
    reported_at: str | None = None
    create: Entity | None = None
    """Registers the entity on the spot when it does not exist (a first state report)."""


@dataclass(frozen=True, slots=True)
class Report:
    """One state report of a batch (:meth:`Engine.report_many`)."""

    entity_id: str
    target: str
    reported_at: datetime | str | None = None
    details: dict[str, Any] | None = None
    create: Entity | None = None


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
        self.fsms = {name: Fsm(decl) for name, decl in (machines or MACHINES).items()}
        self.max_clock_skew = max_clock_skew
        """Seconds a report's timestamp may lie after the server's clock (``OPSCORE_MAX_CLOCK_SKEW_SECONDS``)."""
        self._locks = KeyedLocks()
        self._keys = Keys(store)
        self.listeners: list[Callable[[dict[str, Any], Entity], None]] = []
        """Called with every committed record and the entity as that commit left it."""
        self.commit_timer: Callable[[float], None] | None = None
        """Called with the seconds each commit of :meth:`apply` took (``opscore_store_commit_seconds``)."""

    def fsm(self, entity_type: str) -> Fsm:
        return self.fsms[entity_type]

    # -- requests -------------------------------------------------------------------------

    def report_request(
        self,
        entity_type: str,
        entity_id: str,
        target: str,
        *,
        reported_at: datetime | str | None = None,
        details: dict[str, Any] | None = None,
        create: Entity | None = None,
    ) -> Request:
        """A state report as a :class:`Request`; ``UnknownState``/``InvalidTimestamp`` at once."""
        fsm = self.fsms[entity_type]
        if target not in fsm.states:
            raise UnknownState(
                f"{target!r} is not a state of the {entity_type} machine; valid states: {', '.join(fsm.states)}",
                valid=list(fsm.states),
            )
        at = None if reported_at is None else clock.normalise(reported_at)
        details = details or {}
        latest = clock.after(self.max_clock_skew)

        def decide(current: Entity, now: str) -> Decision:
            return decisions.report(fsm, current, target, at, details, now, latest)

        return Request(entity_type, entity_id, decide, details, at, create)

    def trigger_request(
        self,
        entity_type: str,
        entity_id: str,
        trigger: str,
        *,
        details: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        timers: tuple[Timer, ...] = (),
        cancel_timers: tuple[str, ...] = (),
    ) -> Request:
        """A trigger by name as a :class:`Request`; ``UnknownTrigger`` at once."""
        fsm = self.fsms[entity_type]
        if trigger not in fsm.triggers:
            raise UnknownTrigger(
                f"{trigger!r} is not a trigger of the {entity_type} machine; valid triggers: {', '.join(fsm.triggers)}",
                valid=list(fsm.triggers),
            )

        def decide(current: Entity, now: str) -> Decision:
            return decisions.trigger(fsm, current, trigger, data, timers, cancel_timers)

        return Request(entity_type, entity_id, decide, details or {})

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
        """A report that ``entity_id`` is now in ``target``; a refusal is raised (and recorded).

        Same state: a heartbeat (liveness only, no record). Otherwise the single declared
        trigger from the current state to ``target`` is fired, or the report is refused.
        ``create`` registers an unknown entity on the spot; ``reported_at`` older than the
        newest accepted report is refused as stale (``None`` skips that check).
        """
        request = self.report_request(
            entity_type, entity_id, target, reported_at=reported_at, details=details, create=create
        )
        return _raised((await self.apply([request], ctx=ctx))[0])

    async def report_many(
        self, entity_type: str, reports: list[Report], *, ctx: Context
    ) -> list[TransitionResult | Replay | OpsCoreError]:
        """Many state reports, each answered as :meth:`report` would answer it alone, in its place."""
        results: list[Outcome | None] = [None] * len(reports)
        requests: list[Request] = []
        places: list[int] = []
        for n, r in enumerate(reports):
            try:
                requests.append(
                    self.report_request(
                        entity_type,
                        r.entity_id,
                        r.target,
                        reported_at=r.reported_at,
                        details=r.details,
                        create=r.create,
                    )
                )
                places.append(n)
            except OpsCoreError as exc:
                results[n] = exc
        for n, outcome in zip(places, await self.apply(requests, ctx=ctx), strict=True):
            results[n] = outcome
        return [r for r in results if r is not None]

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

        ``data`` and ``timers``/``cancel_timers`` are written in the same atomic write as the
        transition, and only when it is applied (a refused trigger arms nothing): a workflow
        task's deadline exists exactly when the task is ``dispatched``.
        """
        request = self.trigger_request(
            entity_type, entity_id, trigger, details=details, data=data, timers=timers, cancel_timers=cancel_timers
        )
        return _raised((await self.apply([request], ctx=ctx))[0])

    # -- the one path every transition takes ------------------------------------------------

    async def apply(self, requests: list[Request], *, ctx: Context) -> list[Outcome]:
        """Apply requests; each answered in its place (a result, a replay or a refusal), none raised.

        Requests of distinct entities are decided and committed together; the requests of one
        entity are applied in their order. An ``Idempotency-Key`` names one request.
        """
        if ctx.idempotency is not None:
            if len(requests) != 1:
                raise ValueError("an Idempotency-Key names exactly one request")
            return [await self._keys.run(ctx.idempotency, lambda: self._one(requests[0], ctx))]
        if len(requests) == 1:
            return [await self._one(requests[0], ctx)]
        return await self._many(requests, ctx)

    async def _one(self, request: Request, ctx: Context) -> Outcome:
        locks, key = self._locks, (request.entity_type, request.entity_id)
        if not locks.try_acquire(key):
            await locks.acquire(key)
        try:
            results: list[Outcome | None] = [None]
            await self._round([request], [0], ctx, results)
            outcome = results[0]
            assert outcome is not None
            return outcome
        finally:
            locks.release(key)

    async def _many(self, requests: list[Request], ctx: Context) -> list[Outcome]:
        """Entities whose lock is free are taken now and go together, one round per depth; the
        entities someone else holds wait for their lock, each on its own, concurrently."""
        results: list[Outcome | None] = [None] * len(requests)
        queues: dict[Hashable, list[int]] = {}
        for n, r in enumerate(requests):
            queues.setdefault((r.entity_type, r.entity_id), []).append(n)
        locks = self._locks
        mine = [key for key in queues if locks.try_acquire(key)]
        held = set(mine)
        busy = [key for key in queues if key not in held]

        async def together() -> None:
            try:
                depth = 0
                while indices := [queues[key][depth] for key in mine if len(queues[key]) > depth]:
                    await self._round(requests, indices, ctx, results)
                    depth += 1
            finally:
                for key in mine:
                    locks.release(key)

        async def in_turn(key: Hashable) -> None:
            await locks.acquire(key)
            try:
                for n in queues[key]:
                    await self._round(requests, [n], ctx, results)
            finally:
                locks.release(key)

        if busy:
            await asyncio.gather(together(), *(in_turn(key) for key in busy))
        else:
            await together()
        return [r for r in results if r is not None]

    async def _round(
        self, requests: list[Request], indices: list[int], ctx: Context, results: list[Outcome | None]
    ) -> None:
        """Requests of distinct entities whose locks are held: read, decide, commit together.

        A change that lost the compare-and-set (another replica moved its entity) is decided
        again from a fresh read, with an ``If-Match`` it is refused with 412 instead.
        """
        for _ in range(MAX_CAS_RETRIES):
            currents = await self._read([requests[n] for n in indices])
            now = clock.now()
            plans: list[_Plan] = []
            for n, current in zip(indices, currents, strict=True):
                request = requests[n]
                seed = None
                if current is None:
                    if request.create is None:
                        results[n] = UnknownEntity(request.entity_type, request.entity_id)
                        continue
                    seed = current = request.create
                if ctx.if_match is not None and ctx.if_match != current.revision:
                    decision = Decision(
                        refusal=PreconditionFailed(
                            f"If-Match revision {ctx.if_match} is not the current revision {current.revision}",
                            revision=current.revision,
                        )
                    )
                else:
                    decision = request.decide(current, now)
                plans.append((n, current, self._change(ctx, request, current, seed, decision), decision.refusal))
            if not plans:
                return
            lost: list[int] = []
            for (n, current, change, refusal), outcome in zip(plans, await self._commit(plans), strict=True):
                if isinstance(outcome, RevisionConflict):
                    if ctx.if_match is not None:
                        results[n] = PreconditionFailed(outcome.detail, revision=outcome.extra.get("revision"))
                    else:
                        lost.append(n)
                elif isinstance(outcome, OpsCoreError):
                    results[n] = outcome
                elif isinstance(outcome, Exception):
                    raise outcome
                else:
                    results[n] = self._conclude(current, change, outcome, refusal)
            if not lost:
                return
            indices = lost
        for n in indices:
            request = requests[n]
            results[n] = RevisionConflict(
                f"{request.entity_type} {request.entity_id!r} kept changing under this request; try again",
            )

    async def _read(self, requests: list[Request]) -> list[Entity | None]:
        if len(requests) == 1:
            return [await self.store.get(requests[0].entity_type, requests[0].entity_id)]
        entity_type = requests[0].entity_type
        if all(r.entity_type == entity_type for r in requests):
            return await self.store.get_many(entity_type, [r.entity_id for r in requests])
        return [await self.store.get(r.entity_type, r.entity_id) for r in requests]

    async def _commit(self, plans: list[_Plan]) -> list[Committed | Exception]:
        started = time.perf_counter()
        try:
            if len(plans) > 1:
                return await self.store.apply_many([plan[2] for plan in plans])
            try:
                return [await self.store.apply(plans[0][2])]
            except Exception as exc:  # noqa: BLE001 - handed back as this change's outcome
                return [exc]
        finally:
            if self.commit_timer is not None:
                self.commit_timer(time.perf_counter() - started)

    def _change(
        self, ctx: Context, request: Request, current: Entity, seed: Entity | None, decision: Decision
    ) -> Change:
        """The decided change with its audit record draft, ready for the store (no record for a heartbeat)."""
        refusal = decision.refusal
        record = None
        if not decision.heartbeat:
            record = audit.draft(
                entity_type=request.entity_type,
                entity_id=request.entity_id,
                event=decision.event,
                source=current.state,
                dest=decision.dest,
                outcome="applied" if refusal is None else "rejected",
                reason=None if refusal is None else refusal.code,
                actor=ctx.actor,
                request_id=ctx.request_id,
                details=request.details,
                reported_at=request.reported_at,
            )
        applied = refusal is None and decision.state is not None
        idempotency = None
        if ctx.idempotency is not None:
            idempotency = entry(
                ctx.idempotency,
                request.entity_type,
                request.entity_id,
                decision.state or current.state,
                current.state,
                applied,
                current.revision + (1 if applied else 0),
                refusal,
            )
        return Change(
            request.entity_type,
            request.entity_id,
            create=seed,
            expected_revision=current.revision if applied else None,
            state=decision.state if refusal is None else None,
            record=record,
            seen_at=decision.seen_at,
            report_at=decision.report_at,
            details=decision.details,
            data=decision.data,
            idempotency=idempotency,
            timers=decision.timers,
            cancel_timers=decision.cancel_timers,
            # what this was decided on; an If-Match answer needs the row's revision, read under its lock
            base=current if seed is None and ctx.if_match is None else None,
        )

    def _conclude(
        self, current: Entity, change: Change, committed: Committed, refusal: OpsCoreError | None
    ) -> TransitionResult | OpsCoreError:
        """Log the committed change; the refusal (with its audit id), or the result."""
        self._emit(committed)
        if refusal is not None:
            assert committed.record is not None
            refusal.extra["auditId"] = committed.record["id"]
            return refusal
        return TransitionResult(
            entity=committed.entity,
            previous_state=current.state,
            changed=change.expected_revision is not None,
            record=committed.record,
            created=committed.created,
        )

    def _emit(self, committed: Committed) -> None:
        """Log the committed record as one JSON line and tell listeners (workflows)."""
        record = committed.record
        if record is None:
            return
        loglines.transition(record)
        for listener in self.listeners:
            listener(record, committed.entity)

    # -- metadata, creation, compare-and-set writes (no transition) ---------------------------

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
        async with self._locks.hold((entity_type, entity_id)):
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
                # the revision too: the record's source is the state read, which must still hold
                change = Change(
                    entity_type,
                    entity_id,
                    expected_revision=current.revision,
                    expected_data=expected,
                    data=data,
                    record=record,
                )
                try:
                    committed = await self.store.apply(change)
                except RevisionConflict:
                    continue
                self._emit(committed)
                return committed.entity, False
        raise RevisionConflict(f"{entity_type} {entity_id!r} kept changing under this request; try again")

    async def create(self, entity_type: str, entity_id: str, data: dict[str, Any], *, ctx: Context) -> Entity:
        """Create an entity in its initial state unless it exists; an existing one is left untouched.

        Unlike :meth:`upsert`, a second creator (another replica healing the same gap) can
        never overwrite what the first one has done with the entity since.
        """
        fsm = self.fsms[entity_type]
        seed = Entity(entity_type, entity_id, fsm.initial, data=data)
        async with self._locks.hold((entity_type, entity_id)):
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
        async with self._locks.hold((entity_type, entity_id)):
            committed = await self.store.apply(change)
        return committed.entity

    async def get(self, entity_type: str, entity_id: str) -> Entity:
        entity = await self.store.get(entity_type, entity_id)
        if entity is None:
            raise UnknownEntity(entity_type, entity_id)
        return entity


def _raised(outcome: Outcome) -> TransitionResult | Replay:
    """The outcome of a single request: the result, or its refusal raised."""
    if isinstance(outcome, OpsCoreError):
        raise outcome
    return outcome
