"""Every client command of ``opscore`` against a real server: text for people, ``--json`` parsed, errors.

Most commands run in this process (``cli.main``: the same code path as the ``opscore`` script,
without an interpreter start per command); what is about the process itself (exit status,
no traceback, stdout versus stderr, ``--version``, start-up time) runs ``python -m opscore``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opscore import cli
from tests.client.conftest import FAILING_DEFINITION, TWO_STEPS, Live, wait_until
from tests.servers import ROOT, free_port


@pytest.fixture
def env(live: Live, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The CLI's environment: the live server and its admin key; a folder without .env or database."""
    for name in list(os.environ):
        if name.startswith(("OPSCORE_", "AGENTKIT_", "SIMULATOR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPSCORE_API_URL", live.url)
    monkeypatch.setenv("OPSCORE_API_KEY", live.server.api_key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Ran:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert "\x1b[" not in out, "colours only on a terminal"
    return Ran(code, out, err)


def opscore(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None) -> Ran:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPSCORE_", "AGENTKIT_"))}
    done = subprocess.run(
        [sys.executable, "-m", "opscore", *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Ran(done.returncode, done.stdout, done.stderr)


# -- agents --------------------------------------------------------------------------------------


def test_agents_report_show_list_trigger_register(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moved = run(capsys, "agents", "report", "k1", "initializing")
    assert moved.code == 0 and moved.out.startswith("k1: registered -> initializing  (revision 1, audit record ")
    answer = run(capsys, "agents", "report", "k1", "idle", "--details", '{"note": "up"}', "--json").json()
    assert (answer["state"], answer["previousState"], answer["changed"]) == ("idle", "initializing", True)
    assert "unchanged" in run(capsys, "agents", "report", "k1", "idle").out

    shown = run(capsys, "agents", "show", "k1")
    assert shown.code == 0 and "state:" in shown.out and "idle" in shown.out
    assert run(capsys, "agents", "show", "k1", "--json").json()["revision"] == 2

    registered = run(capsys, "agents", "register", "k2", "--capability", "cli", "--capability", "x", "--json")
    assert registered.json()["capabilities"] == ["cli", "x"] and registered.json()["state"] == "registered"
    listed = run(capsys, "agents", "list", "--capability", "cli", "--json").json()
    assert [a["agentId"] for a in listed["items"]] == ["k2"]
    table = run(capsys, "agents", "list", "--state", "idle")
    header, *rows = table.out.splitlines()
    assert header.split() == ["AGENT", "STATE", "REV", "LAST", "SEEN", "CAPABILITIES"]
    assert any(row.split()[:3] == ["k1", "idle", "2"] for row in rows)

    triggered = run(capsys, "agents", "trigger", "k1", "begin_task", "--json").json()
    assert triggered["state"] == "active"
    at = run(capsys, "agents", "show", "k1", "--at", "2000-01-01T00:00:00Z")
    assert at.code == 1 and "not_yet_created" in at.err


def test_every_page_is_listed(env: Path, capsys: pytest.CaptureFixture[str], live: Live) -> None:
    with live.client() as client:
        # more than the CLI's page of 1000 (a report registers an agent on the spot)
        client.agents.report_many([{"agentId": f"many-{n:04d}", "state": "idle"} for n in range(1000)])
        client.agents.report_many([{"agentId": f"many-{n:04d}", "state": "idle"} for n in range(1000, 1005)])
    listed = run(capsys, "agents", "list", "--state", "idle", "--json").json()["items"]
    assert sum(1 for a in listed if a["agentId"].startswith("many-")) == 1005


def test_refusals_are_one_line_with_the_detail(env: Path, capsys: pytest.CaptureFixture[str], live: Live) -> None:
    run(capsys, "agents", "report", "k3", "idle")
    illegal = run(capsys, "agents", "report", "k3", "registered")
    assert illegal.code == 1 and illegal.out == ""
    assert illegal.err.count("\n") == 1 and illegal.err.startswith("opscore: illegal_transition: ")
    assert "allowed now: initializing, active, error, offline, deregistered" in illegal.err

    missing = run(capsys, "agents", "show", "nobody")
    assert (missing.code, missing.err) == (1, "opscore: unknown_agent: no agent with id 'nobody'\n")
    unknown = run(capsys, "agents", "trigger", "k3", "dance")
    assert unknown.code == 1 and "unknown_trigger" in unknown.err and unknown.err.count("recover") == 1
    bad_json = run(capsys, "agents", "report", "k3", "active", "--details", "{not json")
    assert bad_json.code == 2 and "--details" in bad_json.err
    stale = run(capsys, "agents", "report", "k3", "active", "--if-match", "99")
    assert stale.code == 1 and "revision_mismatch" in stale.err


def test_401_and_403(
    env: Path, capsys: pytest.CaptureFixture[str], live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSCORE_API_KEY", "wrong-key")
    wrong = run(capsys, "agents", "list")
    assert wrong.code == 1 and wrong.err == "opscore: unauthorized: invalid API key\n"
    monkeypatch.setenv("OPSCORE_API_KEY", live.reader)
    forbidden = run(capsys, "agents", "report", "k4", "idle")
    assert forbidden.code == 1 and forbidden.err.startswith("opscore: forbidden: ") and "reader" in forbidden.err
    assert run(capsys, "agents", "list", "--json").code == 0  # read holds every GET
    monkeypatch.delenv("OPSCORE_API_KEY")
    nokey = run(capsys, "agents", "list")
    assert nokey.code == 2 and "OPSCORE_API_KEY is not set" in nokey.err


# -- definitions and runs ------------------------------------------------------------------------


def test_definitions_and_runs(env: Path, capsys: pytest.CaptureFixture[str], live: Live) -> None:
    (env / "two.json").write_text(json.dumps({**TWO_STEPS, "id": "cli-two"}))
    uploaded = run(capsys, "definitions", "upload", "two.json")
    assert uploaded.code == 0 and uploaded.out == "stored cli-two v1.0 (2 tasks)\n"
    assert run(capsys, "definitions", "show", "cli-two", "--json").json()["tasks"][0]["taskId"] == "summarise"
    assert "summarise_text" in run(capsys, "definitions", "show", "cli-two").out
    assert "cli-two" in [d["id"] for d in run(capsys, "definitions", "list", "--json").json()["items"]]
    assert "cli-two" in run(capsys, "definitions", "list").out
    bad = env / "bad.yaml"
    bad.write_text("id: broken\nversion: 1\ntasks:\n  - taskId: a\n    nextTaskId: nowhere\n")
    refused = run(capsys, "definitions", "upload", str(bad))
    assert refused.code == 1 and "invalid_definition" in refused.err

    run(capsys, "agents", "register", "k-run", "--capability", "summarise_text")
    started = run(capsys, "runs", "start", "k-run", "--definition", "cli-two", "--payload", '{"doc": 1}', "--json")
    session = started.json()["sessionId"]
    assert started.json()["state"] == "running"
    assert session in [
        r["sessionId"] for r in run(capsys, "runs", "list", "--agent", "k-run", "--json").json()["items"]
    ]
    assert session in run(capsys, "runs", "list", "--workflow", "cli-two").out
    shown = run(capsys, "runs", "show", session)
    assert "summarise" in shown.out and "TASK" in shown.out
    assert run(capsys, "runs", "show", session, "--json").json()["sessionId"] == session
    assert run(capsys, "runs", "pause", session).out == f"run {session}: paused\n"
    again = run(capsys, "runs", "pause", session)
    assert again.code == 1 and "illegal_transition" in again.err and "triggers allowed now: resume, " in again.err
    assert run(capsys, "runs", "resume", session, "--json").json()["state"] == "running"
    assert run(capsys, "runs", "cancel", session, "--details", '{"why": "test"}').code == 0
    missing = run(capsys, "runs", "show", "no-such-run")
    assert missing.code == 1 and "unknown_workflow" in missing.err

    (env / "fails.yaml").write_text(json.dumps(FAILING_DEFINITION))
    run(capsys, "agents", "report", "t-failer", "idle")
    session = run(capsys, "runs", "start", "t-failer", "--file", "fails.yaml", "--json").json()["sessionId"]
    with live.client() as client:
        wait_until(lambda: client.runs.get(session).state == "failed", timeout=15)
    retried = run(capsys, "runs", "retry", session, "--json")
    assert retried.code == 0 and retried.json()["sessionId"] == session
    both = run(capsys, "runs", "start", "k-run")
    assert both.code == 2 and "--definition" in both.err

    tasks = run(capsys, "diagram", "--workflow", session, "--view", "tasks")
    assert tasks.code == 0 and tasks.out.startswith("---") and "flowchart" in tasks.out
    assert "stateDiagram-v2" in run(capsys, "diagram", "--workflow", session).out


# -- audit ---------------------------------------------------------------------------------------


def test_audit_list_and_tail(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for state in ("initializing", "idle", "active"):
        run(capsys, "agents", "report", "k-audit", state)
    run(capsys, "agents", "report", "k-audit", "registered")  # refused, recorded
    records = run(capsys, "audit", "list", "--agent", "k-audit", "--json").json()["items"]
    assert [(r["seq"], r["outcome"]) for r in records] == [
        (1, "applied"),
        (2, "applied"),
        (3, "applied"),
        (4, "rejected"),
    ]
    table = run(capsys, "audit", "list", "--agent", "k-audit", "--outcome", "rejected")
    assert "rejected (illegal_transition)" in table.out and len(table.out.splitlines()) == 2
    newest = run(capsys, "audit", "list", "--newest-first", "--limit", "2", "--json").json()["items"]
    assert len(newest) == 2 and newest[0]["id"] > newest[1]["id"]
    everything = run(capsys, "audit", "list", "--entity-type", "agent", "--json").json()["items"]
    assert [r["id"] for r in everything] == sorted(r["id"] for r in everything)

    tail = run(capsys, "audit", "tail", "-n", "2", "--agent", "k-audit")
    lines = tail.out.splitlines()
    assert len(lines) == 2 and "seq 3" in lines[0] and "seq 4" in lines[1] and "rejected" in lines[1]
    as_json = [json.loads(line) for line in run(capsys, "audit", "tail", "-n", "3", "--json").out.splitlines()]
    assert len(as_json) == 3 and as_json == sorted(as_json, key=lambda r: r["id"])


def stamp(seconds: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(minutes=1) + timedelta(seconds=seconds)).isoformat()


def test_tail_follow_shows_a_record_reported_after_it_started(live: Live, tmp_path: Path) -> None:
    """``opscore audit tail -f`` as a process: the last record first, then what is reported later."""
    with live.server.client() as http:
        http.post("/v1/opscore/agent/k-tail/state", json={"timestamp": stamp(), "state": "initializing"})
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPSCORE_", "AGENTKIT_"))},
        "OPSCORE_API_URL": live.url,
        "OPSCORE_API_KEY": live.server.api_key,
        "PYTHONPATH": str(ROOT),
    }
    follower = subprocess.Popen(
        [sys.executable, "-m", "opscore", "audit", "tail", "-f", "-n", "1", "--agent", "k-tail", "--json"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert (first["entityId"], first["dest"]) == ("k-tail", "initializing")
        with live.server.client() as http:
            answer = http.post("/v1/opscore/agent/k-tail/state", json={"timestamp": stamp(1), "state": "idle"})
            assert answer.status_code == 200
        later = json.loads(follower.stdout.readline())
        assert (later["entityId"], later["dest"], later["id"]) == ("k-tail", "idle", answer.json()["auditId"])
    finally:
        follower.terminate()
        follower.communicate(timeout=10)  # waits, and closes its pipes


def test_audit_export_and_verify_through_the_server(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "agents", "report", "k-export", "idle")
    exported = run(capsys, "audit", "export", "--server", "--out", "audit.jsonl", "--json")
    assert exported.code == 0 and exported.json()["file"] == "audit.jsonl"
    lines = (env / "audit.jsonl").read_text().splitlines()
    records = [line for line in lines if "kind" not in json.loads(line)]  # then the trailer: heads, end
    assert len(records) == exported.json()["exported"] > 0
    assert json.loads(lines[-1]) == {"kind": "end", "records": len(records), "entities": len(lines) - len(records) - 1}
    to_stdout = run(capsys, "audit", "export", "--server", "--out", "-")
    assert to_stdout.out.splitlines()[: len(lines)] == lines and not (env / "-").exists()
    assert to_stdout.err.startswith("exported ")  # the summary never mixes into the records

    offline = run(capsys, "audit", "verify", "--file", "audit.jsonl", "--json").json()
    assert offline["ok"] and offline["records"] == len(records)
    assert run(capsys, "audit", "verify", "--file", "audit.jsonl").out.startswith("ok: every chain verified")
    remote = run(capsys, "audit", "verify", "--server", "--json")
    assert remote.code == 0 and remote.json()["ok"]

    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "dest": "forged"})
    (env / "bad.jsonl").write_text("\n".join(lines) + "\n")
    tampered = run(capsys, "audit", "verify", "--file", "bad.jsonl")
    assert tampered.code == 1 and tampered.out.startswith("FAILED: ")
    assert f"{first['entityType']} {first['entityId']} seq {first['seq']}: hash does not match" in tampered.out


def test_audit_against_the_database_and_where_there_is_none(
    env: Path, capsys: pytest.CaptureFixture[str], live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    none_here = run(capsys, "audit", "verify")
    assert none_here.code == 2 and none_here.err.startswith("opscore: no database at ./opscore.db: run this in")
    assert run(capsys, "audit", "export", "--out", "x.jsonl").code == 2 and not (env / "x.jsonl").exists()
    monkeypatch.setenv("OPSCORE_DATABASE_URL", live.server.database_url)
    verified = run(capsys, "audit", "verify", "--json")
    assert verified.code == 0 and verified.json()["ok"]
    exported = run(capsys, "audit", "export", "--out", "-")
    *chained, end = exported.out.splitlines()  # records and head lines carry a hash; the end line counts
    assert exported.code == 0 and all(json.loads(line)["hash"] for line in chained)
    assert json.loads(end)["kind"] == "end"
    monkeypatch.setenv("OPSCORE_DATABASE_URL", "postgresql://opscore:hunter2@127.0.0.1:1/nothing")
    monkeypatch.setenv("OPSCORE_PG_POOL_TIMEOUT", "1")
    down = run(capsys, "audit", "verify")
    assert down.code == 3 and down.err.count("\n") == 1 and "hunter2" not in down.err


# -- the rest ------------------------------------------------------------------------------------


def test_agent_diagram_and_keys(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "agents", "report", "k-draw", "idle")
    drawn = run(capsys, "diagram", "--agent", "k-draw", "--out", str(env))
    assert drawn.code == 0 and (env / "agent-k-draw.mmd").read_text().startswith("---")
    created = run(capsys, "keys", "create", "--name", "ci", "--scope", "read", "--json").json()
    assert created["entry"]["name"] == "ci" and created["entry"]["scopes"] == ["read"]
    assert len(created["entry"]["sha256"]) == 64 and created["secret"] not in json.dumps(created["entry"])
    human = run(capsys, "keys", "create", "--name", "sum", "--scope", "report", "--agents", "summariser-*")
    assert "shown once" in human.out and '"agents": ["summariser-*"]' in human.out
    assert run(capsys, "keys", "create", "--name", "9bad", "--scope", "read").code == 2


def test_the_process_exit_statuses_and_streams(live: Live, tmp_path: Path) -> None:
    """``python -m opscore`` as a script runs it: the server stopped, a wrong key, --version, --help."""
    env = {"OPSCORE_API_URL": live.url, "OPSCORE_API_KEY": live.server.api_key}
    listed = opscore("agents", "list", "--json", cwd=tmp_path, env=env)
    assert listed.code == 0 and isinstance(listed.json()["items"], list)
    down = {**env, "OPSCORE_API_URL": f"http://127.0.0.1:{free_port()}"}
    for args in (["agents", "list"], ["agents", "report", "a", "idle"], ["audit", "tail", "-f"], ["runs", "list"]):
        result = opscore(*args, cwd=tmp_path, env=down)
        assert result.code == 3, (args, result.err)
        assert result.err.startswith("opscore: unreachable: cannot reach Ops-Core at http://127.0.0.1:")
        assert result.err.count("\n") == 1 and result.out == ""
    wrong = opscore("agents", "show", "x", cwd=tmp_path, env={**env, "OPSCORE_API_KEY": "nope"})
    assert (wrong.code, wrong.err) == (1, "opscore: unauthorized: invalid API key\n")
    (tmp_path / ".env").write_text(f"OPSCORE_API_URL={live.url}\nOPSCORE_API_KEY={live.server.api_key}\n")
    from_dotenv = opscore("agents", "report", "k-dotenv", "idle", "--json", cwd=tmp_path)
    assert from_dotenv.code == 0 and from_dotenv.json()["state"] == "idle"
    assert opscore("--version", cwd=tmp_path).out == f"opscore {__import__('opscore').__version__}\n"
    usage = opscore("agents", "report", "only-one-argument", cwd=tmp_path)
    assert usage.code == 2 and "Missing argument 'STATE'" in usage.err


def test_help_answers_without_settings_or_a_server(tmp_path: Path) -> None:
    """``opscore --help`` works with no ``.env``, no key and no server (how fast: ``make bench``,
    row ``cli``; what it must not import: tests/client/test_imports.py)."""
    result = opscore("--help", cwd=tmp_path)
    assert result.code == 0
    for group in ("agents", "runs", "definitions", "audit", "diagram", "keys", "serve", "simulate"):
        assert group in result.out
