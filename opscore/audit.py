"""Audit records: canonical JSON, hashing and chain verification. Pure functions, no I/O.

DESIGN §4 fixes the bytes that are hashed: the record without ``hash``, serialised as
``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in UTF-8.
``prevHash`` links each record to the one before it in the same entity's chain (64 zeros for
the first), and the entity row keeps the head (``seq``, ``hash``) so a deleted tail shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64

RECORD_FIELDS = (
    "id",
    "entityType",
    "entityId",
    "seq",
    "event",
    "source",
    "dest",
    "outcome",
    "reason",
    "actor",
    "requestId",
    "details",
    "reportedAt",
    "recordedAt",
    "prevHash",
    "hash",
)

_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical(record: dict[str, Any]) -> bytes:
    """The exact bytes DESIGN §4 hashes (``record`` must not hold ``hash``)."""
    return _encode(record).encode("utf-8")


def digest(record: dict[str, Any]) -> str:
    """SHA-256 hex of the record without its ``hash`` field."""
    if "hash" in record:
        record = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(record)).hexdigest()


def seal(draft: dict[str, Any], *, record_id: int, seq: int, prev_hash: str, recorded_at: str) -> dict[str, Any]:
    """Complete a draft at the chain's head: fill the chain fields and compute ``hash``."""
    record = dict(draft)
    record["id"] = record_id
    record["seq"] = seq
    record["prevHash"] = prev_hash
    record["recordedAt"] = recorded_at
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    return record


def draft(
    *,
    entity_type: str,
    entity_id: str,
    event: str | None,
    source: str | None,
    dest: str | None,
    outcome: str,
    reason: str | None,
    actor: str,
    request_id: str | None,
    details: dict[str, Any],
    reported_at: str | None,
) -> dict[str, Any]:
    """A record draft: every contract field but the ones the store fills at the head."""
    return {
        "entityType": entity_type,
        "entityId": entity_id,
        "event": event,
        "source": source,
        "dest": dest,
        "outcome": outcome,
        "reason": reason,
        "actor": actor,
        "requestId": request_id,
        "details": details,
        "reportedAt": reported_at,
    }


@dataclass(slots=True)
class Problem:
    """One thing verification found wrong."""

    entity_type: str
    entity_id: str
    seq: int | None
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return {"entityType": self.entity_type, "entityId": self.entity_id, "seq": self.seq, "problem": self.problem}


@dataclass(slots=True)
class Verification:
    """The result of checking chains: ``ok`` only when no problem was found."""

    entities: int = 0
    records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self, max_problems: int = 1000) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entities": self.entities,
            "records": self.records,
            "problems": [p.to_dict() for p in self.problems[:max_problems]],
        }


@dataclass(slots=True)
class _Chain:
    seq: int = 0
    hash: str = GENESIS


class ChainVerifier:
    """Checks records one at a time, in ``seq`` order per entity (entities may interleave).

    Feed every record with :meth:`add`, then the entity heads with :meth:`head` (when known),
    then read :attr:`result`. Memory is one small entry per entity, not per record.
    """

    def __init__(self) -> None:
        self._chains: dict[tuple[str, str], _Chain] = {}
        self._heads: set[tuple[str, str]] = set()
        self.result = Verification()

    def add(self, record: dict[str, Any], raw_hash: str | None = None) -> None:
        """Check one record; ``raw_hash`` is the stored hash when it is kept beside the record."""
        etype, eid = str(record.get("entityType")), str(record.get("entityId"))
        key = (etype, eid)
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = _Chain()
        self.result.records += 1
        seq = record.get("seq")
        stored = raw_hash if raw_hash is not None else record.get("hash")
        problems = self.result.problems
        if seq != chain.seq + 1:
            problems.append(Problem(etype, eid, seq, f"seq {seq} follows {chain.seq}: a record is missing or repeated"))
        if record.get("prevHash") != chain.hash:
            problems.append(Problem(etype, eid, seq, "prevHash does not match the previous record's hash"))
        actual = digest(record)
        if actual != stored:
            problems.append(Problem(etype, eid, seq, "hash does not match the record's content"))
        chain.seq = seq if isinstance(seq, int) else chain.seq + 1
        chain.hash = stored if isinstance(stored, str) else actual

    def head(self, entity_type: str, entity_id: str, seq: int, head_hash: str) -> None:
        """Compare an entity's stored head with the end of its verified chain."""
        self._heads.add((entity_type, entity_id))
        chain = self._chains.get((entity_type, entity_id), _Chain())
        if seq == 0 and chain.seq == 0:
            return
        if chain.seq != seq:
            self.result.problems.append(
                Problem(entity_type, entity_id, seq, f"entity head is at seq {seq} but the chain ends at {chain.seq}")
            )
        elif chain.hash != head_hash:
            self.result.problems.append(
                Problem(entity_type, entity_id, seq, "entity head hash does not match the chain's last record")
            )

    def finish(self) -> Verification:
        """The result; when heads were given, a chain whose entity row is gone is a problem too."""
        if self._heads:
            for (etype, eid), chain in self._chains.items():
                if (etype, eid) not in self._heads:
                    self.result.problems.append(
                        Problem(etype, eid, chain.seq, "records exist but the entity row (the chain's head) is missing")
                    )
        self.result.entities = len(self._heads.union(self._chains))
        return self.result


def verify(records: Iterable[dict[str, Any]], heads: Iterable[tuple[str, str, int, str]] = ()) -> Verification:
    """Verify records (grouped or interleaved, ascending ``seq`` per entity) and optional heads."""
    verifier = ChainVerifier()
    for record in records:
        verifier.add(record)
    for etype, eid, seq, head_hash in heads:
        verifier.head(etype, eid, seq, head_hash)
    return verifier.finish()


def read_jsonl(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Parse an exported JSON Lines file, skipping blank lines.

    ``ValueError`` naming the line when one is not a JSON object (a truncated or garbled file).
    """
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is not a JSON object")
            yield record


def replay(records: Iterable[dict[str, Any]], initial: str) -> str:
    """The state an entity is in after its applied records, from ``initial``."""
    state = initial
    for record in records:
        if record.get("outcome") == "applied" and record.get("dest") is not None:
            state = record["dest"]
    return state
