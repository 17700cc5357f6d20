"""Signed checkpoints (DESIGN §12): what a line holds, how it is signed, kept and verified.

The hash chain proves that nothing changed since the head it ends in, but whoever can write
the database can recompute every hash after an edit, entity head included. A checkpoint
pins the heads from outside the database: a JSON line, signed with Ed25519, appended to
``OPSCORE_CHECKPOINT_FILE`` (which the database's writers cannot reach)::

    {"v": 1, "n": 17, "position": "123456", "at": "2026-11-23T10:00:00.123456+00:00",
     "records": 17000, "full": false,
     "heads": {"agent": {"agent-7": [12, "<hash of its record seq 12>"], ...}, "task": {...}},
     "prev": "<SHA-256 of line 16>", "keyId": "<SHA-256 of the public key>", "sig": "<base64>"}

- ``position`` is the live stream's position (:meth:`opscore.storage.base.Store.stream_page`)
  of the last record covered: the moment is a point of the one commit order, so a record
  that commits late is covered by the next line, never skipped.
- ``heads`` holds the heads that changed since line ``n - 1``; the first line (``full``)
  holds every head. The head map at line ``n`` is the fold of lines 1..n, and a line stays
  as small as the activity since the previous one (≈ 1,000 heads), however large the fleet.
- ``prev`` chains the lines (SHA-256 of the previous line's canonical JSON, 64 zeros for the
  first); ``sig`` signs the canonical JSON (:func:`opscore.audit.canonical`) of the line
  without ``sig``; ``keyId`` names the key, so a rotated key's lines still verify with the
  old public key beside the new one.

Why the newest head per entity is enough to verify: the checkpointer signs a head only when
its record links (``seq`` + 1, ``prevHash``) to the head it holds for that entity
(:class:`opscore.checkpointer.Checkpointer`), so each signed head extends the one signed
before, and the record at the newest pinned ``seq`` commits, through the chain, to every
earlier one. Verification keeps one :class:`~opscore.audit.Pin` per entity and streams.

This module is pure apart from reading key files and :class:`CheckpointFile`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from opscore import audit
from opscore.machines import MACHINES

VERSION = 1
GENESIS = "0" * 64

INITIAL_STATES: dict[str, str] = {name: decl["initial"] for name, decl in MACHINES.items()}
"""Each entity type's initial state: where a chain's replay starts (:class:`opscore.audit.ChainVerifier`)."""


def verifier(pins: Mapping[tuple[str, str], audit.Pin] | None = None) -> audit.ChainVerifier:
    """The verifier every entry point uses: the machines' initial states, and pins when given."""
    return audit.ChainVerifier(INITIAL_STATES, pins)


# -- keys -----------------------------------------------------------------------------------


class InvalidCheckpointSettings(ValueError):
    """Checkpoints are configured but cannot be kept (Ops-Core refuses to start): the message says why."""


class InvalidSigningKey(InvalidCheckpointSettings):
    """A signing or public key that cannot be used; the message names the file, never the key."""


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: what a line's ``keyId`` names."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Signer:
    """The private key checkpoints are signed with (``OPSCORE_SIGNING_KEY``)."""

    private: Ed25519PrivateKey = field(repr=False)
    key_id: str

    @classmethod
    def of(cls, private: Ed25519PrivateKey) -> Signer:
        return cls(private, key_id(private.public_key()))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.private.sign(data)).decode("ascii")

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_signer(path: str | Path) -> Signer:
    """The Ed25519 private key in PEM at ``path``; :class:`InvalidSigningKey` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidSigningKey(f"OPSCORE_SIGNING_KEY {str(path)!r} cannot be read: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidSigningKey(
            f"OPSCORE_SIGNING_KEY {str(path)!r} is not an unencrypted PEM private key "
            "(make one with `opscore keys signing-key --out FILE`)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidSigningKey(f"OPSCORE_SIGNING_KEY {str(path)!r} is not an Ed25519 key")
    return Signer.of(key)


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, Ed25519PublicKey]:
    """``{keyId: key}`` of Ed25519 public keys in PEM (a private key's file gives its public key)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidSigningKey(f"public key {str(path)!r} cannot be read: {exc.strerror}") from exc
        public: Any
        try:
            public = serialization.load_pem_public_key(data)
        except ValueError:
            try:
                public = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError) as exc:
                raise InvalidSigningKey(f"{str(path)!r} is not a PEM public key") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise InvalidSigningKey(f"{str(path)!r} is not an Ed25519 public key")
        keys[key_id(public)] = public
    return keys


