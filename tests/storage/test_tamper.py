"""Tampering, one kind at a time, on a real SQLite file and on PostgreSQL (issue 14, item 5).

Each test builds three agents' chains through the engine, signs checkpoints of them with the
real :class:`~opscore.checkpointer.Checkpointer` (PostgreSQL: through its relay table), then
changes the database with raw SQL as someone with database access would, and verifies twice:
without checkpoints (what the chain alone implies) and with them. What each mode catches:

| tampering                                   | without checkpoints | with checkpoints |
|---------------------------------------------|---------------------|------------------|
| a byte edited in a record                   | yes (hash)          | yes              |
| a record deleted                            | yes (seq, prevHash) | yes              |
| two records swapped                         | yes (seq order)     | yes              |
| the tail deleted (head left as it was)      | yes (entity head)   | yes              |
| the tail deleted, head/state moved back     | NO                  | yes              |
| a plain UPDATE of an entity's state         | yes (replay)        | yes              |
| a full rewrite (every later hash, the head) | NO                  | yes              |
| a whole entity deleted (row and records)    | NO                  | yes              |
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from opscore import audit, checkpoints
from opscore.checkpointer import Checkpointer
from opscore.checkpoints import CheckpointFile, Checkpoints, make_signing_key
from opscore.engine import Context, Engine
from opscore.models import Entity
from opscore.storage import Store, open_store
from opscore.storage.checkpoint_relay import open_relay
from tests.storage.conftest import Backend, until

FLOW = ["initializing", "idle", "active", "idle", "active", "error", "idle"]
AGENTS = ("t-1", "t-2", "t-3")
CTX = Context(actor="key:tamper", request_id="r-tamper")


async def populate(store: Store, signed_once: Callable[[], Awaitable[None]]) -> None:
    """Three agents along FLOW (7 applied records each) and one refusal each (seq 8).

    ``signed_once`` is awaited after the first three records: the file then has a first line
    before the rest arrive, however fast the machine (on a quiet one, all 24 records could
    otherwise land before the checkpointer's first step and be signed in one line).
    """
    engine = Engine(store)
    for n, state in enumerate(FLOW):
        if n == 1:
            await signed_once()
        for agent in AGENTS:
            await engine.report("agent", agent, state, ctx=CTX, create=Entity("agent", agent, "registered"))
    for agent in AGENTS:
        with pytest.raises(Exception, match="cannot go"):
            await engine.report("agent", agent, "registered", ctx=CTX)


class Scene:
    """A populated database whose every record is covered by signed checkpoints."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.db = Backend("sqlite" if url.startswith("sqlite") else "postgres", url)
        self.url = url
        self.file = tmp / "checkpoints.jsonl"
        self.private, self.public, _ = make_signing_key(tmp / "signing.pem")

    def run(self, scenario: Callable[[Store], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            store = open_store(self.url)
            await store.open()
            try:
                return await scenario(store)
            finally:
                await store.close()

        return asyncio.run(main())

    def build(self) -> None:
        async def scenario(store: Store) -> None:
            runner = Checkpointer(
                store,
                CheckpointFile(self.file),
                checkpoints.load_signer(self.private),
                relay=open_relay(self.url),
                records=5,
                seconds=0.2,  # the last 4 records: signed by time
                poll=0.01,
            )
            await runner.start()  # before the records: a full first line, then lines of what moved
            # up to 30 s each on a loaded machine
            await populate(store, lambda: until(lambda: runner.file.last is not None, timeout=30))
            await until(lambda: runner.file.last is not None and runner.file.last["records"] == 24, timeout=30)
            await runner.stop()
            assert runner.halted is None
            assert runner.file.last is not None and runner.file.last["records"] == 24  # every record is signed

        self.run(scenario)

    def signed(self) -> Checkpoints:
        found = checkpoints.read_checkpoint_file(self.file, [self.public])
        assert not found.problems and found.lines >= 2
        return found

    def verify(self, with_checkpoints: bool) -> audit.Verification:
        signed = self.signed() if with_checkpoints else None
        return self.run(lambda store: checkpoints.verify_database(store, signed))

    def sql(self, statement: str, *params: Any) -> int:
        return asyncio.run(self.db.execute(statement, params))

    def rows(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        return asyncio.run(self.db.query(statement, params))

    def chain(self, agent: str) -> list[tuple[int, dict[str, Any]]]:
        """``[(id, record)]`` of an agent, in seq order, read past the store."""
        found = self.rows("SELECT id, body FROM audit WHERE entity_id = %s ORDER BY seq", agent)
        return [(row_id, json.loads(body)) for row_id, body in found]

    def write(self, row_id: int, record: dict[str, Any]) -> None:
        body = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        assert self.sql("UPDATE audit SET body = %s WHERE id = %s", body, row_id) == 1


@pytest.fixture
def scene(database_url: str, tmp_path: Path) -> Scene:
    built = Scene(database_url, tmp_path)
    built.build()
    assert built.verify(with_checkpoints=False).ok
    assert built.verify(with_checkpoints=True).ok
    return built


def named(result: audit.Verification) -> set[tuple[str, int | None]]:
    return {(p.entity_id, p.seq) for p in result.problems}


def texts(result: audit.Verification) -> str:
    return "\n".join(f"{p.entity_id} {p.seq}: {p.problem}" for p in result.problems)


def test_a_byte_edited_in_a_record(scene: Scene) -> None:
    row_id, record = scene.chain("t-2")[3]
    record["actor"] = "key:tampeR"
    scene.write(row_id, record)
    for mode in (False, True):
        result = scene.verify(mode)
        assert ("t-2", 4) in named(result), texts(result)
        assert "hash does not match" in texts(result)


def test_a_record_deleted(scene: Scene) -> None:
    row_id, _ = scene.chain("t-1")[2]
    assert scene.sql("DELETE FROM audit WHERE id = %s", row_id) == 1
    for mode in (False, True):
        result = scene.verify(mode)
        assert ("t-1", 4) in named(result), texts(result)
        assert "seq 4 follows 2" in texts(result)


def test_two_records_swapped(scene: Scene) -> None:
    (first_id, first), (second_id, second) = scene.chain("t-3")[2:4]
    scene.write(first_id, second)
    scene.write(second_id, first)
    for mode in (False, True):
        result = scene.verify(mode)
        assert ("t-3", 4) in named(result), texts(result)
        assert "seq 4 follows 2" in texts(result)


def test_the_tail_truncated(scene: Scene) -> None:
    tail = [row_id for row_id, _ in scene.chain("t-1")[5:]]
    assert scene.sql(f"DELETE FROM audit WHERE id IN ({','.join(map(str, tail))})") == 3
    for mode in (False, True):
        result = scene.verify(mode)
        assert "entity head is at seq 8 but the chain ends at 5" in texts(result)
    assert ("t-1", 8) in named(scene.verify(True))


def test_the_tail_truncated_with_the_head_moved_back(scene: Scene) -> None:
    """Records deleted and the entity row set to what is left: only a checkpoint knows."""
    kept = scene.chain("t-1")[:5]
    tail = [row_id for row_id, _ in scene.chain("t-1")[5:]]
    assert scene.sql(f"DELETE FROM audit WHERE id IN ({','.join(map(str, tail))})") == 3
    last = kept[-1][1]
    scene.sql(
        "UPDATE entities SET seq = %s, head_hash = %s, state = %s, revision = %s WHERE entity_id = %s",
        last["seq"],
        last["hash"],
        last["dest"],
        5,
        "t-1",
    )
    assert scene.verify(False).ok  # the chain alone cannot know
    result = scene.verify(True)
    assert named(result) == {("t-1", 8)}, texts(result)
    assert "covers this chain up to seq 8, but it ends at seq 5" in texts(result)


def test_a_plain_update_of_an_entity_state(scene: Scene) -> None:
    assert scene.sql("UPDATE entities SET state = 'active' WHERE entity_id = 't-2'") == 1
    for mode in (False, True):
        result = scene.verify(mode)
        assert named(result) == {("t-2", 8)}, texts(result)
        assert "entity state is 'active' but its chain replays to 'idle'" in texts(result)


def test_a_full_rewrite_passes_the_chain_and_fails_the_checkpoints(scene: Scene) -> None:
    """A record changed, then every later hash and the entity head recomputed: the chain is whole again.

    This is why checkpoints exist: only a signature kept outside the database tells.
    """
    chain = scene.chain("t-3")
    prev = chain[2][1]["prevHash"]
    for row_id, record in chain[2:]:
        if record["seq"] == 3:
            record["actor"] = "key:someone-else"
        record["prevHash"] = prev
        record["hash"] = prev = audit.digest(record)
        scene.write(row_id, record)
    scene.sql("UPDATE entities SET head_hash = %s WHERE entity_id = 't-3'", prev)
    assert scene.verify(False).ok
    result = scene.verify(True)
    assert named(result) == {("t-3", 8)}, texts(result)
    assert "not the one signed checkpoint" in texts(result) and "at or before seq 8" in texts(result)


def test_a_whole_entity_deleted(scene: Scene) -> None:
    scene.sql("DELETE FROM audit WHERE entity_id = 't-2'")
    scene.sql("DELETE FROM entities WHERE entity_id = 't-2'")
    scene.sql("DELETE FROM labels WHERE entity_id = 't-2'")
    assert scene.verify(False).ok
    result = scene.verify(True)
    assert named(result) == {("t-2", 8)}, texts(result)
    assert "has no record at all" in texts(result)


def test_an_export_detects_a_cut_tail_and_the_checkpoints_a_rewritten_one(scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"

    async def export(store: Store) -> tuple[int, int]:
        with out.open("w", encoding="utf-8") as fh:
            return await checkpoints.export_database(store, fh.write)

    assert scene.run(export) == (24, 3)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert checkpoints.verify_export(lines).ok
    assert checkpoints.verify_export(lines, scene.signed()).ok

    # the last record of t-1 removed: its head line in the trailer says more
    last_of_t1 = max(i for i, line in enumerate(lines) if '"entityId":"t-1"' in line and '"kind"' not in line)
    cut = lines[:last_of_t1] + lines[last_of_t1 + 1 :]
    result = checkpoints.verify_export(cut)
    assert "entity head is at seq 8 but the chain ends at 7" in texts(result)
    assert "the end line counts 24 records" in texts(result)

    # the file cut short: no end line
    assert "ends without the export's end line" in texts(checkpoints.verify_export(lines[:10]))

    # a consistent forgery of the file (records and trailer rewritten): only the checkpoints tell
    forged, prev = [], audit.GENESIS
    for line in lines:
        item = json.loads(line)
        if item.get("entityId") == "t-1" and "kind" not in item:
            item["details"] = {"forged": True}
            item["prevHash"] = prev
            item["hash"] = prev = audit.digest(item)
        elif item.get("kind") == "head" and item["entityId"] == "t-1":
            item["hash"] = prev
        forged.append(json.dumps(item))
    assert checkpoints.verify_export(forged).ok
    result = checkpoints.verify_export(forged, scene.signed())
    assert named(result) == {("t-1", 8)}, texts(result)
