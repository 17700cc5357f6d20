"""What the SQLite and PostgreSQL stores share besides :mod:`~opscore.storage.rows`' page queries.

Schema-version bookkeeping, the label back-fill of schema 2, definitions, timer listings and
idempotency rows: the statements (in a :class:`~opscore.storage.rows.Dialect`'s
placeholders), the mapping of their rows and the decisions taken on them, written once so
that the two stores cannot drift apart. Each store keeps its own I/O (SQLite: ``sqlite3`` in
its writer and reader threads; PostgreSQL: async psycopg on a pool), and whatever its SQL
cannot say the same way (clocks, locks, upserts inside its write path) stays in its module.
"""

from __future__ import annotations

import json
from typing import Any

from opscore.errors import DefinitionExists, SchemaMismatch, SchemaTooNew
from opscore.models import Entity, IdempotencyEntry, Timer
from opscore.storage.base import utc_now
from opscore.storage.rows import TIMER_COLUMNS, Dialect, entity_from_row, label_rows, timer_from_row

Statement = tuple[str, tuple[Any, ...]]

# -- schema versions ---------------------------------------------------------------------

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
SELECT_VERSION = "SELECT version FROM schema_version"


def versions_to_run(row: tuple[Any, ...] | None, latest: int) -> range:
    """The migrations a database at ``row``'s version needs; refuses a schema newer than ``latest``."""
    version = int(row[0]) if row else 0
    if version > latest:
        raise SchemaTooNew(
            f"the database has schema version {version}, newer than this Ops-Core knows "
            f"({latest}): upgrade Ops-Core instead of downgrading the data",
        )
    return range(version + 1, latest + 1)


def record_version(d: Dialect, row: tuple[Any, ...] | None, latest: int) -> Statement | None:
    """The statement that records ``latest`` after the migrations ran (none when it already was)."""
    if row is None:
        return f"INSERT INTO schema_version (version) VALUES ({d.ph})", (latest,)
    if int(row[0]) != latest:
        return f"UPDATE schema_version SET version = {d.ph}", (latest,)
    return None


def readable_version(row: tuple[Any, ...] | None, latest: int) -> int:
    """The version of a database a process will only read; an older one is read as it is.

    A reader never migrates: what ``opscore audit verify``/``export`` read has not changed
    since version 1.
    """
    version = int(row[0]) if row else 0
    if not 1 <= version <= latest:
        raise SchemaMismatch(f"the database has schema version {version}; this Ops-Core reads {latest}")
    return version


# -- the label back-fill of schema 2 -----------------------------------------------------


def legacy_entity(row: tuple[Any, ...]) -> Entity:
    """An entity row of any age; data that no longer parses labels only its state."""
    try:
        return entity_from_row(row)
    except ValueError:
        return entity_from_row((*row[:6], "{}", *row[7:11], "{}"))


def backfill_labels(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``labels`` rows of existing entity rows: read in Python, never with SQL JSON (see rows.py)."""
    return [label for row in rows for label in label_rows(None, legacy_entity(row))]


# -- definitions -------------------------------------------------------------------------


def definition_text(body: dict[str, Any]) -> str:
    """A definition as stored: the same body is the same text, so a repeated PUT is recognised."""
    return json.dumps(body, sort_keys=True, ensure_ascii=False)


def insert_definition(d: Dialect, definition_id: str, version: str, text: str) -> Statement:
    """Insert unless (id, version) exists; the store reads the row count to know which happened."""
    p = d.ph
    return (
        f"INSERT INTO definitions (definition_id, version, body, created_at) VALUES ({p},{p},{p},{p}) "
        "ON CONFLICT (definition_id, version) DO NOTHING",
        (definition_id, version, text, utc_now()),
    )


def select_definition(d: Dialect, definition_id: str, version: str | None) -> Statement:
    """The body of one version, or (``version`` None) of the latest stored."""
    p = d.ph
    if version is None:
        return f"SELECT body FROM definitions WHERE definition_id = {p} ORDER BY n DESC LIMIT 1", (definition_id,)
    return f"SELECT body FROM definitions WHERE definition_id = {p} AND version = {p}", (definition_id, version)


def kept_definition(row: tuple[Any, ...] | None, text: str, definition_id: str, version: str) -> bool:
    """After an insert that found (id, version) taken: ``False`` if it holds ``text``, else refuse."""
    if row is not None and row[0] != text:
        raise DefinitionExists(definition_id, version)
    return False


def definitions_page(d: Dialect, after: int | None, limit: int) -> Statement:
    return f"SELECT n, body FROM definitions WHERE n > {d.ph} ORDER BY n LIMIT {d.ph}", (after or 0, limit)


def definitions_from_rows(rows: list[tuple[Any, ...]]) -> list[tuple[int, dict[str, Any]]]:
    return [(int(r[0]), json.loads(r[1])) for r in rows]


def definition_from_row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    body: dict[str, Any] = json.loads(row[0])
    return body


# -- timers ------------------------------------------------------------------------------


def select_timers(d: Dialect, entity_type: str | None, entity_id: str | None) -> Statement:
    """Every timer, or an entity type's or an entity's, by due time (then key: a stable order)."""
    sql = [f"SELECT {TIMER_COLUMNS} FROM timers WHERE 1=1"]
    params: list[Any] = []
    if entity_type is not None:
        sql.append(f"AND entity_type = {d.ph}")
        params.append(entity_type)
    if entity_id is not None:
        sql.append(f"AND entity_id = {d.ph}")
        params.append(entity_id)
    sql.append("ORDER BY due_at, key")
    return " ".join(sql), tuple(params)


def timers_from_rows(rows: list[tuple[Any, ...]]) -> list[Timer]:
    return [timer_from_row(r) for r in rows]


def finish_timer(d: Dialect, key: str) -> Statement:
    return f"DELETE FROM timers WHERE key = {d.ph}", (key,)


# -- idempotency -------------------------------------------------------------------------

IDEMPOTENCY_COLUMNS = "fingerprint, status, body"
"""What a stored answer is read as (:func:`idempotency_from_row`); how old it may be is each store's clock."""


def idempotency_from_row(scope: str, key: str, row: tuple[Any, ...] | None) -> IdempotencyEntry | None:
    return None if row is None else IdempotencyEntry(scope, key, row[0], row[1], json.loads(row[2]))