def make_signing_key(out: str | Path) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (PEM, mode 600) to ``out`` and its public key to ``out.pub``.

    Refuses (``FileExistsError``) to overwrite either file: a lost signing key is recoverable
    (make another and keep the old public key), an overwritten one leaves lines nobody can check.
    Returns both paths and the key id.
    """
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + ".pub")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = Signer.of(private)
    if public_path.exists():
        raise FileExistsError(f"{public_path} exists")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    with public_path.open("xb") as fh:
        fh.write(signer.public_pem())
    return private_path, public_path, signer.key_id


# -- lines ----------------------------------------------------------------------------------

Heads = Mapping[tuple[str, str], tuple[int, str]]
"""``{(entityType, entityId): (seq, hash)}``."""


def line_hash(line: Mapping[str, Any]) -> str:
    """What the next line's ``prev`` holds: SHA-256 of this line's canonical JSON, ``sig`` included."""
    return hashlib.sha256(audit.canonical(dict(line))).hexdigest()


def text_hash(text: str) -> str:
    """:func:`line_hash` of a line from its text, when the text is canonical (every line Ops-Core writes).

    Hashing the text spares re-encoding a large line (the first one holds every head: ~16 MB
    and 0.3 s for 100,000 agents) each time the next line is made.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def grouped(heads: Heads) -> dict[str, dict[str, list[Any]]]:
    """``heads`` as a line holds them: ``{entityType: {entityId: [seq, hash]}}``."""
    out: dict[str, dict[str, list[Any]]] = {}
    for (etype, eid), (seq, hashed) in heads.items():
        out.setdefault(etype, {})[eid] = [seq, hashed]
    return out


def make_line(
    *,
    n: int,
    position: str,
    at: str,
    records: int,
    full: bool,
    heads: Heads,
    prev: str,
    signer: Signer,
) -> tuple[dict[str, Any], str]:
    """A signed line and its text (canonical JSON, no newline)."""
    line: dict[str, Any] = {
        "v": VERSION,
        "n": n,
        "position": position,
        "at": at,
        "records": records,
        "full": full,
        "heads": grouped(heads),
        "prev": prev,
        "keyId": signer.key_id,
    }
    line["sig"] = signer.sign(audit.canonical(line))
    return line, audit.canonical(line).decode("utf-8")


