"""Settings and keys: one source of truth, read once; keys that cannot work refused with a reason."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest

from opscore import cli
from opscore.config import (
    InvalidApiKeys,
    Settings,
    anonymous_name,
    first_secret,
    parse_api_keys,
)
from opscore.keys import Scope, digest, match


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No OPSCORE_/AGENTKIT_/SIMULATOR_ variable from the caller, and a directory without .env."""
    import os

    for name in list(os.environ):
        if name.startswith(("OPSCORE_", "AGENTKIT_", "SIMULATOR_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- keys --------------------------------------------------------------------------------------


def test_named_and_unnamed_keys() -> None:
    keys = parse_api_keys("agents:0123456789, ops:Prod2024:xyz-and-more ,plain-secret")
    assert [(k.name, k.digest) for k in keys] == [
        ("agents", digest(b"0123456789")),
        ("ops", digest(b"Prod2024:xyz-and-more")),  # the first ':' names; the rest is the secret
        (anonymous_name(b"plain-secret"), digest(b"plain-secret")),
    ]
    assert all(k.scopes == set(Scope) and k.agents is None for k in keys)  # OPSCORE_API_KEY: every scope
    assert match(keys, b"plain-secret") is keys[2]
    assert match(keys, b"Prod2024:xyz-and-more") is keys[1]
    assert match(keys, b"Prod2024") is None


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        pytest.param(
            "Prod2024:xyz", ["key #1", "'Prod2024'", "3 characters", "name:secret", "mykey:"], id="short-named"
        ),
        pytest.param("good-key-123,caf\u00e9-secret-42", ["key #2", "non-ASCII"], id="non-ascii"),
        pytest.param("tabby\tsecret-123", ["key #1", "control character"], id="control"),
        pytest.param("two words-secret", ["key #1", "a space"], id="space"),
    ],
)
def test_keys_that_cannot_work_are_refused_with_the_rule_never_the_secret(raw: str, words: list[str]) -> None:
    with pytest.raises(InvalidApiKeys) as refused:
        parse_api_keys(raw)
    message = str(refused.value)
    for word in words:
        assert word in message, message
    for secret in ("xyz", "caf\u00e9", "secret-42", "tabby", "words"):
        assert secret not in message


def test_an_unnamed_key_is_named_by_pbkdf2_not_a_short_hash() -> None:
    name = anonymous_name(b"weak")
    assert re.fullmatch(r"anon-[0-9a-f]{12}", name)
    assert (
        name == "anon-" + hashlib.pbkdf2_hmac("sha256", b"weak", b"opscore-anonymous-key-name-v1", 200_000).hex()[:12]
    )
    assert hashlib.sha256(b"weak").hexdigest()[:8] not in name
    assert anonymous_name(b"weak") == name  # stable (audit records name the same key the same)


def test_first_secret_is_what_a_client_sends() -> None:
    assert first_secret("agents:0123456789,other") == "0123456789"
    assert first_secret(" plain ,other") == "plain"
    assert first_secret("") == ""


# -- one Settings, environment then .env then defaults ------------------------------------------


