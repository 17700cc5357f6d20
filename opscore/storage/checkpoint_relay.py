"""Where replicas agree on one checkpoint stream: who signs, and the lines they all copy.

One process signs checkpoints at a time (the leader); every replica keeps a full copy of
the one stream in its own ``OPSCORE_CHECKPOINT_FILE``. :class:`CheckpointRelay` is that
port; :func:`open_relay` picks the implementation from the database URL:

- :class:`LocalRelay` (SQLite, memory): one process writes the database, so it is always
  the leader and its file is the only copy; nothing is kept in the database.
- :class:`PostgresRelay`: the leader holds a session-level advisory lock on a dedicated
  connection (released by PostgreSQL when that session ends, so a replica that dies hands
  over leadership by itself) and inserts each signed line into the append-only table
  ``checkpoint_lines`` *on that same connection*: a leader that lost its session cannot
  publish anything, and ``n`` as primary key forbids two lines with one number. The other
  replicas copy the lines they do not have yet into their files; a new leader continues the
  chain from the table's last line. The table is a relay, not the record: a replica whose
  file disagrees with the table refuses to follow or lead (:mod:`opscore.checkpointer`).

The table is created by the relay (``CREATE TABLE IF NOT EXISTS``), outside the numbered
schema migrations: it belongs to checkpointing, which may be off, and holds nothing the
rest of Ops-Core reads.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from typing import Any

log = logging.getLogger("opscore.checkpoints")

LOCK_CLASS = 0x0C4E
"""The first key of the two-key advisory lock; the second is ``hashtext(current_schema())``, so
several Ops-Core databases (schemas) on one server each have their own leader."""


class LostLeadership(Exception):
    """The relay can no longer publish as leader (session gone, or the line number taken)."""


class CheckpointRelay(abc.ABC):
    """Leadership and the shared copy of the lines."""

    shared = True
    """Whether replicas share it (and leadership is a database session's advisory lock)."""

    async def open(self) -> None:
        """Connect (nothing for a local relay)."""

    async def close(self) -> None:
        """Disconnect; a leader's lock goes with its session."""

    @abc.abstractmethod
    async def lead(self) -> bool:
        """Whether this process is the leader now (try to become it if not; never waits)."""

    @abc.abstractmethod
    async def lines_after(self, n: int, limit: int = 100) -> list[tuple[int, str]]:
        """Shared lines numbered above ``n``, in order: ``[(n, text)]``."""

    @abc.abstractmethod
    async def publish(self, n: int, text: str) -> None:
        """Share line ``n`` as leader; :class:`LostLeadership` when this process may not."""


class LocalRelay(CheckpointRelay):
    """One process, one file: always the leader, nothing shared."""

    shared = False

    async def lead(self) -> bool:
        return True

    async def lines_after(self, n: int, limit: int = 100) -> list[tuple[int, str]]:
        return []

    async def publish(self, n: int, text: str) -> None:
        return None


class PostgresRelay(CheckpointRelay):
    """Advisory-lock leadership and the ``checkpoint_lines`` table, on one dedicated connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._leading = False

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._leading = False
            # keepalives: a leader cut off by the network loses its lock within a minute, not hours
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, keepalives_idle=10, keepalives_interval=5, keepalives_count=3
            )
            # another replica may create it at the same moment
            with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                await self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS checkpoint_lines ("
                    "n bigint PRIMARY KEY, line text NOT NULL, "
                    "written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
                )
        return self._conn

    async def _drop(self) -> None:
        self._leading = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                log.debug("closing the checkpoint connection failed", exc_info=True)

    async def close(self) -> None:
        await self._drop()

    async def lead(self) -> bool:
        import psycopg

        try:
            conn = await self._connection()
            if self._leading:
                await conn.execute("SELECT 1")  # the session, and so the lock, is still there
                return True
            row = await (
                await conn.execute(
                    "SELECT pg_try_advisory_lock(%s, hashtext(current_schema()))",
                    (LOCK_CLASS,),
                )
            ).fetchone()
            self._leading = bool(row and row[0])
            return self._leading
        except psycopg.Error:
            await self._drop()
            raise

    async def lines_after(self, n: int, limit: int = 100) -> list[tuple[int, str]]:
        import psycopg

        try:
            conn = await self._connection()
            cur = await conn.execute(
                "SELECT n, line FROM checkpoint_lines WHERE n > %s ORDER BY n LIMIT %s",
                (n, limit),
            )
            return [(int(row[0]), str(row[1])) for row in await cur.fetchall()]
        except psycopg.Error:
            await self._drop()
            raise

    async def publish(self, n: int, text: str) -> None:
        import psycopg

        if not self._leading or self._conn is None:
            raise LostLeadership("not the leader")
        try:
            await self._conn.execute("INSERT INTO checkpoint_lines (n, line) VALUES (%s, %s)", (n, text))
        except psycopg.errors.UniqueViolation as exc:
            self._leading = False
            raise LostLeadership(f"checkpoint line {n} exists already") from exc
        except psycopg.Error as exc:
            await self._drop()
            raise LostLeadership(str(exc)) from exc


def open_relay(url: str) -> CheckpointRelay:
    """The relay for the database at ``url`` (PostgreSQL shares; anything else is local)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresRelay(url)
    return LocalRelay()
