"""Audit records: canonical JSON, hashing and chain verification. Pure functions, no I/O.

DESIGN §4 fixes the bytes that are hashed: the record without ``hash``, serialised as
``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in UTF-8.
``prevHash`` links each record to the one before it in the same entity's chain (64 zeros for
the first), and the entity row keeps the head (``seq``, ``hash``) so a deleted tail shows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

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
_SORTED = orjson.OPT_SORT_KEYS
_PLAIN = (str, int, bool, type(None))


class Sealed(dict[str, Any]):
    """A sealed record (a plain dict to everyone) that also carries its JSON text.

    ``text`` is the whole record, ``hash`` included, serialised once while sealing: the
    canonical bytes with ``"hash"`` appended as the last key. Stores write it as the row's
    body and the log line splices it in, so a record is serialised once, not three times.
    """

    __slots__ = ("text",)
    text: str


def _orjson_safe(value: Any) -> bool:
    """Whether orjson writes exactly the stdlib's bytes for ``value``.

    They agree on str (same escapes, UTF-8 as is), exact int, bool, None, and on dict (str
    keys, sorted by code point) and list of those. They differ on floats (``1e+16`` against
    ``1e16``, NaN) and on subclasses, so anything else takes the stdlib path.
    """
    kind = type(value)
    if kind is dict or kind is Sealed:
        for k, v in value.items():  # noqa: SIM110 - a loop is faster than all() over a generator here
            if type(k) is not str or not (type(v) in _PLAIN or _orjson_safe(v)):
                return False
        return True
    if kind is list:
        return all(type(v) in _PLAIN or _orjson_safe(v) for v in value)
    return kind in _PLAIN


def canonical(record: dict[str, Any]) -> bytes:
    """The exact bytes DESIGN §4 hashes (``record`` must not hold ``hash``).

    Always ``json.dumps(record, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False).encode("utf-8")``; orjson produces the same bytes an order of magnitude
    faster (docs/performance.md) whenever :func:`_orjson_safe` holds, the stdlib otherwise.
    """
    if _orjson_safe(record):
        try:
            return orjson.dumps(record, option=_SORTED)
        except orjson.JSONEncodeError:  # an int beyond 64 bits
            pass
    return _encode(record).encode("utf-8")


def digest(record: dict[str, Any]) -> str:
    """SHA-256 hex of the record without its ``hash`` field."""
    if "hash" in record:
        record = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(record)).hexdigest()


def seal(draft: dict[str, Any], *, record_id: int, seq: int, prev_hash: str, recorded_at: str) -> dict[str, Any]:
    """Complete a draft at the chain's head: fill the chain fields and compute ``hash``."""
    record = Sealed(draft)
    record["id"] = record_id
    record["seq"] = seq
    record["prevHash"] = prev_hash
    record["recordedAt"] = recorded_at
    body = canonical(record)
    record["hash"] = hashed = hashlib.sha256(body).hexdigest()
    record.text = body[:-1].decode("utf-8") + ',"hash":"' + hashed + '"}'
    return record


def text_of(record: dict[str, Any]) -> str:
    """The record's JSON text: the one made while sealing, or a fresh compact serialisation."""
    text = getattr(record, "text", None)
    if text is None:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return str(text)


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
    """What verification keeps per entity: the chain's end, its replayed state, and its pin."""

    seq: int = 0
    hash: str = GENESIS
    state: str | None = None
    """The state the applied transitions so far lead to (``None``: the machine's initial state is unknown)."""
    revision: int = 0
    pin_seq: int = -1
    """The seq of the entity's newest checkpointed head (``-1``: none)."""
    pin_hash: str = ""
    pin_line: int = 0


@dataclass(frozen=True, slots=True)
class Head:
    """An entity's stored head: where its chain ends (``seq``, ``hash``) and what it holds now."""

    entity_type: str
    entity_id: str
    seq: int
    hash: str
    state: str | None = None
    revision: int | None = None


@dataclass(frozen=True, slots=True)
class Pin:
    """A signed checkpoint's head of one entity: the record at ``seq`` must hash to ``hash``."""

    seq: int
    hash: str
    line: int
    """The checkpoint line (its ``n``) that signed it last."""


