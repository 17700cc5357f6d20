"""Audit records: the exact canonical bytes, the hash chain, and what verification catches."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
from typing import Any

import pytest

from opscore import audit

GENESIS = "0" * 64


def contract_bytes(record: dict[str, Any]) -> bytes:
    """DESIGN §4, verbatim."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_chain(entity_id: str, n: int, *, first_id: int = 1, step: int = 1) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    prev = GENESIS
    for i in range(n):
        draft = audit.draft(
            entity_type="agent",
            entity_id=entity_id,
            event="begin_task" if i % 2 == 0 else "finish_task",
            source="idle" if i % 2 == 0 else "active",
            dest="active" if i % 2 == 0 else "idle",
            outcome="applied",
            reason=None,
            actor="key:test",
            request_id=f"r{i}",
            details={"note": "café ☕ 日本", "n": i, "nested": {"b": [1, 2.5, None, True]}},
            reported_at=f"2026-11-23T10:00:{i:02d}.000000+00:00",
        )
        record = audit.seal(
            draft, record_id=first_id + i * step, seq=i + 1, prev_hash=prev, recorded_at=f"2026-11-23T10:00:{i:02d}Z"
        )
        prev = record["hash"]
        records.append(record)
    return records


def test_canonical_bytes_are_the_contract_serialisation() -> None:
    record = make_chain("agént-ü", 1)[0]
    without = {k: v for k, v in record.items() if k != "hash"}
    assert audit.canonical(without) == contract_bytes(without)
    assert "café ☕ 日本".encode() in audit.canonical(without)  # not \\u-escaped
    assert b"\\u" not in audit.canonical(without)


def test_hash_is_sha256_of_the_record_without_hash() -> None:
    for record in make_chain("a", 3):
        without = {k: v for k, v in record.items() if k != "hash"}
        assert record["hash"] == hashlib.sha256(contract_bytes(without)).hexdigest()
        assert audit.digest(record) == record["hash"]
        assert len(record["hash"]) == 64


def test_records_carry_every_contract_field() -> None:
    record = make_chain("a", 1)[0]
    assert set(record) == set(audit.RECORD_FIELDS)


def test_prev_hash_chains_from_64_zeros() -> None:
    records = make_chain("a", 4)
    assert records[0]["prevHash"] == GENESIS == audit.GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prevHash"] == before["hash"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]


