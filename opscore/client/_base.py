"""What the synchronous and the asynchronous client share: routes, errors, retries, SSE parsing.

Pure code, no I/O: ``_async.py`` (the source) and ``_sync.py`` (generated from it by
``scripts/unasync.py``) do the sending. Nothing here imports the server: a program that only
talks to Ops-Core pays for httpx and pydantic, not for FastAPI or a database driver.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from opscore import __version__, errors

if TYPE_CHECKING:
    from opscore.config import Settings

F = TypeVar("F", bound=Callable[..., Any])

USER_AGENT = f"opscore-client/{__version__}"

# -- the routes (the server's path templates, placeholders named as its parameters) -----------

HEALTH = "/health"
READY = "/ready"
OPENAPI = "/openapi.json"
METRICS = "/metrics"
AGENTS = "/v1/opscore/agents"
AGENT = "/v1/opscore/agent/{agent_id}"
AGENT_STATE = "/v1/opscore/agent/{agent_id}/state"
AGENT_TRANSITIONS = "/v1/opscore/agent/{agent_id}/transitions"
AGENT_AUDIT = "/v1/opscore/agent/{agent_id}/audit"
AGENT_DIAGRAM = "/v1/opscore/agent/{agent_id}/diagram"
AGENT_WORKFLOW = "/v1/opscore/agent/{agent_id}/workflow"
STATE_REPORTS = "/v1/opscore/state-reports"
AUDIT = "/v1/opscore/audit"
AUDIT_VERIFY = "/v1/opscore/audit/verify"
AUDIT_STREAM = "/v1/opscore/audit/stream"
AUDIT_CHECKPOINTS = "/v1/opscore/audit/checkpoints"
AUDIT_HEADS = "/v1/opscore/audit/heads"
MACHINES = "/v1/opscore/machines"
MACHINE = "/v1/opscore/machines/{name}"
MACHINE_DIAGRAM = "/v1/opscore/machines/{name}/diagram"
DEFINITIONS = "/v1/opscore/workflow-definitions"
DEFINITION = "/v1/opscore/workflow-definitions/{definition_id}"
RUNS = "/v1/opscore/workflows"
RUN = "/v1/opscore/workflows/{session_id}"
RUN_TRANSITIONS = "/v1/opscore/workflows/{session_id}/transitions"
RUN_AUDIT = "/v1/opscore/workflows/{session_id}/audit"
RUN_DIAGRAM = "/v1/opscore/workflows/{session_id}/diagram"
TASK_DIAGRAM = "/v1/opscore/workflows/{session_id}/tasks/{task_id}/diagram"
WEBHOOK = "/v1/opscore/internal/agent/notify"


def route(method: str, path: str, *, transition: bool = False) -> Callable[[F], F]:
    """Mark a client method as the one for ``method path`` (a test checks every route has one).

    ``transition`` marks the calls that send an ``Idempotency-Key`` and retry on their own.
    """

    def mark(fn: F) -> F:
        fn.__opscore_route__ = (method, path, transition)  # type: ignore[attr-defined]
        return fn

    return mark


def settings_of(settings: Settings | None = None) -> tuple[str, str]:
    """(base URL, bearer key) from the one ``Settings``, as the CLI finds the server.

    ``OPSCORE_API_URL`` (else ``http://OPSCORE_HOST:OPSCORE_PORT``) and the secret of the first
    ``OPSCORE_API_KEY`` key, from the environment, then ``.env``. Imports ``opscore.config``
    (pydantic-settings) only when called.
    """
    from opscore.config import Settings, first_secret

    conf = settings if settings is not None else Settings()
    return conf.opscore_url, first_secret(conf.api_key)


def fill(template: str, **ids: str) -> str:
    """``template`` with each ``{name}`` replaced by its id, percent-encoded (``/`` included)."""
    for name, value in ids.items():
        template = template.replace("{" + name + "}", quote(value, safe=""))
    return template


def params(**values: Any) -> dict[str, Any]:
    """Query parameters without the ``None`` ones."""
    return {k: v for k, v in values.items() if v is not None}


def if_match_header(revision: int | None) -> dict[str, str]:
    return {} if revision is None else {"If-Match": f'"{revision}"'}


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# -- errors --------------------------------------------------------------------------------------


class ServerUnreachable(errors.Unavailable):
    """No answer from Ops-Core: the connection failed or broke (server down, wrong URL, timeout)."""

    code = "unreachable"


class UnexpectedResponse(errors.StorageError):
    """An answer that is not Ops-Core's (a proxy's HTML page, a truncated body).

    In the 500 family of the error tree (something broke that no input explains), so it has
    a row in the server's status table like every class of the tree.
    """

    code = "unexpected_response"


FALLBACK: dict[int, type[errors.OpsCoreError]] = {
    400: errors.Invalid,
    401: errors.Unauthorized,
    404: errors.NotFound,
    409: errors.Refused,
    412: errors.PreconditionFailed,
    413: errors.PayloadTooLarge,
    422: errors.Invalid,
    501: errors.RendererMissing,
    503: errors.Unavailable,
}
"""The class of an error whose ``code`` this client does not know (a newer server), by status."""


def error_from(response: httpx.Response) -> errors.OpsCoreError:
    """The exception of an error answer: the domain class of its ``code``, carrying its fields.

    ``opscore.errors.from_dict`` picks the class by ``code`` (``illegal_transition`` →
    :class:`~opscore.errors.IllegalTransition` with ``allowed``); a code it does not know gets
    the class of its HTTP status (:data:`FALLBACK`). The request id is added as a note.
    """
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("detail"), str) and isinstance(body.get("code"), str)):
        text = response.text.strip().replace("\n", " ")[:200]
        cls = FALLBACK.get(status, UnexpectedResponse if status < 500 else errors.StorageError)
        err: errors.OpsCoreError = cls(f"HTTP {status} from {response.request.url}: {text or 'no body'}")
    else:
        err = errors.from_dict(body)
        if type(err) is errors.OpsCoreError:
            fallback = FALLBACK.get(status, errors.StorageError if status >= 500 else errors.OpsCoreError)
            rebuilt = fallback.__new__(fallback)
            errors.OpsCoreError.__init__(rebuilt, err.detail, **err.extra)
            rebuilt.code = err.code  # type: ignore[misc]  # the server's code, kept as it came
            err = rebuilt
    request_id = response.headers.get("x-request-id")
    if request_id:
        err.add_note(f"request id {request_id} (HTTP {status})")
    return err


def unreachable(base_url: str, exc: httpx.HTTPError) -> ServerUnreachable:
    reason = str(exc) or type(exc).__name__
    return ServerUnreachable(f"cannot reach Ops-Core at {base_url}: {reason}", reason=type(exc).__name__)


# -- retries -------------------------------------------------------------------------------------

RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
"""Failures after which a transition may be sent again: its ``Idempotency-Key`` makes the
second sending return the first answer if the first one was applied after all."""


@dataclass(frozen=True, slots=True)
class Retry:
    """How transition calls retry: ``attempts`` more sendings, waits doubling from ``backoff`` s.

    Only transition calls retry (state reports, triggers, run transitions): they carry an
    ``Idempotency-Key``, so a request whose answer was lost is never applied twice. They retry
    on a connection that failed or broke, on 503 (storage unavailable, the server asks to
    retry) and on 409 ``idempotency_key_in_use`` (the first sending is still being applied).
    """

    attempts: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): jittered, or ``Retry-After``."""
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass
        base: float = min(self.max_backoff, self.backoff * 2.0**attempt)
        return base * (0.5 + random.random() / 2)  # jitter, not a secret