class ChainVerifier:
    """Checks records one at a time, in ``seq`` order per entity (entities may interleave).

    Feed every record with :meth:`add`, then the entity heads with :meth:`head` (when known),
    then read :meth:`finish`. Memory is one small entry per entity, never per record.

    Beyond each record's hash, its ``prevHash`` link and gap-free ``seq``, the chain implies
    the entity's state: every applied transition starts where the previous one ended
    (``source`` = the previous ``dest``, from the machine's initial state), a metadata change
    (:data:`METADATA_EVENT`) stays where it is, a refused record moves nothing, and the entity's
    stored state and revision equal that replay. ``initial`` maps each entity type to its
    machine's initial state (passed in: this module knows no machine); without it the first
    transition's ``source`` and the state of an entity with no record are not checked.

    ``pins`` are the heads signed checkpoints committed to (:mod:`opscore.checkpoints`): the
    record at a pinned ``seq`` must hash to the pinned hash, and a chain must not end before
    its pinned ``seq``. That catches what the chain alone cannot: a rewrite that recomputed
    every later hash and the entity head, a tail cut with the head moved back, a deleted entity.
    """

    def __init__(self, initial: Mapping[str, str] | None = None, pins: Mapping[tuple[str, str], Pin] | None = None):
        self._chains: dict[tuple[str, str], _Chain] = {}
        self._heads: set[tuple[str, str]] = set()
        self._initial: Mapping[str, str] = initial or {}
        self._pins: Mapping[tuple[str, str], Pin] = pins or {}
        self.result = Verification()

    def _chain(self, key: tuple[str, str]) -> _Chain:
        chain = self._chains[key] = _Chain(state=self._initial.get(key[0]))
        pin = self._pins.get(key)
        if pin is not None:
            chain.pin_seq, chain.pin_hash, chain.pin_line = pin.seq, pin.hash, pin.line
        return chain

    def add(self, record: dict[str, Any], raw_hash: str | None = None) -> None:
        """Check one record; ``raw_hash`` is the stored hash when it is kept beside the record."""
        etype, eid = record.get("entityType"), record.get("entityId")
        if type(etype) is not str or type(eid) is not str:
            etype, eid = str(etype), str(eid)
        key = (etype, eid)
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chain(key)
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
        if record.get("outcome") == "applied":
            self._replay(chain, record, etype, eid, seq)
        if seq == chain.pin_seq and actual != chain.pin_hash:
            problems.append(
                Problem(
                    etype,
                    eid,
                    seq,
                    f"the record at seq {seq} is not the one signed checkpoint #{chain.pin_line} "
                    f"committed to: a record at or before seq {seq} was changed, replaced or reordered",
                )
            )
        chain.seq = seq if isinstance(seq, int) else chain.seq + 1
        chain.hash = stored if isinstance(stored, str) else actual

    def _replay(self, chain: _Chain, record: dict[str, Any], etype: str, eid: str, seq: Any) -> None:
        """An applied record: it starts where the chain stands; a transition moves it (revision + 1)."""
        source, dest = record.get("source"), record.get("dest")
        if chain.state is not None and source != chain.state:
            self.result.problems.append(
                Problem(etype, eid, seq, f"source {source!r} is not {chain.state!r}, where the chain stands")
            )
        if record.get("event") == METADATA_EVENT:
            if dest != source:
                self.result.problems.append(Problem(etype, eid, seq, "a metadata change moves the state"))
        elif dest is not None:
            chain.state = dest
            chain.revision += 1

    def head(
        self,
        entity_type: str,
        entity_id: str,
        seq: int,
        head_hash: str,
        state: str | None = None,
        revision: int | None = None,
    ) -> None:
        """Compare an entity's stored head (and, when given, its state and revision) with its chain."""
        key = (entity_type, entity_id)
        self._heads.add(key)
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chain(key)
        problems = self.result.problems
        if chain.seq != seq:
            problems.append(
                Problem(entity_type, entity_id, seq, f"entity head is at seq {seq} but the chain ends at {chain.seq}")
            )
        elif chain.hash != head_hash and not (seq == 0 and chain.seq == 0):
            problems.append(
                Problem(entity_type, entity_id, seq, "entity head hash does not match the chain's last record")
            )
        if state is not None and chain.state is not None and state != chain.state:
            problems.append(
                Problem(
                    entity_type,
                    entity_id,
                    seq,
                    f"entity state is {state!r} but its chain replays to {chain.state!r}",
                )
            )
        if revision is not None and revision != chain.revision:
            problems.append(
                Problem(
                    entity_type,
                    entity_id,
                    seq,
                    f"entity revision is {revision} but its chain holds {chain.revision} transitions",
                )
            )

    def finish(self) -> Verification:
        """The result; when heads were given, a chain whose entity row is gone is a problem too.

        A pinned entity whose chain ends before its pinned ``seq`` (or has no record at all)
        lost records a signed checkpoint covered.
        """
        problems = self.result.problems
        if self._heads:
            for (etype, eid), chain in self._chains.items():
                if (etype, eid) not in self._heads:
                    problems.append(
                        Problem(etype, eid, chain.seq, "records exist but the entity row (the chain's head) is missing")
                    )
        for (etype, eid), pin in self._pins.items():
            found = self._chains.get((etype, eid))
            ends = 0 if found is None else found.seq
            if ends < pin.seq:
                what = "has no record at all" if ends == 0 else f"ends at seq {ends}"
                problems.append(
                    Problem(
                        etype,
                        eid,
                        pin.seq,
                        f"signed checkpoint #{pin.line} covers this chain up to seq {pin.seq}, but it {what}: "
                        "records a checkpoint covered were deleted",
                    )
                )
        self.result.entities = len(self._heads.union(self._chains))
        return self.result


