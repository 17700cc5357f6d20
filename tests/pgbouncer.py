"""A real PgBouncer in transaction mode for tests: its own process, port and config file.

Never the system's service: each test starts ``pgbouncer`` with a config file in its
``tmp_path``, listening on a free port, pooling the test database, and stops it afterwards.
PgBouncer refuses the ``options`` startup parameter that :mod:`tests.pg` isolates tests by,
so a test behind it gets a login role of its own whose ``search_path`` is its schema
(``ALTER ROLE … SET search_path``), which is also how an operator puts Ops-Core in a schema
behind a pooler.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from tests.servers import free_port


@dataclass
class PgBouncer:
    """``pgbouncer`` in ``pool_mode = transaction`` in front of ``target`` (host, port, dbname)."""

    directory: Path
    target: tuple[str, int, str]
    pool_size: int = 4
    users: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def url(self, user: str) -> str:
        """The database in transaction mode."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.target[2]}"

    def session_url(self, user: str) -> str:
        """The same database through the same PgBouncer in session mode (a second entry)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.target[2]}_session"

    def start(self, timeout: float = 10.0) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
        host, port, dbname = self.target
        users = self.directory / "users.txt"
        users.write_text("".join(f'"{user}" ""\n' for user in self.users))
        config = self.directory / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"{dbname} = host={host} port={port} dbname={dbname}\n"
            f"{dbname}_session = host={host} port={port} dbname={dbname} pool_mode=session\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            "logfile =\n"
            "pidfile =\n"
        )
        argv = [binary, str(config)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root; it reads its config first, then switches
            argv[1:1] = ["-u", "postgres"]
        with open(self.directory / "pgbouncer.log", "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {(self.directory / 'pgbouncer.log').read_text()[-2000:]}")
            if self.users:
                try:
                    with psycopg.connect(self.url(self.users[0]), connect_timeout=2) as conn:
                        conn.execute("SELECT 1")
                    return self
                except psycopg.OperationalError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not accept a connection in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # SIGINT: safe shutdown; SIGTERM waits for clients
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def schema_role(base_url: str) -> Iterator[str]:
    """A new login role owning a new schema that is its ``search_path``; both dropped afterwards."""
    name = f"opscore_pgb_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident))
        conn.execute(sql.SQL("ALTER ROLE {} SET search_path = {}").format(ident, ident))
    try:
        yield name
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            # sessions PgBouncer still holds for the role would keep it from being dropped
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@contextmanager
def pgbouncer(base_url: str, directory: Path, *, pool_size: int = 4) -> Iterator[tuple[PgBouncer, str]]:
    """A PgBouncer in transaction mode before ``base_url``'s database, and the role to use through it."""
    parts = urlsplit(base_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.lstrip("/") or "postgres")
    with schema_role(base_url) as role:
        bouncer = PgBouncer(directory, target, pool_size=pool_size, users=[role])
        bouncer.start()
        try:
            yield bouncer, role
        finally:
            bouncer.stop()
