"""The module map of docs/architecture.md: ``python -m tests.module_map`` prints it afresh.

Each module with its line count and the first line of its docstring; paste the output under
"Module map" when modules move (``tests/test_docs.py`` fails when one is missing there).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "opscore"


DESIGN = re.compile(r",? as DESIGN §[^,.]* fix them|\s*\(DESIGN §[^)]*\)")


def modules() -> list[Path]:
    """Every Python module of the package, in path order."""
    return sorted(PACKAGE.rglob("*.py"))


def table() -> str:
    rows = ["| module | lines | what it holds |", "|---|---:|---|"]
    for path in modules():
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        first = (doc.splitlines()[0] if doc else "").replace("|", "\\|")
        first = DESIGN.sub("", first)  # the design notes are not in the repository: no pointer to them
        name = path.relative_to(ROOT).as_posix()
        rows.append(f"| `{name}` | {len(text.splitlines())} | {first} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
