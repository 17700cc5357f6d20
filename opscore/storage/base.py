"""The storage port: what the engine needs from any backend, and the one rule for a write.

A store never decides whether a transition is legal; it commits what the engine built,
atomically, or refuses when the revision the decision was based on is no longer current.
:func:`next_entity` is the single definition of how a :class:`Change` moves an entity and
its audit chain forward, so every backend (memory, SQLite, PostgreSQL) agrees on it and only
has to persist the result.
"""

from __future__ import annotations

import abc
import time
from dataclasses import replace
from typing import Any

from opscore import audit, clock
from opscore.errors import InvalidPosition, RevisionConflict, UnknownEntity
from opscore.models import AuditQuery, Change, Committed, Entity, EntityQuery, IdempotencyEntry, Position, Timer

WRITE_ERROR_WINDOW = 10.0
"""Seconds a failed write keeps a store from being ready (unless a write succeeds sooner)."""

IDEMPOTENCY_TTL = 48 * 3600.0
"""Seconds an ``Idempotency-Key`` answer is kept (DESIGN §5 asks for at least 24 h)."""


def utc_now() -> str:
    """Now, as the fixed-width UTC ISO-8601 text every stored timestamp uses."""
    return clock.now()


def later(a: str | None, b: str | None) -> str | None:
    """The later of two stored timestamps (fixed-width UTC text compares as time)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


def next_entity(
    current: Entity | None, change: Change, *, now: str, record_id: int | None
) -> tuple[Entity, dict[str, Any] | None, bool]:
    """Apply ``change`` to ``current``: the new entity, the sealed audit record, created?

    Raises ``UnknownEntity`` (absent and nothing to create) or ``RevisionConflict``
    (compare-and-set lost: ``expected_revision`` or ``expected_data`` no longer holds, or the
    entity moved since ``base`` was read: a heartbeat or a refusal decided on a state that is
    no longer the entity's must be decided again). Every
    backend calls this under its write lock (SQLite's one writer, PostgreSQL's row lock), so
    both conditions are checked against the committed row, never a stale copy. ``record_id``
    is the id the backend allocated for the record. ``now`` is the change's time; an entity
    whose last change is later keeps that time instead.
    """
    created = False
    if current is None:
        if change.create is None:
            raise UnknownEntity(change.entity_type, change.entity_id)
        current = replace(change.create, created_at=now, updated_at=now)
        created = True
    elif current.updated_at > now:
        # Never stamp a record earlier than the entity's last change (a clock that stepped back,
        # a replica whose clock is behind): recordedAt never decreases along a chain, which
        # the seek of ``?at=`` relies on (opscore.storage.rows.seek).
        now = current.updated_at
    if change.expected_revision is not None and current.revision != change.expected_revision:
        raise RevisionConflict(
            f"{change.entity_type} {change.entity_id!r} is at revision {current.revision}, "
            f"not {change.expected_revision}",
            revision=current.revision,
        )
    base = change.base
    if base is not None and not created and (current.revision, current.seq) != (base.revision, base.seq):
        raise RevisionConflict(
            f"{change.entity_type} {change.entity_id!r} moved since revision {base.revision} was read "
            f"(now revision {current.revision}, seq {current.seq})",
            revision=current.revision,
        )
    if change.expected_data is not None:
        moved = sorted(k for k, v in change.expected_data.items() if current.data.get(k) != v)
        if moved:
            raise RevisionConflict(
                f"{change.entity_type} {change.entity_id!r} changed its {', '.join(moved)} meanwhile",
                revision=current.revision,
            )
    record = None
    seq, head = current.seq, current.head_hash
    if change.record is not None:
        if record_id is None:
            raise ValueError("a change with an audit record needs a record id")
        record = audit.seal(change.record, record_id=record_id, seq=seq + 1, prev_hash=head, recorded_at=now)
        seq, head = record["seq"], record["hash"]
    state, revision = current.state, current.revision
    if change.state is not None:
        state, revision = change.state, revision + 1
    data = current.data if change.data is None else {**current.data, **change.data}
    new = Entity(
        entity_type=current.entity_type,
        entity_id=current.entity_id,
        state=state,
        revision=revision,
        seq=seq,
        head_hash=head,
        data=data,
        created_at=current.created_at,
        updated_at=now if (record is not None or change.data is not None or created) else current.updated_at,
        last_seen_at=later(current.last_seen_at, change.seen_at),
        last_report_at=later(current.last_report_at, change.report_at),
        last_details=change.details if change.details is not None else current.last_details,
    )
    return new, record, created


def stored_answer(entry: IdempotencyEntry, record: dict[str, Any] | None) -> IdempotencyEntry:
    """The idempotency entry as saved: its body gains the id of the record written with it."""
    if record is None or "auditId" not in entry.body:
        return entry
    return replace(entry, body={**entry.body, "auditId": record["id"]})


class Store(abc.ABC):
    """A backend. All methods are coroutines and never block the event loop."""

    backend: str = "abstract"
    sole_writer: bool = False
    """Whether this process is the only one that writes to the store (SQLite's file lock, memory).

    Then what the process committed is all there is, and it may remember facts about the
    store between reads (``workflows.shared.Shared.none_waiting``); among PostgreSQL
    replicas it may not.
    """

    async def open(self) -> None:
        """Connect, create or migrate the schema; refuse an unknown newer schema."""

    async def close(self) -> None:
        """Finish pending writes and release connections."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``Unavailable`` when the backend cannot be reached."""

    last_write_error: str | None = None
    """Why the latest write failed, while no write has succeeded since (``None``: writes work)."""
    last_write_error_at = 0.0
    """``time.monotonic()`` of that failure."""

    def write_failed(self, error: str) -> None:
        self.last_write_error, self.last_write_error_at = error, time.monotonic()

    def recent_write_error(self, window: float = WRITE_ERROR_WINDOW) -> str | None:
        """Why writes fail, if the latest one failed less than ``window`` seconds ago.

        The window lets a store that was taken out of traffic (not ready) come back: once it
        has passed, readiness is decided by a fresh probe write again.
        """
        if self.last_write_error is not None and time.monotonic() - self.last_write_error_at < window:
            return self.last_write_error
        return None

    async def probe_write(self) -> None:
        """Commit a write that changes nothing (a full disk, a read-only replica fail it); raise ``Unavailable``."""
        await self.ping()

    @abc.abstractmethod
    async def get(self, entity_type: str, entity_id: str) -> Entity | None:
        """The entity as last committed, or ``None``."""

    async def get_many(self, entity_type: str, entity_ids: list[str]) -> list[Entity | None]:
        """:meth:`get` for several entities at once, in the order asked."""
        return [await self.get(entity_type, entity_id) for entity_id in entity_ids]

    @abc.abstractmethod
    async def apply(self, change: Change) -> Committed:
        """Commit one change atomically (entity, audit record, idempotency answer) or raise."""

    async def apply_many(self, changes: list[Change]) -> list[Committed | Exception]:
        """Commit several independent changes; each succeeds or fails on its own."""
        results: list[Committed | Exception] = []
        for change in changes:
            try:
                results.append(await self.apply(change))
            except Exception as exc:  # noqa: BLE001 - handed back to the caller of this change
                results.append(exc)
        return results

    @abc.abstractmethod
    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        """A page of entities of one type, ordered by id or by creation (see :class:`EntityQuery`).

        ``ValueError`` for a label filter on a field the storage does not label for that type.
        """

    async def count_states(self) -> dict[tuple[str, str], int]:
        """How many entities are in each ``(entity_type, state)``: metrics and the console's counts.

        One aggregate query on the SQL stores (the ``entities_state`` index holds both columns).
        """
        raise NotImplementedError

    def batch_counts(self) -> dict[str, tuple[int, int]]:
        """Batches so far by kind, each as (batches, items they carried): ``/metrics`` shows them.

        ``commit``: the group commits (items: the changes they committed); ``read``: the
        coalesced reads (items: the entities asked for). Their ratio is the mean batch, which
        says how much of each batch's fixed cost a change pays. Empty for a store that does not
        batch (memory).
        """
        return {}

    @abc.abstractmethod
    async def list_audit(self, query: AuditQuery) -> list[dict[str, Any]]:
        """A page of audit records ordered by id."""

    async def list_audit_text(self, query: AuditQuery) -> list[tuple[int, str]]:
        """A page of records as ``(id, JSON text as stored)``: what listings and exports serve.

        Served as stored, never re-encoded: any record the store holds can be listed, and
        the text served is the text whose parse hashes to the record's ``hash``.
        """
        return [(int(r["id"]), audit.text_of(r)) for r in await self.list_audit(query)]

    # -- the live stream (DESIGN §10) ----------------------------------------------------------

    async def stream_page(self, after: str, query: AuditQuery) -> list[tuple[str, str]]:
        """Records committed after position ``after``, in the one order every reader sees them.

        ``[(position, JSON text as stored)]``, at most ``query.limit`` (its filters apply; its
        cursor fields are ignored). ``after`` is a position this store handed out, or ``"0"``
        for the very first record. The promise: a reader that resumes after position P gets
        every record committed after it exactly once and in one order, never skipping one
        that committed late. Here positions are record ids, which holds wherever ids are
        given in commit order (one writer: SQLite, memory); PostgreSQL replicas override it.
        ``Invalid`` (``invalid_position``) for a position this store never hands out.
        """
        start = self.parse_position(after)
        rows = await self.list_audit_text(replace(query, after_id=start, descending=False))
        return [(str(record_id), text) for record_id, text in rows]

    async def stream_head(self) -> str:
        """The position of now: every record committed so far is at or before it."""
        newest = await self.list_audit_text(AuditQuery(descending=True, limit=1))
        return str(newest[0][0]) if newest else "0"

    def parse_position(self, position: str) -> int:
        if not position.isascii() or not position.isdigit() or len(position) > 19:
            raise InvalidPosition()
        return int(position)

    async def position_at(self, entity_type: str, entity_id: str, moment: str) -> Position | None:
        """Where the entity's chain stood at ``moment`` (inclusive), found by a seek.

        ``None`` when this store cannot seek there (the memory store never does; the SQL
        stores not across records written before schema 2): the caller then replays the
        chain (:func:`opscore.history.at`), which gives the same answer more slowly.
        """
        return None

    @abc.abstractmethod
    async def verify(self, verifier: audit.ChainVerifier | None = None) -> audit.Verification:
        """Feed every record (in id order) and then every entity head to ``verifier``, from one snapshot.

        Heads carry the entity's ``state`` and ``revision`` too, so the verifier compares them
        with the replay of the chain. ``verifier`` (default: one with no machine or checkpoint
        knowledge) is built by the caller: :func:`opscore.checkpoints.verifier`.
        """

    @abc.abstractmethod
    async def get_idempotency(self, scope: str, key: str) -> IdempotencyEntry | None:
        """The saved first answer for this key, if any (kept at least 24 h)."""

    @abc.abstractmethod
    async def purge_idempotency(self, older_than: float = IDEMPOTENCY_TTL) -> int:
        """Forget idempotency answers older than ``older_than`` seconds; how many were dropped.

        Reads already ignore expired answers; this only reclaims their space (the scheduler
        calls it periodically).
        """

    @abc.abstractmethod
    async def remember_signature(self, signature: str, seen_at: float, window: float) -> bool:
        """Record a webhook signature; ``False`` when it was already seen within ``window`` s."""

    # -- workflows: definitions and durable timers ------------------------------------------

    @abc.abstractmethod
    async def put_definition(self, definition_id: str, version: str, body: dict[str, Any]) -> bool:
        """Store a definition; ``True`` when new, ``False`` when the same body is already stored.

        An id+version is immutable: another body under a stored id+version raises ``DefinitionExists``.
        """

    @abc.abstractmethod
    async def get_definition(self, definition_id: str, version: str | None = None) -> dict[str, Any] | None:
        """One definition; without ``version``, the one stored last under that id."""

    @abc.abstractmethod
    async def definitions_page(self, after: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """A page of definitions, oldest first, as ``(position, body)``; ``after`` a position handed out.

        Positions grow with every definition stored and are never reused (they may skip).
        """

    async def list_definitions(self) -> list[dict[str, Any]]:
        """Every stored definition, oldest first (a page at a time underneath)."""
        found: list[dict[str, Any]] = []
        after: int | None = None
        while page := await self.definitions_page(after, 500):
            found.extend(body for _, body in page)
            after = page[-1][0]
        return found

    @abc.abstractmethod
    async def claim_timers(self, now: str, limit: int, lease_seconds: float) -> list[Timer]:
        """Timers due at ``now``, each leased to this caller for ``lease_seconds``.

        A claimed timer is not handed out again until its lease runs out, so among replicas
        each due timer goes to one claimer (PostgreSQL: ``FOR UPDATE SKIP LOCKED``); a
        claimer that dies before :meth:`finish_timer` lets it come back after the lease.
        """

    @abc.abstractmethod
    async def finish_timer(self, key: str) -> None:
        """Delete a timer once its work is done (a missing key is fine)."""

    @abc.abstractmethod
    async def list_timers(self, entity_type: str | None = None, entity_id: str | None = None) -> list[Timer]:
        """Armed timers (for inspection and tests), ordered by due time."""
