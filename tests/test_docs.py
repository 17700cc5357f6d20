"""The architecture document lists every module the package has."""

from __future__ import annotations

from tests.module_map import ROOT, modules


def test_every_module_is_in_the_architecture_module_map() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [p.relative_to(ROOT).as_posix() for p in modules() if f"`{p.relative_to(ROOT).as_posix()}`" not in text]
    assert not missing, f"docs/architecture.md's module map lacks {missing} (python -m tests.module_map)"


def test_the_readme_layout_names_only_paths_that_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Layout")
    section = text[start : text.index("\n## ", start + 1)]
    quoted = section.split("`")[1::2]
    named = [q for q in quoted if q.startswith(("opscore/", "tests/", "benchmarks/", "docs/", "scripts/"))]
    assert len(named) > 20, f"the README's layout section names too few paths: {named}"
    gone = [n for n in named if not (ROOT / n).exists()]
    assert not gone, f"the README's layout section names paths that do not exist: {gone}"
