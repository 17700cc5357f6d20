"""Backends of the storage port; :func:`open_store` picks one from the database URL."""

from __future__ import annotations

from opscore.storage.base import Store


def open_store(
    url: str,
    *,
    readonly: bool = False,
    pool_min: int | None = None,
    pool_max: int | None = None,
    pool_timeout: float | None = None,
    pooler: str = "none",
) -> Store:
    """``sqlite:///path``, ``postgresql://…`` or ``memory://`` (tests only) → an unopened store.

    The ``pool_*`` sizes are PostgreSQL's (``OPSCORE_PG_POOL_*`` in ``Settings``); the other
    backends have no pool and ignore them. ``None`` keeps the store's defaults. ``pooler`` is
    ``OPSCORE_PG_POOLER`` (``"transaction"`` behind PgBouncer in transaction mode).
    """
    if url.startswith("sqlite://"):
        from opscore.storage.sqlite import SQLiteStore, path_from_url

        return SQLiteStore(path_from_url(url), readonly=readonly)
    if url.startswith(("postgresql://", "postgres://")):
        from opscore.storage.postgres import PostgresStore

        return PostgresStore(
            url, readonly=readonly, min_size=pool_min, max_size=pool_max, timeout=pool_timeout, pooler=pooler
        )
    if url.startswith("memory://"):
        from opscore.storage.memory import MemoryStore

        return MemoryStore()
    raise ValueError(f"unsupported OPSCORE_DATABASE_URL scheme: {url.split(':', 1)[0]!r} (use sqlite or postgresql)")


__all__ = ["Store", "open_store"]