def verify(
    records: Iterable[dict[str, Any]],
    heads: Iterable[tuple[str, str, int, str] | Head] = (),
    *,
    initial: Mapping[str, str] | None = None,
    pins: Mapping[tuple[str, str], Pin] | None = None,
) -> Verification:
    """Verify records (grouped or interleaved, ascending ``seq`` per entity) and optional heads."""
    verifier = ChainVerifier(initial, pins)
    for record in records:
        verifier.add(record)
    for head in heads:
        if isinstance(head, Head):
            verifier.head(head.entity_type, head.entity_id, head.seq, head.hash, head.state, head.revision)
        else:
            verifier.head(*head)
    return verifier.finish()


def loads(text: str) -> Any:
    """Parse JSON like ``json.loads``: orjson (faster) unless it could differ.

    orjson reads integers beyond 64 bits as floats and refuses NaN: a result holding any
    float (or anything but str/int/bool/None/dict/list), or a text orjson refuses, is parsed
    again by the stdlib. Audit records rarely hold floats, so that is the rare path.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    return value if _orjson_safe(value) else json.loads(text)


def read_jsonl(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Parse an exported JSON Lines file, skipping blank lines.

    ``ValueError`` naming the line when one is not a JSON object (a truncated or garbled file).
    """
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                record = loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is not a JSON object")
            yield record


METADATA_EVENT = "update_metadata"
"""The ``event`` of a record of changed metadata (an agent re-registered with other capabilities):
``source`` = ``dest`` = the state it stays in, the fields' old and new values in ``details``."""


def is_transition(record: dict[str, Any]) -> bool:
    """Whether ``record`` moved its entity: applied, with a destination, not a metadata change.

    Transitions are what ``revision`` counts and what replaying a chain walks through.
    """
    return (
        record.get("outcome") == "applied" and record.get("dest") is not None and record.get("event") != METADATA_EVENT
    )


def replay(records: Iterable[dict[str, Any]], initial: str) -> str:
    """The state an entity is in after its transitions, from ``initial``."""
    state = initial
    for record in records:
        if is_transition(record):
            state = record["dest"]
    return state


# -- exports: the records, then a trailer of entity heads ---------------------------------------

EXPORT_HEAD = "head"
EXPORT_END = "end"


def head_line(head: Head) -> dict[str, Any]:
    """One line of an export's trailer: an entity's stored head, state and revision."""
    return {
        "kind": EXPORT_HEAD,
        "entityType": head.entity_type,
        "entityId": head.entity_id,
        "seq": head.seq,
        "hash": head.hash,
        "state": head.state,
        "revision": head.revision,
    }


