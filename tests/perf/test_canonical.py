"""The fast canonical JSON is byte for byte DESIGN §4's, and a sealed record's text is the record."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from opscore import audit

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 1e16, 1e-7, 1.5e300, 0.1, 123456789.0])
    | st.text()
    | st.sampled_from(["é", "😀", "\u2028", "\x00\x1f\x7f", '"\\/', "日本語"])
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
)


def reference(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@settings(max_examples=1000, deadline=None)
@given(json_values)
def test_canonical_is_the_stdlib_bytes_for_any_json(value: Any) -> None:
    record = {"details": value, "entityId": "é-1", "id": 7, "reason": None}
    assert audit.canonical(record) == reference(record)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.text(), st.integers(1, 2**40))
def test_a_sealed_record_hashes_and_reads_back_as_itself(details: dict[str, Any], actor: str, record_id: int) -> None:
    draft = audit.draft(
        entity_type="agent",
        entity_id="a-é",
        event="ready",
        source="registered",
        dest="idle",
        outcome="applied",
        reason=None,
        actor=actor,
        request_id=None,
        details=details,
        reported_at=None,
    )
    record = audit.seal(draft, record_id=record_id, seq=1, prev_hash=audit.GENESIS, recorded_at="2030-01-01")
    without = {k: v for k, v in record.items() if k != "hash"}
    assert record["hash"] == hashlib.sha256(reference(without)).hexdigest()
    assert audit.digest(record) == record["hash"]
    text = audit.text_of(record)
    if not _has_nan(record):  # NaN != NaN: nothing to compare
        assert json.loads(text) == record
        assert audit.loads(text) == record


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def test_loads_keeps_huge_integers_exact() -> None:
    text = '{"n":123456789012345678901234567890,"m":-9999999999999999999}'
    assert audit.loads(text) == {"n": 123456789012345678901234567890, "m": -9999999999999999999}
