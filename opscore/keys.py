"""API keys and what each may do (DESIGN §9): scopes, agent globs, hashed secrets.

Two sources, one kind of key:

- ``OPSCORE_API_KEY`` (``secret`` or ``name:secret``, comma separated, see
  :func:`opscore.config.parse_api_keys`): each of those keys holds every scope;
- ``OPSCORE_KEYS_FILE``, a JSON or YAML list of ``{"name", "sha256", "scopes", "agents"}``:
  the secret itself is never stored, only its SHA-256.

Scopes: ``report`` (state reports, single and batch, and agent registration; only for agent
ids matching ``agents`` when globs are given, and reading those agents back), ``read`` (every
GET), ``operate`` (operator triggers, workflow definitions, starting and moving runs; implies
``read``), ``admin`` (everything). A presented key is hashed once and compared with every
key's digest in constant time (:func:`match`), so neither the answer nor its timing says
which key, if any, came close.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml


class Scope(StrEnum):
    REPORT = "report"
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"


IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.REPORT: frozenset({Scope.REPORT}),
    Scope.READ: frozenset({Scope.READ}),
    Scope.OPERATE: frozenset({Scope.OPERATE, Scope.READ}),
    Scope.ADMIN: frozenset(Scope),
}
"""What holding a scope gives: ``operate`` reads too, ``admin`` everything."""

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class InvalidApiKeys(ValueError):
    """A key Ops-Core refuses to start with; the message never quotes a secret."""


class InvalidKeysFile(InvalidApiKeys):
    """``OPSCORE_KEYS_FILE`` cannot be used; the message names the entry and the rule."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted key: its name (audit ``actor: key:<name>``), its secret's SHA-256, its powers."""

    name: str
    digest: bytes
    scopes: frozenset[Scope] = IMPLIED[Scope.ADMIN]
    """Every scope the key holds, implied ones included."""
    agents: tuple[str, ...] | None = None
    """Globs of the agent ids a ``report`` key may report for; ``None``: any agent."""

    def holds(self, scope: Scope) -> bool:
        return scope in self.scopes

    def may_report_for(self, agent_id: str) -> bool:
        """Whether this key may report (and register) for ``agent_id``."""
        if Scope.REPORT not in self.scopes:
            return False
        return self.agents is None or Scope.ADMIN in self.scopes or any(fnmatchcase(agent_id, g) for g in self.agents)

    def may_read_agent(self, agent_id: str) -> bool:
        """``read`` reads every agent; a ``report`` key reads back the agents it reports for."""
        return Scope.READ in self.scopes or self.may_report_for(agent_id)

    def describe(self) -> str:
        """The key's powers in words, for a 403's detail (never its secret or hash)."""
        listed = ", ".join(s.value for s in Scope if s in self.scopes)
        where = "" if self.agents is None else f" (agents {', '.join(self.agents)})"
        return f"key {self.name!r} holds {listed}{where}"


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def match(keys: Iterable[ApiKey], presented: bytes) -> ApiKey | None:
    """The key whose secret is ``presented``: one hash, then a constant-time compare with every key."""
    wanted = digest(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(key.digest, wanted):
            found = key
    return found


def expand(scopes: Iterable[Scope]) -> frozenset[Scope]:
    held: set[Scope] = set()
    for scope in scopes:
        held |= IMPLIED[scope]
    return frozenset(held)


def parse_entries(entries: Any, source: str = "OPSCORE_KEYS_FILE") -> tuple[ApiKey, ...]:
    """Keys from the file's entries; :class:`InvalidKeysFile` naming the entry and rule otherwise."""
    if not isinstance(entries, list):
        raise InvalidKeysFile(f"{source}: expected a list of keys, got {type(entries).__name__}")
    keys: list[ApiKey] = []
    names: set[str] = set()
    for n, entry in enumerate(entries, start=1):
        where = f"{source}: entry #{n}"
        if not isinstance(entry, dict):
            raise InvalidKeysFile(f"{where} is not an object")
        unknown = set(entry) - {"name", "sha256", "scopes", "agents"}
        if unknown:
            raise InvalidKeysFile(f"{where} has unknown fields {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidKeysFile(f"{where}: name must be a letter then up to 31 letters, digits, '_', '.', '-'")
        where = f"{source}: key {name!r}"
        if name in names:
            raise InvalidKeysFile(f"{where} is listed twice")
        names.add(name)
        hashed = entry.get("sha256")
        if isinstance(hashed, (int, float)):
            raise InvalidKeysFile(f"{where}: sha256 must be quoted (YAML read its digits as a number)")
        if not isinstance(hashed, str) or not _HEX64.match(hashed.lower()):
            raise InvalidKeysFile(f"{where}: sha256 must be the 64 hex digits of the secret's SHA-256")
        raw_scopes = entry.get("scopes")
        if not isinstance(raw_scopes, list) or not raw_scopes:
            raise InvalidKeysFile(f"{where}: scopes must be a non-empty list of {', '.join(Scope)}")
        try:
            scopes = expand(Scope(s) for s in raw_scopes)
        except ValueError as exc:
            raise InvalidKeysFile(f"{where}: unknown scope in {raw_scopes}; scopes are {', '.join(Scope)}") from exc
        agents = entry.get("agents")
        if agents is not None and (
            not isinstance(agents, list) or not agents or not all(isinstance(g, str) and g for g in agents)
        ):
            raise InvalidKeysFile(f"{where}: agents must be a non-empty list of globs such as 'summariser-*'")
        keys.append(
            ApiKey(
                name=name,
                digest=bytes.fromhex(hashed.lower()),
                scopes=scopes,
                agents=None if agents is None else tuple(agents),
            )
        )
    return tuple(keys)


def load_keys_file(path: str) -> tuple[ApiKey, ...]:
    """``OPSCORE_KEYS_FILE``: JSON, or YAML (a superset of JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidKeysFile(f"OPSCORE_KEYS_FILE {path!r} cannot be read: {exc.strerror}") from exc
    try:
        entries = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidKeysFile(f"OPSCORE_KEYS_FILE {path!r} is neither JSON nor YAML: {exc}") from exc
    return parse_entries(entries if entries is not None else [])


def new_key(name: str, scopes: Iterable[str], agents: Iterable[str] = ()) -> tuple[str, dict[str, Any]]:
    """A fresh secret (to show once) and the entry to add to ``OPSCORE_KEYS_FILE`` (its hash only)."""
    secret = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {
        "name": name,
        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "scopes": list(dict.fromkeys(scopes)),
    }
    globs = list(agents)
    if globs:
        entry["agents"] = globs
    parse_entries([entry], "the new key")  # the same rules as the file's
    return secret, entry
