"""The one exception tree of Ops-Core: one class per ``code``.

Domain code raises these; ``api/errors.py`` maps each family to one HTTP status, so every
error reaches a client as ``{"detail", "code", ...extra}``::

    OpsCoreError
    ├── NotFound                      404 not_found
    │   ├── UnknownEntity             unknown_entity
    │   │   ├── UnknownAgent          unknown_agent
    │   │   ├── UnknownWorkflow       unknown_workflow        (a run)
    │   │   └── UnknownTask           unknown_task
    │   ├── UnknownDefinition         unknown_workflow_definition
    │   ├── UnknownMachine            unknown_machine
    │   └── NotYetCreated             not_yet_created         (a moment before the entity existed)
    ├── Invalid                       422 validation_error
    │   ├── UnknownState              unknown_state           (valid states listed)
    │   ├── UnknownTrigger            unknown_trigger         (valid triggers listed)
    │   ├── InvalidDefinition         invalid_definition      (every problem listed)
    │   ├── IdempotencyKeyReused      idempotency_key_reused
    │   ├── TimestampInFuture         timestamp_in_future     (recorded as a rejection; DESIGN §3)
    │   ├── InvalidTimestamp          invalid_timestamp
    │   ├── InvalidTime               invalid_time            (a query's at/since/until)
    │   ├── InvalidCursor             invalid_cursor
    │   ├── InvalidPosition           invalid_position        (a stream position)
    │   ├── InvalidIfMatch            invalid_if_match
    │   ├── InvalidIdempotencyKey     invalid_idempotency_key
    │   ├── AgentIdMismatch           agent_id_mismatch
    │   ├── UnsupportedHeader         unsupported_header
    │   ├── Unstorable                unstorable_value
    │   └── UnacceptableInput         unacceptable_input      (opscore.inputs)
    │       ├── NestedTooDeep         too_deep
    │       ├── NonFiniteNumber       non_finite_number       (NaN, ±Infinity, 1e400)
    │       ├── LoneSurrogate         lone_surrogate
    │       ├── NulCharacter          nul_character
    │       └── InvalidId             invalid_id              (control characters, '/', U+FFFD, length)
    ├── Refused                       409
    │   ├── IllegalTransition         illegal_transition      (from, to, allowed)
    │   ├── StaleReport               stale_report
    │   ├── RevisionConflict          revision_conflict       (a compare-and-set lost; the engine retries it)
    │   └── Conflict                  conflict
    │       ├── IdempotencyKeyInUse   idempotency_key_in_use
    │       └── DefinitionExists      definition_exists       (an id+version is immutable)
    ├── PreconditionFailed            412 revision_mismatch   (If-Match did not hold)
    ├── Unauthorized                  401 unauthorized
    │   ├── BadSignature              bad_signature           (the webhook's HMAC)
    │   ├── BadTimestamp              bad_timestamp
    │   ├── StaleTimestamp            stale_timestamp
    │   ├── Replayed                  replayed
    │   └── WebhookDisabled           webhook_disabled
    ├── Forbidden                     403 forbidden           (a scope missing, an agent outside the globs)
    ├── PayloadTooLarge               413 payload_too_large
    ├── RendererMissing               501 renderer_missing    (SVG without Graphviz's dot)
    ├── Unavailable                   503 unavailable         (storage unreachable)
    │   └── CommitOutcomeUnknown      commit_outcome_unknown
    └── StorageError                  500 storage_error       (something broke that no input explains)
        ├── NoApiKey                  no_api_key              (start-up)
        ├── DatabaseInUse             database_in_use
        ├── NotOpsCore                not_opscore
        ├── NoSchema                  no_schema
        ├── SchemaTooNew              schema_too_new
        └── SchemaMismatch            schema_mismatch

Every error carries ``detail`` (a sentence for people; a class with a standing sentence
gives it as ``message``) and ``extra`` (fields for programs).
"""

from __future__ import annotations

from typing import Any, ClassVar


class OpsCoreError(Exception):
    """Base class: ``code`` is machine readable, ``detail`` human readable."""

    code: ClassVar[str] = "error"
    message: ClassVar[str] = "Ops-Core could not do this"
    """The detail when none is given (a sentence said the same way everywhere)."""

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        detail = self.message if detail is None else detail
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON body clients get (without the HTTP status)."""
        return {"detail": self.detail, "code": self.code, **self.extra}


# -- 404 --------------------------------------------------------------------------------------------


class NotFound(OpsCoreError):
    code = "not_found"


class UnknownEntity(NotFound):
    """No entity with that id; ``UnknownEntity(type, id)`` is an :class:`UnknownAgent`, :class:`UnknownWorkflow`..."""

    code = "unknown_entity"
    entity_type: str
    entity_id: str

    def __new__(cls, entity_type: str, entity_id: str) -> UnknownEntity:
        if cls is UnknownEntity:
            cls = _UNKNOWN.get(entity_type, UnknownEntity)
        return super().__new__(cls, entity_type, entity_id)

    def __init__(self, entity_type: str, entity_id: str) -> None:
        super().__init__(f"no {entity_type} with id {entity_id!r}")
        self.entity_type = entity_type
        self.entity_id = entity_id


class UnknownAgent(UnknownEntity):
    code = "unknown_agent"


class UnknownWorkflow(UnknownEntity):
    code = "unknown_workflow"


class UnknownTask(UnknownEntity):
    code = "unknown_task"


_UNKNOWN: dict[str, type[UnknownEntity]] = {"agent": UnknownAgent, "workflow": UnknownWorkflow, "task": UnknownTask}


class UnknownDefinition(NotFound):
    code = "unknown_workflow_definition"


class UnknownMachine(NotFound):
    code = "unknown_machine"

    @property
    def valid(self) -> list[str]:
        """The machines there are."""
        return list(self.extra.get("valid") or [])


class NotYetCreated(NotFound):
    code = "not_yet_created"


# -- 422 --------------------------------------------------------------------------------------------


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
    message = "this Idempotency-Key was first used with a different request; use a new key for a new request"


class TimestampInFuture(Invalid):
    """A report dated beyond the server's clock plus ``OPSCORE_MAX_CLOCK_SKEW_SECONDS``."""

    code = "timestamp_in_future"


