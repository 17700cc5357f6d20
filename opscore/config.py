"""Settings: the environment first, then ``.env``, then defaults (DESIGN §7 fixes the names).

Built once at start-up (``opscore serve``, the app's lifespan, each CLI command) and handed
down, never read again from the environment afterwards and never at import, so tests build
their own with ``Settings(database_url=...)``. There is no default API key: a service that
anyone who read the README could call would not keep anything honest.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from opscore.keys import ApiKey, InvalidApiKeys, digest, load_keys_file

__all__ = ["ApiKey", "InvalidApiKeys", "Settings", "parse_api_keys"]

_NAMED = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]{0,31}):(.+)$")
_PRINTABLE_ASCII = re.compile(r"^[\x21-\x7e]+$")

MIN_NAMED_SECRET = 8
"""A named key's secret is at least this long: ``Prod2024:xyz`` is a mistake, not a key called Prod2024."""

ANON_SALT = b"opscore-anonymous-key-name-v1"
ANON_ITERATIONS = 200_000


@functools.lru_cache(maxsize=64)
def anonymous_name(secret: bytes) -> str:
    """The stable actor name of an unnamed key: ``anon-`` + 12 hex digits of PBKDF2-HMAC-SHA256.

    A plain hash prefix of a weak key is reversed by trying candidates at billions a second;
    200,000 PBKDF2 iterations make each guess cost ~0.1 s, paid once per key at start-up
    (cached: tests build many apps with the same key).
    """
    return "anon-" + hashlib.pbkdf2_hmac("sha256", secret, ANON_SALT, ANON_ITERATIONS).hex()[:12]


def first_secret(raw: str) -> str:
    """The secret of the first key in an ``OPSCORE_API_KEY`` value: what a client sends as its bearer."""
    first = next((p.strip() for p in raw.split(",") if p.strip()), "")
    match = _NAMED.match(first)
    return match.group(2) if match else first


