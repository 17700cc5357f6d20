"""MemoryStore: a real implementation of the port that keeps everything in dicts.

For unit tests and throw-away experiments only; ``open_store`` never picks it silently
(it takes ``memory://``). Writes are atomic because nothing awaits inside :meth:`apply`.
"""

from __future__ import annotations

import time
from typing import Any

from opscore import audit
from opscore.errors import DefinitionExists, IdempotencyKeyInUse
from opscore.models import AuditQuery, Change, Committed, Entity, EntityQuery, IdempotencyEntry, Timer
from opscore.storage.base import IDEMPOTENCY_TTL, Store, next_entity, stored_answer, utc_now
from opscore.storage.rows import check_labels, label_value


def matches(record: dict[str, Any], query: AuditQuery) -> bool:
    """Whether a record passes the filters of ``query`` (not its cursor or limit)."""
    if query.entity_type is not None and record["entityType"] != query.entity_type:
        return False
    if query.entity_id is not None and record["entityId"] != query.entity_id:
        return False
    if query.entity_ids is not None and record["entityId"] not in query.entity_ids:
        return False
    if query.entity_types is not None and record["entityType"] not in query.entity_types:
        return False
    if query.outcome is not None and record["outcome"] != query.outcome:
        return False
    if query.since is not None and record["recordedAt"] < query.since:
        return False
    return query.until is None or record["recordedAt"] <= query.until


