"""The one exception tree of Ops-Core.

Domain code raises these; ``api/errors.py`` maps each class to one HTTP status and the
``code`` below, so every error reaches a client as ``{"detail", "code", ...extra}``::

    OpsCoreError
    ├── NotFound                  404
    │   ├── UnknownEntity         unknown_agent / unknown_workflow / unknown_entity
    │   ├── UnknownMachine        unknown_machine
    │   └── NotYetCreated         not_yet_created    (asked about a moment before the entity existed)
    ├── Invalid                   422
    │   ├── UnknownState          unknown_state      (valid states listed)
    │   ├── UnknownTrigger        unknown_trigger    (valid triggers listed)
    │   ├── InvalidDefinition     invalid_definition (every problem listed)
    │   ├── IdempotencyKeyReused  idempotency_key_reused
    │   ├── TimestampInFuture     timestamp_in_future (recorded as a rejection; DESIGN §3)
    │   ├── InvalidTimestamp      invalid_timestamp
    │   └── UnacceptableInput     client data no JSON output could hold again (opscore.inputs)
    │       ├── NestedTooDeep     too_deep
    │       ├── NonFiniteNumber   non_finite_number  (NaN, ±Infinity, 1e400)
    │       ├── LoneSurrogate     lone_surrogate
    │       ├── NulCharacter      nul_character
    │       └── InvalidId         invalid_id         (control characters, '/', U+FFFD, length)
    ├── Refused                   409
    │   ├── IllegalTransition     illegal_transition (from, to, allowed)
    │   ├── StaleReport           stale_report
    │   └── Conflict              conflict
    │       └── IdempotencyKeyInUse   idempotency_key_in_use (another request with this key is being applied)
    ├── PreconditionFailed        412 revision_mismatch (If-Match did not hold)
    ├── RevisionConflict          the store's compare-and-set lost; the engine retries it
    ├── Unauthorized              401
    ├── Forbidden                 403 forbidden (the key lacks the scope, or the agent is outside its globs)
    ├── PayloadTooLarge           413 payload_too_large
    ├── RendererMissing           501 renderer_missing (SVG without Graphviz's dot; detail says what to install)
    ├── Unavailable               503 (storage unreachable)
    └── StorageError              500: something broke that no input explains

Every error carries ``detail`` (a sentence for people) and ``extra`` (fields for programs).
"""

from __future__ import annotations

from typing import Any, ClassVar


class OpsCoreError(Exception):
    """Base class: ``code`` is machine readable, ``detail`` human readable."""

    code: ClassVar[str] = "error"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON body clients get (without the HTTP status)."""
        return {"detail": self.detail, "code": self.code, **self.extra}


class NotFound(OpsCoreError):
    code = "not_found"


class UnknownEntity(NotFound):
    code = "unknown_entity"

    def __init__(self, entity_type: str, entity_id: str) -> None:
        super().__init__(f"no {entity_type} with id {entity_id!r}", code=f"unknown_{entity_type}")
        self.entity_type = entity_type
        self.entity_id = entity_id


class UnknownMachine(NotFound):
    code = "unknown_machine"

    @property
    def valid(self) -> list[str]:
        """The machines there are."""
        return list(self.extra.get("valid") or [])


class NotYetCreated(NotFound):
    code = "not_yet_created"


class Invalid(OpsCoreError):
    code = "validation_error"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """``validation_error``: one ``{"loc", "msg", "type"}`` per problem (empty for other codes)."""
        return list(self.extra.get("errors") or [])


class UnknownState(Invalid):
    code = "unknown_state"

    @property
    def valid(self) -> list[str]:
        """The states of the machine."""
        return list(self.extra.get("valid") or [])


class UnknownTrigger(Invalid):
    code = "unknown_trigger"

    @property
    def valid(self) -> list[str]:
        """The triggers of the machine."""
        return list(self.extra.get("valid") or [])


class InvalidDefinition(Invalid):
    code = "invalid_definition"

    @property
    def problems(self) -> list[Any]:
        """Every problem of the definition at once."""
        return list(self.extra.get("problems") or [])


class IdempotencyKeyReused(Invalid):
    code = "idempotency_key_reused"


class TimestampInFuture(Invalid):
    """A report dated beyond the server's clock plus ``OPSCORE_MAX_CLOCK_SKEW_SECONDS``."""

    code = "timestamp_in_future"


