"""SQLite store: stdlib ``sqlite3``, WAL, ``synchronous=FULL``, group commit.

Every write is a job of the store's :class:`~opscore.storage.writer.GroupCommitWriter`: one
thread owns the only write connection and commits everything queued in one transaction,
with one fsync; a caller's future resolves only after that COMMIT returned, so an
acknowledged transition is on disk. This module holds the SQL the writer drives: the
schema, one :class:`_Batch` per transaction (``BEGIN IMMEDIATE``, a SAVEPOINT for a job that
writes as it goes, the deferred rows of plain changes; a small batch of plain changes alone is
one autocommit statement), the changes themselves and the reads.

The writer is the only writer of the file (a lock file keeps a second server out), so the
store keeps the entities it has seen in a cache that is updated only after a commit
succeeds; the event loop answers entity reads from it without a thread hop. Everything else
is read through per-thread read connections in the store's own reader threads, which WAL
lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from opscore import audit
from opscore.errors import DatabaseInUse, IdempotencyKeyInUse, NotOpsCore, StorageError, Unavailable
from opscore.models import AuditQuery, Change, Committed, Entity, EntityQuery, IdempotencyEntry, Position, Timer
from opscore.storage import sql
from opscore.storage.base import IDEMPOTENCY_TTL, Store, next_entity, stored_answer, utc_now
from opscore.storage.rows import (
    ENTITY_COLUMNS,
    LABEL_COLUMNS,
    LABELLED,
    SQLITE,
    TIMER_COLUMNS,
    Steps,
    audit_page,
    audit_row,
    entity_from_row,
    entity_values,
    label_rows,
    seek,
    select_entities,
    timer_from_row,
)
from opscore.storage.writer import GroupCommitWriter, Mode

SCHEMA_VERSION = 3

R = TypeVar("R")


def _backfill_labels(conn: sqlite3.Connection) -> None:
    """Label every existing entity of a labelled type (schema 2), a page of entity rows at a time."""
    types = list(LABELLED)
    marks = ",".join("?" * len(types))
    last: tuple[str, str] = ("", "")
    while True:
        rows = conn.execute(
            f"SELECT {ENTITY_COLUMNS} FROM entities WHERE entity_type IN ({marks}) "
            "AND (entity_type, entity_id) > (?, ?) ORDER BY entity_type, entity_id LIMIT 5000",
            [*types, *last],
        ).fetchall()
        if not rows:
            return
        _write_rows(conn, _UPSERT_LABELS_HEAD, 5, sql.backfill_labels(rows), _UPSERT_LABELS_TAIL)
        last = (rows[-1][0], rows[-1][1])


Migration = str | Callable[[sqlite3.Connection], None]

MIGRATIONS: dict[int, list[Migration]] = {
    1: [
        """CREATE TABLE entities (
            entity_type TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            state TEXT NOT NULL,
            revision INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            head_hash TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_seen_at TEXT,
            last_report_at TEXT,
            last_details TEXT NOT NULL,
            PRIMARY KEY (entity_type, entity_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX entities_state ON entities (entity_type, state, entity_id)",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            entity_type TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            recorded_at TEXT NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE UNIQUE INDEX audit_chain ON audit (entity_type, entity_id, seq)",
        "CREATE INDEX audit_entity ON audit (entity_type, entity_id, id)",
        "CREATE INDEX audit_type ON audit (entity_type, id)",
        "CREATE INDEX audit_recorded ON audit (recorded_at)",
        """CREATE TABLE idempotency (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status INTEGER NOT NULL,
            body TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX idempotency_created ON idempotency (created)",
        "CREATE TABLE webhook_signatures (signature TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID",
        """CREATE TABLE definitions (
            n INTEGER PRIMARY KEY,
            definition_id TEXT NOT NULL,
            version TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (definition_id, version)
        )""",
        """CREATE TABLE timers (
            key TEXT PRIMARY KEY,
            due_at TEXT NOT NULL,
            kind TEXT NOT NULL,
            entity_type TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            payload TEXT NOT NULL,
            lease_until REAL NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "CREATE INDEX timers_due ON timers (due_at)",
        "CREATE INDEX timers_entity ON timers (entity_type, entity_id)",
    ],
    # 2: listings by creation and by label (opscore/storage/rows.py), and ?at= as a seek:
    # each record keeps the entity's revision after it (NULL on rows written before).
    2: [
        "ALTER TABLE audit ADD COLUMN revision INTEGER",
        "CREATE INDEX audit_moment ON audit (entity_type, entity_id, recorded_at)",
        "CREATE INDEX entities_created ON entities (entity_type, created_at, entity_id)",
        """CREATE TABLE labels (
            entity_type TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT,
            created_at TEXT NOT NULL,
            PRIMARY KEY (entity_type, entity_id, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX labels_value ON labels (entity_type, key, value, created_at, entity_id)",
        _backfill_labels,
    ],
    # 3: one entity's records are read through audit_chain alone (rows.audit_page, rows.seek): each
    # of these indexes cost a random B-tree page, written to the WAL, in every commit.
    3: [
        "DROP INDEX IF EXISTS audit_entity",
        "DROP INDEX IF EXISTS audit_moment",
    ],
}

WRITER_CACHE_KIB = 64 * 1024
READERS = 8
"""Threads (each with its own read connection) that serve reads beside the writer (WAL)."""
_MISSING: Final = Entity("", "", "")
"""Not in the cache (an entity no store holds, told apart by identity; ``None`` caches "no such entity")."""


def path_from_url(url: str) -> str:
    """``sqlite:///./x.db`` → ``./x.db``; ``sqlite:////abs/x.db`` → ``/abs/x.db``."""
    if not url.startswith("sqlite://"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    rest = url[len("sqlite://") :]
    return rest[1:] if rest.startswith("/") else rest


_SELECT_ENTITY = f"SELECT {ENTITY_COLUMNS} FROM entities WHERE entity_type = ? AND entity_id = ?"
_INSERT_AUDIT = (
    "INSERT INTO audit (id, entity_type, entity_id, seq, outcome, recorded_at, body, revision) VALUES (?,?,?,?,?,?,?,?)"
)
_INSERT_AUDIT_HEAD = "INSERT INTO audit (id, entity_type, entity_id, seq, outcome, recorded_at, body, revision)"
_UPSERT_LABELS_HEAD = f"INSERT INTO labels ({LABEL_COLUMNS})"
_UPSERT_LABELS_TAIL = "ON CONFLICT (entity_type, entity_id, key) DO UPDATE SET value = excluded.value"

_UPSERT_HEAD = f"INSERT INTO entities ({ENTITY_COLUMNS})"
_UPSERT_TAIL = (
    "ON CONFLICT (entity_type, entity_id) DO UPDATE SET state=excluded.state, revision=excluded.revision, "
    "seq=excluded.seq, head_hash=excluded.head_hash, data=excluded.data, updated_at=excluded.updated_at, "
    "last_seen_at=excluded.last_seen_at, last_report_at=excluded.last_report_at, last_details=excluded.last_details"
)
_UPSERT = f"{_UPSERT_HEAD} VALUES (?,?,?,?,?,?,?,?,?,?,?,?) {_UPSERT_TAIL}"


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pragmas every Ops-Core connection uses."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30, cached_statements=256)
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; refuse a newer one. Returns the version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(sql.VERSION_TABLE)
        row = conn.execute(sql.SELECT_VERSION).fetchone()
        for v in sql.versions_to_run(row, SCHEMA_VERSION):
            for step in MIGRATIONS[v]:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
        recorded = sql.record_version(SQLITE, row, SCHEMA_VERSION)
        if recorded is not None:
            conn.execute(*recorded)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def check_version(conn: sqlite3.Connection) -> int:
    """The schema version of a database this process will only read; refuse unknown ones."""
    try:
        row = conn.execute(sql.SELECT_VERSION).fetchone()
    except sqlite3.OperationalError as exc:
        raise NotOpsCore(f"not an Ops-Core database: {exc}") from exc
    return sql.readable_version(row, SCHEMA_VERSION)


_ROWS_PER_STATEMENT = 64


def _multi_row(head: str, width: int, rows: int, tail: str = "") -> str:
    one = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([one] * rows)} {tail}"


def _write_rows(conn: sqlite3.Connection, head: str, width: int, rows: list[tuple[Any, ...]], tail: str) -> None:
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        conn.execute(_multi_row(head, width, len(chunk), tail), [v for row in chunk for v in row])


_ALONE_WIDTH = 13
"""Columns of the ``temp.batch_rows`` view: a kind (``a`` audit, ``e`` entity, ``l`` label), then that row's values."""

_ALONE_MAX_ROWS = _ROWS_PER_STATEMENT
"""A batch of plain changes with at most this many rows (and nothing else to write) commits as ONE statement.

Measured (``docs/performance.md``, "One statement for a small batch"): the trigger costs about
10 µs more per change than direct multi-row INSERTs, in SQLite's C code with the GIL released;
each statement saved saves a GIL hand-off worth up to a whole event-loop callback. Up to a
few dozen changes the hand-offs cost more; above, the trigger does. 64 rows of 13 values
also stay under the 999 bound variables of older SQLite builds.
"""


def _one_statement_ddl() -> list[str]:
    """The writer connection's ``temp.batch_rows`` view and the trigger that spreads its rows to the tables.

    TEMP: it lives in the writer connection only, so no migration and no other reader ever
    sees it. One multi-row ``INSERT INTO batch_rows`` in autocommit mode is one durable,
    atomic transaction (SQLite's own BEGIN … COMMIT with its fsync): ONE ``sqlite3`` call.
    """
    columns = ", ".join(f"c{n}" for n in range(1, _ALONE_WIDTH))

    def new(width: int) -> str:
        return ", ".join(f"NEW.c{n}" for n in range(1, width + 1))

    return [
        f"CREATE TEMP VIEW IF NOT EXISTS batch_rows (kind, {columns}) AS "
        f"SELECT {', '.join(['NULL'] * _ALONE_WIDTH)} WHERE 0",
        f"""CREATE TEMP TRIGGER IF NOT EXISTS batch_rows_spread INSTEAD OF INSERT ON batch_rows BEGIN
            {_INSERT_AUDIT_HEAD} SELECT {new(8)} WHERE NEW.kind = 'a';
            {_UPSERT_HEAD} SELECT {new(12)} WHERE NEW.kind = 'e' {_UPSERT_TAIL};
            {_UPSERT_LABELS_HEAD} SELECT {new(5)} WHERE NEW.kind = 'l' {_UPSERT_LABELS_TAIL};
        END""",
    ]


class _Deferred:
    """Rows of the batch's plain transitions, written together at the batch's end.

    Every ``sqlite3`` statement releases the GIL and must win it back from the busy event
    loop (up to the 5 ms switch interval each time): four statements per transition
    (SAVEPOINT, INSERT, UPSERT, RELEASE) made the writer crawl under load. A plain change
    (no idempotency answer, no timers) is decided entirely in Python, so it needs no
    savepoint (:attr:`Mode.PLAIN`): it either raises before touching anything or adds its
    rows here. In a transaction they go out as multi-row INSERTs of 64 (:meth:`write`); a
    small batch with nothing else to write goes as one statement that is its own
    transaction (:meth:`write_alone`).
    """

    __slots__ = ("audit", "entities", "labels")

    def __init__(self) -> None:
        self.audit: list[tuple[Any, ...]] = []
        self.entities: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.labels: list[tuple[Any, ...]] = []
        """Label rows in the order their changes were applied (a later one overrides)."""

    def __len__(self) -> int:
        return len(self.audit) + len(self.entities) + len(self.labels)

    def write(self, conn: sqlite3.Connection) -> None:
        """The rows, inside the caller's transaction."""
        _write_rows(conn, _INSERT_AUDIT_HEAD, 8, self.audit, "")
        _write_rows(conn, _UPSERT_HEAD, 12, list(self.entities.values()), _UPSERT_TAIL)
        if self.labels:
            _write_rows(conn, _UPSERT_LABELS_HEAD, 5, self.labels, _UPSERT_LABELS_TAIL)
            self.labels.clear()
        self.audit.clear()
        self.entities.clear()

    def write_alone(self, conn: sqlite3.Connection) -> None:
        """The rows as ONE autocommit statement through ``temp.batch_rows``: committed (and synced) when it returns.

        The entities go after the audit rows and the labels last, in the order :meth:`write`
        writes them; multi-row VALUES reach the trigger in order, so a later label wins.
        """
        pad = (None,) * (_ALONE_WIDTH - 9)
        rows = [("a", *row, *pad) for row in self.audit]
        rows += [("e", *row) for row in self.entities.values()]
        label_pad = (None,) * (_ALONE_WIDTH - 6)
        rows += [("l", *row, *label_pad) for row in self.labels]
        conn.execute(_multi_row("INSERT INTO batch_rows", _ALONE_WIDTH, len(rows)), [v for row in rows for v in row])
        self.audit.clear()
        self.entities.clear()
        self.labels.clear()


class _Batch:
    """One transaction of the writer (its :class:`~opscore.storage.writer.Transaction`), and what its jobs see.

    ``staged`` holds the entities its jobs read or wrote; they reach the store's cache only
    when :meth:`commit` returned, so the cache never holds what did not commit.

    ``BEGIN IMMEDIATE`` waits for the first job that writes as it goes (:meth:`savepoint`):
    a batch of plain changes alone reads (the writer is the file's only writer, so nothing
    moves between a read and the commit) and then commits its rows as one statement, or,
    above ``_ALONE_MAX_ROWS``, in a transaction opened at :meth:`commit`.
    """

    __slots__ = ("conn", "deferred", "first_id", "open", "staged", "store", "writes")

    def __init__(self, store: SQLiteStore, writes: bool) -> None:
        assert store._wconn is not None
        self.store = store
        self.conn = store._wconn
        self.writes = writes
        self.open = False
        """``BEGIN IMMEDIATE`` ran."""
        self.staged: dict[tuple[str, str], Entity | None] = {}
        self.deferred = _Deferred()
        self.first_id = store._next_id

    def _begin(self) -> None:
        if not self.open:
            self.conn.execute("BEGIN IMMEDIATE")
            self.open = True

    def begin(self) -> None:
        """Nothing yet: the transaction opens when something must be written inside one."""

    def savepoint(self) -> None:
        self._begin()
        self.deferred.write(self.conn)  # rows of earlier plain jobs first: this job may read or overwrite them
        self.conn.execute("SAVEPOINT job")

    def rollback_savepoint(self) -> None:
        self.conn.execute("ROLLBACK TO job")
        self.conn.execute("RELEASE job")

    def release_savepoint(self) -> None:
        self.conn.execute("RELEASE job")

    def commit(self) -> None:
        if self.writes:
            deferred = self.deferred
            if not self.open and 0 < len(deferred) <= _ALONE_MAX_ROWS:
                deferred.write_alone(self.conn)
            elif self.open or deferred:
                self._begin()
                deferred.write(self.conn)
                self.conn.execute("COMMIT")
        store, staged = self.store, self.staged
        if len(store._cache) + len(staged) > store.cache_size:
            store._cache.clear()
        store._cache.update(staged)
        if self.writes and staged:  # entities were written: a real change committed (a timer claim proves little)
            store.last_write_error = None

    def abort(self, exc: BaseException) -> Exception:
        with contextlib.suppress(sqlite3.Error):
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        self.store._next_id = self.first_id
        if self.writes:
            self.store.write_failed(str(exc))
        return StorageError(f"the SQLite commit failed: {exc}")


def _run(conn: sqlite3.Connection, steps: Steps) -> Any:
    """Run a generator of read steps (:data:`~opscore.storage.rows.Steps`) on ``conn``: its answer."""
    try:
        sql, params = next(steps)
        while True:
            sql, params = steps.send(conn.execute(sql, params).fetchone())
    except StopIteration as done:
        return done.value


def _audit_page(conn: sqlite3.Connection, query: AuditQuery, columns: str) -> list[tuple[Any, ...]]:
    """A page of audit rows (one chain through ``audit_chain`` alone: ``rows.audit_page``)."""
    sql, params = _run(conn, audit_page(query, SQLITE, columns))
    return conn.execute(sql, params).fetchall()


def _is_plain(change: Change) -> bool:
    """No SQL of its own before COMMIT (no idempotency answer, no timers): see :class:`_Deferred`."""
    return change.idempotency is None and not change.timers and not change.cancel_timers


class SQLiteStore(Store):
    backend = "sqlite"
    sole_writer = True  # the file lock (_open_sync) admits one serving process

    def __init__(self, path: str, *, max_batch: int = 512, cache_size: int = 250_000, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.cache_size = cache_size
        self._cache: dict[tuple[str, str], Entity | None] = {}
        self._writer = GroupCommitWriter(functools.partial(_Batch, self), max_batch=max_batch, name="SQLite")
        self._wconn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._readers_pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="opscore-sqlite-read")
        self._next_id = 1
        self._version = SCHEMA_VERSION

    def batch_counts(self) -> dict[str, tuple[int, int]]:
        return {"commit": (self._writer.commits, self._writer.committed)}

    @property
    def batches(self) -> int:
        """Transactions the writer committed."""
        return self._writer.batches

    @property
    def batched(self) -> int:
        """Jobs those transactions ran (``batched / batches`` is the mean group commit)."""
        return self._writer.batched

    # -- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Take the file (lock, migrate) and start the writer; read-only: only check the schema."""
        if self.readonly:
            self._version = await self._read(check_version)
            return
        await asyncio.to_thread(self._open_sync)
        self._writer.start()

    def _open_sync(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DatabaseInUse(
                f"another Ops-Core process already serves {self.path}; SQLite takes one server "
                "process (use PostgreSQL for several replicas)",
            ) from exc
        self._lock_fd = fd
        conn = connect(self.path)
        migrate(conn)
        self._next_id = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM audit").fetchone()[0]
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        for ddl in _one_statement_ddl():
            conn.execute(ddl)
        self._wconn = conn

    async def close(self) -> None:
        """Let the writer finish what is queued and wait for every read in flight, then close the connections."""
        await asyncio.to_thread(self._writer.stop)
        await asyncio.to_thread(self._readers_pool.shutdown, wait=True, cancel_futures=True)
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writes (jobs of the writer) --------------------------------------------------------

    def _load(self, tx: _Batch, key: tuple[str, str]) -> Entity | None:
        staged = tx.staged
        if key in staged:
            return staged[key]
        if key in self._cache:
            return self._cache[key]
        row = tx.conn.execute(_SELECT_ENTITY, key).fetchone()
        entity = None if row is None else entity_from_row(row)
        staged[key] = entity
        return entity

    def _apply_sync(self, tx: _Batch, change: Change, *, plain: bool) -> Committed:
        """``change`` in the writer's transaction: a ``plain`` one adds deferred rows, the others run SQL now.

        ``plain`` must be exact: a change with SQL of its own runs in a SAVEPOINT, and rows it
        deferred would outlive that SAVEPOINT's rollback.
        """
        conn = tx.conn
        key = (change.entity_type, change.entity_id)
        current = self._load(tx, key)
        record_id = self._next_id if change.record is not None else None
        new, record, created = next_entity(current, change, now=utc_now(), record_id=record_id)
        deferred = tx.deferred
        if record is not None:
            row = audit_row(new, record)
            if plain:
                deferred.audit.append(row)
            else:
                conn.execute(_INSERT_AUDIT, row)
        labels = label_rows(current, new) if new.entity_type in LABELLED else None
        if plain:
            deferred.entities[key] = entity_values(new)
            if labels:
                deferred.labels.extend(labels)
        else:
            conn.execute(_UPSERT, entity_values(new))
            if labels:
                _write_rows(conn, _UPSERT_LABELS_HEAD, 5, labels, _UPSERT_LABELS_TAIL)
        if change.idempotency is not None:
            entry = stored_answer(change.idempotency, record)
            try:
                conn.execute(
                    "INSERT INTO idempotency (scope, key, fingerprint, status, body, created) VALUES (?,?,?,?,?,?)",
                    (entry.scope, entry.key, entry.fingerprint, entry.status, json.dumps(entry.body), time.time()),
                )
            except sqlite3.IntegrityError as exc:
                raise IdempotencyKeyInUse("this Idempotency-Key is already in use") from exc
        if change.cancel_timers:
            conn.executemany("DELETE FROM timers WHERE key = ?", [(k,) for k in change.cancel_timers])
        if change.timers:
            conn.executemany(
                "INSERT OR REPLACE INTO timers (key, due_at, kind, entity_type, entity_id, payload, lease_until) "
                "VALUES (?,?,?,?,?,?,0)",
                [(t.key, t.due_at, t.kind, t.entity_type, t.entity_id, json.dumps(t.payload)) for t in change.timers],
            )
        if record is not None:
            self._next_id += 1
        tx.staged[key] = new
        return Committed(new, record, created)

    def _write(self, job: Callable[[_Batch], R]) -> asyncio.Future[R]:
        """A job that writes as it goes: its own SAVEPOINT in the writer's transaction."""
        return self._writer.submit(job, Mode.SAVEPOINT)

    # -- the port ---------------------------------------------------------------------------

    async def ping(self) -> None:
        try:
            await self._read(lambda c: c.execute("SELECT 1").fetchone())
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"SQLite is unreachable: {exc}") from exc

    async def probe_write(self) -> None:
        """A real commit through the writer (``UPDATE schema_version`` to itself): a full disk fails it."""

        def job(tx: _Batch) -> None:
            tx.conn.execute("UPDATE schema_version SET version = version")

        try:
            await self._write(job)
        except StorageError as exc:
            raise Unavailable(f"SQLite cannot commit: {self.last_write_error or exc.detail}") from exc

    async def get(self, entity_type: str, entity_id: str) -> Entity | None:
        key = (entity_type, entity_id)
        cached = self._cache.get(key, _MISSING)
        if cached is not _MISSING:
            return cached
        if self.readonly:
            row = await self._read(lambda c: c.execute(_SELECT_ENTITY, key).fetchone())
            return None if row is None else entity_from_row(row)
        return await self._writer.submit(lambda tx: self._load(tx, key), Mode.READ)

    async def get_many(self, entity_type: str, entity_ids: list[str]) -> list[Entity | None]:
        """From the cache; the ones it lacks are read by ONE writer job (one hop, not one each)."""
        cache = self._cache
        found = [cache.get((entity_type, entity_id), _MISSING) for entity_id in entity_ids]
        missing = [(entity_type, entity_ids[n]) for n, e in enumerate(found) if e is _MISSING]
        if missing:
            if self.readonly:
                loaded = [await self.get(*key) for key in missing]
            else:
                loaded = await self._writer.submit(lambda tx: [self._load(tx, key) for key in missing], Mode.READ)
            fill = iter(loaded)
            found = [next(fill) if e is _MISSING else e for e in found]
        return found

    async def apply(self, change: Change) -> Committed:
        plain = _is_plain(change)
        job = functools.partial(self._apply_sync, change=change, plain=plain)
        return await self._writer.submit(job, Mode.PLAIN if plain else Mode.SAVEPOINT)

    async def apply_many(self, changes: list[Change]) -> list[Committed | Exception]:
        """Plain changes go as ONE job with one future (a :class:`~opscore.storage.writer.Many`); the rest one job each.

        All of them reach the writer together, so they share its group commit, and every
        future resolves after that COMMIT, as for :meth:`apply`.
        """
        out: dict[int, Committed | Exception] = {}
        plain: list[int] = []
        futures: list[tuple[int, asyncio.Future[Committed]]] = []
        for n, change in enumerate(changes):
            if _is_plain(change):
                plain.append(n)
            else:
                futures.append((n, self._write(functools.partial(self._apply_sync, change=change, plain=False))))
        apply_plain = functools.partial(self._apply_sync, plain=True)
        together = self._writer.submit_many(apply_plain, [changes[n] for n in plain]) if plain else None
        for n, future in futures:
            try:
                out[n] = await future
            except Exception as exc:  # noqa: BLE001 - handed back to the caller of this change
                out[n] = exc
        if together is not None:
            try:
                answers: list[Committed | Exception] = await together
            except Exception as exc:  # noqa: BLE001 - the batch's COMMIT failed: every change failed
                answers = [exc] * len(plain)
            for n, answer in zip(plain, answers, strict=True):
                out[n] = answer
        return [out[n] for n in range(len(changes))]

    async def remember_signature(self, signature: str, seen_at: float, window: float) -> bool:
        def job(tx: _Batch) -> bool:
            tx.conn.execute("DELETE FROM webhook_signatures WHERE seen < ?", (time.time() - 2 * window,))
            try:
                tx.conn.execute("INSERT INTO webhook_signatures (signature, seen) VALUES (?, ?)", (signature, seen_at))
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._write(job)

    async def purge_idempotency(self, older_than: float = IDEMPOTENCY_TTL) -> int:
        def job(tx: _Batch) -> int:
            return tx.conn.execute("DELETE FROM idempotency WHERE created < ?", (time.time() - older_than,)).rowcount

        return await self._write(job)

    # -- reads ------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=self.readonly)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        """``fn`` on this thread's read connection, in the store's own reader threads.

        Their own pool, so that :meth:`close` can wait for every read in flight before it
        closes the connections (closing one under a running query crashes the process).
        """
        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers_pool, lambda: fn(self._reader()))
        except RuntimeError as exc:
            if "shutdown" not in str(exc):
                raise
            raise Unavailable("the SQLite store is closing") from exc

    async def get_idempotency(self, scope: str, key: str) -> IdempotencyEntry | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {sql.IDEMPOTENCY_COLUMNS} FROM idempotency WHERE scope=? AND key=? AND created >= ?",
                (scope, key, time.time() - IDEMPOTENCY_TTL),
            ).fetchone()
        )
        return sql.idempotency_from_row(scope, key, row)

    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        sql, params = select_entities(query, SQLITE)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [entity_from_row(r) for r in rows]

    async def count_states(self) -> dict[tuple[str, str], int]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT entity_type, state, count(*) FROM entities GROUP BY entity_type, state"
            ).fetchall()
        )
        return {(str(t), str(s)): int(n) for t, s, n in rows}

    async def list_audit(self, query: AuditQuery) -> list[dict[str, Any]]:
        rows = await self._read(functools.partial(_audit_page, query=query, columns="body"))
        return [audit.loads(r[0]) for r in rows]

    async def list_audit_text(self, query: AuditQuery) -> list[tuple[int, str]]:
        rows: list[tuple[int, str]] = await self._read(functools.partial(_audit_page, query=query, columns="id, body"))
        return rows

    async def position_at(self, entity_type: str, entity_id: str, moment: str) -> Position | None:
        """The seek of :func:`opscore.storage.rows.seek`, every step in one worker thread."""
        if self._version < 2:
            return None
        result: Position | None = await self._read(
            functools.partial(_run, steps=seek(SQLITE, entity_type, entity_id, moment))
        )
        return result

    def iter_records(self, conn: sqlite3.Connection, chunk: int = 10_000) -> Iterator[dict[str, Any]]:
        """Every audit record in id order (which is ``seq`` order within each entity)."""
        last = 0
        while True:
            rows = conn.execute("SELECT id, body FROM audit WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return
            for _, body in rows:
                yield audit.loads(body)
            last = rows[-1][0]

    def verify_sync(self, conn: sqlite3.Connection, verifier: audit.ChainVerifier | None = None) -> audit.Verification:
        verifier = verifier if verifier is not None else audit.ChainVerifier()
        conn.execute("BEGIN")
        try:
            for record in self.iter_records(conn):
                # the parsed dict is ours: taking "hash" out spares digest() a copy per record
                verifier.add(record, record.pop("hash", None))
            heads = conn.execute("SELECT entity_type, entity_id, seq, head_hash, state, revision FROM entities")
            for etype, eid, seq, head, state, revision in heads:
                verifier.head(etype, eid, seq, head, state, revision)
        finally:
            conn.execute("COMMIT")
        return verifier.finish()

    async def verify(self, verifier: audit.ChainVerifier | None = None) -> audit.Verification:
        return await self._read(lambda conn: self.verify_sync(conn, verifier))

    # -- workflows --------------------------------------------------------------------------

    async def put_definition(self, definition_id: str, version: str, body: dict[str, Any]) -> bool:
        text = sql.definition_text(body)

        def job(tx: _Batch) -> bool:
            if tx.conn.execute(*sql.insert_definition(SQLITE, definition_id, version, text)).rowcount == 1:
                return True
            row = tx.conn.execute(*sql.select_definition(SQLITE, definition_id, version)).fetchone()
            return sql.kept_definition(row, text, definition_id, version)

        return await self._write(job)

    async def get_definition(self, definition_id: str, version: str | None = None) -> dict[str, Any] | None:
        statement = sql.select_definition(SQLITE, definition_id, version)
        return sql.definition_from_row(await self._read(lambda c: c.execute(*statement).fetchone()))

    async def definitions_page(self, after: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        statement = sql.definitions_page(SQLITE, after, limit)
        return sql.definitions_from_rows(await self._read(lambda c: c.execute(*statement).fetchall()))

    async def claim_timers(self, now: str, limit: int, lease_seconds: float) -> list[Timer]:
        def job(tx: _Batch) -> list[Timer]:
            clock = time.time()
            rows = tx.conn.execute(
                f"SELECT {TIMER_COLUMNS} FROM timers WHERE due_at <= ? AND lease_until <= ? ORDER BY due_at LIMIT ?",
                (now, clock, limit),
            ).fetchall()
            tx.conn.executemany(
                "UPDATE timers SET lease_until = ? WHERE key = ?", [(clock + lease_seconds, r[0]) for r in rows]
            )
            return [timer_from_row(r) for r in rows]

        return await self._write(job)

    async def finish_timer(self, key: str) -> None:
        statement = sql.finish_timer(SQLITE, key)
        await self._write(lambda tx: tx.conn.execute(*statement))

    async def list_timers(self, entity_type: str | None = None, entity_id: str | None = None) -> list[Timer]:
        statement = sql.select_timers(SQLITE, entity_type, entity_id)
        return sql.timers_from_rows(await self._read(lambda c: c.execute(*statement).fetchall()))
