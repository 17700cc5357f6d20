"""Rows and queries shared by every SQL backend: entity/timer codecs, labels and the page SELECTs.

The SQL stores keep the same columns in the same order (``ENTITY_COLUMNS``,
``TIMER_COLUMNS``); only their placeholders and extra columns differ (PostgreSQL adds a
``capabilities`` array for its index).

**Labels** (schema version 2) are how listings filter on a field without scanning: for the
entity types in :data:`LABELLED`, each listed field's value is copied into the ``labels``
side table, one row per (entity, field), beside the entity's ``created_at``, and an index on
``(entity_type, key, value, created_at, entity_id)`` serves "the runs of definition X, newest
first" as one index range. The store writes a label in the same transaction as the entity,
when the entity is created or when the field's value changes, so labels never disagree with
what was committed. Why a side table rather than an index on an expression of ``data``:
``data`` is JSON *text* on both SQL stores, and SQL JSON functions refuse legacy rows (SQLite
3.40 calls a row holding ``NaN`` "malformed JSON"; a PostgreSQL ``::json`` cast fails on it
too), whereas labels are computed in Python, which reads every row we ever wrote. Why ``state``
is a label of a run rather than a column of an index on ``entities``: an index on
``(entity_type, state, created_at, entity_id)`` would be maintained on every agent transition,
the hot path; the label costs only the few transitions of a run. Entity types without labels
(agents, tasks) pay nothing: no row, no statement.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final

from opscore import audit
from opscore.models import AuditQuery, Entity, EntityQuery, Position, Timer

LABELLED: Final[dict[str, tuple[str, ...]]] = {"workflow": ("state", "workflowId", "agentId")}
"""Per entity type, the fields copied into ``labels``: ``state`` is the entity's state, any other
name a key of its ``data``. Changing this needs a schema migration that back-fills the new field."""

LABEL_COLUMNS = "entity_type, entity_id, key, value, created_at"

ENTITY_COLUMNS = (
    "entity_type, entity_id, state, revision, seq, head_hash, data, created_at, updated_at, "
    "last_seen_at, last_report_at, last_details"
)
TIMER_COLUMNS = "key, due_at, kind, entity_type, entity_id, payload"


def dumps(value: Any) -> str:
    """Compact JSON for a stored (never hashed) value; ``{}`` without serialising it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else "{}"


def audit_row(entity: Entity, record: dict[str, Any]) -> tuple[Any, ...]:
    """An audit row's values: id, entity_type, entity_id, seq, outcome, recorded_at, body, revision.

    The body is the text made while sealing (:func:`~opscore.audit.text_of`), not a second
    serialisation; ``revision`` is the entity's after the record.
    """
    return (
        record["id"],
        entity.entity_type,
        entity.entity_id,
        record["seq"],
        record["outcome"],
        record["recordedAt"],
        audit.text_of(record),
        entity.revision,
    )


def entity_from_row(row: tuple[Any, ...]) -> Entity:
    """An :class:`Entity` from a row selected as ``ENTITY_COLUMNS``."""
    return Entity(
        entity_type=row[0],
        entity_id=row[1],
        state=row[2],
        revision=row[3],
        seq=row[4],
        head_hash=row[5],
        data=json.loads(row[6]),
        created_at=row[7],
        updated_at=row[8],
        last_seen_at=row[9],
        last_report_at=row[10],
        last_details=json.loads(row[11]),
    )


def entity_values(e: Entity) -> tuple[Any, ...]:
    """The values of ``ENTITY_COLUMNS`` for ``e``, in that order."""
    return (
        e.entity_type,
        e.entity_id,
        e.state,
        e.revision,
        e.seq,
        e.head_hash,
        dumps(e.data),
        e.created_at,
        e.updated_at,
        e.last_seen_at,
        e.last_report_at,
        dumps(e.last_details),
    )


def label_value(entity: Entity, key: str) -> str | None:
    """The value ``key`` labels ``entity`` with: a string, or ``None`` (absent, or not a string)."""
    value = entity.state if key == "state" else entity.data.get(key)
    return value if isinstance(value, str) else None


