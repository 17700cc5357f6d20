"""``opscore keys signing-key`` and ``opscore audit verify --checkpoints … --public-key …``, as processes.

Against the database (SQLite file and PostgreSQL) and against an export: exit 0 when all
holds, 1 naming the entity and ``seq`` otherwise; the full rewrite passes without checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opscore import audit
from tests.servers import Server
from tests.storage.test_tamper import Scene
from tests.test_cli import opscore, populated  # noqa: F401 - the fixture


def problems(stdout: str) -> list[tuple[str, int | None, str]]:
    return [(p["entityId"], p["seq"], p["problem"]) for p in json.loads(stdout)["problems"]]


def test_signing_key_makes_a_key_pair_once(tmp_path: Path) -> None:
    made = opscore("keys", "signing-key", "--out", str(tmp_path / "signing.pem"), "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    assert answer["publicKey"] == str(tmp_path / "signing.pem.pub") and len(answer["keyId"]) == 64
    assert os.stat(tmp_path / "signing.pem").st_mode & 0o777 == 0o600
    assert (tmp_path / "signing.pem.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = opscore("keys", "signing-key", "--out", str(tmp_path / "signing.pem"), cwd=tmp_path)
    assert again.returncode == 1 and "never overwritten" in again.stderr


def test_verify_with_checkpoints_against_the_database_and_an_export(database_url: str, tmp_path: Path) -> None:
    scene = Scene(database_url, tmp_path)
    scene.build()
    env = {"OPSCORE_DATABASE_URL": database_url}
    signed = ["--checkpoints", str(scene.file), "--public-key", str(scene.public)]

    clean = opscore("audit", "verify", "--json", *signed, cwd=tmp_path, env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout) == {"ok": True, "entities": 3, "records": 24, "problems": []}
    export = tmp_path / "export.jsonl"
    assert opscore("audit", "export", "--out", str(export), cwd=tmp_path, env=env).returncode == 0
    offline = opscore("audit", "verify", "--file", str(export), *signed, cwd=tmp_path)
    assert offline.returncode == 0, offline.stdout + offline.stderr

    # a full rewrite of t-3 from seq 3 on, head included: a whole chain again
    chain = scene.chain("t-3")
    prev = chain[2][1]["prevHash"]
    for row_id, record in chain[2:]:
        record["details"] = {"rewritten": True} if record["seq"] == 3 else record["details"]
        record["prevHash"] = prev
        record["hash"] = prev = audit.digest(record)
        scene.write(row_id, record)
    scene.sql("UPDATE entities SET head_hash = %s WHERE entity_id = 't-3'", prev)

    unsigned = opscore("audit", "verify", cwd=tmp_path, env=env)
    assert unsigned.returncode == 0, unsigned.stdout  # the chain alone cannot tell
    caught = opscore("audit", "verify", "--json", *signed, cwd=tmp_path, env=env)
    assert caught.returncode == 1
    [(entity, seq, why)] = problems(caught.stdout)
    assert (entity, seq) == ("t-3", 8) and "signed checkpoint" in why

    rewritten = tmp_path / "rewritten.jsonl"
    assert opscore("audit", "export", "--out", str(rewritten), cwd=tmp_path, env=env).returncode == 0
    assert opscore("audit", "verify", "--file", str(rewritten), cwd=tmp_path).returncode == 0
    caught = opscore("audit", "verify", "--json", "--file", str(rewritten), *signed, cwd=tmp_path)
    assert caught.returncode == 1 and [(e, s) for e, s, _ in problems(caught.stdout)] == [("t-3", 8)]

    # the export cut before its trailer: detected without checkpoints
    lines = export.read_text(encoding="utf-8").splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    result = opscore("audit", "verify", "--file", str(cut), cwd=tmp_path)
    assert result.returncode == 1 and "end line" in result.stdout

    # a checkpoint line edited: its signature fails, and it is named
    texts = scene.file.read_text(encoding="utf-8").splitlines()
    line = json.loads(texts[1])
    first_type = next(iter(line["heads"]))
    first_id = next(iter(line["heads"][first_type]))
    line["heads"][first_type][first_id][0] += 1
    texts[1] = json.dumps(line)
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = opscore("audit", "verify", "--json", "--file", str(export), "--checkpoints", str(forged), "--public-key",
                     str(scene.public), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert ("line 2", None) in [(e, s) for e, s, _ in problems(result.stdout)]
    assert "signature does not verify" in result.stdout

    # usage: one without the other
    half = opscore("audit", "verify", "--checkpoints", str(scene.file), cwd=tmp_path, env=env)
    assert half.returncode == 2 and "--public-key" in half.stderr


def test_an_export_through_the_server_carries_the_heads(populated: Server, tmp_path: Path) -> None:  # noqa: F811
    env = {"OPSCORE_API_URL": populated.url, "OPSCORE_API_KEY": populated.api_key}
    out = tmp_path / "served.jsonl"
    exported = opscore("audit", "export", "--server", "--out", str(out), "--json", cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line).get("kind") for line in lines[-4:]] == ["head", "head", "head", "end"]
    verified = opscore("audit", "verify", "--file", str(out), "--json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout) == {"ok": True, "entities": 3, "records": 15, "problems": []}
    cut = tmp_path / "cut.jsonl"
    records = [json.loads(line) for line in lines]
    tail = max(r["seq"] for r in records if r.get("entityId") == "c2" and "kind" not in r)
    kept = [
        line
        for line, r in zip(lines, records, strict=True)
        if not (r.get("entityId") == "c2" and r.get("seq") == tail and "kind" not in r)
    ]
    cut.write_text("\n".join(kept) + "\n", encoding="utf-8")
    result = opscore("audit", "verify", "--file", str(cut), "--json", cwd=tmp_path)
    assert result.returncode == 1 and any(p[0] == "c2" for p in problems(result.stdout))
