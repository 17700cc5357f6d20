"""Settings: the environment first, then ``.env``, then defaults (DESIGN §7 fixes the names).

Built in the app's lifespan or the CLI, never at import, so tests build their own with
``Settings(database_url=...)``. There is no default API key: a service that anyone who read
the README could call would not keep anything honest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_NAMED = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]{0,31}):(.+)$")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted bearer key and the name audit records show for it (``actor: key:<name>``)."""

    name: str
    secret: bytes


def parse_api_keys(raw: str) -> tuple[ApiKey, ...]:
    """``secret`` or ``name:secret``, comma separated (several keys allow rotation).

    An unnamed key is named by the first 8 hex digits of its SHA-256, so an audit record
    tells keys apart without revealing them.
    """
    keys = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        match = _NAMED.match(part)
        name, secret = (match.group(1), match.group(2)) if match else (None, part)
        name = name or hashlib.sha256(secret.encode()).hexdigest()[:8]
        keys.append(ApiKey(name, secret.encode()))
    return tuple(keys)


class Settings(BaseSettings):
    """Every setting of Ops-Core; the environment variable of each is in its alias."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    api_key: str = Field(default="", validation_alias=AliasChoices("OPSCORE_API_KEY", "api_key"), repr=False)
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
    max_body_bytes: int = Field(
        default=1024 * 1024, validation_alias=AliasChoices("OPSCORE_MAX_BODY_BYTES", "max_body_bytes")
    )
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

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("OPSCORE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @property
    def api_keys(self) -> tuple[ApiKey, ...]:
        return parse_api_keys(self.api_key)

    @property
    def webhook_secrets(self) -> tuple[bytes, ...]:
        return tuple(s.strip().encode() for s in self.webhook_secret.split(",") if s.strip())


def match_key(keys: tuple[ApiKey, ...], presented: bytes) -> ApiKey | None:
    """The key equal to ``presented``, compared in constant time against every key."""
    found = None
    for key in keys:
        if hmac.compare_digest(key.secret, presented):
            found = key
    return found