def label_rows(old: Entity | None, new: Entity) -> list[tuple[Any, ...]]:
    """The ``labels`` rows (``LABEL_COLUMNS``) to upsert when ``old`` becomes ``new`` (``old`` None: created).

    Empty for an entity type without labels, and for a change that moves none of its labelled
    fields: such a change writes nothing more than it did before labels existed.
    """
    keys = LABELLED.get(new.entity_type)
    if keys is None:
        return []
    etype, eid, created = new.entity_type, new.entity_id, new.created_at
    if old is None:
        return [(etype, eid, key, value, created) for key in keys if (value := label_value(new, key)) is not None]
    return [
        (etype, eid, key, value, created) for key in keys if (value := label_value(new, key)) != label_value(old, key)
    ]


def check_labels(query: EntityQuery) -> None:
    """``ValueError`` for a label filter on a field that is not labelled for the query's type."""
    keys = LABELLED.get(query.entity_type, ())
    unknown = [key for key, _ in query.labels if key not in keys]
    if unknown:
        raise ValueError(f"{query.entity_type} entities have no label {', '.join(unknown)} (labelled: {keys})")


def timer_from_row(row: tuple[Any, ...]) -> Timer:
    """A :class:`Timer` from a row selected as ``TIMER_COLUMNS``."""
    return Timer(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the SQL stores' queries differ in: placeholders and three expressions."""

    ph: str
    capability: str
    """Tests that ``data.capabilities`` holds the one bound value."""
    id_prefix: str
    """Tests ``entity_id`` against a prefix: binds its length, then the prefix."""
    ids_as_array: bool
    """``entity_id = ANY(<one array>)`` rather than ``IN (<one value each>)``."""


SQLITE = Dialect(
    ph="?",
    capability="EXISTS (SELECT 1 FROM json_each(e.data, '$.capabilities') WHERE value = ?)",
    id_prefix="substr(e.entity_id, 1, ?) = ?",
    ids_as_array=False,
)
POSTGRES = Dialect(
    ph="%s",
    capability="e.capabilities @> ARRAY[%s]::text[]",
    id_prefix="left(e.entity_id, %s) = %s",
    ids_as_array=True,
)

_E_COLUMNS = ", ".join(f"e.{column}" for column in ENTITY_COLUMNS.split(", "))


def select_entities(query: EntityQuery, d: Dialect) -> tuple[str, list[Any]]:
    """The page of ``query`` as one SELECT of ``ENTITY_COLUMNS`` and its parameters.

    Without label filters the page is one range of an ``entities`` index: ``entities_state``
    (by id, with ``state``), the primary key (by id), ``entities_created`` (by creation). With
    label filters, the first label's index range (``labels_value``: newest first is the index
    read backwards) drives, and each entity and further label is one primary-key lookup. On a
    labelled type, a ``state`` filter ordered by creation is a label too. Any other filter is
    checked on the rows that range yields.
    """
    check_labels(query)
    p = d.ph
    labels = list(query.labels)
    state = query.state
    if state is not None and query.by_created and "state" in LABELLED.get(query.entity_type, ()):
        labels.append(("state", state))
        state = None
    params: list[Any] = []
    if labels:
        # the driving label's rows carry entity_id and created_at: order and page on them
        order_cols = ["l0.created_at", "l0.entity_id"] if query.by_created else ["l0.entity_id"]
        sql = [f"SELECT {_E_COLUMNS} FROM labels l0 JOIN entities e ON e.entity_type = l0.entity_type "
               "AND e.entity_id = l0.entity_id"]  # fmt: skip
        for n, (key, value) in enumerate(labels[1:], start=1):
            sql.append(
                f"JOIN labels l{n} ON l{n}.entity_type = l0.entity_type AND l{n}.entity_id = l0.entity_id "
                f"AND l{n}.key = {p} AND l{n}.value = {p}"
            )
            params.extend([key, value])
        sql.append(f"WHERE l0.entity_type = {p} AND l0.key = {p} AND l0.value = {p}")
        params.extend([query.entity_type, labels[0][0], labels[0][1]])
    else:
        order_cols = ["e.created_at", "e.entity_id"] if query.by_created else ["e.entity_id"]
        sql = [f"SELECT {_E_COLUMNS} FROM entities e WHERE e.entity_type = {p}"]
        params.append(query.entity_type)
    if state is not None:
        sql.append(f"AND e.state = {p}")
        params.append(state)
    if query.capability is not None:
        sql.append(f"AND {d.capability}")
        params.append(query.capability)
    if query.id_prefix is not None:
        sql.append(f"AND {d.id_prefix}")
        params.extend([len(query.id_prefix), query.id_prefix])
    if query.seen_before is not None:
        sql.append(f"AND COALESCE(e.last_seen_at, '') < {p}")
        params.append(query.seen_before)
    op = "<" if query.descending else ">"
    if query.by_created and query.after_created is not None:
        if query.after_id is None:
            raise ValueError("a keyset position in creation order needs after_created and after_id")
        sql.append(f"AND ({order_cols[0]}, {order_cols[1]}) {op} ({p}, {p})")
        params.extend([query.after_created, query.after_id])
    elif query.after_id is not None:
        if query.by_created:
            raise ValueError("a keyset position in creation order needs after_created and after_id")
        sql.append(f"AND {order_cols[0]} {op} {p}")
        params.append(query.after_id)
    direction = " DESC" if query.descending else ""
    sql.append(f"ORDER BY {', '.join(c + direction for c in order_cols)} LIMIT {p}")
    params.append(query.limit)
    return " ".join(sql), params


def select_audit(query: AuditQuery, d: Dialect, columns: str = "body") -> tuple[str, list[Any]]:
    """The page of ``query`` as one SELECT of ``columns`` (keyset on ``id``) and its parameters."""
    p = d.ph
    sql = [f"SELECT {columns} FROM audit WHERE 1=1"]
    params: list[Any] = []
    if query.entity_type is not None:
        sql.append(f"AND entity_type = {p}")
        params.append(query.entity_type)
    if query.entity_id is not None:
        sql.append(f"AND entity_id = {p}")
        params.append(query.entity_id)
    if query.entity_ids is not None:
        if d.ids_as_array:
            sql.append(f"AND entity_id = ANY({p})")
            params.append(list(query.entity_ids))
        else:
            sql.append(f"AND entity_id IN ({','.join([p] * len(query.entity_ids))})")
            params.extend(query.entity_ids)
    if query.entity_types is not None:
        sql.append(f"AND entity_type IN ({','.join([p] * len(query.entity_types))})")
        params.extend(query.entity_types)
    _filters(query, d, sql, params)
    sql.append(f"ORDER BY id {'DESC' if query.descending else 'ASC'} LIMIT {p}")
    params.append(query.limit)
    return " ".join(sql), params


def _filters(query: AuditQuery, d: Dialect, sql: list[str], params: list[Any]) -> None:
    """``query``'s outcome, time range and ``id`` cursor, added to ``sql`` and ``params``."""
    p = d.ph
    if query.outcome is not None:
        sql.append(f"AND outcome = {p}")
        params.append(query.outcome)
    if query.since is not None:
        sql.append(f"AND recorded_at >= {p}")
        params.append(query.since)
    if query.until is not None:
        sql.append(f"AND recorded_at <= {p}")
        params.append(query.until)
    if query.after_id is not None:
        sql.append(f"AND id < {p}" if query.descending else f"AND id > {p}")
        params.append(query.after_id)


Steps = Generator[tuple[str, tuple[Any, ...]], tuple[Any, ...] | None, Any]
"""Reads as steps: each yields ``(sql, params)`` and is sent the first row (or ``None``); the
generator's return value is the answer. Each store runs the same steps with its own I/O (SQLite
in one worker thread, PostgreSQL on one pooled connection)."""


def _last_seq(d: Dialect, entity_type: str, entity_id: str, column: str, bound: Any) -> Steps:
    """The chain's last ``seq`` whose ``column`` is at most ``bound`` (0: none), by binary search over ``seq``.

    ``seq`` runs 1..n without gaps, and ``column`` never decreases along a chain: ``id`` (ids
    are allocated in commit order, and a chain's records commit in ``seq`` order) and
    ``recorded_at`` (:func:`~opscore.storage.base.next_entity` never stamps a record earlier
    than its entity's last change). So log2(n) point lookups in ``audit_chain`` find it.
    """
    p = d.ph
    chain = f"entity_type = {p} AND entity_id = {p}"
    row = yield (f"SELECT MAX(seq) FROM audit WHERE {chain}", (entity_type, entity_id))
    lo, hi = 0, int(row[0]) if row is not None and row[0] is not None else 0
    probe = f"SELECT {column} FROM audit WHERE {chain} AND seq = {p}"
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = yield (probe, (entity_type, entity_id, mid))
        if found is not None and found[0] is not None and found[0] <= bound:
            lo = mid
        else:
            hi = mid - 1
    return lo


def audit_page(query: AuditQuery, d: Dialect, columns: str = "body") -> Steps:
    """The page of ``query``: returns ``(sql, params)``, after the steps it needs first (if any).

    A page of one chain (one type, one id) goes through ``audit_chain`` alone: neither store
    keeps an index on ``(entity_type, entity_id, id)`` or ``(…, recorded_at)`` (each cost every
    record an index entry and its share of the WAL; ``docs/performance.md``). Within a chain
    ``seq`` order is ``id`` order, so the page is ordered by ``seq``; the ``id`` cursor becomes
    a ``seq`` bound first (one lookup when the cursor is a record of the chain, as a previous
    page's last record is; a binary search otherwise), so a deep page costs what the first does.
    The ``id`` condition stays in the SELECT: the bound only makes it cheap. Every other page is
    :func:`select_audit`'s.
    """
    p = d.ph
    entity_type, entity_id = query.entity_type, query.entity_id
    several = query.entity_ids is not None or query.entity_types is not None
    if entity_type is None or entity_id is None or several:
        return select_audit(query, d, columns)
    sql = [f"SELECT {columns} FROM audit WHERE entity_type = {p} AND entity_id = {p}"]
    params: list[Any] = [entity_type, entity_id]
    _filters(query, d, sql, params)
    if query.after_id is not None:
        # ascending: after the last record with id <= cursor; descending: up to the last with id < cursor
        bound = query.after_id - 1 if query.descending else query.after_id
        row = yield (
            f"SELECT seq FROM audit WHERE id = {p} AND entity_type = {p} AND entity_id = {p}",
            (bound, entity_type, entity_id),
        )
        last = int(row[0]) if row is not None else (yield from _last_seq(d, entity_type, entity_id, "id", bound))
        sql.append(f"AND seq <= {p}" if query.descending else f"AND seq > {p}")
        params.append(last)
    sql.append(f"ORDER BY seq {'DESC' if query.descending else 'ASC'} LIMIT {p}")
    params.append(query.limit)
    return " ".join(sql), params


def seek(d: Dialect, entity_type: str, entity_id: str, moment: str) -> Steps:
    """Where the chain stood at ``moment``, in a few indexed lookups; ``None``: replay instead.

    Every record written since schema 2 keeps, in the ``revision`` column (never in its
    hashed body), the entity's revision after it. So: (1) the last record at or before the
    moment: a binary search over ``seq`` on ``recorded_at`` (no index holds a chain by
    ``recorded_at``); its
    revision is the answer's. (2) Unless that record is itself a transition, the transition
    that produced the revision is the first record carrying it: revisions never decrease along
    ``seq``, so a binary search over ``seq`` (point lookups in ``audit_chain``) finds it in
    log2(seq) steps, however many refused or metadata records follow it. Records from before
    schema 2 (``revision`` NULL) come first in every chain; when the answer depends on one of
    them the seek returns ``None`` and the caller replays the chain.

    The seek and the replay agree because ``recordedAt`` never decreases along a chain:
    :func:`~opscore.storage.base.next_entity` stamps a record no earlier than its entity's
    last change, even when the wall clock (or another replica's) is behind. Only a chain
    written before that rule, across a clock that stepped back, can hold a record earlier than
    its predecessor; there the binary search finds a boundary around the step, and the replay
    the last record by ``seq``.
    """
    p = d.ph
    last = yield from _last_seq(d, entity_type, entity_id, "recorded_at", moment)
    row = None
    if last:
        row = yield (
            f"SELECT seq, revision, body FROM audit WHERE entity_type = {p} AND entity_id = {p} AND seq = {p}",
            (entity_type, entity_id, last),
        )
    if row is None:
        return Position(None, 0, None)
    seq, revision, body = int(row[0]), row[1], row[2]
    if revision is None:
        return None
    last = audit.loads(body)
    if revision == 0:
        return Position(last, 0, None)
    if audit.is_transition(last):
        return Position(last, int(revision), last)
    at_seq = f"SELECT revision, body FROM audit WHERE entity_type = {p} AND entity_id = {p} AND seq = {p}"
    lo, hi = 1, seq - 1
    while lo < hi:
        mid = (lo + hi) // 2
        found = yield (at_seq.replace("revision, body", "revision"), (entity_type, entity_id, mid))
        if found is None or found[0] is None or found[0] < revision:
            lo = mid + 1
        else:
            hi = mid
    if hi < 1:
        return None
    found = yield (at_seq, (entity_type, entity_id, lo))
    if found is None or found[0] != revision:
        return None
    producer = audit.loads(found[1])
    return Position(last, int(revision), producer) if audit.is_transition(producer) else None
