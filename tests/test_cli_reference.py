"""docs/cli.md is the commands' own help, regenerated: it fails here when a command changed."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT


def test_the_cli_reference_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_reference_names_every_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for command in (
        "agents list", "agents show", "agents report", "agents trigger", "agents register",
        "runs list", "runs show", "runs start", "runs pause", "runs resume", "runs cancel", "runs retry",
        "definitions upload", "definitions list", "definitions show",
        "audit list", "audit tail", "audit export", "audit verify",
        "diagram", "keys create", "serve", "simulate",
    ):  # fmt: skip
        assert f"`opscore {command}`" in text, command
