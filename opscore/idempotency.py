"""``Idempotency-Key``: a retried request gets the first answer, never a second transition.

The first answer is saved in the same atomic write as the change it answers (the store fills
in the id of the record written with it), so an answer exists exactly when its effect does.
Answers are the engine's own (:meth:`TransitionResult.answer`, or the refusal's fields), not
HTTP: the API renders a replay as it renders any result or error. Requests with one key are
serialised in this process; across replicas the key's primary key in the store decides
(:class:`~opscore.errors.IdempotencyKeyInUse`), and the loser replays the winner's answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opscore.errors import IdempotencyKeyInUse, IdempotencyKeyReused, OpsCoreError, from_dict
from opscore.locks import KeyedLocks
from opscore.models import IdempotencyEntry, TransitionResult, answer
from opscore.storage.base import Store

ANSWERED = 200
"""The ``status`` saved with an answer; a refusal is saved with ``REFUSED``."""
REFUSED = 0
"""Entries written before answers were the engine's own hold an HTTP status >= 400 instead."""


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An ``Idempotency-Key`` of one caller (``scope``), with the fingerprint of its request."""

    scope: str
    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Replay:
    """A saved first answer returned for a repeated ``Idempotency-Key``."""

    status: int
    body: dict[str, Any]


def entry(
    idem: Idempotency,
    entity_type: str,
    entity_id: str,
    state: str,
    previous: str,
    changed: bool,
    revision: int,
    refusal: OpsCoreError | None,
) -> IdempotencyEntry:
    """The answer this request will get, to be saved with its effect (the store adds ``auditId``)."""
    if refusal is not None:
        return IdempotencyEntry(idem.scope, idem.key, idem.fingerprint, REFUSED, {**refusal.to_dict(), "auditId": None})
    body = answer(entity_type, entity_id, state, previous, changed, revision, None)
    return IdempotencyEntry(idem.scope, idem.key, idem.fingerprint, ANSWERED, body)


def replay(stored: IdempotencyEntry, idem: Idempotency) -> Replay:
    """The saved answer, or the saved refusal raised again; 422 when the key came with another request."""
    if stored.fingerprint != idem.fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was first used with a different request; use a new key for a new request"
        )
    if stored.status == REFUSED or stored.status >= 400:
        raise from_dict(stored.body)
    return Replay(stored.status, stored.body)


Outcome = TransitionResult | Replay | OpsCoreError


class Keys:
    """Runs a request under its key: the saved answer if there is one, else the request once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._locks = KeyedLocks()

    async def run(self, idem: Idempotency, attempt: Callable[[], Awaitable[Outcome]]) -> Outcome:
        try:
            async with self._locks.hold((idem.scope, idem.key)):
                stored = await self.store.get_idempotency(idem.scope, idem.key)
                if stored is not None:
                    return replay(stored, idem)
                outcome = await attempt()
                if isinstance(outcome, IdempotencyKeyInUse):  # another replica saved an answer first
                    stored = await self.store.get_idempotency(idem.scope, idem.key)
                    if stored is not None:
                        return replay(stored, idem)
                return outcome
        except OpsCoreError as exc:  # a saved refusal, or the key reused for another request
            return exc
