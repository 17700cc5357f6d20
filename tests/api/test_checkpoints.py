"""Signed checkpoints over HTTP: started by the lifespan, served paged, verified, signed at shutdown.

On memory, SQLite and PostgreSQL (``store_url``); the app runs in process under its lifespan.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from opscore import checkpoints
from opscore.checkpoints import make_signing_key
from tests.inproc import InProcess

V1 = "/v1/opscore"


def report(client: httpx.Client, agent: str, state: str) -> httpx.Response:
    body = {"agentId": agent, "timestamp": datetime.now(UTC).isoformat(), "state": state, "details": {}}
    return client.post(f"{V1}/agent/{agent}/state", json=body)


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def lines(client: httpx.Client, **params: object) -> dict:
    answer = client.get(f"{V1}/audit/checkpoints", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_server_signs_serves_and_verifies_checkpoints(store_url: str, tmp_path: Path) -> None:
    private, public, key_id = make_signing_key(tmp_path / "signing.pem")
    file = tmp_path / "checkpoints.jsonl"
    app = InProcess(
        store_url,
        signing_key=str(private),
        checkpoint_file=str(file),
        checkpoint_records=4,
        checkpoint_seconds=0.2,
    ).start()
    try:
        with app.client() as client:
            for agent in ("h-1", "h-2", "h-3"):
                assert report(client, agent, "initializing").status_code == 200
            wait_for(lambda: lines(client)["items"])  # the first line: every head
            for state in ("idle", "active", "idle"):
                for agent in ("h-1", "h-2", "h-3"):
                    assert report(client, agent, state).status_code == 200
            # then a line every 4 records (or 0.2 s): what moved since the line before
            wait_for(lambda: lines(client, limit=100)["items"][-1]["records"] == 12)
            page = lines(client, limit=1)
            assert page["keyId"] == key_id and page["halted"] is None
            assert [line["n"] for line in page["items"]] == [1] and page["nextCursor"]
            assert page["items"][0]["full"] is True and page["items"][0]["prev"] == "0" * 64
            rest = lines(client, cursor=page["nextCursor"], limit=100)
            assert rest["nextCursor"] is None
            served = page["items"] + rest["items"]
            assert [line["n"] for line in served] == list(range(1, len(served) + 1))

            # what was served verifies offline with the public key alone
            keys = checkpoints.load_public_keys([public])
            signed = checkpoints.read_checkpoints([json.dumps(line) for line in served], keys)
            assert not signed.problems and signed.lines == len(served)
            assert {key for key in signed.pins} == {("agent", "h-1"), ("agent", "h-2"), ("agent", "h-3")}
            assert all(pin.seq == 4 for pin in signed.pins.values())

            verdict = client.get(f"{V1}/audit/verify").json()
            assert verdict["ok"] is True, verdict

            assert report(client, "h-1", "active").status_code == 200  # signed by time, or by the shutdown
        texts_before = file.read_text(encoding="utf-8").splitlines()
    finally:
        app.stop()
    after = file.read_text(encoding="utf-8").splitlines()
    assert after[: len(texts_before)] == texts_before
    last = json.loads(after[-1])
    assert last["heads"] == {"agent": {"h-1": [5, last["heads"]["agent"]["h-1"][1]]}} and last["records"] == 13
    signed = checkpoints.read_checkpoint_file(file, [public])
    assert not signed.problems and signed.pins[("agent", "h-1")].seq == 5


def test_a_restart_continues_the_same_chain(database_url: str, tmp_path: Path) -> None:
    """SQLite and PostgreSQL (a memory store does not outlive its process)."""
    store_url = database_url
    private, public, _ = make_signing_key(tmp_path / "signing.pem")
    file = tmp_path / "checkpoints.jsonl"
    settings = {"signing_key": str(private), "checkpoint_file": str(file), "checkpoint_records": 3}
    for round_ in range(2):
        app = InProcess(store_url, **settings).start()
        try:
            with app.client() as client:
                for agent in ("r-1", "r-2"):
                    assert report(client, agent, ("idle", "active")[round_]).status_code == 200
        finally:
            app.stop()
    signed = checkpoints.read_checkpoint_file(file, [public])
    assert not signed.problems
    assert {key: pin.seq for key, pin in signed.pins.items()} == {("agent", "r-1"): 2, ("agent", "r-2"): 2}
    assert sum(1 for line in file.read_text().splitlines() if json.loads(line)["full"]) == 1


def test_no_signing_key_no_checkpoints(store_url: str) -> None:
    app = InProcess(store_url).start()
    try:
        with app.client() as client:
            assert lines(client) == {"items": [], "nextCursor": None, "keyId": None, "halted": None}
            assert client.get(f"{V1}/audit/checkpoints", params={"cursor": "nonsense"}).json()["code"] == (
                "invalid_cursor"
            )
    finally:
        app.stop()


def test_a_bad_signing_key_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello", encoding="utf-8")
    with pytest.raises(checkpoints.InvalidSigningKey, match="not an unencrypted PEM private key"):
        InProcess("memory://", signing_key=str(bad)).start()


def test_heads_are_paged_across_entity_types(server: InProcess) -> None:
    with server.client() as client:
        for agent in ("k-1", "k-2", "k-3"):
            assert report(client, agent, "idle").status_code == 200
        seen, cursor = [], None
        while True:
            page = client.get(f"{V1}/audit/heads", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += page["items"]
            cursor = page["nextCursor"]
            if not cursor:
                break
        agents = [h for h in seen if h["entityType"] == "agent"]
        assert [h["entityId"] for h in agents] == ["k-1", "k-2", "k-3"]
        assert all(
            h["seq"] == 1 and h["state"] == "idle" and h["revision"] == 1 and len(h["hash"]) == 64 for h in agents
        )
        bad = client.get(f"{V1}/audit/heads", params={"cursor": "eyJwIjpbOSwieCJdLCJvIjoiYXNjIn0"})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


def test_a_checkpoint_file_that_cannot_be_written_refuses_to_start(tmp_path: Path) -> None:
    private, _, _ = make_signing_key(tmp_path / "signing.pem")
    nowhere = tmp_path / "missing-dir" / "checkpoints.jsonl"
    with pytest.raises(checkpoints.InvalidCheckpointSettings, match=r"OPSCORE_CHECKPOINT_FILE .* cannot be written"):
        InProcess("memory://", signing_key=str(private), checkpoint_file=str(nowhere)).start()
