"""PostgreSQL test databases: one schema per test, dropped afterwards.

Isolation by schema, not by database: creating a schema is cheap, needs no CREATEDB right,
and every connection of every server process on the yielded URL lands in it through
``options=-csearch_path=<schema>`` in the connection string.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import psycopg
from psycopg import sql


def with_search_path(base_url: str, schema: str) -> str:
    """``base_url`` whose connections use ``schema`` first (a URL parameter libpq understands)."""
    option = quote(f"-csearch_path={schema}", safe="")
    return f"{base_url}{'&' if '?' in base_url else '?'}options={option}"


@contextmanager
def fresh_schema(base_url: str) -> Iterator[str]:
    """A new empty schema on ``base_url``'s database; a URL that uses it; ``DROP … CASCADE`` after."""
    schema = f"opscore_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_search_path(base_url, schema)
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
