"""What a new user meets before any code runs: compose file, Dockerfile, CI workflow, LICENSE, docs.

No Docker engine runs where this suite runs, so nothing here builds or starts a container.
``docker compose config`` (or Debian's ``docker-compose config``; ``.ci/run`` installs it when it
can) checks the compose file when present; its structure and the compose schema are checked
always (``check-jsonschema`` ships the published schemas, so this works offline).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from opscore.config import Settings
from tests.servers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
REQUIRED = {"OPSCORE_API_KEY"}
"""The only variables ``docker compose up`` needs set (README, Docker section)."""


def setting_names() -> set[str]:
    """The environment variable of every setting (the first alias of each field)."""
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        assert choices, field
        names.add(str(choices[0]))
    return names


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_structure_needs_only_the_documented_variables() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Z0-9_]+):?\?", text))
    assert required == REQUIRED, f"required variables outside the documented set: {required - REQUIRED}"
    for name in re.findall(r"\$\{([A-Z0-9_]+)", text):
        assert name in setting_names() or name.startswith("POSTGRES_"), name
    services = compose()["services"]
    assert {"opscore", "agentkit"} <= set(services)
    for name, service in services.items():
        plain_up = name in {"opscore", "agentkit"}
        assert ("profiles" not in service) == plain_up, name  # `docker compose up` starts exactly these
        if name == "postgres":
            continue  # the postgres image's own variables
        for variable in service.get("environment", {}):
            assert variable in setting_names(), f"{name}: {variable} is no setting of Ops-Core"
    opscore, agentkit = services["opscore"], services["agentkit"]
    assert agentkit["command"][:2] == ["opscore", "simulate"]
    port = agentkit["command"][agentkit["command"].index("--port") + 1]
    assert opscore["environment"]["AGENTKIT_API_URL"] == f"http://agentkit:{port}"  # dispatches reach it
    assert agentkit["environment"]["OPSCORE_API_URL"] == "http://opscore:8000"
    # the simulator gets its key (and webhook secret, when set) from the same place as Ops-Core
    for variable in ("OPSCORE_API_KEY", "OPSCORE_WEBHOOK_SECRET"):
        assert agentkit["environment"][variable] == opscore["environment"][variable]


def test_compose_file_matches_the_compose_schema() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    if not checker.exists():
        pytest.fail("check-jsonschema is missing: `make .venv/bin/.test-installed` installs requirements-test.txt")
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1), whichever runs here."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_config(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    """``<compose> [extra] config`` on a copy of the file in a directory without .env, with only ``env``."""
    command = compose_command()
    assert command is not None
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    return subprocess.run(
        [*command, *extra, "config"], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(compose_command() is None, reason="no docker compose here; the structure tests above still ran")
def test_docker_compose_config_with_only_what_the_readme_says(tmp_path: Path) -> None:
    missing = run_config(tmp_path, {})
    assert missing.returncode != 0 and "OPSCORE_API_KEY" in missing.stdout + missing.stderr

    plain = run_config(tmp_path, {"OPSCORE_API_KEY": "k"})
    assert plain.returncode == 0, plain.stderr
    services = yaml.safe_load(plain.stdout)["services"]
    assert services["agentkit"]["environment"]["OPSCORE_API_KEY"] == "k"
    assert services["opscore"]["environment"]["OPSCORE_API_KEY"] == "k"

    (tmp_path / ".env").write_text("OPSCORE_API_KEY=from-dotenv\nOPSCORE_WEBHOOK_SECRET=hook\n")  # what make run writes
    dotenv = run_config(tmp_path, {})
    assert dotenv.returncode == 0, dotenv.stderr
    services = yaml.safe_load(dotenv.stdout)["services"]
    assert services["agentkit"]["environment"]["OPSCORE_WEBHOOK_SECRET"] == "hook"
    (tmp_path / ".env").unlink()

    replicas = run_config(tmp_path, {"OPSCORE_API_KEY": "k", "POSTGRES_PASSWORD": "pw"}, "--profile", "replicas")
    assert replicas.returncode == 0, replicas.stderr
    services = yaml.safe_load(replicas.stdout)["services"]
    assert {"postgres", "opscore-replica-1", "opscore-replica-2"} <= set(services)
    assert services["opscore-replica-2"]["environment"]["OPSCORE_DATABASE_URL"].startswith("postgresql://opscore:pw@")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_runs_opscore_serve_as_a_non_root_user_with_a_healthcheck() -> None:
    instructions = dockerfile()
    words = [word for word, _ in instructions]
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert words.index("USER") < words.index("CMD")  # the server never runs as root
    assert ("EXPOSE", "8000") in instructions
    assert ("CMD", '["opscore", "serve"]') in instructions
    healthcheck = next(rest for word, rest in instructions if word == "HEALTHCHECK")
    assert "/health" in healthcheck and "OPSCORE_PORT" in healthcheck
    env = " ".join(rest for word, rest in instructions if word in {"ENV", "ARG"})
    assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)", env), env
    assert "OPSCORE_HOST=0.0.0.0" in env  # listens beyond the container's loopback
    copied = " ".join(rest for word, rest in instructions if word in {"COPY", "ADD"})
    assert ".env" not in copied and "LICENSE" in copied
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_ci_workflow_runs_what_ci_run_runs() -> None:
    path = ROOT / ".github" / "workflows" / "ci.yml"
    text = path.read_text(encoding="utf-8")
    workflow = yaml.safe_load(text)
    job = workflow["jobs"]["test"]
    assert job["services"]["postgres"]["image"].startswith("postgres:")
    assert job["env"]["OPSCORE_TEST_DATABASE_URL"].startswith("postgresql://")
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "graphviz" in runs and ".ci/run" in runs
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"#.*chromium", text)  # the hook a later change enables
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_license_changelog_contributing() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text) > 10_000
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "## [0.1.0]" in changelog
    assert changelog.index("## [Unreleased]") < changelog.index("## [0.1.0]")
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for needed in ("make test", "make lint", "make bench", "ruff", "mypy", "STYLE", "OPSCORE_TEST_DATABASE_URL"):
        assert needed in contributing, needed


def test_readme_documents_every_setting_and_points_at_nothing_missing() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in sorted(setting_names()):
        assert f"`{name}`" in readme, f"{name} is not documented in the README"
    assert "make run PORT=" in readme and "HOST=" in readme
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        assert "DESIGN" not in text, f"{doc.name} points at a DESIGN file the repository does not have"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links resolve
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
