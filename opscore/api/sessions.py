"""The console's sign-in: a signed, expiring session cookie that stands for an API key (DESIGN §13).

Signing in with a key sets ``opscore_session``: ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), ``Secure`` over HTTPS, ``Path=/``. The
key itself never leaves the sign-in form's body: not in a URL, not in browser storage, not in
the cookie. The cookie holds ``{key name, session id, expiry, key fingerprint}`` and an
HMAC-SHA256 over it, so **any replica verifies it without shared state**: the MAC key is
``OPSCORE_SESSION_SECRET`` when set, else derived from ``OPSCORE_API_KEY`` (secrets every
replica holds, never the keys file's hashes, which are not secret enough to sign with). The
fingerprint binds the session to the key's current secret: rotating that key ends its sessions.

A request carrying the cookie instead of ``Authorization`` is the key's request, scopes and
all (``deps.caller`` asks :func:`authenticate`). Every unsafe method (anything but GET, HEAD,
OPTIONS) must also carry ``X-CSRF-Token``, a per-session token the console's pages hold: a
cross-site form can neither read it nor set the header (and SameSite=Strict keeps the cookie
away from it anyway). 403 ``csrf_failed`` otherwise.

Signing out clears the cookie and revokes its session id on the replica that served the
sign-out. What remains, without shared state: a copy of the cookie taken before sign-out
stays valid on *other* replicas until it expires (``OPSCORE_SESSION_SECONDS``, 8 h by
default); changing ``OPSCORE_SESSION_SECRET`` (or the key) ends every session everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from opscore.config import Settings
from opscore.errors import CsrfFailed, Unauthorized
from opscore.keys import ApiKey, Scope

COOKIE = "opscore_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_REVOKED = 100_000
"""Session ids one replica remembers as signed out (each only until it would have expired anyway)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_material(key: ApiKey) -> bytes:
    """What the server holds of a key (its secret's digest) and its powers: sessions are bound to both."""
    powers = ",".join(sorted(key.scopes)) + "|" + ",".join(key.agents or ())
    return key.digest + b"|" + powers.encode()


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session: which key it stands for, its id, when it ends."""

    key: ApiKey
    sid: str
    expires: int


class Sessions:
    """Issues and verifies session cookies for one app; built once from ``Settings`` in the lifespan."""

    def __init__(self, secret: bytes, keys: tuple[ApiKey, ...], seconds: float) -> None:
        self._mac_key = hmac.new(b"opscore-console-session-v1", secret, hashlib.sha256).digest()
        self._keys = {key.name: key for key in keys}
        self.seconds = seconds
        self._revoked: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings, keys: tuple[ApiKey, ...]) -> Sessions:
        secret = settings.session_secret.strip()
        if not secret:  # every replica holds the same OPSCORE_API_KEY: the order of its keys does not matter
            secret = "\n".join(sorted(p.strip() for p in settings.api_key.split(",") if p.strip()))
        return cls(secret.encode(), keys, settings.session_seconds)

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._mac_key, b"\x00".join(parts), hashlib.sha256).digest()

    def _fingerprint(self, key: ApiKey) -> str:
        return _b64(self._mac(b"key", key.name.encode(), key_material(key))[:12])

    def issue(self, key: ApiKey) -> tuple[str, Session]:
        """A new session for ``key``: the cookie's value, and the session it stands for.

        The expiry is a whole second, rounded up: a session lasts at least ``seconds`` (rounding
        down cut up to a second off, so a 1-second session could end before its first use).
        """
        expires = math.ceil(time.time() + self.seconds)
        sid = secrets.token_urlsafe(12)
        payload = json.dumps(
            {"k": key.name, "s": sid, "e": expires, "f": self._fingerprint(key)}, separators=(",", ":")
        ).encode()
        value = _b64(payload) + "." + _b64(self._mac(b"session", payload))
        return value, Session(key, sid, expires)

    def read(self, value: str) -> Session | None:
        """The session a cookie value stands for; ``None`` when forged, expired, signed out or its key changed."""
        head, dot, tail = value.partition(".")
        if not dot or len(value) > 1024:
            return None
        try:
            payload, mac = _unb64(head), _unb64(tail)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._mac(b"session", payload)):
            return None
        try:
            data = json.loads(payload)
            name, sid, expires, fingerprint = str(data["k"]), str(data["s"]), int(data["e"]), str(data["f"])
        except (ValueError, KeyError, TypeError):
            return None
        key = self._keys.get(name)
        if key is None or expires <= time.time() or sid in self._revoked:
            return None
        if not hmac.compare_digest(fingerprint, self._fingerprint(key)):
            return None
        return Session(key, sid, expires)

    def csrf_token(self, session: Session) -> str:
        """The token unsafe requests of this session carry in ``X-CSRF-Token``."""
        return _b64(self._mac(b"csrf", session.sid.encode())[:18])

    def check_csrf(self, session: Session, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token(session).encode())

    def revoke(self, session: Session) -> None:
        """Refuse this session id from now on (on this replica; see the module's docstring)."""
        now = time.time()
        if len(self._revoked) >= MAX_REVOKED:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        if len(self._revoked) < MAX_REVOKED:
            self._revoked[session.sid] = session.expires


def cookie_max_age(session: Session) -> int:
    """The cookie's ``Max-Age``: from the whole second it is sent in to the session's expiry.

    Counted from ``seconds`` alone, a client that keeps time in whole seconds (Python's
    ``http.cookiejar`` does) adds it to the second it truncated ``now`` to, and drops a
    1-second cookie as soon as that second ends, however early in it the cookie arrived,
    while the server would still accept it. At worst a browser keeps the cookie a second past
    the session's end, when the server refuses it anyway.
    """
    return max(0, session.expires - int(time.time()))


def current(request: Request) -> Session | None:
    """The request's valid session, if its cookie holds one."""
    value = request.cookies.get(COOKIE)
    if value is None:
        return None
    sessions: Sessions = request.app.state.sessions
    return sessions.read(value)


def authenticate(request: Request) -> ApiKey:
    """The key a session cookie stands for (``deps.caller``'s hook); 401 or 403 ``csrf_failed`` otherwise."""
    session = current(request)
    if session is None:
        request.scope["opscore.denied"] = "invalid_session"
        raise Unauthorized("the console session is not valid (expired, signed out, or its key changed): sign in again")
    if request.method not in SAFE_METHODS:
        sessions: Sessions = request.app.state.sessions
        if not sessions.check_csrf(session, request.headers.get(CSRF_HEADER)):
            request.scope["opscore.denied"] = "csrf"
            raise CsrfFailed
    return session.key


def may_operate(key: ApiKey) -> bool:
    """Whether this key may operate (run transitions, triggers): the console shows action buttons only then."""
    return key.holds(Scope.OPERATE)
