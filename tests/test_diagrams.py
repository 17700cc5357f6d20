"""opscore/diagrams.py and `opscore diagram`: every state and trigger drawn, highlight, path, freshness."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from opscore import cli, diagrams
from opscore.api.deps import parse_moment
from opscore.api.errors import status_of
from opscore.errors import Invalid, RendererMissing
from opscore.machines import AGENT, MACHINES, Declaration, transition_rows

ROOT = Path(__file__).resolve().parent.parent
DOT = diagrams.find_dot()
needs_dot = pytest.mark.skipif(
    DOT is None, reason="Graphviz's dot is not installed (apt-get install graphviz); SVG diagrams cannot be drawn"
)
SVG_NS = "{http://www.w3.org/2000/svg}"
EDGE = re.compile(r"^\s*(\w+) --> (\w+): (.+)$")


def rows(decl: Declaration) -> set[tuple[str, str, str]]:
    return {(r["source"], r["dest"], r["trigger"]) for r in transition_rows(decl)}


def mermaid_edges(text: str) -> dict[tuple[str, str], str]:
    return {(m[1], m[2]): m[3] for m in map(EDGE.match, text.splitlines()) if m}


def mermaid_classes(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^\s*Class (\w+) s_(\w+)$", text, re.MULTILINE)}


def svg_parts(text: str) -> tuple[dict[str, ET.Element], dict[tuple[str, str], ET.Element]]:
    """Nodes by title and edges by (source, dest) of a dot SVG."""
    root = ET.fromstring(text)
    nodes, edges = {}, {}
    for g in root.iter(f"{SVG_NS}g"):
        title = g.findtext(f"{SVG_NS}title") or ""
        if g.get("class") == "node":
            nodes[title] = g
        elif g.get("class") == "edge":
            source, _, dest = title.partition("->")
            edges[(source, dest)] = g
    return nodes, edges


def label(g: ET.Element) -> str:
    return " ".join(t.text or "" for t in g.iter(f"{SVG_NS}text"))


def shape(g: ET.Element) -> ET.Element:
    """The first drawn shape of a node or edge (a path, or an ellipse for the initial dot)."""
    found = next((el for el in g if el.tag in {f"{SVG_NS}path", f"{SVG_NS}ellipse", f"{SVG_NS}polygon"}), None)
    assert found is not None
    return found


def fill(g: ET.Element) -> str:
    return shape(g).get("fill", "")


def stroke(g: ET.Element) -> str:
    return shape(g).get("stroke", "")


RECORDS = [
    {"id": 1, "outcome": "applied", "event": "ready", "source": "registered", "dest": "idle"},
    {"id": 2, "outcome": "rejected", "event": None, "source": "idle", "dest": "deregistered"},
    {"id": 3, "outcome": "applied", "event": "begin_task", "source": "idle", "dest": "active"},
    {"id": 4, "outcome": "applied", "event": "finish_task", "source": "active", "dest": "idle"},
    {"id": 5, "outcome": "applied", "event": "begin_task", "source": "idle", "dest": "active"},
]


# -- every state and trigger, in every format ----------------------------------------------


@pytest.mark.parametrize("name", list(MACHINES))
def test_mermaid_draws_exactly_the_declaration(name: str) -> None:
    decl = MACHINES[name]
    text = diagrams.mermaid(decl)
    declared_states = re.findall(r'^\s*state "(\w+)" as (\w+)$', text, re.MULTILINE)
    assert [s for s, _ in declared_states] == decl["states"]
    edges = mermaid_edges(text)
    assert {(s, d, t) for (s, d), t in edges.items()} == rows(decl)
    assert f"[*] --> {decl['initial']}" in text
    for state in decl["terminal"]:
        assert f"{state} --> [*]" in text
    assert text.startswith(f'---\ntitle: "{name} machine"\n---\nstateDiagram-v2\n')
    assert not any(line != line.rstrip() for line in text.splitlines())


@needs_dot
@pytest.mark.parametrize("name", list(MACHINES))
def test_svg_draws_exactly_the_declaration(name: str) -> None:
    decl = MACHINES[name]
    text = diagrams.svg(decl)
    nodes, edges = svg_parts(text)  # parses as XML
    assert set(nodes) == {*decl["states"], diagrams.INITIAL_NODE}
    drawn = {(s, d, label(g)) for (s, d), g in edges.items() if s != diagrams.INITIAL_NODE}
    assert drawn == rows(decl)
    assert (diagrams.INITIAL_NODE, decl["initial"]) in edges


# -- highlight and path ------------------------------------------------------------------


def test_path_steps_numbers_the_latest_applied_transitions_oldest_first() -> None:
    steps = diagrams.path_steps(RECORDS, last=10)
    assert [(s.number, s.trigger, s.source, s.dest, s.record_id) for s in steps] == [
        (1, "ready", "registered", "idle", 1),
        (2, "begin_task", "idle", "active", 3),
        (3, "finish_task", "active", "idle", 4),
        (4, "begin_task", "idle", "active", 5),
    ]
    assert [(s.number, s.record_id) for s in diagrams.path_steps(RECORDS, last=2)] == [(1, 4), (2, 5)]
    assert diagrams.path_steps(RECORDS, last=0) == []


def test_mermaid_highlights_the_current_state_and_numbers_the_path() -> None:
    plain = diagrams.mermaid(AGENT, current="active")
    assert mermaid_classes(plain)["active"] == "active"
    assert mermaid_classes(plain)["idle"] == "default"
    assert not any("#" in t for t in mermaid_edges(plain).values()) and "note" not in plain

    text = diagrams.mermaid(AGENT, current="active", path=diagrams.path_steps(RECORDS))
    edges = mermaid_edges(text)
    assert edges[("registered", "idle")] == "ready #1"
    assert edges[("idle", "active")] == "begin_task #2 #4"
    assert edges[("active", "idle")] == "finish_task #3"
    assert edges[("idle", "error")] == "fail"
    classes = mermaid_classes(text)
    assert classes["active"] == "active"
    assert classes["registered"] == classes["idle"] == "previous"
    assert classes["error"] == "default" and classes["deregistered"] == "terminal"
    note = text[text.index("note right of active") :]
    assert note.splitlines()[1:5] == [
        "    #1 ready: registered → idle",
        "    #2 begin_task: idle → active",
        "    #3 finish_task: active → idle",
        "    #4 begin_task: idle → active",
    ]
    assert note.splitlines()[5] == "  end note"


def test_a_step_the_declaration_no_longer_has_is_drawn_and_marked() -> None:
    records = [{"id": 9, "outcome": "applied", "event": "teleport", "source": "error", "dest": "active"}]
    text = diagrams.mermaid(AGENT, current="active", path=diagrams.path_steps(records))
    assert mermaid_edges(text)[("error", "active")] == "teleport #1 (undeclared)"


def test_an_unknown_current_state_is_an_error_not_a_silent_diagram() -> None:
    with pytest.raises(ValueError, match="nirvana"):
        diagrams.mermaid(AGENT, current="nirvana")


@needs_dot
def test_svg_highlights_the_current_state_and_draws_the_path_distinctly() -> None:
    nodes, edges = svg_parts(diagrams.svg(AGENT, current="active", path=diagrams.path_steps(RECORDS)))
    styles = diagrams._GRAPHVIZ_STYLES
    assert fill(nodes["active"]) == styles["node"]["active"]["fillcolor"]
    assert fill(nodes["idle"]) == fill(nodes["registered"]) == styles["node"]["previous"]["fillcolor"]
    assert fill(nodes["error"]) == "white"
    assert label(edges[("idle", "active")]) == "begin_task #2 #4"
    assert stroke(edges[("idle", "active")]) == styles["edge"]["latest"]["color"]
    assert stroke(edges[("active", "idle")]) == stroke(edges[("registered", "idle")]) == "#1f5fbf"
    assert stroke(edges[("idle", "error")]) == styles["edge"]["default"]["color"]
    assert shape(edges[("idle", "active")]).get("stroke-width") == "3.5"


# -- without Graphviz ----------------------------------------------------------------------


def test_svg_without_dot_says_what_to_install_and_maps_to_501(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagrams, "find_dot", lambda: None)
    with pytest.raises(RendererMissing) as caught:
        diagrams.svg(AGENT)
    assert "graphviz" in caught.value.detail and "apt-get install graphviz" in caught.value.detail
    assert status_of(caught.value) == 501
    assert caught.value.to_dict()["code"] == "renderer_missing"
    assert "stateDiagram-v2" in diagrams.render(AGENT, "mermaid")  # Mermaid needs nothing


def test_cli_without_dot_exits_with_the_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(diagrams, "find_dot", lambda: None)
    assert cli.main(["diagram", "--machine", "agent", "--format", "svg", "--out", str(tmp_path)]) == 2
    assert "graphviz" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_render_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="png"):
        diagrams.render(AGENT, "png")


# -- the committed files -------------------------------------------------------------------


def test_committed_mermaid_files_are_fresh(tmp_path: Path) -> None:
    assert cli.main(["diagram", "--all", "--format", "mermaid", "--out", str(tmp_path)]) == 0
    for name in MACHINES:
        fresh = (tmp_path / f"{name}.mmd").read_text(encoding="utf-8")
        committed = ROOT / "diagrams" / f"{name}.mmd"
        assert committed.exists(), f"diagrams/{name}.mmd is missing: run `make diagrams`"
        assert committed.read_text(encoding="utf-8") == fresh, f"diagrams/{name}.mmd is stale: run `make diagrams`"


@needs_dot
def test_committed_svg_files_are_fresh(tmp_path: Path) -> None:
    assert cli.main(["diagram", "--all", "--format", "svg", "--out", str(tmp_path)]) == 0
    for name in MACHINES:
        fresh = (tmp_path / f"{name}.svg").read_text(encoding="utf-8")
        committed = ROOT / "diagrams" / f"{name}.svg"
        assert committed.exists(), f"diagrams/{name}.svg is missing: run `make diagrams`"
        assert diagrams.svg_outline(committed.read_text(encoding="utf-8")) == diagrams.svg_outline(fresh), (
            f"diagrams/{name}.svg is stale: run `make diagrams`"
        )


def test_diagrams_folder_holds_only_generated_files_and_its_readme() -> None:
    expected = {f"{n}.{ext}" for n in MACHINES for ext in ("mmd", "svg")} | {"README.md"}
    assert {p.name for p in (ROOT / "diagrams").iterdir()} == expected


@needs_dot
def test_svg_outline_ignores_layout_and_version_but_not_content() -> None:
    text = diagrams.svg(AGENT)
    moved = re.sub(r'(points|d|x|y|viewBox|width|height|transform)="[^"]*"', r'\1="0"', text)
    moved = moved.replace("Generated by graphviz version", "Generated by graphviz version 99.0 was")
    assert diagrams.svg_outline(moved) == diagrams.svg_outline(text)
    assert diagrams.svg_outline(diagrams.svg(AGENT, current="idle")) != diagrams.svg_outline(text)
    renamed = text.replace(">begin_task<", ">start_task<")
    assert diagrams.svg_outline(renamed) != diagrams.svg_outline(text)


def test_readme_embeds_the_generated_agent_diagram() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    agent_blocks = [b for b in blocks if b.startswith('---\ntitle: "agent machine"')]
    assert agent_blocks == [diagrams.mermaid(AGENT)]


# -- the command line ----------------------------------------------------------------------


def test_cli_prints_one_machine_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["diagram", "--machine", "task"]) == 0
    assert capsys.readouterr().out == diagrams.mermaid(MACHINES["task"])


def test_cli_refuses_an_unknown_machine_and_svg_of_all_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["diagram", "--machine", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["diagram", "--all", "--format", "svg"]) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_needs_one_subject() -> None:
    with pytest.raises(SystemExit):
        cli.main(["diagram", "--format", "svg"])


# -- ?at= parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("2026-11-23T10:00:00Z", "2026-11-23T10:00:00.000000+00:00", id="zulu"),
        pytest.param("2026-11-23T11:00:00+01:00", "2026-11-23T10:00:00.000000+00:00", id="offset"),
        pytest.param("2026-11-23T11:00:00 01:00", "2026-11-23T10:00:00.000000+00:00", id="plus-lost-in-query"),
        pytest.param("2026-11-23T10:00:00", "2026-11-23T10:00:00.000000+00:00", id="naive-is-utc"),
    ],
)
def test_parse_moment(raw: str, expected: str) -> None:
    assert parse_moment(raw) == expected


def test_parse_moment_refuses_what_is_not_a_time() -> None:
    with pytest.raises(Invalid) as caught:
        parse_moment("yesterday")
    assert caught.value.code == "invalid_time"