def should_retry(response: httpx.Response) -> bool:
    """An answer a transition call may retry after (the request was not applied, or is in flight)."""
    if response.status_code == 503:
        return True
    if response.status_code == 409:
        try:
            body = response.json()
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("code") == "idempotency_key_in_use"
    return False


# -- the registration webhook (what AgentKit sends; for stand-ins and tests) ---------------------


def signed_webhook(event_type: str, agent_details: Mapping[str, Any], secret: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a webhook signed as AgentKit signs it (DESIGN §2)."""
    body = json.dumps({"event_type": event_type, "agent_details": dict(agent_details)}).encode()
    stamp = str(int(time.time()))
    signature = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-AgentKit-Timestamp": stamp,
        "X-AgentKit-Signature": signature,
    }
    return body, headers


# -- server-sent events (DESIGN §10) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: ``id`` is the position after it (opaque), ``data`` its text."""

    event: str
    data: str
    id: str | None


class EventDecoder:
    """Server-sent events from lines, as the HTML standard parses them.

    ``feed`` takes one line (without its end) and returns the event a blank line completes.
    ``last_id`` is the position of the last *complete* event, even one without data (the
    server may say where "now" is before any record): an ``id:`` line whose event the
    connection cut before its blank line does not count, so resuming never skips it.
    """

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self.retry_ms: int | None = None
        self._id = last_id
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            self.last_id = self._id
            if not self._data:
                self._event = ""
                return None
            event = Event(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive ping
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def reset(self) -> None:
        """Forget a half-received event (its connection broke)."""
        self._id, self._event, self._data = self.last_id, "", []
