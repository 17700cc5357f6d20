"""PostgreSQL store: psycopg 3 (async) and ``psycopg_pool``, for several replicas on one database.

Every replica talks to the same tables and keeps nothing of its own: no entity cache (unlike
SQLite, whose single writer may cache because it is the only process writing the file), no
id counter, no replay memory. What makes that correct:

- **Row locks, then compare-and-set.** :meth:`PostgresStore.apply` runs one transaction:
  ``SELECT … FOR UPDATE`` on the entity row, :func:`~opscore.storage.base.next_entity` on
  what it read (``RevisionConflict`` when another replica moved the entity since the engine
  decided; the engine retries from a fresh read), then ONE statement writing the audit
  record, the idempotency answer and the entity (data-modifying CTEs), then timers if any.
  Two replicas racing on one entity queue on the row lock, so they never both apply from
  the same revision and ``seq`` stays gap-free; a unique index on (entity, seq) backs it up.
- **Ids after the lock.** The record id comes from the ``audit_ids`` sequence, taken in the
  same statement as the lock but evaluated on the already locked row (the id is hashed into
  the record, so it must exist before the insert). So within one entity the ids grow in
  ``seq`` order, which is what lets :meth:`verify` stream every chain in id order. Across
  entities ids are unique and grow, but a transaction that rolls back leaves a gap, and
  concurrent commits may become visible slightly out of id order.
- **Group commit.** Plain changes (no idempotency answer, no timers) do not get a transaction
  each: :mod:`opscore.storage.pgwrite` gathers them and :meth:`PostgresStore._apply_set` commits
  a batch in one transaction of set-based statements under the same row locks (taken in key
  order), each change decided on its locked row as above and answered alone when refused.
  Concurrent point reads share one query the same way.
- **Stream positions in commit order** (schema 3): each record keeps its transaction's ``xid8``;
  the stream serves records below the oldest running transaction, ordered by ``(xid, id)``.
- **One clock.** ``recordedAt`` and the entity's times are the database's
  ``clock_timestamp()``, read under the lock, so records of one entity are in time order
  even when the replicas' clocks differ.
- **Everything shared is in tables**: idempotency answers, webhook signatures (replay
  protection across replicas), definitions, timers (claimed with ``FOR UPDATE SKIP LOCKED``
  and leased by the database clock).

Audit bodies are stored as the JSON *text* the store wrote, never ``jsonb``: ``jsonb``
reorders keys, may rewrite numbers and refuses ``\\u0000``; the hash is checked by parsing
the text back and re-canonicalising it with :func:`opscore.audit.canonical`. Entity metadata
and details are text for the same ``\\u0000`` reason (a report with such a string must not
answer 500 on one backend and 200 on the other); the capabilities the agent list filters on
are copied into a ``text[]`` column with a GIN index.

Pool sizes are constructor arguments, set from ``Settings`` (``OPSCORE_PG_POOL_MIN``, default 2,
``OPSCORE_PG_POOL_MAX``, default 10, and the wait for a free connection,
``OPSCORE_PG_POOL_TIMEOUT`` seconds, default 10; then the request answers 503). ``search_path`` in the URL
(``?options=-csearch_path%3Dmyschema``) puts the tables in that schema.

Behind a pooler in transaction mode (PgBouncer's ``pool_mode = transaction``,
``OPSCORE_PG_POOLER=transaction``) each transaction may run on another server connection, so
nothing may rely on the session: psycopg prepares no statement on the server
(``prepare_threshold=None``; by default it prepares a query from its fifth run, and the
next transaction on another server connection fails with "prepared statement … does not
exist" or "… already exists"), and the backend pid psycopg reports is the pooler's, so
:meth:`PostgresStore._settle` never terminates a backend by it. Everything else the store
does already fits: autocommit statements or explicit transactions, transaction-scoped
advisory locks, server-side cursors only inside transactions, no ``SET`` outside one, no
``LISTEN``. (The checkpoint leader's session lock is not the store's: see
:mod:`opscore.storage.checkpoint_relay`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from opscore import audit
from opscore.errors import (
    CommitOutcomeUnknown,
    IdempotencyKeyInUse,
    InvalidPosition,
    NoSchema,
    NotOpsCore,
    OpsCoreError,
    RevisionConflict,
    StorageError,
    Unavailable,
    UnknownEntity,
    Unstorable,
)
from opscore.models import AuditQuery, Change, Committed, Entity, EntityQuery, IdempotencyEntry, Position, Timer
from opscore.storage import sql
from opscore.storage.base import IDEMPOTENCY_TTL, Store, next_entity, stored_answer
from opscore.storage.pgwrite import GroupWriter, ReadCoalescer, answer_of, plain
from opscore.storage.rows import (
    ENTITY_COLUMNS,
    LABEL_COLUMNS,
    LABELLED,
    POSTGRES,
    TIMER_COLUMNS,
    Steps,
    audit_page,
    audit_row,
    dumps,
    entity_from_row,
    entity_values,
    label_rows,
    seek,
    select_entities,
    timer_from_row,
)

SCHEMA_VERSION = 4

Connection = psycopg.AsyncConnection[tuple[Any, ...]]


async def _backfill_labels(conn: Connection) -> None:
    """Label every existing entity of a labelled type (schema 2): parsed in Python, never ``::json``."""
    async with conn.cursor(name="opscore_backfill") as cur:
        await cur.execute(f"SELECT {ENTITY_COLUMNS} FROM entities WHERE entity_type = ANY(%s)", (list(LABELLED),))
        while rows := await cur.fetchmany(VERIFY_CHUNK):
            labels = sql.backfill_labels(rows)
            if labels:
                async with conn.cursor() as writer:
                    await writer.executemany(f"INSERT INTO labels ({LABEL_COLUMNS}) VALUES (%s,%s,%s,%s,%s)", labels)


Migration = str | Callable[[Connection], Awaitable[None]]

# Text keys are COLLATE "C" so that ORDER BY and keyset cursors compare code points, as the
# SQLite and memory stores (and Python) do, whatever the database's default collation is.
MIGRATIONS: dict[int, list[Migration]] = {
    1: [
        """CREATE TABLE entities (
            entity_type text COLLATE "C" NOT NULL,
            entity_id text COLLATE "C" NOT NULL,
            state text COLLATE "C" NOT NULL,
            revision bigint NOT NULL,
            seq bigint NOT NULL,
            head_hash text NOT NULL,
            data text NOT NULL,
            capabilities text[] NOT NULL DEFAULT '{}',
            created_at text COLLATE "C" NOT NULL,
            updated_at text COLLATE "C" NOT NULL,
            last_seen_at text COLLATE "C",
            last_report_at text COLLATE "C",
            last_details text NOT NULL,
            PRIMARY KEY (entity_type, entity_id)
        )""",
        "CREATE INDEX entities_state ON entities (entity_type, state, entity_id)",
        "CREATE INDEX entities_capabilities ON entities USING gin (capabilities)",
        "CREATE SEQUENCE audit_ids AS bigint",
        """CREATE TABLE audit (
            id bigint PRIMARY KEY,
            entity_type text COLLATE "C" NOT NULL,
            entity_id text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            outcome text COLLATE "C" NOT NULL,
            recorded_at text COLLATE "C" NOT NULL,
            body text NOT NULL
        )""",
        "CREATE UNIQUE INDEX audit_chain ON audit (entity_type, entity_id, seq)",
        "CREATE INDEX audit_entity ON audit (entity_type, entity_id, id)",
        "CREATE INDEX audit_type ON audit (entity_type, id)",
        "CREATE INDEX audit_recorded ON audit (recorded_at)",
        """CREATE TABLE idempotency (
            scope text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            fingerprint text NOT NULL,
            status integer NOT NULL,
            body text NOT NULL,
            created timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (scope, key)
        )""",
        "CREATE INDEX idempotency_created ON idempotency (created)",
        """CREATE TABLE webhook_signatures (
            signature text COLLATE "C" PRIMARY KEY,
            seen double precision NOT NULL
        )""",
        "CREATE INDEX webhook_signatures_seen ON webhook_signatures (seen)",
        """CREATE TABLE definitions (
            n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            definition_id text COLLATE "C" NOT NULL,
            version text COLLATE "C" NOT NULL,
            body text NOT NULL,
            created_at text NOT NULL,
            UNIQUE (definition_id, version)
        )""",
        """CREATE TABLE timers (
            key text COLLATE "C" PRIMARY KEY,
            due_at text COLLATE "C" NOT NULL,
            kind text NOT NULL,
            entity_type text COLLATE "C" NOT NULL,
            entity_id text COLLATE "C" NOT NULL,
            payload text NOT NULL,
            lease_until timestamptz NOT NULL DEFAULT '-infinity'
        )""",
        "CREATE INDEX timers_due ON timers (due_at)",
        "CREATE INDEX timers_entity ON timers (entity_type, entity_id)",
    ],
    # 2: listings by creation and by label (opscore/storage/rows.py), and ?at= as a seek:
    # each record keeps the entity's revision after it (NULL on rows written before).
    2: [
        "ALTER TABLE audit ADD COLUMN revision bigint",
        "CREATE INDEX audit_moment ON audit (entity_type, entity_id, recorded_at, id)",
        "CREATE INDEX entities_created ON entities (entity_type, created_at, entity_id)",
        """CREATE TABLE labels (
            entity_type text COLLATE "C" NOT NULL,
            entity_id text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            value text COLLATE "C",
            created_at text COLLATE "C" NOT NULL,
            PRIMARY KEY (entity_type, entity_id, key)
        )""",
        "CREATE INDEX labels_value ON labels (entity_type, key, value, created_at, entity_id)",
        _backfill_labels,
    ],
    # 3: the live stream in commit order (DESIGN §10). Each record keeps the id of the transaction
    # that wrote it (xid8, never wraps); records written before have 0, so they come first, in id
    # order, as they were served. New rows get it from the column default: every insert path has it.
    3: [
        "ALTER TABLE audit ADD COLUMN xid xid8 NOT NULL DEFAULT '0'",
        "ALTER TABLE audit ALTER COLUMN xid SET DEFAULT pg_current_xact_id()",
        "CREATE INDEX audit_commit ON audit (xid, id)",
    ],
    # 4: one entity's records are read through audit_chain alone (rows.audit_page, rows.seek), as
    # SQLite's schema 3 does: each of these indexes cost every record an index entry, its WAL
    # and its pages (docs/performance.md, "Two audit indexes fewer on PostgreSQL").
    4: [
        "DROP INDEX IF EXISTS audit_entity",
        "DROP INDEX IF EXISTS audit_moment",
    ],
}

VERIFY_CHUNK = 5000

log = logging.getLogger("opscore.storage")

# pg_advisory_xact_lock(int, int): a fixed first key for Ops-Core migrations, the schema's
# name hashed into the second, so replicas of one deployment queue and other schemas don't.
_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(1869640563, hashtext(current_schema()))"

_SELECT_ENTITY = f"SELECT {ENTITY_COLUMNS} FROM entities WHERE entity_type = %s AND entity_id = %s"
# The row lock, then (only when the change writes a record) the record id and the time: the
# outer SELECT is evaluated on rows the MATERIALIZED CTE has already locked, so a chain's ids
# and recordedAt grow with its seq even when replicas race. One round trip for all three.
_LOCK_ENTITY = (
    f"WITH locked AS MATERIALIZED ({_SELECT_ENTITY} FOR UPDATE) "
    "SELECT locked.*, CASE WHEN %s THEN nextval('audit_ids') END, clock_timestamp(), pg_current_xact_id()::text "
    "FROM locked"
)
_INSERT_ENTITY = (
    f"INSERT INTO entities ({ENTITY_COLUMNS}, capabilities) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
    "ON CONFLICT (entity_type, entity_id) DO NOTHING RETURNING 1"
)
_UPDATE_ENTITY = (
    "UPDATE entities SET state=%s, revision=%s, seq=%s, head_hash=%s, data=%s, updated_at=%s, last_seen_at=%s, "
    "last_report_at=%s, last_details=%s, capabilities=%s WHERE entity_type=%s AND entity_id=%s"
)
_INSERT_AUDIT = (
    "INSERT INTO audit (id, entity_type, entity_id, seq, outcome, recorded_at, body, revision) "
    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
)
_UPSERT_LABELS = (
    f"INSERT INTO labels ({LABEL_COLUMNS}) VALUES {{rows}} "
    "ON CONFLICT (entity_type, entity_id, key) DO UPDATE SET value = excluded.value"
)
_INSERT_IDEMPOTENCY = "INSERT INTO idempotency (scope, key, fingerprint, status, body) VALUES (%s,%s,%s,%s,%s)"
_NEXT_RECORD = "SELECT CASE WHEN %s THEN nextval('audit_ids') END, clock_timestamp(), pg_current_xact_id()::text"
# -- the group commit's statements (opscore/storage/pgwrite.py batches, these write) ---------------
# Rows are locked in key order, so two replicas' batches never wait on each other in a cycle.
# Every json_to_recordset joined to entities carries ``LIMIT <its row count>``: the
# planner cannot see into the JSON and assumes 100 rows, for which a hash join over a whole
# sequential scan of entities looks cheaper than index probes while the table holds fewer than
# about ten thousand rows; with the true count it probes the primary key (0.7 → 0.08 ms a batch
# at 6,000 rows, and a scan's cost grew with the table and with every batch, not every change).
# The coalesced read names its ids as a JSON array, one statement per entity type (nearly always
# one): cheaper to plan than a join to json_to_recordset (PostgreSQL CPU for a read of four
# rows: 65 µs against 140, most of it planning, which runs for every batch; docs/performance.md).
_SELECT_IDS = (
    f"SELECT {ENTITY_COLUMNS} FROM entities "
    "WHERE entity_type = %s AND entity_id = ANY(ARRAY(SELECT json_array_elements_text(%s::json)))"
)
_LOCK_MANY = (
    f"SELECT {ENTITY_COLUMNS} FROM entities WHERE (entity_type, entity_id) IN "
    "(SELECT * FROM json_to_recordset(%s::json) AS k(t text, i text) LIMIT %s) "
    "ORDER BY entity_type, entity_id FOR UPDATE"
)
# After the locks, or after the engine's read the change was decided on: the batch's record ids
# and clock. A chain's previous record committed before that read (else the UPDATE's compare-and-set
# refuses the change), so within a chain ids and recordedAt grow with seq, as under _LOCK_ENTITY.
_NEXT_RECORDS = (
    "SELECT ARRAY(SELECT nextval('audit_ids') FROM generate_series(1, %s)), clock_timestamp(), "
    "pg_current_xact_id()::text"
)
# A batch with nothing to lock opens its transaction with the same query: ``BEGIN`` and the
# SELECT sent as one simple-protocol string (no parameters; the count is an int written in), so
# the transaction costs no round trip of its own. Never prepared: a prepared statement holds one.
_BEGIN_NEXT_RECORDS = "BEGIN; " + _NEXT_RECORDS.replace("%s", "{count:d}")
# Rows travel as ONE json parameter (orjson, see _json; psycopg dumps a text[] element by element
# with a regex, which cost more than the rest of the batch). ``json``, never ``jsonb``: strings
# come back exactly as sent; one PostgreSQL cannot hold (a NUL) fails the batch, which then
# runs change by change and refuses that one alone.
_ENTITY_ROW = (
    "entity_type text, entity_id text, state text, revision int8, seq int8, head_hash text, data text, "
    "created_at text, updated_at text, last_seen_at text, last_report_at text, last_details text, caps json"
)
_ENTITY_KEYS = (*ENTITY_COLUMNS.split(", "), "caps")
_CAPS = "ARRAY(SELECT json_array_elements_text(u.caps))"
_CREATE_MANY = (
    f"INSERT INTO entities ({ENTITY_COLUMNS}, capabilities) "
    "SELECT u.entity_type, u.entity_id, u.state, u.revision, u.seq, u.head_hash, u.data, u.created_at, "
    f"u.updated_at, u.last_seen_at, u.last_report_at, u.last_details, {_CAPS} "
    f"FROM json_to_recordset(%s::json) AS u({_ENTITY_ROW}) "
    "ON CONFLICT (entity_type, entity_id) DO NOTHING RETURNING entity_type, entity_id"
)
# Compare-and-set on the revision and seq the change was decided on: the row read under the lock
# (every such row comes back; one that did not would fail the batch, then each change runs alone,
# rather than commit a fork) or the engine's read (Change.base: a row another writer moved since
# does not come back, and that change alone is refused with RevisionConflict). What moves without
# a revision (liveness times, details) is merged with the row as it is: times only move forward,
# and details are written only by a change that brought some. data and capabilities are rewritten
# only by a change that has data (u.d not NULL); such a change always reads under the lock.
_UPDATE_KEYS = ("t", "i", "s", "r", "q", "h", "d", "caps", "u", "ls", "lr", "ld", "rw", "sq")
_UPDATE_MANY = (
    "UPDATE entities e SET state = u.s, revision = u.r, seq = u.q, head_hash = u.h, data = COALESCE(u.d, e.data), "
    'updated_at = GREATEST(e.updated_at, u.u COLLATE "C"), last_seen_at = GREATEST(e.last_seen_at, u.ls COLLATE "C"), '
    'last_report_at = GREATEST(e.last_report_at, u.lr COLLATE "C"), last_details = COALESCE(u.ld, e.last_details), '
    f"capabilities = CASE WHEN u.d IS NULL THEN e.capabilities ELSE {_CAPS} END "
    "FROM (SELECT * FROM json_to_recordset(%s::json) AS u(t text, i text, s text, r int8, q int8, h text, d text, "
    "caps json, u text, ls text, lr text, ld text, rw int8, sq int8) LIMIT %s) u "
    "WHERE e.entity_type = u.t AND e.entity_id = u.i AND e.revision = u.rw AND e.seq = u.sq "
    "RETURNING e.entity_type, e.entity_id"
)
# Each audit row says whether its entity was created by this batch (c): such a record is written
# as it is; any other only if the UPDATE moved its entity (a refused compare-and-set writes none).
_AUDIT_KEYS = ("id", "t", "i", "q", "o", "at", "b", "r", "c")
_INSERT_AUDIT_MANY = (
    "INSERT INTO audit (id, entity_type, entity_id, seq, outcome, recorded_at, body, revision) "
    "SELECT a.id, a.t, a.i, a.q, a.o, a.at, a.b, a.r FROM json_to_recordset(%s::json) "
    "AS a(id int8, t text, i text, q int8, o text, at text, b text, r int8, c bool)"
)
# The update and its records in ONE statement: the records' INSERT reads which entities the
# UPDATE moved from its RETURNING, so a batch's writes cost one round trip, not two.
_UPDATE_AND_AUDIT_MANY = (
    f"WITH u AS ({_UPDATE_MANY}), "
    f"w AS ({_INSERT_AUDIT_MANY} WHERE a.c OR (a.t, a.i) IN (SELECT entity_type, entity_id FROM u)) "
    "SELECT entity_type, entity_id FROM u"
)
OUTCOME_WAIT_SECONDS = 10.0
"""How long a write whose COMMIT lost its connection waits to learn whether it committed."""
_CLAIMED_COLUMNS = ", ".join("t." + c for c in TIMER_COLUMNS.split(", "))


async def _plan_each_run(conn: psycopg.AsyncConnection[Any]) -> None:
    """A pooled connection plans every run of a prepared statement for its parameters and today's table sizes.

    psycopg prepares a query from its fifth run; PostgreSQL then keeps a *generic* plan when
    it costs about what the custom ones did. Planned while ``entities`` was small (a new
    database, the first seconds of a new schema), the generic plan of the group writer's
    ``… IN (SELECT … FROM json_to_recordset(…))`` reads is a sequential scan, and it stays
    cached until an ANALYZE invalidates it: as the table grew, every batch scanned all of it.
    Measured at 64 connections (``docs/performance.md``): PostgreSQL's CPU per state report
    went 193 → 388 → 508 µs over three rounds of fresh agents, and stays about 100 µs with
    custom plans; planning each run costs a few µs a request. Behind a transaction pooler no
    statement is prepared (``prepare_threshold=None``), so every run is planned anyway.
    """
    await conn.execute("SET plan_cache_mode = force_custom_plan")


@dataclass(slots=True)
class _Attempt:
    """What one write knows about its transaction, to find out its fate if COMMIT loses the connection."""

    backend_pid: int | None = None
    xid: str | None = None
    result: Committed | None = None
    sent: bool = False
    """The transaction's work is done and COMMIT goes out next (the group commit's mark)."""


def _capabilities(data: dict[str, Any]) -> list[str]:
    """What ``capability`` filters match: the strings of ``data["capabilities"]``."""
    caps = data.get("capabilities")
    if isinstance(caps, str):
        return [caps]
    if isinstance(caps, list):
        return [c for c in caps if isinstance(c, str)]
    return []


def _utc_text(moment: datetime) -> str:
    """A database timestamp as the fixed-width UTC text every stored time uses."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _position(xid: str, record_id: int) -> str:
    return str(record_id) if xid == "0" else f"{xid}-{record_id}"