def test_every_limit_and_pool_size_is_a_setting(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text(
        "OPSCORE_MAX_HEADER_BYTES=32768\nOPSCORE_READ_TIMEOUT_SECONDS=3\nOPSCORE_PG_POOL_MAX=4\nOPSCORE_ACCESS_LOG=false\n"
    )
    monkeypatch.setenv("OPSCORE_MAX_CONNECTIONS", "50")
    conf = Settings()
    assert (conf.max_header_bytes, conf.read_timeout_seconds, conf.max_connections) == (32768, 3.0, 50)
    assert (conf.pg_pool_min, conf.pg_pool_max, conf.pg_pool_timeout) == (2, 4, 10.0)
    assert conf.access_log is False
    defaults = Settings.model_construct()
    assert (defaults.max_body_bytes, defaults.max_header_bytes, defaults.read_timeout_seconds) == (
        1 << 20,
        1 << 16,
        5.0,
    )


def test_clients_find_the_server_where_its_settings_say(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().opscore_url == "http://127.0.0.1:8000"
    (clean_env / ".env").write_text("OPSCORE_HOST=0.0.0.0\nOPSCORE_PORT=9100\n")
    assert Settings().opscore_url == "http://127.0.0.1:9100"  # a wildcard bind is dialled on loopback
    monkeypatch.setenv("OPSCORE_HOST", "::")
    assert Settings().opscore_url == "http://[::1]:9100"
    monkeypatch.setenv("OPSCORE_API_URL", "https://ops.example/")
    assert Settings().opscore_url == "https://ops.example"


def simulate_args(*argv: str) -> argparse.Namespace:
    return cli.parse(["simulate", *argv])


def test_simulate_defaults_follow_the_server_configuration(clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        "OPSCORE_API_KEY=sim:0123456789abc\n"
        "OPSCORE_WEBHOOK_SECRET=hook-secret,older-secret\n"
        "OPSCORE_PORT=9100\n"
        "AGENTKIT_API_URL=http://127.0.0.2:9123\n"
        "SIMULATOR_AGENTS=7\n"
    )
    host, port, config = cli.simulator_config(simulate_args(), Settings())
    assert (host, port) == ("127.0.0.2", 9123)  # listens where Ops-Core dispatches to
    assert config.opscore_url == "http://127.0.0.1:9100"  # calls Ops-Core where it listens
    assert config.api_key == "0123456789abc"  # the secret of a named key, as a client sends it
    assert config.webhook_secret == "hook-secret,older-secret"
    assert config.agents == 7 and config.latency == 0.2 and config.capabilities == ["summarise_text", "review_text"]

    host, port, config = cli.simulator_config(
        simulate_args("--port", "9999", "--host", "0.0.0.0", "--opscore-url", "http://x:1", "--agents", "2"), Settings()
    )
    assert (host, port, config.opscore_url, config.agents) == ("0.0.0.0", 9999, "http://x:1", 2)


def test_simulate_without_a_port_in_the_agentkit_url(clean_env: Path) -> None:
    (clean_env / ".env").write_text("AGENTKIT_API_URL=http://agentkit\nOPSCORE_API_URL=http://opscore:8000\n")
    host, port, config = cli.simulator_config(simulate_args(), Settings())
    assert (host, port, config.opscore_url) == ("agentkit", 80, "http://opscore:8000")


def test_serve_defaults_come_from_settings(clean_env: Path) -> None:
    args = cli.parse(["serve"])
    assert (args.host, args.port) == (None, None)  # resolved from Settings in cmd_serve, .env included


def test_ensure_env_creates_a_key_and_a_webhook_secret_once(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = clean_env / ".env"
    env.write_text("OPSCORE_LOG_LEVEL=INFO")  # no trailing newline
    generated = cli.ensure_env(env)
    assert set(generated) == {"OPSCORE_API_KEY", "OPSCORE_WEBHOOK_SECRET"}
    text = env.read_text()
    assert text.startswith("OPSCORE_LOG_LEVEL=INFO\nOPSCORE_API_KEY=")
    assert f"OPSCORE_WEBHOOK_SECRET={generated['OPSCORE_WEBHOOK_SECRET']}\n" in text
    assert env.stat().st_mode & 0o777 == 0o600
    assert cli.ensure_env(env) == {}  # configured now: nothing generated again
    assert env.read_text() == text
    for name in generated:
        monkeypatch.delenv(name)


def test_ensure_env_keeps_a_configured_key(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSCORE_API_KEY", "from-the-environment")
    generated = cli.ensure_env(clean_env / ".env")
    assert set(generated) == {"OPSCORE_WEBHOOK_SECRET"}
    monkeypatch.delenv("OPSCORE_WEBHOOK_SECRET")


def test_a_new_key_is_shown_once_and_stored_as_its_hash_only() -> None:
    from opscore.keys import load_keys_file, new_key

    secret, entry = new_key("summariser", ["report"], ["summariser-*"])
    assert secret not in json.dumps(entry) and len(secret) >= 32
    assert entry == {
        "name": "summariser",
        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "scopes": ["report"],
        "agents": ["summariser-*"],
    }
    path = Path("keys.json")
    path.write_text(json.dumps([entry]), encoding="utf-8")
    (key,) = load_keys_file(str(path))
    assert match([key], secret.encode()) is key
    assert key.may_report_for("summariser-7") and not key.may_report_for("reviewer-1")
    assert not key.holds(Scope.READ) and key.may_read_agent("summariser-7")
    with pytest.raises(ValueError, match="scope"):
        new_key("x", ["fly"])