class InvalidTimestamp(Invalid):
    code = "invalid_timestamp"


class UnacceptableInput(Invalid):
    """Client data that no JSON output could hold again (see :mod:`opscore.inputs`)."""

    code = "unacceptable_input"


class NestedTooDeep(UnacceptableInput):
    code = "too_deep"


class NonFiniteNumber(UnacceptableInput):
    code = "non_finite_number"


class LoneSurrogate(UnacceptableInput):
    code = "lone_surrogate"


class NulCharacter(UnacceptableInput):
    code = "nul_character"


class InvalidId(UnacceptableInput):
    code = "invalid_id"


class Refused(OpsCoreError):
    code = "conflict"


class _FromTo(Refused):
    """A refusal that names the state it started from (``from`` is a keyword in Python)."""

    def __init__(self, detail: str, *, source: str, to: str | None, **extra: Any) -> None:
        super().__init__(detail, **{"from": source, "to": to}, **extra)

    # Read from ``extra`` (the body's fields), so an error rebuilt by :func:`from_dict` has them too.
    @property
    def source(self) -> str | None:
        """The state the entity was in (``from`` in the body)."""
        value = self.extra.get("from")
        return value if isinstance(value, str) else None

    @property
    def to(self) -> str | None:
        """The state asked for (``None`` when a trigger was asked for by name)."""
        value = self.extra.get("to")
        return value if isinstance(value, str) else None

    @property
    def allowed(self) -> list[str]:
        """The states reachable from :attr:`source` now."""
        return list(self.extra.get("allowed") or [])


class IllegalTransition(_FromTo):
    code = "illegal_transition"


class StaleReport(_FromTo):
    code = "stale_report"


class Conflict(Refused):
    code = "conflict"


class IdempotencyKeyInUse(Conflict):
    code = "idempotency_key_in_use"


class PreconditionFailed(OpsCoreError):
    code = "revision_mismatch"

    @property
    def revision(self) -> int | None:
        """The entity's current revision (its ``ETag``), when known."""
        value = self.extra.get("revision")
        return value if isinstance(value, int) else None


class RevisionConflict(OpsCoreError):
    """The store's compare-and-set found another revision than the one the decision was based on."""

    code = "revision_conflict"


class Unauthorized(OpsCoreError):
    code = "unauthorized"


class Forbidden(OpsCoreError):
    """A valid key without the scope a request needs (DESIGN §9); nothing changed, nothing recorded."""

    code = "forbidden"


class PayloadTooLarge(OpsCoreError):
    code = "payload_too_large"


class RendererMissing(OpsCoreError):
    """A diagram format whose renderer is not installed on this host (SVG needs Graphviz's ``dot``)."""

    code = "renderer_missing"


class Unavailable(OpsCoreError):
    code = "unavailable"


class StorageError(OpsCoreError):
    code = "storage_error"


_BY_CODE: dict[str, type[OpsCoreError]] = {}


def _register(cls: type[OpsCoreError]) -> None:
    _BY_CODE[cls.code] = cls  # a subclass sharing its parent's code (Conflict, Refused) wins: the more exact class
    for sub in cls.__subclasses__():
        _register(sub)


def from_dict(body: dict[str, Any]) -> OpsCoreError:
    """Rebuild an error from :meth:`OpsCoreError.to_dict` (idempotent replays answer the stored error)."""
    body = dict(body)
    detail = body.pop("detail")
    code = body.pop("code")
    if not _BY_CODE:
        _register(OpsCoreError)
    cls = _BY_CODE.get(code, OpsCoreError)
    if code.startswith("unknown_") and cls is OpsCoreError:
        cls = UnknownEntity
    err = OpsCoreError.__new__(cls)
    OpsCoreError.__init__(err, detail, code=code, **body)
    return err  # built without the subclass __init__: the stored body already has every field