class InvalidTimestamp(Invalid):
    code = "invalid_timestamp"


class InvalidTime(Invalid):
    code = "invalid_time"


class InvalidCursor(Invalid):
    code = "invalid_cursor"
    message = "cursor is not a cursor this server handed out"


class InvalidPosition(Invalid):
    code = "invalid_position"
    message = "not a stream position this server handed out"


class InvalidIfMatch(Invalid):
    code = "invalid_if_match"


class InvalidIdempotencyKey(Invalid):
    code = "invalid_idempotency_key"
    message = "Idempotency-Key must be 1 to 255 characters"


class AgentIdMismatch(Invalid):
    code = "agent_id_mismatch"


class UnsupportedHeader(Invalid):
    code = "unsupported_header"


class Unstorable(Invalid):
    code = "unstorable_value"


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


# -- 409 --------------------------------------------------------------------------------------------


class Refused(OpsCoreError):
    """The family of 409s (never raised itself)."""

    code = "refused"


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


class RevisionConflict(Refused):
    """The store's compare-and-set found another revision than the one the decision was based on."""

    code = "revision_conflict"


class Conflict(Refused):
    code = "conflict"


class IdempotencyKeyInUse(Conflict):
    code = "idempotency_key_in_use"
    message = "this Idempotency-Key is already in use"


class DefinitionExists(Conflict):
    code = "definition_exists"

    def __init__(self, definition_id: str, version: str) -> None:
        super().__init__(
            f"definition {definition_id!r} version {version!r} is stored with another body; "
            "a stored version is immutable: publish a new version"
        )


# -- the rest ---------------------------------------------------------------------------------------


class PreconditionFailed(OpsCoreError):
    code = "revision_mismatch"

    @property
    def revision(self) -> int | None:
        """The entity's current revision (its ``ETag``), when known."""
        value = self.extra.get("revision")
        return value if isinstance(value, int) else None


class Unauthorized(OpsCoreError):
    code = "unauthorized"


class BadSignature(Unauthorized):
    code = "bad_signature"


class BadTimestamp(Unauthorized):
    code = "bad_timestamp"


class StaleTimestamp(Unauthorized):
    code = "stale_timestamp"


class Replayed(Unauthorized):
    code = "replayed"
    message = "this signature was already used: replay refused"


class WebhookDisabled(Unauthorized):
    code = "webhook_disabled"
    message = "the webhook is disabled: OPSCORE_WEBHOOK_SECRET is not set"


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


class CommitOutcomeUnknown(Unavailable):
    code = "commit_outcome_unknown"


class StorageError(OpsCoreError):
    code = "storage_error"


class NoApiKey(StorageError):
    code = "no_api_key"


class DatabaseInUse(StorageError):
    code = "database_in_use"


class NotOpsCore(StorageError):
    code = "not_opscore"


class NoSchema(StorageError):
    code = "no_schema"


class SchemaTooNew(StorageError):
    code = "schema_too_new"


class SchemaMismatch(StorageError):
    code = "schema_mismatch"


def every_class() -> list[type[OpsCoreError]]:
    """The whole tree, depth first (the error table's test walks it)."""
    found: list[type[OpsCoreError]] = []
    stack: list[type[OpsCoreError]] = [OpsCoreError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return found


def by_code() -> dict[str, type[OpsCoreError]]:
    """Each code's class (a code names one class; ``_FromTo`` and bases shared with a child defer to the first)."""
    table: dict[str, type[OpsCoreError]] = {}
    for cls in every_class():
        table.setdefault(cls.code, cls)
    return table


def from_dict(body: dict[str, Any]) -> OpsCoreError:
    """Rebuild an error from :meth:`OpsCoreError.to_dict` (idempotent replays answer the stored error)."""
    body = dict(body)
    detail = body.pop("detail")
    code = body.pop("code")
    cls = by_code().get(code, OpsCoreError)
    err = OpsCoreError.__new__(cls)
    OpsCoreError.__init__(err, detail, **body)
    if cls is OpsCoreError:
        err.code = code  # type: ignore[misc]  # a code from elsewhere, kept as it came
    return err  # built without the subclass __init__: the stored body already has every field