def signature_problem(line: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """Why ``line``'s signature does not hold under ``keys`` (``None``: it holds)."""
    public = keys.get(str(line.get("keyId")))
    if public is None:
        return f"signed by key {str(line.get('keyId'))[:16]}…, which is not among the public keys given"
    try:
        sig = base64.b64decode(str(line.get("sig")), validate=True)
        public.verify(sig, audit.canonical({k: v for k, v in line.items() if k != "sig"}))
    except (InvalidSignature, ValueError):
        return "its signature does not verify: the line was changed or forged"
    return None


def shape_problem(line: Any) -> str | None:
    """Why ``line`` is not a checkpoint line at all (``None``: it has the shape of one)."""
    if not isinstance(line, dict):
        return "not a JSON object"
    if line.get("v") != VERSION:
        return f"version {line.get('v')!r}, not {VERSION}"
    for name, kind in (("n", int), ("position", str), ("prev", str), ("keyId", str), ("sig", str), ("heads", dict)):
        if not isinstance(line.get(name), kind):
            return f"no {name}"
    for etype, ids in line["heads"].items():
        if not isinstance(ids, dict):
            return f"heads of {etype!r} are not an object"
        for head in ids.values():
            if not (
                isinstance(head, list)
                and len(head) == 2
                and isinstance(head[0], int)
                and isinstance(head[1], str)
                and head[0] >= 1
            ):
                return f"a head of {etype!r} is not [seq, hash]"
    return None


def heads_of(line: Mapping[str, Any]) -> Iterator[tuple[tuple[str, str], int, str]]:
    for etype, ids in line["heads"].items():
        for eid, (seq, hashed) in ids.items():
            yield (etype, eid), seq, hashed


@dataclass
class Checkpoints:
    """A checkpoint file read and checked: the newest signed head of every entity, and what failed."""

    pins: dict[tuple[str, str], audit.Pin] = field(default_factory=dict)
    lines: int = 0
    """Lines that verified (the pins come from these)."""
    last: dict[str, Any] | None = None
    problems: list[audit.Problem] = field(default_factory=list)


def read_checkpoints(
    texts: Iterable[str], keys: Mapping[str, Ed25519PublicKey], *, other_keys: bool = False
) -> Checkpoints:
    """Check every line (shape, signature, ``n`` and ``prev`` chain) and fold their heads.

    Only the lines before the first bad one are trusted: their pins are kept (so the
    database is still checked against everything that verified) and the bad line is a
    problem, with ``entityType`` ``"checkpoint"`` and its line number. Within the good lines
    a head must never go back (lower ``seq``, or the same ``seq`` with another hash).

    ``other_keys``: a line signed by a key not in ``keys`` is taken on the strength of the
    chain alone (the server checking its own file, which holds lines of rotated keys it
    cannot verify; it warned when it copied them). Offline verification never does that.
    """
    found = Checkpoints()
    prev = GENESIS
    number = 0
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            line = audit.loads(text)
        except ValueError:
            line = None
        why = shape_problem(line) if line is not None else "not JSON"
        if why is None:
            assert isinstance(line, dict)
            why = None if other_keys and line["keyId"] not in keys else signature_problem(line, keys)
            if why is None and line["n"] != found.lines + 1:
                why = f"it is line #{line['n']} where #{found.lines + 1} was due: lines were removed or reordered"
            elif why is None and line["prev"] != prev:
                why = "its prev does not match the line before it: the chain of lines is broken"
            elif why is None and found.lines == 0 and line.get("full") is not True:
                why = "the first line is not a full checkpoint (the file lost its beginning)"
        if why is not None:
            found.problems.append(audit.Problem("checkpoint", f"line {number}", None, why))
            return found
        assert isinstance(line, dict)
        for key, seq, hashed in heads_of(line):
            pin = found.pins.get(key)
            if pin is not None and (seq < pin.seq or (seq == pin.seq and hashed != pin.hash)):
                found.problems.append(
                    audit.Problem(
                        key[0],
                        key[1],
                        seq,
                        f"checkpoint #{line['n']} moves this head back from seq {pin.seq} (#{pin.line}) to {seq}",
                    )
                )
                continue
            found.pins[key] = audit.Pin(seq, hashed, line["n"])
        found.lines += 1
        found.last = line
        prev = line_hash(line)
    return found


# -- verification with checkpoints ----------------------------------------------------------


def _with(checkpoints: Checkpoints | None) -> audit.ChainVerifier:
    check = verifier(checkpoints.pins if checkpoints is not None else None)
    if checkpoints is not None:
        check.result.problems.extend(checkpoints.problems)
    return check


async def verify_database(store: Any, checkpoints: Checkpoints | None = None) -> audit.Verification:
    """Every chain, every head, state and revision of ``store``, and every pin of ``checkpoints``."""
    result: audit.Verification = await store.verify(_with(checkpoints))
    return result


def verify_export(lines: Iterable[str], checkpoints: Checkpoints | None = None) -> audit.Verification:
    """An exported file (records, trailer of heads, end line), and every pin of ``checkpoints``."""
    return audit.verify_export(lines, _with(checkpoints))


def read_checkpoint_file(path: str | Path, public_keys: Iterable[str | Path]) -> Checkpoints:
    """:func:`read_checkpoints` of a file, with the keys in the PEM files ``public_keys``."""
    keys = load_public_keys(public_keys)
    with open(path, encoding="utf-8") as fh:
        return read_checkpoints(fh, keys)


# -- the file -------------------------------------------------------------------------------


class CheckpointFile:
    """``OPSCORE_CHECKPOINT_FILE``: signed lines appended, flushed and fsynced, read back by number.

    Keeps the byte offset of every complete line, so a page of lines is one seek however long
    the file. A last line without its newline (a crash mid-write) was never complete, never
    served nor replicated: opening cuts it off.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offsets: list[int] = []
        self._size = 0
        self.last: dict[str, Any] | None = None
        self.last_hash = GENESIS
        """:func:`line_hash` of the last line (64 zeros when empty): what the next line's ``prev`` holds."""

    def open(self) -> str | None:
        """Index the lines already there; what was cut off (a torn last line), if anything."""
        self._offsets = []
        self._size = 0
        self.last = None
        self.last_hash = GENESIS
        if not self.path.exists():
            return None
        torn = None
        with self.path.open("rb+") as fh:
            offset = 0
            last_text = b""
            for raw in fh:
                if not raw.endswith(b"\n"):
                    torn = raw.decode("utf-8", "replace")[:80]
                    break
                self._offsets.append(offset)
                offset += len(raw)
                if raw.strip():
                    last_text = raw
            if torn is not None:
                fh.truncate(offset)
                os.fsync(fh.fileno())
            self._size = offset
        if last_text.strip():
            self.last = audit.loads(last_text.decode("utf-8"))
            self.last_hash = text_hash(last_text.decode("utf-8").rstrip("\n"))
        return torn

    def __len__(self) -> int:
        return len(self._offsets)

    def check_writable(self) -> None:
        """Create the file if need be, or raise ``OSError``: a start-up that cannot keep checkpoints refuses."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.close(fd)

    def append(self, texts: list[str], last: dict[str, Any]) -> None:
        """Append lines and make them durable (:meth:`write` then :meth:`extend`)."""
        self.write(texts)
        self.extend(texts, last)

    def write(self, texts: list[str]) -> None:
        """Append lines to the file, flushed and fsynced; on failure the file is cut back to where it was.

        Only I/O: a thread may run it while the event loop serves pages of the index, which
        :meth:`extend` updates afterwards (on the loop).
        """
        data = "".join(t + "\n" for t in texts).encode("utf-8")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, self._size)
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    def extend(self, texts: list[str], last: dict[str, Any]) -> None:
        """Index lines :meth:`write` made durable."""
        offset = self._size
        for text in texts:
            self._offsets.append(offset)
            offset += len(text.encode("utf-8")) + 1
        self._size = offset
        self.last = last
        self.last_hash = text_hash(texts[-1])

    def read(self, after: int, limit: int) -> list[str]:
        """Lines ``after + 1`` … ``after + limit`` (numbered from 1), without their newlines."""
        if after >= len(self._offsets) or limit <= 0:
            return []
        start = self._offsets[after]
        stop_index = after + limit
        stop = self._offsets[stop_index] if stop_index < len(self._offsets) else self._size
        with self.path.open("rb") as fh:
            fh.seek(start)
            data = fh.read(stop - start)
        return data.decode("utf-8").splitlines()

    def texts(self) -> Iterator[str]:
        """Every complete line, in order."""
        if not self._offsets:
            return
        with self.path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    return
                yield raw.decode("utf-8").rstrip("\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- exports --------------------------------------------------------------------------------


async def read_heads(store: Any, *, page: int = 5000) -> dict[tuple[str, str], audit.Head]:
    """Every entity's head, state and revision (``store`` is a :class:`opscore.storage.base.Store`)."""
    from opscore.models import EntityQuery

    heads: dict[tuple[str, str], audit.Head] = {}
    for etype in MACHINES:
        after: str | None = None
        while True:
            entities = await store.list_entities(EntityQuery(etype, after_id=after, limit=page))
            for e in entities:
                heads[(e.entity_type, e.entity_id)] = audit.Head(
                    e.entity_type, e.entity_id, e.seq, e.head_hash, e.state, e.revision
                )
            if len(entities) < page:
                break
            after = entities[-1].entity_id
    return heads


async def export_database(store: Any, write: Callable[[str], Any], *, page: int = 5000) -> tuple[int, int]:
    """Write an export of ``store`` through ``write`` (one call per line, newline included).

    The heads are read first, then the records in id order up to those heads, then the
    trailer (:func:`opscore.audit.export_records`): consistent while Ops-Core keeps writing.
    Returns (records, entities) written.
    """
    from opscore.models import AuditQuery

    heads = await read_heads(store, page=page)
    written = 0
    after_id = 0
    while rows := await store.list_audit(AuditQuery(after_id=after_id, limit=page)):
        for line in audit.export_records(rows, heads):
            write(line + "\n")
            written += 1
        after_id = rows[-1]["id"]
    for line in audit.export_trailer(heads, written):
        write(line + "\n")
    return written, len(heads)
