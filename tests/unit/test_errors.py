"""One class per code, and every class in the one HTTP table (STYLE 19, httpx's mapping test)."""

from __future__ import annotations

import ast
from pathlib import Path

from opscore import errors
from opscore.api.errors import STATUS, render_error, status_of

PACKAGE = Path(__file__).resolve().parents[2] / "opscore"


def test_every_error_class_has_a_row_in_the_status_table() -> None:
    missing = [
        cls.__name__
        for cls in errors.every_class()
        if cls is not errors.OpsCoreError and not any(base in STATUS for base in cls.__mro__)
    ]
    assert not missing, f"add these to api/errors.STATUS (or give them a base that is there): {missing}"


def test_each_code_names_one_class() -> None:
    seen: dict[str, str] = {}
    for cls in errors.every_class():
        if "code" not in vars(cls):
            continue  # inherits its parent's code (e.g. the _FromTo helper base)
        assert cls.code not in seen, f"{cls.__name__} and {seen[cls.code]} share the code {cls.code!r}"
        seen[cls.code] = cls.__name__


def test_no_error_is_told_apart_by_a_code_string() -> None:
    """Errors are classes: nobody passes ``code=`` or compares ``exc.code == "..."``."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and any(k.arg == "code" for k in node.keywords):
                offenders.append(f"{path.name}:{node.lineno} passes code=")
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "code":
                offenders.append(f"{path.name}:{node.lineno} compares .code")
    assert not offenders, offenders


def test_unknown_entities_are_one_class_per_machine() -> None:
    assert type(errors.UnknownEntity("agent", "a")) is errors.UnknownAgent
    assert errors.UnknownEntity("workflow", "s").code == "unknown_workflow"
    assert errors.UnknownEntity("gizmo", "g").code == "unknown_entity"
    assert status_of(errors.UnknownTask) == 404


def test_a_stored_error_comes_back_as_its_own_class() -> None:
    first = errors.IllegalTransition("no", source="idle", to="registered", allowed=["active"])
    again = errors.from_dict(first.to_dict())
    assert type(again) is errors.IllegalTransition and again.to_dict() == first.to_dict()
    assert render_error(again) == render_error(first)
    odd = errors.from_dict({"detail": "x", "code": "from_elsewhere"})
    assert odd.to_dict() == {"detail": "x", "code": "from_elsewhere"}