def _stream_position(position: str) -> tuple[int, int]:
    """``(xid, id)`` of a stream position; ``InvalidPosition`` for anything this store never hands out."""
    xid, sep, record_id = position.partition("-")
    if not sep:
        xid, record_id = "0", position
    for part in (xid, record_id):
        if not part.isascii() or not part.isdigit() or len(part) > 19:
            raise InvalidPosition()
    return int(xid), int(record_id)


def _feed(verifier: audit.ChainVerifier, bodies: list[tuple[str]]) -> None:
    for (body,) in bodies:
        verifier.add(json.loads(body))


def _entity_params(e: Entity) -> tuple[Any, ...]:
    return (*entity_values(e), _capabilities(e.data))


_PENDING: Any = None


def _rows(keys: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """Rows as the one JSON parameter a set-based statement reads with ``json_to_recordset``."""
    return _json([dict(zip(keys, row, strict=True)) for row in rows])


def _json(value: Any) -> str:
    """JSON text for a statement's parameter: orjson, a fifth of the stdlib's CPU on a batch's rows.

    What orjson refuses (a lone surrogate, an integer beyond 64 bits) goes through the stdlib,
    which writes it as before, so PostgreSQL's own refusal (``Unstorable``) stays the answer.
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False)


def _create_row(outcome: Committed | Exception) -> tuple[Any, ...]:
    assert isinstance(outcome, Committed)
    e = outcome.entity
    return (*entity_values(e), _capabilities(e.data))


def _decided_on_base(change: Change) -> bool:
    """Whether the group writer decides ``change`` on the engine's read instead of a locked one.

    Only when the write's compare-and-set on revision and seq covers everything the decision
    read: metadata (``data``, ``expected_data``) is not versioned by them, so those changes
    read their row under the lock.
    """
    return change.base is not None and change.data is None and change.expected_data is None


def _audit_rows(outcomes: list[Committed | Exception], skipped: set[int]) -> list[tuple[Any, ...]]:
    """The records of a batch's decided changes, each marked whether it created its entity (see _AUDIT_KEYS)."""
    rows: list[tuple[Any, ...]] = []
    for n, outcome in enumerate(outcomes):
        if n in skipped or not isinstance(outcome, Committed) or outcome.record is None:
            continue
        rows.append((*audit_row(outcome.entity, outcome.record), outcome.created))
    return rows


async def _run_steps(conn: Connection, steps: Steps) -> Any:
    """Run a generator of read steps (:data:`~opscore.storage.rows.Steps`) on ``conn``: its answer."""
    try:
        sql, params = next(steps)
        while True:
            row = await (await conn.execute(sql, params)).fetchone()
            sql, params = steps.send(row)
    except StopIteration as done:
        return done.value


async def _roll_back(conn: Connection) -> None:
    """End a failed batch's transaction; a connection that cannot is broken, and the pool drops it."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            await conn.execute("ROLLBACK", prepare=False)


def _update_row(change: Change, outcome: Committed | Exception, current: Entity) -> tuple[Any, ...]:
    """The new row for ``_UPDATE_MANY``; data (and capabilities) only when the change brought data."""
    assert isinstance(outcome, Committed)
    e = outcome.entity
    data = None if change.data is None else dumps(e.data)
    caps = None if change.data is None else _capabilities(e.data)
    details = None if change.details is None else dumps(e.last_details)
    return (
        e.entity_type,
        e.entity_id,
        e.state,
        e.revision,
        e.seq,
        e.head_hash,
        data,
        caps,
        e.updated_at,
        e.last_seen_at,
        e.last_report_at,
        details,
        current.revision,
        current.seq,
    )


_WRITES: dict[tuple[bool, bool, bool, int], str] = {}


def _write(
    entity: Entity,
    record: dict[str, Any] | None,
    idempotency: IdempotencyEntry | None,
    *,
    update: bool = True,
    labels: list[tuple[Any, ...]] | None = None,
) -> tuple[str, tuple[Any, ...]]:
    """ONE statement for the rest of a change: audit record, idempotency answer, labels, entity update.

    Data-modifying CTEs all run, whatever the outer statement reads; a duplicate idempotency
    key fails the statement with ``idempotency_pkey``. ``update`` is false when the entity was
    just inserted. ``labels`` are the rows :func:`~opscore.storage.rows.label_rows` found moved
    (none for most changes: then the statement is what it was before labels). Fewer statements
    is what matters here: each costs a round trip and about as much Python in psycopg as the
    rest of the write.
    """
    shape = (record is not None, idempotency is not None, update, len(labels) if labels else 0)
    params: list[Any] = []
    if record is not None:
        params += audit_row(entity, record)
    if idempotency is not None:
        entry = stored_answer(idempotency, record)
        params += [entry.scope, entry.key, entry.fingerprint, entry.status, dumps(entry.body)]
    if labels:
        params += [value for row in labels for value in row]
    if update:
        params += [
            entity.state,
            entity.revision,
            entity.seq,
            entity.head_hash,
            dumps(entity.data),
            entity.updated_at,
            entity.last_seen_at,
            entity.last_report_at,
            dumps(entity.last_details),
            _capabilities(entity.data),
            entity.entity_type,
            entity.entity_id,
        ]
    sql = _WRITES.get(shape)
    if sql is None:
        parts = []
        if shape[0]:
            parts.append(f"a AS ({_INSERT_AUDIT})")
        if shape[1]:
            parts.append(f"i AS ({_INSERT_IDEMPOTENCY})")
        if shape[3]:
            parts.append(f"l AS ({_UPSERT_LABELS.format(rows=','.join(['(%s,%s,%s,%s,%s)'] * shape[3]))})")
        head = f"WITH {', '.join(parts)} " if parts else ""
        sql = _WRITES[shape] = head + (_UPDATE_ENTITY if shape[2] else "SELECT 1")
    return sql, tuple(params)


class PostgresStore(Store):
    """The storage port on PostgreSQL; any number of processes may share one database."""

    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        readonly: bool = False,
        pooler: str = "none",
        max_batch: int = 512,
        in_flight: int = 2,
    ) -> None:
        # One group writer; a full batch (a backlog of max_batch changes) goes out beside the
        # one in flight, up to in_flight at once (opscore/storage/pgwrite.py; docs/performance.md,
        # "One writer again" and "Full batches side by side").
        self.url = url
        self.readonly = readonly
        self.pooler = pooler
        # Sizes come from Settings (OPSCORE_PG_POOL_MIN/MAX/TIMEOUT) through open_store; never
        # from the environment here, so a configured size is the one in effect.
        self.min_size = min_size if min_size is not None else 2
        self.max_size = max(max_size if max_size is not None else 10, self.min_size, 1)
        self.timeout = timeout if timeout is not None else 10.0
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] | None = None
        self._version = SCHEMA_VERSION
        self._reads = ReadCoalescer(self._get_set)
        self._writer = GroupWriter(self._commit_set, self._apply_alone, max_batch=max_batch, in_flight=in_flight)

    def batch_counts(self) -> dict[str, tuple[int, int]]:
        return {
            "commit": (self._writer.batches, self._writer.batched),
            "read": (self._reads.batches, self._reads.batched),
        }

    @property
    def batches(self) -> int:
        """Group commits so far (benchmarks report the mean batch)."""
        return self._writer.batches

    @property
    def batched(self) -> int:
        return self._writer.batched

    # -- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the pool and bring the schema to :data:`SCHEMA_VERSION` under an advisory lock."""
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
            self.url,
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.timeout,
            kwargs=self.connect_kwargs(),
            configure=None if self.pooler == "transaction" else _plan_each_run,
            open=False,
            name="opscore",
        )
        try:
            await pool.open(wait=True, timeout=self.timeout)
        except PoolTimeout as exc:
            await pool.close()
            raise Unavailable(f"PostgreSQL is unreachable: no connection within {self.timeout:g} s") from exc
        self._pool = pool
        try:
            await (self.check_version() if self.readonly else self.migrate())
        except BaseException:
            await self.close()
            raise
        if not self.readonly:
            self._writer.start()

    def connect_kwargs(self) -> dict[str, Any]:
        """What every pooled connection is opened with; behind a transaction pooler, no prepared statements."""
        kwargs: dict[str, Any] = {"autocommit": True}
        if self.pooler == "transaction":
            kwargs["prepare_threshold"] = None
        return kwargs

    async def close(self) -> None:
        await self._writer.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def migrate(self) -> int:
        """Create or upgrade the schema; refuse a newer one. Safe when replicas start together.

        The advisory lock is taken inside the migration's transaction (DDL is transactional
        in PostgreSQL), so the second replica waits, then finds the schema current.
        """
        async with self._connection() as conn, conn.transaction():
            schema = (await (await conn.execute("SELECT current_schema()")).fetchone() or (None,))[0]
            if schema is None:
                raise NoSchema(
                    "no schema to create Ops-Core's tables in: the search_path names no existing schema",
                )
            await conn.execute(_MIGRATION_LOCK)
            await conn.execute(sql.VERSION_TABLE)
            row = await (await conn.execute(sql.SELECT_VERSION)).fetchone()
            for v in sql.versions_to_run(row, SCHEMA_VERSION):
                for step in MIGRATIONS[v]:
                    if isinstance(step, str):
                        await conn.execute(step)
                    else:
                        await step(conn)
            recorded = sql.record_version(POSTGRES, row, SCHEMA_VERSION)
            if recorded is not None:
                await conn.execute(*recorded)
        return SCHEMA_VERSION

    async def check_version(self) -> int:
        """For a process that only reads (``opscore audit verify``): no DDL, refuse unknown schemas."""
        async with self._connection() as conn:
            try:
                row = await (await conn.execute(sql.SELECT_VERSION)).fetchone()
            except pg_errors.UndefinedTable as exc:
                raise NotOpsCore(f"not an Ops-Core database: {exc}") from exc
        self._version = sql.readable_version(row, SCHEMA_VERSION)
        return self._version

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """A pooled connection; psycopg's failures translated where they enter (STYLE 7)."""
        if self._pool is None:
            raise StorageError("the PostgreSQL store is not open")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise Unavailable(f"no PostgreSQL connection within {self.timeout:g} s: {exc}") from exc
        except pg_errors.TransactionRollback as exc:  # deadlock or serialization failure: retry
            raise RevisionConflict(f"PostgreSQL rolled the transaction back: {exc}") from exc
        except pg_errors.DataError as exc:  # e.g. a NUL character in a text key
            raise Unstorable(f"the value cannot be stored: {exc}") from exc
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 for it, refused before it was sent
            raise Unstorable(f"the value cannot be stored as UTF-8: {exc.reason}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Unavailable(f"PostgreSQL is unreachable: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL failed: {exc}") from exc

    # -- the port ---------------------------------------------------------------------------

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.execute("SELECT 1")

    async def probe_write(self) -> None:
        """A committed write (``UPDATE schema_version`` to itself): a read-only or failed-over primary refuses it."""
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute("UPDATE schema_version SET version = version")
        except StorageError as exc:
            self.write_failed(exc.detail)
            raise Unavailable(f"PostgreSQL cannot commit: {exc.detail}") from exc

    async def get(self, entity_type: str, entity_id: str) -> Entity | None:
        """Joins the reads waiting at the same moment (:class:`~opscore.storage.pgwrite.ReadCoalescer`)."""
        found: Entity | None = await self._reads.get((entity_type, entity_id))
        return found

    async def _get_set(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Entity]:
        async with self._connection() as conn:
            if len(keys) == 1:
                rows = await (await conn.execute(_SELECT_ENTITY, keys[0])).fetchall()
            else:
                by_type: dict[str, list[str]] = {}
                for entity_type, entity_id in keys:
                    by_type.setdefault(entity_type, []).append(entity_id)
                rows = []
                for entity_type, ids in by_type.items():
                    param = _json(ids)
                    rows += await (await conn.execute(_SELECT_IDS, (entity_type, param))).fetchall()
        return {(row[0], row[1]): entity_from_row(row) for row in rows}

    async def get_many(self, entity_type: str, entity_ids: list[str]) -> list[Entity | None]:
        """One query for all of them (a run's tasks, a batch of reports), in the order asked."""
        if not entity_ids:
            return []
        found = await self._get_set(list(dict.fromkeys((entity_type, i) for i in entity_ids)))
        return [found.get((entity_type, entity_id)) for entity_id in entity_ids]

    async def apply(self, change: Change) -> Committed:
        """A plain change joins the group commit (:mod:`opscore.storage.pgwrite`); others commit alone."""
        if self._writer.running and plain(change):
            return await self._writer.submit(change)
        return await self._apply_alone(change)

    async def apply_many(self, changes: list[Change]) -> list[Committed | Exception]:
        """The plain changes queued together (they share batches); the others each alone, in turn."""
        grouped = [n for n, c in enumerate(changes) if plain(c)] if self._writer.running else []
        together = asyncio.ensure_future(self._writer.submit_many([changes[n] for n in grouped])) if grouped else None
        alone = set(grouped)
        out = {n: await answer_of(self._apply_alone(c)) for n, c in enumerate(changes) if n not in alone}
        if together is not None:
            out.update(zip(grouped, await together, strict=True))
        return [out[n] for n in range(len(changes))]

    async def _commit_set(self, changes: list[Change]) -> list[Committed | Exception] | None:
        """The group writer's batch in ONE transaction; ``None`` when it failed as a whole (nothing committed).

        Raises ``Unavailable`` when the connection broke: before COMMIT went out nothing
        committed; while it was in flight :meth:`_settle` finds out, so every caller hears the
        truth (the batch's answers, 503, or ``commit_outcome_unknown``).
        """
        attempt = _Attempt()
        try:
            async with self._connection() as conn:
                attempt.backend_pid = conn.info.backend_pid
                try:
                    outcomes, redo = await self._apply_set(conn, changes, attempt)  # opens the transaction
                    attempt.sent = True
                    await conn.execute("COMMIT", prepare=False)
                except BaseException:
                    await _roll_back(conn)
                    raise
        except Unavailable as exc:
            if not (attempt.sent and attempt.xid is not None and await self._settle(attempt)):
                self.write_failed(exc.detail)
                raise
        except (StorageError, RevisionConflict, Unstorable, ValueError) as exc:  # a refused value, a deadlock
            # text psycopg cannot encode is Unstorable by now (_connection); a ValueError is any other
            # value a statement's parameters could not be made of
            detail = exc.detail if isinstance(exc, OpsCoreError) else repr(exc)
            log.warning("PostgreSQL batch rolled back", extra={"changes": len(changes), "error": detail})
            return None  # nothing committed: the writer applies each change alone
        self.last_write_error = None
        if redo:  # created meanwhile by another transaction: each applied again, on the row now there
            answers = await asyncio.gather(*(answer_of(self._apply_alone(changes[n])) for n in redo))
            for n, answer in zip(redo, answers, strict=True):
                outcomes[n] = answer
        return outcomes

    async def _apply_set(
        self, conn: Connection, changes: list[Change], attempt: _Attempt
    ) -> tuple[list[Committed | Exception], list[int]]:
        """Decide each change on its row, write them set-wise, compare-and-set on what each was decided on.

        A change that carries the engine's read (``Change.base``) and no metadata is decided on
        that read: no second read, no row lock taken before the write. The others (metadata,
        a compare-and-set on data, no base) are read again with ``FOR UPDATE`` first.
        Opens the transaction (the caller commits it). Statements: BEGIN with the ids and clock
        (or BEGIN, lock and read, ids and clock), [create], the update (compare-and-set) with its
        records' insert, [labels]: the same handful for one change or for hundreds, and on the
        hot path two round trips before COMMIT. A change refused
        by :func:`~opscore.storage.base.next_entity` (revision moved, unknown entity), or
        whose base another writer moved, is answered alone and writes nothing. Returns each
        change's outcome and the places of the changes whose entity another transaction
        created meanwhile (to apply again).
        """
        on_base = [_decided_on_base(c) for c in changes]
        locked = [c for c, b in zip(changes, on_base, strict=True) if not b]
        found: dict[tuple[str, str], Any] = {}
        wanted = sum(1 for c in changes if c.record is not None)
        if locked:
            await conn.execute("BEGIN", prepare=False)
            keys = _json([{"t": c.entity_type, "i": c.entity_id} for c in locked])
            rows = await (await conn.execute(_LOCK_MANY, (keys, len(locked)))).fetchall()
            found = {(r[0], r[1]): r for r in rows}
            head = await (await conn.execute(_NEXT_RECORDS, (wanted,))).fetchone()
        else:
            cursor = await conn.execute(_BEGIN_NEXT_RECORDS.format(count=wanted), prepare=False)
            cursor.nextset()  # past BEGIN's result
            head = await cursor.fetchone()
        assert head is not None
        record_ids, clock, attempt.xid = sorted(head[0]), head[1], head[2]
        now = _utc_text(clock)
        outcomes: list[Committed | Exception] = [_PENDING] * len(changes)
        currents: list[Entity | None] = [None] * len(changes)
        creates: list[int] = []
        updates: list[int] = []
        next_id = 0
        for n, change in enumerate(changes):
            if on_base[n]:
                current = change.base
            else:
                row = found.get((change.entity_type, change.entity_id))
                current = None if row is None else entity_from_row(row)
            currents[n] = current
            record_id = None
            if change.record is not None:
                record_id = record_ids[next_id]
                next_id += 1
            try:
                new, record, created = next_entity(current, change, now=now, record_id=record_id)
            except (OpsCoreError, ValueError) as exc:
                outcomes[n] = exc
                continue
            outcomes[n] = Committed(new, record, created)
            (creates if created else updates).append(n)
        skipped: set[int] = set()
        redo: list[int] = []
        if creates:
            made = await (
                await conn.execute(_CREATE_MANY, (_rows(_ENTITY_KEYS, [_create_row(outcomes[n]) for n in creates]),))
            ).fetchall()
            won = {(r[0], r[1]) for r in made}
            redo = [n for n in creates if (changes[n].entity_type, changes[n].entity_id) not in won]
            skipped.update(redo)
        audit_json = _rows(_AUDIT_KEYS, _audit_rows(outcomes, skipped))
        if updates:
            updates.sort(key=lambda n: (changes[n].entity_type, changes[n].entity_id))  # row locks in key order
            update_rows = []
            for n in updates:
                current = currents[n]
                assert current is not None  # not created: the row was there
                update_rows.append(_update_row(changes[n], outcomes[n], current))
            params = (_rows(_UPDATE_KEYS, update_rows), len(update_rows), audit_json)
            moved = {(r[0], r[1]) for r in await (await conn.execute(_UPDATE_AND_AUDIT_MANY, params)).fetchall()}
            for n in updates:
                change = changes[n]
                if (change.entity_type, change.entity_id) in moved:
                    continue
                if not on_base[n]:  # cannot happen under the lock; never commit a fork if it does
                    raise StorageError(f"{change.entity_type} {change.entity_id!r} moved under its lock")
                base = change.base
                assert base is not None
                outcomes[n] = RevisionConflict(
                    f"{change.entity_type} {change.entity_id!r} moved since revision {base.revision} was read",
                    revision=None,
                )
                skipped.add(n)
        elif audit_json != "[]":
            await conn.execute(_INSERT_AUDIT_MANY, (audit_json,))
        label_sets: list[tuple[Any, ...]] = []
        for n, outcome in enumerate(outcomes):
            if n in skipped or not isinstance(outcome, Committed):
                continue
            if outcome.entity.entity_type in LABELLED:
                label_sets.extend(label_rows(currents[n], outcome.entity))  # None for a created entity
        if label_sets:
            rows_sql = ",".join(["(%s,%s,%s,%s,%s)"] * len(label_sets))
            await conn.execute(_UPSERT_LABELS.format(rows=rows_sql), [v for r in label_sets for v in r])
        return outcomes, redo

    async def _apply_alone(self, change: Change) -> Committed:
        """One transaction, normally four statements: BEGIN, lock and read, one write, COMMIT.

        When the connection breaks after COMMIT was sent, the write may or may not have
        committed, and a caller told "503, try again" would apply it twice. So the answer is
        found out first (:meth:`_settle`): committed → the normal answer; not committed → 503.
        """
        attempt = _Attempt()
        try:
            async with self._connection() as conn:
                attempt.backend_pid = conn.info.backend_pid
                try:
                    async with conn.transaction():
                        attempt.result = await self._apply(conn, change, attempt)
                    self.last_write_error = None
                    return attempt.result
                except pg_errors.UniqueViolation as exc:
                    if exc.diag.constraint_name == "idempotency_pkey":
                        raise IdempotencyKeyInUse("this Idempotency-Key is already in use") from exc
                    # audit_chain cannot be violated under the row lock; if it were, retry from a fresh read
                    raise RevisionConflict(f"{change.entity_type} {change.entity_id!r} moved: {exc}") from exc
        except (Unavailable, StorageError) as exc:
            sent = attempt.result is not None and attempt.xid is not None  # COMMIT went out
            if isinstance(exc, Unavailable) and sent and await self._settle(attempt):
                self.last_write_error = None
                assert attempt.result is not None
                return attempt.result
            # else it broke before COMMIT was sent: nothing of it can have committed
            self.write_failed(exc.detail)
            raise

    async def _settle(self, attempt: _Attempt) -> bool:
        """Whether the transaction whose COMMIT lost its connection committed, found out for sure.

        ``pg_xact_status`` on another connection tells committed or aborted; while it still
        says "in progress" (the server has not noticed the broken connection), its backend is
        terminated, which settles it one way or the other. While the database cannot be reached
        (a failover), it is asked again until :data:`OUTCOME_WAIT_SECONDS` have passed; then
        the outcome stays unknown and the caller is told so (503 ``commit_outcome_unknown``).
        """
        deadline = asyncio.get_running_loop().time() + OUTCOME_WAIT_SECONDS
        terminated = False
        while True:
            try:
                async with self._connection() as conn:
                    row = await (await conn.execute("SELECT pg_xact_status(%s::xid8)", (attempt.xid,))).fetchone()
                    status = None if row is None else row[0]
                    if status == "committed":
                        log.warning("a COMMIT lost its connection but had committed", extra={"xid": attempt.xid})
                        return True
                    if status != "in progress":
                        return False  # aborted (or so old it is forgotten, which means it never committed)
                    # behind a transaction pooler the pid is the pooler's, not a backend's: only wait
                    if not terminated and attempt.backend_pid is not None and self.pooler != "transaction":
                        await conn.execute("SELECT pg_terminate_backend(%s)", (attempt.backend_pid,))
                        terminated = True
            except Unavailable:
                pass  # the database is away (a failover): ask again until the deadline
            except StorageError:
                break  # e.g. "transaction ID is in the future" on a server that never saw it: unknown
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        raise CommitOutcomeUnknown(
            "the connection to PostgreSQL broke during COMMIT and whether the change was committed could "
            "not be found out; retry with the same Idempotency-Key, or read the entity before retrying",
        )

    async def _apply(
        self, conn: psycopg.AsyncConnection[tuple[Any, ...]], change: Change, attempt: _Attempt
    ) -> Committed:
        key = (change.entity_type, change.entity_id)
        wants_id = change.record is not None
        for _ in range(8):
            row = await (await conn.execute(_LOCK_ENTITY, (*key, wants_id))).fetchone()
            if row is None:
                if change.create is None:
                    raise UnknownEntity(change.entity_type, change.entity_id)
                ids = await (await conn.execute(_NEXT_RECORD, (wants_id,))).fetchone()
                assert ids is not None
                current, (record_id, clock, attempt.xid) = None, ids
            else:
                current, record_id, clock, attempt.xid = entity_from_row(row), row[-3], row[-2], row[-1]
            now = _utc_text(clock)
            new, record, created = next_entity(current, change, now=now, record_id=record_id)
            labels = label_rows(current, new) if new.entity_type in LABELLED else None
            if not created:
                await conn.execute(*_write(new, record, change.idempotency, labels=labels))
                break
            cur = await conn.execute(_INSERT_ENTITY, _entity_params(new))
            if await cur.fetchone() is not None:
                if record is not None or change.idempotency is not None or labels:
                    await conn.execute(*_write(new, record, change.idempotency, update=False, labels=labels))
                break
            # Another transaction created it meanwhile (ON CONFLICT waited for its commit): lock that row, redo.
        else:
            raise RevisionConflict(f"{change.entity_type} {change.entity_id!r} could not be created; try again")
        if change.cancel_timers:
            await conn.execute("DELETE FROM timers WHERE key = ANY(%s)", (list(change.cancel_timers),))
        for t in change.timers:
            await conn.execute(
                f"INSERT INTO timers ({TIMER_COLUMNS}, lease_until) VALUES (%s,%s,%s,%s,%s,%s,'-infinity') "
                "ON CONFLICT (key) DO UPDATE SET due_at=excluded.due_at, kind=excluded.kind, "
                "entity_type=excluded.entity_type, entity_id=excluded.entity_id, payload=excluded.payload, "
                "lease_until=excluded.lease_until",
                (t.key, t.due_at, t.kind, t.entity_type, t.entity_id, dumps(t.payload)),
            )
        return Committed(new, record, created)

    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        sql, params = select_entities(query, POSTGRES)
        async with self._connection() as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [entity_from_row(r) for r in rows]

    async def count_states(self) -> dict[tuple[str, str], int]:
        async with self._connection() as conn:
            rows = await (
                await conn.execute("SELECT entity_type, state, count(*) FROM entities GROUP BY entity_type, state")
            ).fetchall()
        return {(str(t), str(s)): int(n) for t, s, n in rows}

    async def list_audit(self, query: AuditQuery) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in await self._audit_page(query, "body")]

    async def list_audit_text(self, query: AuditQuery) -> list[tuple[int, str]]:
        return [(int(r[0]), str(r[1])) for r in await self._audit_page(query, "id, body")]

    async def _audit_page(self, query: AuditQuery, columns: str) -> list[tuple[Any, ...]]:
        """A page of audit rows; one chain's goes through ``audit_chain`` alone (``rows.audit_page``)."""
        async with self._connection() as conn:
            sql, params = await _run_steps(conn, audit_page(query, POSTGRES, columns))
            return await (await conn.execute(sql, params)).fetchall()

    # -- the live stream in commit order (DESIGN §10) ---------------------------------------------
    #
    # Record ids come from a sequence, so under concurrent transactions (several writers, several
    # replicas) they become visible out of id order: a reader that paged by id past 41 could miss
    # 40 committing a moment later. Positions are (xid, id) instead: the writing transaction's id,
    # and only records whose transaction is older than the oldest one still running
    # (pg_snapshot_xmin of the current snapshot) are served. Such a transaction has finished, so
    # its records are all visible now or never; any transaction still to commit has a larger xid
    # than every position handed out. Served in (xid, id) order, a reader resuming after a
    # position gets every later record once. The cost: a record is served once every older
    # transaction in the cluster has ended (normally milliseconds; a transaction left open holds
    # the stream back, never loses a record).

    async def stream_page(self, after: str, query: AuditQuery) -> list[tuple[str, str]]:
        if self._version < 3:
            return await super().stream_page(after, query)
        xid, record_id = _stream_position(after)
        sql = [
            "SELECT xid::text, id, body FROM audit WHERE (xid, id) > (%s::text::xid8, %s) "
            "AND xid < pg_snapshot_xmin(pg_current_snapshot())"
        ]
        params: list[Any] = [str(xid), record_id]
        for column, value in (
            ("entity_type", query.entity_type),
            ("entity_id", query.entity_id),
            ("outcome", query.outcome),
        ):
            if value is not None:
                sql.append(f"AND {column} = %s")
                params.append(value)
        if query.entity_ids is not None:
            sql.append("AND entity_id = ANY(%s)")
            params.append(list(query.entity_ids))
        if query.entity_types is not None:
            sql.append("AND entity_type = ANY(%s)")
            params.append(list(query.entity_types))
        if query.since is not None:
            sql.append("AND recorded_at >= %s")
            params.append(query.since)
        if query.until is not None:
            sql.append("AND recorded_at <= %s")
            params.append(query.until)
        sql.append("ORDER BY xid, id LIMIT %s")
        params.append(query.limit)
        async with self._connection() as conn:
            rows = await (await conn.execute(" ".join(sql), params)).fetchall()
        return [(_position(str(x), int(i)), str(body)) for x, i, body in rows]

    async def stream_head(self) -> str:
        if self._version < 3:
            return await super().stream_head()
        async with self._connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT xid::text, id FROM audit WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) "
                    "ORDER BY xid DESC, id DESC LIMIT 1"
                )
            ).fetchone()
        return "0" if row is None else _position(str(row[0]), int(row[1]))

    def parse_position(self, position: str) -> int:
        """Positions are ``<xid>-<id>`` (opaque to clients); a bare id is one handed out before schema 3."""
        return _stream_position(position)[1]

    async def position_at(self, entity_type: str, entity_id: str, moment: str) -> Position | None:
        """The seek of :func:`opscore.storage.rows.seek`, every step on one pooled connection."""
        if self._version < 2:
            return None
        async with self._connection() as conn:
            result: Position | None = await _run_steps(conn, seek(POSTGRES, entity_type, entity_id, moment))
            return result

    async def verify(self, verifier: audit.ChainVerifier | None = None) -> audit.Verification:
        """Stream every record in id order from one snapshot; parse and hash off the event loop."""
        verifier = verifier if verifier is not None else audit.ChainVerifier()
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            async with conn.cursor(name="opscore_verify") as cur:
                await cur.execute("SELECT body FROM audit ORDER BY id")
                while rows := await cur.fetchmany(VERIFY_CHUNK):
                    await asyncio.to_thread(_feed, verifier, rows)
            async with conn.cursor(name="opscore_heads") as cur:
                await cur.execute("SELECT entity_type, entity_id, seq, head_hash, state, revision FROM entities")
                while heads := await cur.fetchmany(VERIFY_CHUNK):
                    for etype, eid, seq, head, state, revision in heads:
                        verifier.head(etype, eid, seq, head, state, revision)
        return verifier.finish()

    async def get_idempotency(self, scope: str, key: str) -> IdempotencyEntry | None:
        async with self._connection() as conn:
            row = await (
                await conn.execute(
                    f"SELECT {sql.IDEMPOTENCY_COLUMNS} FROM idempotency WHERE scope = %s AND key = %s "
                    "AND created >= clock_timestamp() - make_interval(secs => %s)",
                    (scope, key, IDEMPOTENCY_TTL),
                )
            ).fetchone()
        return sql.idempotency_from_row(scope, key, row)

    async def purge_idempotency(self, older_than: float = IDEMPOTENCY_TTL) -> int:
        async with self._connection() as conn:
            cur = await conn.execute(
                "DELETE FROM idempotency WHERE created < clock_timestamp() - make_interval(secs => %s)",
                (older_than,),
            )
        return cur.rowcount

    async def remember_signature(self, signature: str, seen_at: float, window: float) -> bool:
        """The primary key decides among replicas: exactly one insert of a signature wins."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM webhook_signatures WHERE seen < extract(epoch FROM clock_timestamp()) - %s",
                (2 * window,),
            )
            cur = await conn.execute(
                "INSERT INTO webhook_signatures (signature, seen) VALUES (%s, %s) ON CONFLICT (signature) DO NOTHING",
                (signature, seen_at),
            )
        return cur.rowcount == 1

    # -- workflows --------------------------------------------------------------------------

    async def put_definition(self, definition_id: str, version: str, body: dict[str, Any]) -> bool:
        text = sql.definition_text(body)
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(*sql.insert_definition(POSTGRES, definition_id, version, text))
            if cur.rowcount == 1:
                return True
            row = await (await conn.execute(*sql.select_definition(POSTGRES, definition_id, version))).fetchone()
        return sql.kept_definition(row, text, definition_id, version)

    async def get_definition(self, definition_id: str, version: str | None = None) -> dict[str, Any] | None:
        async with self._connection() as conn:
            row = await (await conn.execute(*sql.select_definition(POSTGRES, definition_id, version))).fetchone()
        return sql.definition_from_row(row)

    async def definitions_page(self, after: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        async with self._connection() as conn:
            rows = await (await conn.execute(*sql.definitions_page(POSTGRES, after, limit))).fetchall()
        return sql.definitions_from_rows(rows)

    async def claim_timers(self, now: str, limit: int, lease_seconds: float) -> list[Timer]:
        """Lease due timers; ``SKIP LOCKED`` lets replicas claim side by side, each timer once."""
        async with self._connection() as conn, conn.transaction():
            rows = await (
                await conn.execute(
                    "WITH due AS (SELECT key FROM timers WHERE due_at <= %s AND lease_until <= clock_timestamp() "
                    "ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                    "UPDATE timers t SET lease_until = clock_timestamp() + make_interval(secs => %s) "
                    f"FROM due WHERE t.key = due.key RETURNING {_CLAIMED_COLUMNS}",
                    (now, limit, lease_seconds),
                )
            ).fetchall()
        return sorted((timer_from_row(r) for r in rows), key=lambda t: (t.due_at, t.key))

    async def finish_timer(self, key: str) -> None:
        async with self._connection() as conn:
            await conn.execute(*sql.finish_timer(POSTGRES, key))

    async def list_timers(self, entity_type: str | None = None, entity_id: str | None = None) -> list[Timer]:
        async with self._connection() as conn:
            rows = await (await conn.execute(*sql.select_timers(POSTGRES, entity_type, entity_id))).fetchall()
        return sql.timers_from_rows(rows)
