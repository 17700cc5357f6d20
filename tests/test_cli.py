"""``python -m opscore``: audit export/verify against the database and a file (client commands: tests/client)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.helpers import report
from tests.servers import ROOT, Server


def opscore(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
    full = {**base, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "opscore", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def populated(sqlite_url: str, tmp_path: Path) -> Iterator[Server]:
    server = Server(database_url=sqlite_url, log_path=tmp_path / "server.log").start()
    with server.client() as client:
        for agent in ("c1", "c2", "c3"):
            for state in ("initializing", "idle", "active", "registered", "idle"):
                assert report(client, agent, state).status_code in (200, 409)
    yield server
    server.stop()


def test_export_then_verify_the_file_offline(populated: Server, sqlite_url: str, tmp_path: Path) -> None:
    env = {"OPSCORE_DATABASE_URL": sqlite_url}
    out = tmp_path / "audit.jsonl"
    exported = opscore("audit", "export", "--out", str(out), "--json", cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout) == {"exported": 15, "file": str(out)}
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 15 + 3 + 1  # the records, a trailer line per entity head, the end line
    with populated.client() as client:
        assert [json.loads(line) for line in lines[:15]] == client.get("/v1/opscore/audit").json()["items"]
    assert [json.loads(line)["kind"] for line in lines[15:]] == ["head"] * 3 + ["end"]

    offline = opscore("audit", "verify", "--file", str(out), "--json", cwd=tmp_path)  # no database configured
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert json.loads(offline.stdout) == {"ok": True, "entities": 3, "records": 15, "problems": []}

    live = opscore("audit", "verify", "--json", cwd=tmp_path, env=env)  # read-only beside the running server
    assert live.returncode == 0, live.stdout + live.stderr
    assert json.loads(live.stdout)["ok"] is True


def tamper(path: Path, index: int, change: dict | None) -> Path:
    lines = path.read_text(encoding="utf-8").splitlines()
    if change is None:
        del lines[index]
    else:
        lines[index] = json.dumps({**json.loads(lines[index]), **change})
    bad = path.with_name(f"bad-{index}.jsonl")
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return bad


def test_a_tampered_file_fails_with_the_problem(populated: Server, sqlite_url: str, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    assert (
        opscore("audit", "export", "--out", str(out), cwd=tmp_path, env={"OPSCORE_DATABASE_URL": sqlite_url}).returncode
        == 0
    )
    cases = {
        "changed field": (tamper(out, 4, {"dest": "active"}), "hash does not match"),
        "deleted record": (tamper(out, 1, None), "missing or repeated"),
    }
    for label, (bad, problem) in cases.items():
        result = opscore("audit", "verify", "--file", str(bad), "--json", cwd=tmp_path)
        assert result.returncode == 1, label
        verdict = json.loads(result.stdout)
        assert verdict["ok"] is False
        assert any(problem in p["problem"] for p in verdict["problems"]), (label, verdict)


def test_verify_against_a_tampered_database(populated: Server, sqlite_url: str, tmp_path: Path) -> None:
    populated.stop()
    env = {"OPSCORE_DATABASE_URL": sqlite_url}
    clean = opscore("audit", "verify", cwd=tmp_path, env=env)  # no server running
    assert clean.returncode == 0, clean.stdout + clean.stderr
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        (body,) = conn.execute("SELECT body FROM audit WHERE id = 3").fetchone()
        record = json.loads(body)
        record["details"] = {"forged": True}
        conn.execute("UPDATE audit SET body = ? WHERE id = 3", (json.dumps(record),))
        conn.execute("DELETE FROM audit WHERE id = (SELECT MAX(id) FROM audit)")
    conn.close()
    result = opscore("audit", "verify", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 1
    problems = [p["problem"] for p in json.loads(result.stdout)["problems"]]
    assert any("hash does not match" in p for p in problems)
    assert any("entity head" in p for p in problems)


def test_serve_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    result = opscore("serve", "--port", "9", cwd=tmp_path)
    assert result.returncode == 2
    assert "OPSCORE_API_KEY is not set" in result.stderr


def test_verify_reports_a_file_that_is_not_json_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nthis is not json\n', encoding="utf-8")
    result = opscore("audit", "verify", "--file", str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert "line 2" in result.stdout + result.stderr