class MemoryStore(Store):
    backend = "memory"
    sole_writer = True

    def __init__(self) -> None:
        self.entities: dict[tuple[str, str], Entity] = {}
        self.records: list[dict[str, Any]] = []
        self.idempotency: dict[tuple[str, str], IdempotencyEntry] = {}
        self.idempotency_at: dict[tuple[str, str], float] = {}
        self.signatures: dict[str, float] = {}
        self.definitions: dict[tuple[str, str], dict[str, Any]] = {}
        self.timers: dict[str, Timer] = {}
        self.leases: dict[str, float] = {}

    async def ping(self) -> None:
        return None

    async def get(self, entity_type: str, entity_id: str) -> Entity | None:
        return self.entities.get((entity_type, entity_id))

    async def get_many(self, entity_type: str, entity_ids: list[str]) -> list[Entity | None]:
        return [self.entities.get((entity_type, entity_id)) for entity_id in entity_ids]

    async def apply(self, change: Change) -> Committed:
        key = (change.entity_type, change.entity_id)
        if change.idempotency is not None:
            ikey = (change.idempotency.scope, change.idempotency.key)
            if ikey in self.idempotency:
                raise IdempotencyKeyInUse("this Idempotency-Key is already in use")
        new, record, created = next_entity(
            self.entities.get(key), change, now=utc_now(), record_id=len(self.records) + 1
        )
        self.entities[key] = new
        if record is not None:
            self.records.append(record)
        if change.idempotency is not None:
            self.idempotency[ikey] = stored_answer(change.idempotency, record)
            self.idempotency_at[ikey] = time.time()
        for timer_key in change.cancel_timers:
            self.timers.pop(timer_key, None)
            self.leases.pop(timer_key, None)
        for timer in change.timers:
            self.timers[timer.key] = timer
            self.leases.pop(timer.key, None)
        return Committed(new, record, created)

    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        check_labels(query)

        def position(e: Entity) -> tuple[str, ...]:
            return (e.created_at, e.entity_id) if query.by_created else (e.entity_id,)

        after: tuple[str, ...] | None = None
        if query.by_created and (query.after_created is not None or query.after_id is not None):
            if query.after_created is None or query.after_id is None:
                raise ValueError("a keyset position in creation order needs after_created and after_id")
            after = (query.after_created, query.after_id)
        elif query.after_id is not None:
            after = (query.after_id,)
        found = sorted(
            (
                e
                for (etype, eid), e in self.entities.items()
                if etype == query.entity_type
                and (query.state is None or e.state == query.state)
                and (query.capability is None or query.capability in e.data.get("capabilities", []))
                and (query.id_prefix is None or eid.startswith(query.id_prefix))
                and (query.seen_before is None or (e.last_seen_at or "") < query.seen_before)
                and all(label_value(e, key) == value for key, value in query.labels)
                and (after is None or (position(e) < after if query.descending else position(e) > after))
            ),
            key=position,
            reverse=query.descending,
        )
        return found[: query.limit]

    async def count_states(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for entity in self.entities.values():
            key = (entity.entity_type, entity.state)
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def list_audit(self, query: AuditQuery) -> list[dict[str, Any]]:
        records = reversed(self.records) if query.descending else iter(self.records)
        page: list[dict[str, Any]] = []
        for record in records:
            if query.after_id is not None and (
                record["id"] >= query.after_id if query.descending else record["id"] <= query.after_id
            ):
                continue
            if matches(record, query):
                page.append(record)
                if len(page) >= query.limit:
                    break
        return page

    async def verify(self, verifier: audit.ChainVerifier | None = None) -> audit.Verification:
        verifier = verifier if verifier is not None else audit.ChainVerifier()
        for record in self.records:
            verifier.add(record)
        for e in self.entities.values():
            verifier.head(e.entity_type, e.entity_id, e.seq, e.head_hash, e.state, e.revision)
        return verifier.finish()

    async def get_idempotency(self, scope: str, key: str) -> IdempotencyEntry | None:
        if self.idempotency_at.get((scope, key), 0.0) < time.time() - IDEMPOTENCY_TTL:
            return None
        return self.idempotency.get((scope, key))

    async def purge_idempotency(self, older_than: float = IDEMPOTENCY_TTL) -> int:
        cutoff = time.time() - older_than
        old = [k for k, at in self.idempotency_at.items() if at < cutoff]
        for k in old:
            del self.idempotency[k], self.idempotency_at[k]
        return len(old)

    async def remember_signature(self, signature: str, seen_at: float, window: float) -> bool:
        now = time.time()
        for sig in [s for s, t in self.signatures.items() if t < now - 2 * window]:
            del self.signatures[sig]
        if signature in self.signatures:
            return False
        self.signatures[signature] = seen_at
        return True

    async def put_definition(self, definition_id: str, version: str, body: dict[str, Any]) -> bool:
        stored = self.definitions.get((definition_id, version))
        if stored is not None:
            if stored != body:
                raise DefinitionExists(definition_id, version)
            return False
        self.definitions[(definition_id, version)] = body
        return True

    async def get_definition(self, definition_id: str, version: str | None = None) -> dict[str, Any] | None:
        if version is not None:
            return self.definitions.get((definition_id, version))
        found = [body for (did, _), body in self.definitions.items() if did == definition_id]
        return found[-1] if found else None

    async def definitions_page(self, after: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        # a definition is never replaced or removed, so its place in insertion order is its position
        start = after or 0
        return [(start + n, body) for n, body in enumerate(list(self.definitions.values())[start:][:limit], 1)]

    async def claim_timers(self, now: str, limit: int, lease_seconds: float) -> list[Timer]:
        clock = time.monotonic()
        due = sorted((t for t in self.timers.values() if t.due_at <= now), key=lambda t: t.due_at)
        claimed = [t for t in due if self.leases.get(t.key, 0.0) <= clock][:limit]
        for timer in claimed:
            self.leases[timer.key] = clock + lease_seconds
        return claimed

    async def finish_timer(self, key: str) -> None:
        self.timers.pop(key, None)
        self.leases.pop(key, None)

    async def list_timers(self, entity_type: str | None = None, entity_id: str | None = None) -> list[Timer]:
        return sorted(
            (
                t
                for t in self.timers.values()
                if (entity_type is None or t.entity_type == entity_type)
                and (entity_id is None or t.entity_id == entity_id)
            ),
            key=lambda t: t.due_at,
        )
