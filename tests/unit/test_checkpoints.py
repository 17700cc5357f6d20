"""What verification infers from a chain, signed lines and their file, and the checkpointer's guard."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from opscore import audit, checkpoints
from opscore.checkpointer import Checkpointer
from opscore.checkpoints import CheckpointFile, Signer, make_line, make_signing_key, read_checkpoints
from opscore.models import Entity
from opscore.storage.memory import MemoryStore

INITIAL = checkpoints.INITIAL_STATES


def chain(entity_id: str, steps: list[tuple[str, str, str | None, str]], first_id: int = 1) -> list[dict[str, Any]]:
    """Sealed records of one agent: (event, source, dest, outcome) each."""
    records, prev = [], audit.GENESIS
    for n, (event, source, dest, outcome) in enumerate(steps, start=1):
        draft = audit.draft(
            entity_type="agent",
            entity_id=entity_id,
            event=event,
            source=source,
            dest=dest,
            outcome=outcome,
            reason=None,
            actor="key:t",
            request_id=None,
            details={},
            reported_at=None,
        )
        record = audit.seal(draft, record_id=first_id + n - 1, seq=n, prev_hash=prev, recorded_at="2026-01-01T00:00Z")
        prev = record["hash"]
        records.append(record)
    return records


GOOD = [
    ("ready", "registered", "idle", "applied"),
    ("begin_task", "idle", "registered", "rejected"),
    (audit.METADATA_EVENT, "idle", "idle", "applied"),
    ("begin_task", "idle", "active", "applied"),
]


def head(records: list[dict[str, Any]], state: str = "active", revision: int = 2) -> audit.Head:
    return audit.Head("agent", records[-1]["entityId"], records[-1]["seq"], records[-1]["hash"], state, revision)


def found(result: audit.Verification) -> list[tuple[int | None, str]]:
    return [(p.seq, p.problem) for p in result.problems]


# -- what the chain implies -----------------------------------------------------------------


def test_a_consistent_chain_replays_to_its_entity() -> None:
    records = chain("a", GOOD)
    assert audit.verify(records, [head(records)], initial=INITIAL).ok


def test_a_transition_must_start_where_the_chain_stands() -> None:
    records = chain("a", [("ready", "registered", "idle", "applied"), ("begin_task", "error", "active", "applied")])
    problems = found(audit.verify(records, [head(records)], initial=INITIAL))
    assert problems == [(2, "source 'error' is not 'idle', where the chain stands")]


def test_the_first_transition_starts_in_the_initial_state() -> None:
    records = chain("a", [("begin_task", "idle", "active", "applied")])
    assert found(audit.verify(records, [head(records, revision=1)], initial=INITIAL)) == [
        (1, "source 'idle' is not 'registered', where the chain stands")
    ]
    assert audit.verify(records, [head(records, revision=1)]).ok  # without the machines it cannot know


def test_a_metadata_change_moves_nothing() -> None:
    records = chain(
        "a", [("ready", "registered", "idle", "applied"), (audit.METADATA_EVENT, "idle", "active", "applied")]
    )
    problems = found(audit.verify(records, [head(records, "idle", 1)], initial=INITIAL))
    assert (2, "a metadata change moves the state") in problems


def test_a_refusal_moves_nothing() -> None:
    records = chain("a", [("ready", "registered", "idle", "applied"), ("fail", "idle", "error", "rejected")])
    assert audit.verify(records, [head(records, "idle", 1)], initial=INITIAL).ok
    problems = found(audit.verify(records, [head(records, "error", 1)], initial=INITIAL))
    assert problems == [(2, "entity state is 'error' but its chain replays to 'idle'")]


def test_the_stored_state_and_revision_are_the_replay() -> None:
    records = chain("a", GOOD)
    assert found(audit.verify(records, [head(records, "error", 2)], initial=INITIAL)) == [
        (4, "entity state is 'error' but its chain replays to 'active'")
    ]
    assert found(audit.verify(records, [head(records, "active", 3)], initial=INITIAL)) == [
        (4, "entity revision is 3 but its chain holds 2 transitions")
    ]


def test_an_entity_without_records_is_in_its_initial_state() -> None:
    fresh = audit.Head("agent", "new", 0, audit.GENESIS, "registered", 0)
    assert audit.verify([], [fresh], initial=INITIAL).ok
    moved = audit.Head("agent", "new", 0, audit.GENESIS, "active", 0)
    assert found(audit.verify([], [moved], initial=INITIAL)) == [
        (0, "entity state is 'active' but its chain replays to 'registered'")
    ]


# -- pins -----------------------------------------------------------------------------------


def rewrite(records: list[dict[str, Any]], index: int, **change: Any) -> list[dict[str, Any]]:
    """``records`` with one changed and every later hash recomputed, as a forger would."""
    out = [dict(r) for r in records]
    prev = out[index]["prevHash"]
    out[index].update(change)
    for record in out[index:]:
        record["prevHash"] = prev
        record["hash"] = prev = audit.digest(record)
    return out


def test_a_pin_catches_what_a_rewrite_hides() -> None:
    records = chain("a", GOOD)
    pins = {("agent", "a"): audit.Pin(4, records[3]["hash"], 7)}
    forged = rewrite(records, 1, actor="key:mallory")
    assert audit.verify(forged, [head(forged)], initial=INITIAL).ok
    problems = found(audit.verify(forged, [head(forged)], initial=INITIAL, pins=pins))
    assert problems == [
        (
            4,
            "the record at seq 4 is not the one signed checkpoint #7 committed to: "
            "a record at or before seq 4 was changed, replaced or reordered",
        )
    ]


def test_a_pin_catches_a_cut_tail_and_a_deleted_entity() -> None:
    records = chain("a", GOOD)
    pins = {("agent", "a"): audit.Pin(4, records[3]["hash"], 2), ("agent", "gone"): audit.Pin(3, "f" * 64, 1)}
    cut = records[:2]
    problems = found(audit.verify(cut, [head(cut, "idle", 1)], initial=INITIAL, pins=pins))
    assert (4, "signed checkpoint #2 covers this chain up to seq 4, but it ends at seq 2: "
            "records a checkpoint covered were deleted") in problems  # fmt: skip
    assert any(seq == 3 and "has no record at all" in why for seq, why in problems)


# -- signed lines ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    private, _, _ = make_signing_key(tmp_path_factory.mktemp("key") / "k.pem")
    return checkpoints.load_signer(private)


def signed_lines(signer: Signer, count: int = 3) -> list[str]:
    texts, prev = [], checkpoints.GENESIS
    for n in range(1, count + 1):
        heads = (
            {("agent", "a"): (n, f"{n:064x}")}
            if n > 1
            else {("agent", "a"): (1, f"{1:064x}"), ("task", "t"): (2, "e" * 64)}
        )
        line, text = make_line(n=n, position=str(n * 10), at="2026-01-01T00:00:00+00:00", records=n * 10,
                               full=n == 1, heads=heads, prev=prev, signer=signer)  # fmt: skip
        prev = checkpoints.line_hash(line)
        texts.append(text)
    return texts


def keys(signer: Signer) -> dict[str, Any]:
    return {signer.key_id: signer.private.public_key()}


def test_signed_lines_fold_into_the_newest_head_of_each_entity(signer: Signer) -> None:
    read = read_checkpoints(signed_lines(signer), keys(signer))
    assert not read.problems and read.lines == 3
    assert read.pins == {("agent", "a"): audit.Pin(3, f"{3:064x}", 3), ("task", "t"): audit.Pin(2, "e" * 64, 1)}
    reserialised = [json.dumps(json.loads(t), indent=1).replace("\n", "") for t in signed_lines(signer)]
    assert not read_checkpoints(reserialised, keys(signer)).problems  # canonical JSON is what is signed


@pytest.mark.parametrize(
    ("damage", "where", "why"),
    [
        pytest.param(
            lambda t: [t[0], t[1].replace('"records":20', '"records":21'), t[2]], "line 2", "signature", id="edited"
        ),
        pytest.param(lambda t: [t[0], t[2]], "line 2", "#3 where #2 was due", id="removed"),
        pytest.param(lambda t: [t[0], t[2], t[1]], "line 2", "#3 where #2 was due", id="reordered"),
        pytest.param(lambda t: t[1:], "line 1", "#2 where #1 was due", id="beginning-lost"),
        pytest.param(lambda t: [t[0], "{not json", t[2]], "line 2", "not JSON", id="garbled"),
    ],
)
def test_a_damaged_line_is_named_and_what_came_before_still_pins(
    signer: Signer, damage: Any, where: str, why: str
) -> None:
    read = read_checkpoints(damage(signed_lines(signer)), keys(signer))
    [problem] = read.problems
    assert (problem.entity_type, problem.entity_id) == ("checkpoint", where) and why in problem.problem
    assert read.lines == int(where.split()[1]) - 1


def test_a_line_of_another_key_is_refused_offline(signer: Signer, tmp_path: Path) -> None:
    other = checkpoints.load_signer(make_signing_key(tmp_path / "other.pem")[0])
    read = read_checkpoints(signed_lines(signer), keys(other))
    assert read.lines == 0 and "not among the public keys given" in read.problems[0].problem
    assert not read_checkpoints(signed_lines(signer), keys(other), other_keys=True).problems


def test_a_head_that_goes_back_is_a_problem(signer: Signer) -> None:
    first, _ = make_line(n=1, position="1", at="x", records=1, full=True, heads={("agent", "a"): (5, "a" * 64)},
                         prev=checkpoints.GENESIS, signer=signer)  # fmt: skip
    _, second = make_line(n=2, position="2", at="x", records=2, full=False, heads={("agent", "a"): (4, "b" * 64)},
                          prev=checkpoints.line_hash(first), signer=signer)  # fmt: skip
    read = read_checkpoints([audit.canonical(first).decode(), second], keys(signer))
    assert [p.problem for p in read.problems] == ["checkpoint #2 moves this head back from seq 5 (#1) to 4"]
    assert read.pins[("agent", "a")].seq == 5


def test_keys_files(tmp_path: Path) -> None:
    private, public, key_id = make_signing_key(tmp_path / "k.pem")
    assert checkpoints.load_signer(private).key_id == key_id
    assert list(checkpoints.load_public_keys([public])) == [key_id]
    assert list(checkpoints.load_public_keys([private])) == [key_id]  # a private key gives its public key
    with pytest.raises(FileExistsError):
        make_signing_key(tmp_path / "k.pem")
    with pytest.raises(checkpoints.InvalidSigningKey, match="cannot be read"):
        checkpoints.load_signer(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk", encoding="utf-8")
    with pytest.raises(checkpoints.InvalidSigningKey, match="not a PEM public key"):
        checkpoints.load_public_keys([junk])


# -- the file -------------------------------------------------------------------------------


def test_the_file_cuts_a_torn_last_line_and_pages_by_number(signer: Signer, tmp_path: Path) -> None:
    texts = signed_lines(signer)
    path = tmp_path / "c.jsonl"
    path.write_text(texts[0] + "\n" + texts[1] + "\n" + texts[2][:40], encoding="utf-8")
    file = CheckpointFile(path)
    assert file.open() is not None
    assert len(file) == 2 and path.read_text(encoding="utf-8") == texts[0] + "\n" + texts[1] + "\n"
    file.append([texts[2]], json.loads(texts[2]))
    assert file.read(0, 2) == texts[:2] and file.read(2, 10) == texts[2:] and file.read(3, 10) == []
    reopened = CheckpointFile(path)
    assert reopened.open() is None and len(reopened) == 3 and reopened.last == json.loads(texts[2])


# -- the checkpointer's guard -----------------------------------------------------------------


async def report(store: MemoryStore, entity_id: str, state: str) -> None:
    from opscore.engine import Context, Engine

    await Engine(store).report(
        "agent", entity_id, state, ctx=Context(actor="key:t"), create=Entity("agent", entity_id, "registered")
    )


def test_a_chain_rewritten_between_checkpoints_is_refused_and_stays_pinned(
    signer: Signer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpointer signs a head only if it extends the signed one: a rewrite cannot get blessed."""

    async def scenario() -> tuple[checkpoints.Checkpoints, audit.Verification]:
        store = MemoryStore()
        await store.open()
        runner = Checkpointer(store, CheckpointFile(tmp_path / "c.jsonl"), signer, records=1, poll=0.01)
        await runner.start()
        for state in ("initializing", "idle"):
            await report(store, "g", state)
        await report(store, "h", "idle")
        while runner.file.last is None or runner.file.last["records"] < 3:
            await asyncio.sleep(0.01)
        # someone rewrites g's chain in the database (hashes and head recomputed), then g moves on
        forged = rewrite([r for r in store.records if r["entityId"] == "g"], 0, actor="key:mallory")
        store.records = [r for r in store.records if r["entityId"] != "g"] + forged
        store.records.sort(key=lambda r: r["id"])
        entity = store.entities[("agent", "g")]
        entity.head_hash = forged[-1]["hash"]
        await report(store, "g", "active")
        await report(store, "h", "active")
        while runner.file.last["records"] < 5:
            await asyncio.sleep(0.01)
        await runner.stop()
        signed = read_checkpoints(runner.file.texts(), keys(signer))
        return signed, await checkpoints.verify_database(store, signed)

    with caplog.at_level(logging.ERROR, logger="opscore.checkpoints"):
        signed, result = asyncio.run(scenario())
    assert [r.message for r in caplog.records] == ["checkpoint chain broken"]
    assert signed.pins[("agent", "g")].seq == 2 and signed.pins[("agent", "h")].seq == 2  # g not blessed
    assert [(p.entity_id, p.seq) for p in result.problems] == [("g", 2)]


def test_a_file_of_another_database_halts(signer: Signer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.jsonl"

    async def sign_some() -> None:
        store = MemoryStore()
        await store.open()
        runner = Checkpointer(store, CheckpointFile(path), signer, poll=0.01)
        await runner.start()
        await report(store, "x", "idle")
        await runner.stop()

    async def other_database() -> Checkpointer:
        store = MemoryStore()
        await store.open()
        await report(store, "y", "idle")
        runner = Checkpointer(store, CheckpointFile(path), signer, poll=0.01)
        await runner.start()
        await asyncio.sleep(0.1)
        await runner.stop()
        return runner

    asyncio.run(sign_some())
    with caplog.at_level(logging.CRITICAL, logger="opscore.checkpoints"):
        runner = asyncio.run(other_database())
    assert runner.halted is not None and "another database" in runner.halted
    assert [r.message for r in caplog.records if r.levelno == logging.CRITICAL] == ["checkpoints halted"]
    assert len(path.read_text().splitlines()) == 1  # nothing signed on top of it
