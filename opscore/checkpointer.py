"""The checkpointer: a background task that signs the live stream's heads (DESIGN §12).

It reads the audit stream (:meth:`opscore.storage.base.Store.stream_page`: every record
exactly once, in commit order, on SQLite and on PostgreSQL with several replicas) and
writes a signed line (:mod:`opscore.checkpoints`) every ``OPSCORE_CHECKPOINT_RECORDS``
records, or after ``OPSCORE_CHECKPOINT_SECONDS`` when there are new ones. The moment of a
line is the stream position of the last record it covers; the first line of a database
carries every head, each later one the heads that moved since.

It holds the head of every entity (one small entry each) and signs a new head only when its
record extends the head it holds (``seq`` + 1 and ``prevHash``): a chain rewritten in the
database since it was signed is refused loudly (one ``"checkpoint chain broken"`` error
line per entity) and stays pinned to what was signed, so verification reports it. That is
also why verification needs only the newest head of each entity.

Replicas (:mod:`opscore.storage.checkpoint_relay`): every replica runs a checkpointer; the
leader signs and publishes each line to the relay before appending it to its file, the
others copy the relay's lines to their files. A replica whose file disagrees with the
relay stops (``"checkpoints halted"``, critical) rather than fork or rewrite the stream.

It never sits in the path of a request: it reads what is committed, in pages, and signs
and writes off the event loop's critical path (JSON and signing of a large line in a
thread); measurements in ``docs/performance.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from opscore import audit
from opscore.checkpoints import (
    CheckpointFile,
    Checkpoints,
    Signer,
    heads_of,
    line_hash,
    make_line,
    read_checkpoints,
    signature_problem,
    text_hash,
)
from opscore.models import AuditQuery
from opscore.storage.base import Store
from opscore.storage.checkpoint_relay import CheckpointRelay, LocalRelay

log = logging.getLogger("opscore.checkpoints")

Key = tuple[str, str]


class Checkpointer:
    """Signs checkpoints of ``store``'s stream into ``file``, as leader of ``relay``."""

    def __init__(
        self,
        store: Store,
        file: CheckpointFile,
        signer: Signer,
        *,
        relay: CheckpointRelay | None = None,
        records: int = 1000,
        seconds: float = 60.0,
        poll: float = 0.5,
        page: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.file = file
        self.signer = signer
        self.relay = relay if relay is not None else LocalRelay()
        self.records = records
        self.seconds = seconds
        self.poll = poll
        self.page = page
        self.clock = clock
        self.halted: str | None = None
        """Why this replica stopped checkpointing (its file and the stream disagree), or ``None``."""
        self.leading = False
        self._loaded = False
        self._heads: dict[Key, tuple[int, str]] = {}
        self._pending: dict[Key, tuple[int, str]] = {}
        self._broken: set[Key] = set()
        self._position = "0"
        self._count = 0
        self._total = 0
        self._last_at = clock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._foreign_keys: set[str] = set()

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (and index) the file, connect the relay, start the task; ``OSError`` if the file cannot be written."""
        await asyncio.to_thread(self.file.check_writable)
        torn = await asyncio.to_thread(self.file.open)
        if torn is not None:
            log.warning("checkpoint file: cut off a torn last line", extra={"file": str(self.file.path)})
        await self.relay.open()
        self._task = asyncio.get_running_loop().create_task(self._main(), name="opscore-checkpointer")

    async def stop(self) -> None:
        """Let the task finish its step, then sign what is pending (a clean shutdown leaves nothing unsigned).

        The task is never cancelled in the middle of signing (a line published but not written,
        or written but not indexed): it is asked to stop between steps, and cancelled only if
        a step hangs (a database that does not answer).
        """
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=15)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        try:
            if self.halted is None:
                await asyncio.wait_for(self._drain(), timeout=10)
        except Exception:
            log.exception("checkpoint at shutdown failed")
        finally:
            await self.relay.close()

    async def _drain(self) -> None:
        while await self.step(final=True):
            pass

    async def _main(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            delay = self.poll
            try:
                more = await self.step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a database or disk hiccup: retry with backoff
                failures += 1
                more = False
                delay = min(30.0, self.poll * 2**failures)
                log.error("checkpoint step failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def signed(self) -> Checkpoints:
        """This replica's file read and checked (own key; lines of other keys on their chain alone)."""
        keys = {self.signer.key_id: self.signer.private.public_key()}
        return await asyncio.to_thread(lambda: read_checkpoints(self.file.texts(), keys, other_keys=True))

    # -- one step ---------------------------------------------------------------------------

    async def step(self, *, final: bool = False) -> bool:
        """Copy shared lines, read one page of the stream as leader, sign if due; more to read now?"""
        if self.halted is not None:
            return False
        await self._sync()
        if self.halted is not None:
            return False
        leading = await self.relay.lead()
        if leading and not self.leading:
            self._loaded = False
        self.leading = leading
        if not leading:
            return False
        if not self._loaded:
            await self._load()
            if self.halted is not None:
                return False
        first = len(self.file) == 0
        limit = self.page if first else max(1, min(self.page, self.records - self._count))
        rows = await self.store.stream_page(self._position, AuditQuery(limit=limit))
        for position, text in rows:
            self._take(position, text)
        caught_up = len(rows) < limit
        if self._count:
            if first:  # every head at once, after catching up with the stream
                due = caught_up or final
            else:
                due = final or self._count >= self.records or self.clock() - self._last_at >= self.seconds
            if due:
                await self._sign()
        return not caught_up

    def _take(self, position: str, text: str) -> None:
        """Fold one record into the heads, if it extends the head held for its entity."""
        record = audit.loads(text)
        key = (str(record.get("entityType")), str(record.get("entityId")))
        seq, hashed, prev = record.get("seq"), record.get("hash"), record.get("prevHash")
        self._position = position
        self._count += 1
        if key in self._broken:
            return
        known = self._heads.get(key)
        if known is None:
            links = seq == 1 and prev == audit.GENESIS
        else:
            links = seq == known[0] + 1 and prev == known[1]
            if not links and seq == known[0] and hashed == known[1]:
                return  # this very head again: nothing to add
        if links and isinstance(seq, int) and isinstance(hashed, str):
            self._heads[key] = self._pending[key] = (seq, hashed)
            return
        self._broken.add(key)
        log.error(
            "checkpoint chain broken",
            extra={
                "entityType": key[0],
                "entityId": key[1],
                "seq": seq,
                "signedSeq": None if known is None else known[0],
                "detail": "this record does not extend the head signed before: the chain was changed in the "
                "database; it stays pinned to the signed head (run `opscore audit verify --checkpoints`)",
            },
        )

    async def _sign(self) -> None:
        n = len(self.file) + 1
        full = n == 1
        heads = self._heads if full else self._pending
        total = self._total + self._count
        prev = self.file.last_hash
        at = datetime.now(UTC).isoformat(timespec="microseconds")
        started = time.perf_counter()
        line, text = await asyncio.to_thread(
            make_line,
            n=n,
            position=self._position,
            at=at,
            records=total,
            full=full,
            heads=dict(heads),
            prev=prev,
            signer=self.signer,
        )
        await self.relay.publish(n, text)
        try:
            await asyncio.to_thread(self.file.write, [text])
            self.file.extend([text], line)
        except OSError:
            if isinstance(self.relay, LocalRelay):
                raise  # the line exists nowhere: keep everything pending and try again
            log.error("checkpoint file write failed: the line is in the relay and will be copied", exc_info=True)
        self._pending = {}
        self._count = 0
        self._total = total
        self._last_at = self.clock()
        log.info(
            "checkpoint",
            extra={
                "n": n,
                "position": self._position,
                "heads": len(heads),
                "records": total,
                "seconds": round(time.perf_counter() - started, 6),
            },
        )

    # -- the file, the relay, the heads -----------------------------------------------------

    async def _sync(self) -> None:
        """Append the relay's lines this file lacks, each checked to extend the file's chain."""
        while rows := await self.relay.lines_after(len(self.file)):
            for n, text in rows:
                line = audit.loads(text)
                why = None
                if n != len(self.file) + 1 or line.get("n") != n:
                    why = f"the relay's line {n} does not follow this file's line {len(self.file)}"
                elif line.get("prev") != self.file.last_hash or text_hash(text) != line_hash(line):
                    why = f"the relay's line {n} does not extend this file's last line (or is not canonical JSON)"
                elif line.get("keyId") == self.signer.key_id:
                    why = signature_problem(line, {self.signer.key_id: self.signer.private.public_key()})
                elif line.get("keyId") not in self._foreign_keys:
                    self._foreign_keys.add(str(line.get("keyId")))
                    log.warning(
                        "checkpoint line signed by another key",
                        extra={"n": n, "keyId": line.get("keyId"), "ownKeyId": self.signer.key_id},
                    )
                if why is not None:
                    self._halt(why)
                    return
                await asyncio.to_thread(self.file.write, [text])
                self.file.extend([text], line)
                if self._loaded:
                    self._fold(line)

    def _fold(self, line: dict[str, Any]) -> None:
        for key, seq, hashed in heads_of(line):
            self._heads[key] = (seq, hashed)
        self._position = str(line["position"])
        self._total = int(line.get("records", 0))
        self._pending = {}
        self._count = 0
        self._last_at = self.clock()

    async def _load(self) -> None:
        """The heads, position and count signed so far: the fold of the file (checked against the relay)."""
        shared = not isinstance(self.relay, LocalRelay)
        if shared and len(self.file):
            rows = await self.relay.lines_after(len(self.file) - 1, 1)
            last_text = self.file.read(len(self.file) - 1, 1)
            if not rows or rows[0][1] != last_text[0]:
                self._halt(
                    "this replica's checkpoint file holds lines the database's checkpoint_lines table does not "
                    "(the table was changed, or the file belongs to another database)"
                )
                return
        heads: dict[Key, tuple[int, str]] = {}
        last: dict[str, Any] | None = None

        def fold() -> None:
            nonlocal last
            for text in self.file.texts():
                if text.strip():
                    last = audit.loads(text)
                    for key, seq, hashed in heads_of(last):
                        heads[key] = (seq, hashed)

        await asyncio.to_thread(fold)
        if last is not None and last.get("keyId") == self.signer.key_id:
            why = signature_problem(last, {self.signer.key_id: self.signer.private.public_key()})
            if why is not None:
                self._halt(f"the last checkpoint line does not verify: {why}")
                return
        self._heads, self._pending, self._broken = heads, {}, set()
        self._position, self._total, self._count = "0", 0, 0
        if last is not None:
            self._position = str(last["position"])
            self._total = int(last.get("records", 0))
            if not await self._matches_store(last):
                return
        self._last_at = self.clock()
        self._loaded = True

    async def _matches_store(self, last: dict[str, Any]) -> bool:
        """Whether the database holds the heads of the last line; entities that do not are broken.

        When none does, the file belongs to another database (or this one lost everything the
        file covers): halt rather than sign on top of it.
        """
        by_type: dict[str, list[tuple[str, int, str]]] = {}
        for (etype, eid), seq, hashed in heads_of(last):
            by_type.setdefault(etype, []).append((eid, seq, hashed))
        checked = matched = 0
        for etype, heads in by_type.items():
            for start in range(0, len(heads), 500):
                chunk = heads[start : start + 500]
                entities = await self.store.get_many(etype, [eid for eid, _, _ in chunk])
                for (eid, seq, hashed), entity in zip(chunk, entities, strict=True):
                    checked += 1
                    if entity is not None and (entity.seq > seq or (entity.seq == seq and entity.head_hash == hashed)):
                        matched += 1
                    else:
                        self._broken.add((etype, eid))
                        log.error(
                            "checkpoint chain broken",
                            extra={
                                "entityType": etype,
                                "entityId": eid,
                                "seq": None if entity is None else entity.seq,
                                "signedSeq": seq,
                                "detail": "the database's head is behind or beside the signed one",
                            },
                        )
        if checked and not matched:
            self._halt(
                "no entity of the last checkpoint line is in this database as signed: the checkpoint file "
                "belongs to another database (move it away), or this database lost what it covers"
            )
            return False
        return True

    def _halt(self, why: str) -> None:
        self.halted = why
        log.critical("checkpoints halted", extra={"detail": why, "file": str(self.file.path)})
