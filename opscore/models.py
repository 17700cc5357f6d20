"""Values of the domain, shared by the engine, the stores and the API.

They are never changed once built (``dataclasses.replace`` makes a changed copy). The four
made for every transition (:class:`Entity`, :class:`Change`, :class:`Committed`,
:class:`TransitionResult`) are plain slotted dataclasses rather than frozen ones: a frozen
``__init__`` stores each field through ``object.__setattr__`` and costs several times as much
(``docs/performance.md``); the others stay frozen.

Audit records themselves stay plain dicts: their exact JSON is the contract (DESIGN §4)
and they are hashed as such, so a dataclass in between would only add a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Entity:
    """One machine instance as stored: an agent, a workflow run or a task.

    ``revision`` counts applied transitions (the ``ETag``); ``seq``/``head_hash`` are the head
    of its audit chain, kept here so that a deleted tail of the chain is detected.
    ``last_report_at`` is the newest accepted report's timestamp (UTC ISO-8601, fixed width,
    so it also compares as text).
    """

    entity_type: str
    entity_id: str
    state: str
    revision: int = 0
    seq: int = 0
    head_hash: str = "0" * 64
    data: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    last_seen_at: str | None = None
    last_report_at: str | None = None
    last_details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IdempotencyEntry:
    """The first answer to a request carrying an ``Idempotency-Key``, saved with its effect.

    ``body`` is the answer; when the same write appends an audit record, the store sets
    ``body["auditId"]`` to that record's id, which only exists once the record is written.
    """

    scope: str
    key: str
    fingerprint: str
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Timer:
    """A durable deadline: due at ``due_at`` (UTC ISO text), claimed by one process at a time.

    ``key`` is unique (e.g. ``task-deadline:<task id>:<attempt>``); scheduling a key that
    exists replaces it. Timers are written in the same transaction as the change that
    arms them, so a restart re-arms exactly what was committed.
    """

    key: str
    due_at: str
    kind: str
    entity_type: str
    entity_id: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Change:
    """Everything one request changes, applied by a store in ONE atomic write.

    - ``create``: insert this entity first when it does not exist yet.
    - ``expected_revision``: compare-and-set; the write fails with ``RevisionConflict``
      unless the stored revision equals it. ``None`` checks nothing.
    - ``expected_data``: compare-and-set on metadata, for writes that move no state (and so
      no revision): the write fails with ``RevisionConflict`` unless every key holds the
      given value (an absent key holds ``None``). Workflows claim an agent with it.
    - ``state``: the new state of an applied transition (revision + 1).
    - ``record``: an audit record draft (everything but ``id``, ``seq``, ``prevHash``,
      ``recordedAt`` and ``hash``, which the store fills in at the chain's head).
    - ``seen_at``/``report_at``/``details``: liveness; ``report_at`` only moves forward.
    - ``data``: new metadata (merged over the old).
    - ``timers``/``cancel_timers``: deadlines armed or disarmed (by key) with this change.
    - ``base``: the entity as the engine read it to decide this change (``None``: not given).
      If the stored revision or seq is no longer the base's, the write fails with
      ``RevisionConflict`` and the engine decides again from a fresh read: a heartbeat or a
      refusal decided on a state another replica has left meanwhile is never written. A store
      checks it under its row lock, or decides on the base without reading the row again and
      lets its write compare-and-set on the base's revision and seq (PostgreSQL's group commit).
    """

    entity_type: str
    entity_id: str
    create: Entity | None = None
    expected_revision: int | None = None
    expected_data: dict[str, Any] | None = None
    state: str | None = None
    record: dict[str, Any] | None = None
    seen_at: str | None = None
    report_at: str | None = None
    details: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    idempotency: IdempotencyEntry | None = None
    timers: tuple[Timer, ...] = ()
    cancel_timers: tuple[str, ...] = ()
    base: Entity | None = None


@dataclass(slots=True)
class Committed:
    """What a store answers for a committed :class:`Change`."""

    entity: Entity
    record: dict[str, Any] | None
    created: bool = False


@dataclass(slots=True)
class TransitionResult:
    """The engine's answer to a state report or a trigger request."""

    entity: Entity
    previous_state: str
    changed: bool
    record: dict[str, Any] | None = None
    created: bool = False

    @property
    def audit_id(self) -> int | None:
        return None if self.record is None else int(self.record["id"])

    def answer(self) -> dict[str, Any]:
        """The answer to the request (DESIGN §5, state report): what a client and a replay get."""
        entity = self.entity
        return answer(
            entity.entity_type,
            entity.entity_id,
            entity.state,
            self.previous_state,
            self.changed,
            entity.revision,
            self.audit_id,
        )


def answer(
    entity_type: str,
    entity_id: str,
    state: str,
    previous_state: str,
    changed: bool,
    revision: int,
    audit_id: int | None,
) -> dict[str, Any]:
    """The answer to an applied transition or a heartbeat: ``{"status": "success", "agentId", ...}``."""
    return {
        "status": "success",
        "agentId" if entity_type == "agent" else "entityId": entity_id,
        "state": state,
        "previousState": previous_state,
        "changed": changed,
        "revision": revision,
        "auditId": audit_id,
    }


@dataclass(frozen=True, slots=True)
class Position:
    """Where an entity's audit chain stood at a moment (a store's answer to ``?at=``).

    ``last`` is the last record at or before the moment (``None``: none yet), ``revision`` the
    entity's revision after it, and ``transition`` the record of the transition that produced
    that revision (``None`` at revision 0). The state then is ``transition["dest"]``.
    """

    last: dict[str, Any] | None
    revision: int
    transition: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A page request over audit records; ``after_id`` is the keyset cursor."""

    entity_type: str | None = None
    entity_id: str | None = None
    outcome: str | None = None
    since: str | None = None
    until: str | None = None
    descending: bool = False
    after_id: int | None = None
    limit: int = 100
    entity_ids: tuple[str, ...] | None = None
    entity_types: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class EntityQuery:
    """A page request over entities of one type, ordered by id (or by creation).

    ``seen_before`` keeps entities whose ``last_seen_at`` is older than it (or never set):
    the liveness sweep's question. ``labels`` keeps entities whose labelled fields hold the
    given strings (``(("workflowId", "wf-1"),)``; only fields the storage labels for this type,
    see ``opscore.storage.rows.LABELLED``). ``by_created`` orders by ``(created_at, entity_id)``
    instead of ``entity_id``; the keyset cursor is then ``(after_created, after_id)``, the
    position of the last entity of the previous page. ``descending`` reverses either order.
    """

    entity_type: str
    state: str | None = None
    capability: str | None = None
    id_prefix: str | None = None
    seen_before: str | None = None
    after_id: str | None = None
    limit: int = 100
    labels: tuple[tuple[str, str], ...] = ()
    by_created: bool = False
    descending: bool = False
    after_created: str | None = None