def heads_of(records: list[dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        last[(r["entityType"], r["entityId"])] = r
    return [(t, i, r["seq"], r["hash"]) for (t, i), r in last.items()]


def two_interleaved() -> list[dict[str, Any]]:
    a = make_chain("a", 5, first_id=1, step=2)
    b = make_chain("b", 5, first_id=2, step=2)
    return sorted(a + b, key=lambda r: r["id"])


def test_an_intact_log_verifies() -> None:
    records = two_interleaved()
    result = audit.verify(records, heads_of(records))
    assert result.ok and result.records == 10 and result.entities == 2
    assert result.to_dict() == {"ok": True, "entities": 2, "records": 10, "problems": []}


def problems(records: list[dict[str, Any]], heads: list[tuple[str, str, int, str]]) -> list[str]:
    result = audit.verify(records, heads)
    assert not result.ok
    return [p["problem"] for p in result.to_dict()["problems"]]


@pytest.mark.parametrize(
    ("field", "value"),
    [("dest", "error"), ("details", {"note": "changed"}), ("actor", "key:mallory"), ("outcome", "rejected")],
)
def test_a_changed_field_is_detected(field: str, value: Any) -> None:
    records = two_interleaved()
    heads = heads_of(records)
    tampered = copy.deepcopy(records)
    tampered[4][field] = value
    found = problems(tampered, heads)
    assert any("hash does not match" in p for p in found)


def test_a_deleted_middle_record_is_detected() -> None:
    records = two_interleaved()
    heads = heads_of(records)
    del records[4]
    found = problems(records, heads)
    assert any("missing or repeated" in p for p in found)
    assert any("prevHash" in p for p in found)


def test_a_deleted_tail_is_detected_by_the_entity_head() -> None:
    records = two_interleaved()
    heads = heads_of(records)
    tail = max(i for i, r in enumerate(records) if r["entityId"] == "a")
    del records[tail]
    assert audit.verify(records).ok  # the chain alone cannot know
    found = problems(records, heads)
    assert any("entity head is at seq 5 but the chain ends at 4" in p for p in found)


def test_a_head_hash_that_differs_is_detected() -> None:
    records = make_chain("a", 2)
    found = problems(records, [("agent", "a", 2, "f" * 64)])
    assert any("head hash" in p for p in found)


def test_a_head_with_no_records_is_detected() -> None:
    found = problems([], [("agent", "ghost", 3, "f" * 64)])
    assert any("chain ends at 0" in p for p in found)
    assert audit.verify([], [("agent", "new", 0, GENESIS)]).ok


def test_a_bad_prev_hash_is_detected_even_when_rehashed() -> None:
    records = make_chain("a", 3)
    forged = dict(records[1], prevHash="1" * 64)
    forged["hash"] = audit.digest(forged)  # a forger recomputes the record's own hash
    records[1] = forged
    found = problems(records, [])
    assert any("prevHash does not match" in p for p in found)


def test_a_duplicated_record_is_detected() -> None:
    records = make_chain("a", 3)
    records.insert(2, copy.deepcopy(records[1]))
    found = problems(records, [])
    assert any("seq 2 follows 2" in p for p in found)


def test_problems_name_the_entity_and_seq() -> None:
    records = make_chain("a", 3)
    records[2]["details"] = {}
    (problem,) = audit.verify(records).to_dict()["problems"]
    assert problem == {
        "entityType": "agent",
        "entityId": "a",
        "seq": 3,
        "problem": "hash does not match the record's content",
    }


def export(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n"


def test_offline_verification_of_an_exported_file() -> None:
    records = two_interleaved()
    text = export(records)
    parsed = list(audit.read_jsonl(io.StringIO(text)))
    assert parsed == records
    assert audit.verify(parsed).ok

    lines = text.splitlines()
    lines[3] = lines[3].replace('"key:test"', '"key:other"')
    assert not audit.verify(audit.read_jsonl(lines)).ok


def test_replay_follows_applied_records_only() -> None:
    records = make_chain("a", 3)  # idle->active, active->idle, idle->active
    assert audit.replay(records, "idle") == "active"
    rejected = dict(records[2], outcome="rejected", dest="error")
    assert audit.replay([*records[:2], rejected], "idle") == "idle"
    assert audit.replay([], "registered") == "registered"


def test_a_chain_whose_entity_row_is_gone_is_reported() -> None:
    records = []
    prev = audit.GENESIS
    for seq, (event, source, dest) in enumerate([("ready", "registered", "idle"), ("begin_task", "idle", "active")], 1):
        draft = audit.draft(
            entity_type="agent",
            entity_id="a",
            event=event,
            source=source,
            dest=dest,
            outcome="applied",
            reason=None,
            actor="t",
            request_id=None,
            details={},
            reported_at=None,
        )
        record = audit.seal(
            draft, record_id=seq, seq=seq, prev_hash=prev, recorded_at="2026-11-24T00:00:00.000000+00:00"
        )
        prev = record["hash"]
        records.append(record)
    other = audit.seal(
        audit.draft(
            entity_type="agent",
            entity_id="b",
            event="ready",
            source="registered",
            dest="idle",
            outcome="applied",
            reason=None,
            actor="t",
            request_id=None,
            details={},
            reported_at=None,
        ),
        record_id=3,
        seq=1,
        prev_hash=audit.GENESIS,
        recorded_at="2026-11-24T00:00:00.000000+00:00",
    )
    intact = audit.verify([*records, other], [("agent", "a", 2, prev), ("agent", "b", 1, other["hash"])])
    assert intact.ok
    missing_row = audit.verify([*records, other], [("agent", "a", 2, prev)])
    assert not missing_row.ok
    assert [(p.entity_id, p.problem) for p in missing_row.problems] == [
        ("b", "records exist but the entity row (the chain's head) is missing")
    ]