def export_records(records: Iterable[dict[str, Any]], heads: Mapping[tuple[str, str], Head]) -> Iterator[str]:
    """The record lines of an export (without newlines): each record up to its entity's head.

    ``heads`` must be read BEFORE the records: a record beyond its entity's head (committed
    after the heads were read; records are never removed) is left out, so the file is one
    consistent moment even while Ops-Core keeps writing, without a snapshot spanning the
    whole read. Records come in id order (which is ``seq`` order within an entity).
    """
    for record in records:
        head = heads.get((record.get("entityType"), record.get("entityId")))  # type: ignore[arg-type]
        seq = record.get("seq")
        if head is not None and isinstance(seq, int) and seq <= head.seq:
            yield canonical(record).decode("utf-8")


def export_trailer(heads: Mapping[tuple[str, str], Head], records: int) -> Iterator[str]:
    """The trailer of an export: one ``{"kind": "head", ...}`` line per entity, sorted, then the end.

    The end line ``{"kind": "end", "records": n, "entities": m}`` closes the file: without
    it, or with other counts, :func:`verify_export` knows the file was cut short; a chain
    shorter than its head line lost its tail.
    """
    for key in sorted(heads):
        yield canonical(head_line(heads[key])).decode("utf-8")
    yield canonical({"kind": EXPORT_END, "records": records, "entities": len(heads)}).decode("utf-8")


def export_lines(records: Iterable[dict[str, Any]], heads: Mapping[tuple[str, str], Head]) -> Iterator[str]:
    """Every line of an export (without newlines): :func:`export_records`, then :func:`export_trailer`."""
    written = 0
    for line in export_records(records, heads):
        written += 1
        yield line
    yield from export_trailer(heads, written)


def verify_export(lines: Iterable[str], verifier: ChainVerifier | None = None) -> Verification:
    """Verify an exported JSON Lines file as it streams: its records, its trailer, its end.

    Problems of the file itself (not JSON, a record after the trailer, no end line, counts
    that differ) are reported with ``entityType`` ``"export"`` and the line number in ``entityId``.
    """
    verifier = verifier if verifier is not None else ChainVerifier()
    problems = verifier.result.problems
    records = heads = 0
    in_trailer = False
    end: dict[str, Any] | None = None
    number = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            item = loads(line)
        except ValueError:
            problems.append(Problem("export", where, None, "not JSON: the file is garbled or cut"))
            continue
        if not isinstance(item, dict):
            problems.append(Problem("export", where, None, "not a JSON object"))
            continue
        if end is not None:
            problems.append(Problem("export", where, None, "a line after the end of the export"))
            continue
        kind = item.get("kind")
        if kind is None:
            if in_trailer:
                problems.append(Problem("export", where, None, "a record after the trailer of heads"))
            records += 1
            verifier.add(item, item.pop("hash", None))
        elif kind == EXPORT_HEAD:
            in_trailer = True
            heads += 1
            seq, hashed = item.get("seq"), item.get("hash")
            if not isinstance(seq, int) or not isinstance(hashed, str):
                problems.append(Problem("export", where, None, "a head line without seq and hash"))
                continue
            state, revision = item.get("state"), item.get("revision")
            verifier.head(
                str(item.get("entityType")),
                str(item.get("entityId")),
                seq,
                hashed,
                state if isinstance(state, str) else None,
                revision if isinstance(revision, int) else None,
            )
        elif kind == EXPORT_END:
            end = item
        else:
            problems.append(Problem("export", where, None, f"unknown line kind {kind!r}"))
    if end is None:
        problems.append(
            Problem(
                "export",
                f"line {number}",
                None,
                "the file ends without the export's end line: it was cut short (or made before exports had "
                "a trailer of entity heads: export it again)",
            )
        )
    elif end.get("records") != records or end.get("entities") != heads:
        problems.append(
            Problem(
                "export",
                "end",
                None,
                f"the end line counts {end.get('records')} records and {end.get('entities')} heads, "
                f"the file holds {records} and {heads}",
            )
        )
    return verifier.finish()