def parse_api_keys(raw: str, variable: str = "OPSCORE_API_KEY") -> tuple[ApiKey, ...]:
    """``secret`` or ``name:secret``, comma separated (several keys allow rotation).

    Refused with :class:`InvalidApiKeys` (position and rule named, never the secret):

    - a key with anything but printable ASCII (non-ASCII only matched when a client sent it
      latin-1 encoded; control characters and spaces never arrive intact in a header);
    - a named key whose secret is shorter than :data:`MIN_NAMED_SECRET`: ``Prod2024:xyz`` would
      otherwise silently become the key ``xyz`` named Prod2024.

    An unnamed key is named by :func:`anonymous_name`, so audit records tell keys apart without
    revealing them.
    """
    keys = []
    parts = [p.strip() for p in raw.split(",")]
    for position, part in enumerate((p for p in parts if p), start=1):
        where = f"{variable}: key #{position}"
        if not _PRINTABLE_ASCII.match(part):
            bad = next(c for c in part if not ("\x21" <= c <= "\x7e"))
            what = "a space" if bad == " " else "a control character" if ord(bad) < 0x80 else "a non-ASCII character"
            raise InvalidApiKeys(
                f"{where} contains {what}; keys must be printable ASCII (generate one with "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        match = _NAMED.match(part)
        if match:
            name, secret = match.group(1), match.group(2)
            if len(secret) < MIN_NAMED_SECRET:
                raise InvalidApiKeys(
                    f"{where} reads as a key named {name!r} whose secret is {len(secret)} characters long: "
                    f"`name:secret` names a key, and its secret must be at least {MIN_NAMED_SECRET} characters. "
                    f"If the ':' belongs to the key itself, name it: `mykey:<the whole key>`"
                )
        else:
            name, secret = anonymous_name(part.encode()), part
        keys.append(ApiKey(name, digest(secret.encode())))
    return tuple(keys)


class Settings(BaseSettings):
    """Every setting of Ops-Core; the environment variable of each is in its alias."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    api_key: str = Field(default="", validation_alias=AliasChoices("OPSCORE_API_KEY", "api_key"), repr=False)
    keys_file: str = Field(default="", validation_alias=AliasChoices("OPSCORE_KEYS_FILE", "keys_file"))
    database_url: str = Field(
        default="sqlite:///./opscore.db", validation_alias=AliasChoices("OPSCORE_DATABASE_URL", "database_url")
    )
    agentkit_api_url: str = Field(
        default="http://127.0.0.1:8001", validation_alias=AliasChoices("AGENTKIT_API_URL", "agentkit_api_url")
    )
    webhook_secret: str = Field(
        default="", validation_alias=AliasChoices("OPSCORE_WEBHOOK_SECRET", "webhook_secret"), repr=False
    )
    webhook_window_seconds: float = Field(
        default=300.0, validation_alias=AliasChoices("OPSCORE_WEBHOOK_WINDOW_SECONDS", "webhook_window_seconds")
    )
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("OPSCORE_LOG_LEVEL", "log_level"))
    access_log: bool = Field(default=True, validation_alias=AliasChoices("OPSCORE_ACCESS_LOG", "access_log"))
    task_timeout_seconds: float = Field(
        default=300.0, validation_alias=AliasChoices("OPSCORE_TASK_TIMEOUT_SECONDS", "task_timeout_seconds")
    )
    max_clock_skew_seconds: float = Field(
        default=300.0,
        ge=0,
        validation_alias=AliasChoices("OPSCORE_MAX_CLOCK_SKEW_SECONDS", "max_clock_skew_seconds"),
    )
    agent_timeout_seconds: float = Field(
        default=300.0, validation_alias=AliasChoices("OPSCORE_AGENT_TIMEOUT_SECONDS", "agent_timeout_seconds")
    )

    # -- signed checkpoints (DESIGN §12; opscore/checkpoints.py) ----------------------------------
    signing_key: str = Field(default="", validation_alias=AliasChoices("OPSCORE_SIGNING_KEY", "signing_key"))
    checkpoint_records: int = Field(
        default=1000, ge=1, validation_alias=AliasChoices("OPSCORE_CHECKPOINT_RECORDS", "checkpoint_records")
    )
    checkpoint_seconds: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("OPSCORE_CHECKPOINT_SECONDS", "checkpoint_seconds")
    )
    checkpoint_file: str = Field(
        default="./opscore-checkpoints.jsonl",
        validation_alias=AliasChoices("OPSCORE_CHECKPOINT_FILE", "checkpoint_file"),
    )

    # -- where `opscore serve` listens, and where clients (CLI, simulator) find it ---------------
    host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("OPSCORE_HOST", "host"))
    port: int = Field(default=8000, ge=0, le=65535, validation_alias=AliasChoices("OPSCORE_PORT", "port"))
    api_url: str = Field(default="", validation_alias=AliasChoices("OPSCORE_API_URL", "api_url"))

    # -- limits of a public-facing service --------------------------------------------------------
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1, validation_alias=AliasChoices("OPSCORE_MAX_BODY_BYTES", "max_body_bytes")
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, validation_alias=AliasChoices("OPSCORE_MAX_HEADER_BYTES", "max_header_bytes")
    )
    read_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("OPSCORE_READ_TIMEOUT_SECONDS", "read_timeout_seconds")
    )
    max_connections: int = Field(
        default=1000, ge=1, validation_alias=AliasChoices("OPSCORE_MAX_CONNECTIONS", "max_connections")
    )
    keep_alive_seconds: int = Field(
        default=5, ge=1, validation_alias=AliasChoices("OPSCORE_KEEP_ALIVE_SECONDS", "keep_alive_seconds")
    )

    # -- the live audit stream, metrics, the operator console ------------------------------------
    max_streams_per_key: int = Field(
        default=16, ge=1, validation_alias=AliasChoices("OPSCORE_MAX_STREAMS_PER_KEY", "max_streams_per_key")
    )
    stream_poll_seconds: float = Field(
        default=0.5, gt=0, le=60, validation_alias=AliasChoices("OPSCORE_STREAM_POLL_SECONDS", "stream_poll_seconds")
    )
    stream_ping_seconds: float = Field(
        default=15.0, gt=0, le=15, validation_alias=AliasChoices("OPSCORE_STREAM_PING_SECONDS", "stream_ping_seconds")
    )
    stream_send_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        validation_alias=AliasChoices("OPSCORE_STREAM_SEND_TIMEOUT_SECONDS", "stream_send_timeout_seconds"),
    )
    stream_max_seconds: float = Field(
        default=3600.0, gt=0, validation_alias=AliasChoices("OPSCORE_STREAM_MAX_SECONDS", "stream_max_seconds")
    )
    metrics_public: bool = Field(
        default=False, validation_alias=AliasChoices("OPSCORE_METRICS_PUBLIC", "metrics_public")
    )
    session_secret: str = Field(
        default="", validation_alias=AliasChoices("OPSCORE_SESSION_SECRET", "session_secret"), repr=False
    )
    session_seconds: float = Field(
        default=8 * 3600.0, gt=0, validation_alias=AliasChoices("OPSCORE_SESSION_SECONDS", "session_seconds")
    )

    # -- PostgreSQL connection pool (one per process) ---------------------------------------------
    pg_pool_min: int = Field(default=2, ge=0, validation_alias=AliasChoices("OPSCORE_PG_POOL_MIN", "pg_pool_min"))
    pg_pool_max: int = Field(default=10, ge=1, validation_alias=AliasChoices("OPSCORE_PG_POOL_MAX", "pg_pool_max"))
    pg_pool_timeout: float = Field(
        default=10.0, gt=0, validation_alias=AliasChoices("OPSCORE_PG_POOL_TIMEOUT", "pg_pool_timeout")
    )
    pg_pooler: Literal["none", "transaction"] = Field(
        default="none", validation_alias=AliasChoices("OPSCORE_PG_POOLER", "pg_pooler")
    )
    """``transaction`` when the URL reaches PostgreSQL through a pooler in transaction mode (PgBouncer's
    ``pool_mode = transaction``): no server-side prepared statements, nothing that needs a session."""
    pg_session_url: str = Field(
        default="", validation_alias=AliasChoices("OPSCORE_PG_SESSION_URL", "pg_session_url"), repr=False
    )
    """Where the checkpoint leader holds its session lock when ``OPSCORE_PG_POOLER=transaction``: the
    database directly, or the pooler in session mode (default: ``OPSCORE_DATABASE_URL``)."""

    # -- `opscore simulate` (the stand-in AgentKit) -----------------------------------------------
    simulator_agents: int = Field(
        default=3, ge=0, validation_alias=AliasChoices("SIMULATOR_AGENTS", "simulator_agents")
    )
    simulator_latency: float = Field(
        default=0.2, ge=0, validation_alias=AliasChoices("SIMULATOR_LATENCY", "simulator_latency")
    )
    simulator_failure_rate: float = Field(
        default=0.0, ge=0, le=1, validation_alias=AliasChoices("SIMULATOR_FAILURE_RATE", "simulator_failure_rate")
    )
    simulator_capabilities: str = Field(
        default="summarise_text,review_text",
        validation_alias=AliasChoices("SIMULATOR_CAPABILITIES", "simulator_capabilities"),
    )

    @field_validator("pg_pooler", mode="before")
    @classmethod
    def _pooler(cls, value: object) -> object:
        value = value.strip().lower() if isinstance(value, str) else value
        if value in ("", "session"):  # a pooler in session mode keeps sessions: nothing to avoid
            return "none"
        if value not in ("none", "transaction"):
            raise ValueError("OPSCORE_PG_POOLER must be none, session or transaction")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("OPSCORE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @property
    def api_keys(self) -> tuple[ApiKey, ...]:
        """Every accepted key: ``OPSCORE_API_KEY``'s (every scope) and ``OPSCORE_KEYS_FILE``'s.

        :class:`InvalidApiKeys` when one breaks a rule (see :func:`parse_api_keys`),
        :class:`~opscore.keys.InvalidKeysFile` when the file does, or when one name is used twice.
        """
        keys = parse_api_keys(self.api_key)
        if self.keys_file.strip():
            keys += load_keys_file(self.keys_file.strip())
        names = [key.name for key in keys]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidApiKeys(
                f"the key name(s) {', '.join(twice)} are given twice (OPSCORE_API_KEY, OPSCORE_KEYS_FILE)"
            )
        return keys

    @property
    def webhook_secrets(self) -> tuple[bytes, ...]:
        return tuple(s.strip().encode() for s in self.webhook_secret.split(",") if s.strip())

    @property
    def opscore_url(self) -> str:
        """Where clients reach Ops-Core: ``OPSCORE_API_URL``, else ``http://<OPSCORE_HOST>:<OPSCORE_PORT>``.

        A wildcard bind address (``0.0.0.0``, ``::``) is where the server listens, not an address
        to call: clients on the same machine use the loopback address instead.
        """
        if self.api_url.strip():
            return self.api_url.strip().rstrip("/")
        return f"http://{url_host(connectable(self.host))}:{self.port}"

    @property
    def agentkit_listen(self) -> tuple[str, int]:
        """(host, port) of ``AGENTKIT_API_URL``: where the stand-in AgentKit listens by default."""
        parts = urlsplit(self.agentkit_api_url.strip())
        host = parts.hostname or "127.0.0.1"
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return host, port


def connectable(host: str) -> str:
    """The address a local client dials for a server bound to ``host`` (wildcards → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
