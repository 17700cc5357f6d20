"""Diagrams of the declared machines: declaration (+ current state, + recent path) → Mermaid or SVG;
and of a workflow run's task graph (its definition's tasks, each with its state).

Pure: no I/O but running Graphviz's ``dot`` for SVG. Every diagram is drawn by a throwaway
``transitions`` ``GraphMachine`` built from the one declaration in ``opscore/machines.py``
(never the engine's runtime machine: a ``GraphMachine`` keeps a graph per model forever), with
one probe model placed in the current state, which the library then styles as ``active``.

- **Mermaid** (``graph_engine="mermaid"``) needs nothing installed. Mermaid state diagrams
  cannot style single edges, so the path is drawn with numbered labels (``begin_task #2 #4``),
  the states it passed through get the ``s_previous`` class, and a note beside the current state
  lists the steps in order. Three touches to the library's text: its front matter is made valid
  YAML (``title: "agent machine"``), terminal states get their ``--> [*]``, and trailing
  blanks go (editors strip them, and the committed files are compared byte for byte).
- **SVG** (``graph_engine="graphviz"``) needs the ``dot`` program (Debian/Ubuntu package
  ``graphviz``). Path edges are coloured and thickened, the latest step most, and numbered the
  same way. Without ``dot`` the call raises :class:`~opscore.errors.RendererMissing` (HTTP 501)
  before anything is drawn.

Path numbering: ``#1`` is the oldest of the steps drawn and ``#n`` the latest, the one that led
to the current state. A pair of states travelled several times carries several numbers.

A run's **task graph** is no state machine, so it is drawn without ``transitions``: a Mermaid
``flowchart`` or a Graphviz ``Digraph`` of :class:`TaskNode`, one node per task of the run's
definition (labelled with its state and attempt, coloured by state), ``nextTaskId`` edges solid
and ``fallbackTaskId`` edges dashed, the task the run is at outlined.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from transitions.extensions import GraphMachine

from opscore.audit import is_transition
from opscore.errors import RendererMissing
from opscore.machines import Declaration, transition_rows

FORMATS: Final = ("mermaid", "svg")
MEDIA_TYPES: Final = {"mermaid": "text/vnd.mermaid; charset=utf-8", "svg": "image/svg+xml"}
EXTENSIONS: Final = {"mermaid": "mmd", "svg": "svg"}
DEFAULT_LAST: Final = 10
INITIAL_NODE: Final = "__initial__"
MAX_LAST: Final = 100

INSTALL_HINT: Final = (
    "SVG diagrams need Graphviz's `dot` program: install the Debian/Ubuntu package `graphviz` "
    "(apt-get install graphviz; macOS: brew install graphviz), or ask for format=mermaid, which needs nothing"
)

# Node styles by name; a node takes the first that applies: active (current) > previous (on the
# path) > terminal > default. "latest" is the edge of the newest step.
_GRAPHVIZ_STYLES: Final[dict[str, Any]] = {
    "node": {
        "default": {"style": "rounded,filled", "shape": "rectangle", "fillcolor": "white", "color": "black"},
        "terminal": {"fillcolor": "#eeeeee", "color": "black", "peripheries": "2"},
        "previous": {"fillcolor": "#dbe9ff", "color": "#1f5fbf", "penwidth": "1.5", "peripheries": "1"},
        "active": {"fillcolor": "#ffd9cc", "color": "#c0392b", "penwidth": "2.5", "peripheries": "2"},
    },
    "edge": {
        "default": {"color": "#555555", "fontcolor": "#333333"},
        "previous": {"color": "#1f5fbf", "fontcolor": "#1f5fbf", "penwidth": "2.5"},
        "latest": {"color": "#c0392b", "fontcolor": "#c0392b", "penwidth": "3.5"},
    },
    "graph": {"default": {"fontname": "Helvetica"}},
}

# The same names as Mermaid ``classDef`` (CSS); edges cannot be styled in a Mermaid state diagram.
_MERMAID_STYLES: Final[dict[str, Any]] = {
    "node": {
        "default": {"fill": "#ffffff", "stroke": "#333333"},
        "terminal": {"fill": "#eeeeee", "stroke": "#333333", "stroke-width": "3px"},
        "previous": {"fill": "#dbe9ff", "stroke": "#1f5fbf", "stroke-width": "2px"},
        "active": {"fill": "#ffd9cc", "stroke": "#c0392b", "stroke-width": "4px", "font-weight": "bold"},
    },
    "edge": {},
    "graph": {},
}


@dataclass(frozen=True, slots=True)
class Step:
    """One applied transition of the path, numbered from 1 (oldest drawn)."""

    number: int
    trigger: str
    source: str
    dest: str
    recorded_at: str | None = None
    record_id: int | None = None

    @property
    def tag(self) -> str:
        return f"#{self.number}"


def path_steps(records: Iterable[dict[str, Any]], last: int = DEFAULT_LAST) -> list[Step]:
    """The last ``last`` applied transitions of ``records`` (oldest first), numbered 1..n.

    Refused records are skipped: they moved nothing. ``last=0`` draws no path.
    """
    applied = [r for r in records if is_transition(r) and r.get("source") is not None]
    chosen = applied[-last:] if last > 0 else []
    return [
        Step(
            number=i,
            trigger=str(r.get("event") or "?"),
            source=str(r["source"]),
            dest=str(r["dest"]),
            recorded_at=r.get("recordedAt"),
            record_id=r.get("id"),
        )
        for i, r in enumerate(chosen, start=1)
    ]


def find_dot() -> str | None:
    """Where ``dot`` is, or ``None`` (tests replace this to simulate a host without Graphviz)."""
    return shutil.which("dot")


def dot_available() -> bool:
    return find_dot() is not None


class _Probe:
    """The one model of a throwaway ``GraphMachine``: it only holds the state to highlight."""


def _build(
    decl: Declaration, engine: Literal["mermaid", "graphviz"], current: str | None, path: Sequence[Step], title: str
) -> Any:
    """The graph of a throwaway ``GraphMachine`` for ``decl``, ``current`` and ``path`` styled."""
    states: list[str] = list(decl["states"])
    if current is not None and current not in states:
        raise ValueError(f"{current!r} is not a state of the {decl['name']} machine")
    numbers: dict[tuple[str, str], list[str]] = defaultdict(list)
    for step in path:
        numbers[(step.source, step.dest)].append(step.tag)
    declared = {(row["source"], row["dest"]) for row in transition_rows(decl)}
    rows: list[dict[str, Any]] = []
    for row in transition_rows(decl):
        tags = numbers.get((row["source"], row["dest"]))
        label = f"{row['trigger']} {' '.join(tags)}" if tags else row["trigger"]
        rows.append({**row, "label": label})
    # A step the declaration no longer has (it changed since) is still drawn, and says so.
    for (source, dest), tags in numbers.items():
        if (source, dest) not in declared and source in states and dest in states:
            trigger = next(s.trigger for s in path if (s.source, s.dest) == (source, dest))
            rows.append(
                {
                    "trigger": trigger,
                    "source": source,
                    "dest": dest,
                    "label": f"{trigger} {' '.join(tags)} (undeclared)",
                }
            )
    machine = GraphMachine(
        model=None,
        states=states,
        transitions=rows,
        initial=decl["initial"],
        auto_transitions=False,
        graph_engine=engine,
        title=title,
    )
    machine.style_attributes = _MERMAID_STYLES if engine == "mermaid" else _GRAPHVIZ_STYLES
    probe = _Probe()
    machine.add_model(probe, initial=current or decl["initial"])
    graph = machine.model_graphs[id(probe)]
    graph.reset_styling()
    for state in decl.get("terminal", ()):
        graph.set_node_style(state, "terminal")
    drawable = [s for s in path if s.source in states and s.dest in states]
    for step in drawable:
        graph.set_previous_transition(step.source, step.dest)
        graph.set_node_style(step.dest, "previous")
    if drawable:
        graph.custom_styles["edge"][drawable[-1].source][drawable[-1].dest] = "latest"  # type: ignore[attr-defined]
    if current is not None:
        graph.set_node_style(current, "active")
    return graph.get_graph(title=title)


def _title(decl: Declaration, subject: str | None, current: str | None, path: Sequence[Step]) -> str:
    title = f"{decl['name']} machine"
    if subject:
        title += f": {subject}"
    if current is not None:
        title += f" (now {current})"
    if path:
        title += f", last {len(path)} transition{'s' if len(path) > 1 else ''} #1 oldest to #{len(path)} latest"
    return title


def mermaid(
    decl: Declaration,
    *,
    current: str | None = None,
    path: Sequence[Step] = (),
    subject: str | None = None,
) -> str:
    """Mermaid ``stateDiagram-v2`` text of ``decl``; ``current`` highlighted, ``path`` numbered."""
    title = _title(decl, subject, current, path)
    graph = _build(decl, "mermaid", current, path, title)
    lines: list[str] = [line.rstrip() for line in graph.source.split("\n")]
    if lines[:1] != ["---"] or lines[2:3] != ["---"]:
        raise RuntimeError("unexpected Mermaid text from transitions: its front matter changed")
    lines[1] = f"title: {json.dumps(title, ensure_ascii=False)}"
    extra = [f"  {state} --> [*]" for state in decl.get("terminal", ())]
    if path:
        anchor = current if current is not None else path[-1].dest
        extra.append(f"  note right of {anchor}")
        extra.extend(f"    {s.tag} {s.trigger}: {s.source} → {s.dest}" for s in path)
        extra.append("  end note")
    return "\n".join([*lines, *extra]) + "\n"


def svg(
    decl: Declaration,
    *,
    current: str | None = None,
    path: Sequence[Step] = (),
    subject: str | None = None,
) -> str:
    """SVG of ``decl`` through Graphviz ``dot``; :class:`RendererMissing` when ``dot`` is absent."""
    if find_dot() is None:
        raise RendererMissing(INSTALL_HINT, format="svg", install="graphviz")
    try:
        import graphviz
    except ImportError as exc:  # pragma: no cover - a dependency of opscore
        raise RendererMissing(
            "SVG diagrams need the Python package `graphviz` (pip install graphviz) and Graphviz's `dot`",
            format="svg",
            install="graphviz",
        ) from exc
    title = _title(decl, subject, current, path)
    graph = _build(decl, "graphviz", current, path, title)
    if not isinstance(graph, graphviz.Digraph):  # transitions fell back to Mermaid
        raise RendererMissing(INSTALL_HINT, format="svg", install="graphviz")
    # Mermaid's [*] --> initial, which the library's Graphviz graph leaves out
    graph.node(INITIAL_NODE, label="", shape="circle", style="filled", fillcolor="black", width="0.2")
    graph.edge(INITIAL_NODE, decl["initial"])
    try:
        data: bytes = graph.pipe(format="svg")
    except graphviz.ExecutableNotFound as exc:
        raise RendererMissing(INSTALL_HINT, format="svg", install="graphviz") from exc
    return data.decode("utf-8")


def render(
    decl: Declaration,
    fmt: str,
    *,
    current: str | None = None,
    path: Sequence[Step] = (),
    subject: str | None = None,
) -> str:
    """``mermaid`` or ``svg`` text of ``decl`` (``ValueError`` for another format)."""
    if fmt == "mermaid":
        return mermaid(decl, current=current, path=path, subject=subject)
    if fmt == "svg":
        return svg(decl, current=current, path=path, subject=subject)
    raise ValueError(f"unknown diagram format {fmt!r}; formats: {', '.join(FORMATS)}")


_SVG = "{http://www.w3.org/2000/svg}"


def svg_outline(text: str) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """What an SVG diagram says, without where ``dot`` put it: comparable across Graphviz versions.

    One ``(class, title, texts, colours)`` per node, edge and graph, sorted. Coordinates,
    sizes and comments (``dot`` writes its version in one) are left out, so two renderings of
    the same diagram by different ``dot`` versions compare equal while a renamed state, a new
    trigger or another highlight do not.
    """
    root = ET.fromstring(text)
    items = []
    for group in root.iter(f"{_SVG}g"):
        cls = group.get("class", "")
        if cls not in {"node", "edge", "graph"}:
            continue
        title_el = group.find(f"{_SVG}title")
        title = "" if title_el is None or title_el.text is None else title_el.text
        # the graph group holds every other group: keep only its own label there
        found = group.findall(f"{_SVG}text") if cls == "graph" else group.iter(f"{_SVG}text")
        texts = tuple(t.text or "" for t in found)
        colours = tuple(
            sorted(
                {
                    f"{el.tag.removeprefix(_SVG)}:{el.get('fill', '')}/{el.get('stroke', '')}"
                    for el in group
                    if el.tag not in {f"{_SVG}g", f"{_SVG}title", f"{_SVG}text"}
                }
            )
        )
        items.append((cls, title, texts, colours))
    return sorted(items)


# -- a run's task graph ------------------------------------------------------------------------

TASK_STATE_STYLES: Final[dict[str, tuple[str, str]]] = {
    "pending": ("#ffffff", "#888888"),
    "waiting": ("#fff4cc", "#b7950b"),
    "dispatched": ("#dbe9ff", "#1f5fbf"),
    "running": ("#b9d3ff", "#1f5fbf"),
    "retrying": ("#ffe0b3", "#d35400"),
    "succeeded": ("#d4f5d4", "#1e8449"),
    "failed": ("#ffd9cc", "#c0392b"),
    "skipped": ("#eeeeee", "#888888"),
    "cancelled": ("#e0e0e0", "#555555"),
}
"""Fill and stroke of a task node by its state (an unknown state is drawn as ``pending``)."""

VIEWS: Final = ("lifecycle", "tasks")
"""What a run's diagram draws: its lifecycle machine (the default) or its definition's task graph."""


@dataclass(frozen=True, slots=True)
class TaskNode:
    """One task of a run's definition, with where the run's task entity is now."""

    task_id: str
    name: str | None
    state: str
    attempt: int = 0
    next_task_id: str | None = None
    fallback_task_id: str | None = None


def _task_style(state: str) -> tuple[str, str]:
    return TASK_STATE_STYLES.get(state, TASK_STATE_STYLES["pending"])


def _task_lines(node: TaskNode) -> tuple[str, str]:
    """The two lines of a node: its name (and id when they differ), then state and attempt."""
    title = node.task_id if not node.name or node.name == node.task_id else f"{node.name} ({node.task_id})"
    status = node.state if node.attempt <= 0 else f"{node.state} · attempt {node.attempt}"
    return title, status


def _task_edges(nodes: Sequence[TaskNode]) -> list[tuple[str, str, bool]]:
    """``(from, to, fallback?)`` for every edge whose both ends are tasks of the graph."""
    known = {n.task_id for n in nodes}
    edges: list[tuple[str, str, bool]] = []
    for node in nodes:
        if node.next_task_id is not None and node.next_task_id in known:
            edges.append((node.task_id, node.next_task_id, False))
        if node.fallback_task_id is not None and node.fallback_task_id in known:
            edges.append((node.task_id, node.fallback_task_id, True))
    return edges


def _mermaid_label(text: str) -> str:
    """Text for a quoted Mermaid label: entity codes for what would end or mark up the label."""
    out = text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    return " ".join(out.split())


def task_graph_mermaid(nodes: Sequence[TaskNode], *, start: str | None, current: str | None, title: str) -> str:
    """Mermaid ``flowchart`` of a run's tasks: ``nextTaskId`` solid, ``fallbackTaskId`` dashed.

    Each node says its task's state and attempt and takes the class of its state (one
    ``classDef`` per task state, the colours of :data:`TASK_STATE_STYLES`); the task the run
    is at has the ``current`` class too; a filled circle points at the first task.
    """
    ids = {node.task_id: f"t{n}" for n, node in enumerate(nodes)}
    lines = ["---", f"title: {json.dumps(title, ensure_ascii=False)}", "---", "flowchart LR"]
    if start in ids:
        lines.append('  start_((" ")) --> ' + ids[start])
    for node in nodes:
        name, status = _task_lines(node)
        state = node.state if node.state in TASK_STATE_STYLES else "pending"
        lines.append(f'  {ids[node.task_id]}["{_mermaid_label(name)}<br/>{_mermaid_label(status)}"]:::{state}')
    for source, dest, fallback in _task_edges(nodes):
        arrow = "-. fallback .->" if fallback else "-->"
        lines.append(f"  {ids[source]} {arrow} {ids[dest]}")
    for state, (fill, stroke) in TASK_STATE_STYLES.items():
        lines.append(f"  classDef {state} fill:{fill},stroke:{stroke},color:#000000")
    lines.append("  classDef current stroke-width:4px")
    lines.append("  style start_ fill:#000000,stroke:#000000")
    if current in ids:
        lines.append(f"  class {ids[current]} current")
    return "\n".join(lines) + "\n"


def task_graph_svg(nodes: Sequence[TaskNode], *, start: str | None, current: str | None, title: str) -> str:
    """SVG of the same graph through Graphviz ``dot``; :class:`RendererMissing` without it."""
    if find_dot() is None:
        raise RendererMissing(INSTALL_HINT, format="svg", install="graphviz")
    import graphviz

    graph = graphviz.Digraph(
        graph_attr={"rankdir": "LR", "label": graphviz.escape(title), "labelloc": "t", "fontname": "Helvetica"},
        node_attr={"shape": "rectangle", "style": "rounded,filled", "fontname": "Helvetica"},
        edge_attr={"color": "#555555", "fontcolor": "#333333", "fontname": "Helvetica"},
    )
    # a node is named by its task id (the SVG's <title>, for whoever embeds it); the start dot by
    # a name no task id can have (they hold no '/'), so the two never collide
    ids = {node.task_id: graphviz.escape(node.task_id) for node in nodes}
    if start in ids:
        graph.node("/start", label="", shape="circle", style="filled", fillcolor="black", width="0.2")
        graph.edge("/start", ids[start])
    for node in nodes:
        fill, stroke = _task_style(node.state)
        name, status = _task_lines(node)
        extra = {"penwidth": "3", "peripheries": "2"} if node.task_id == current else {"penwidth": "1.2"}
        graph.node(
            ids[node.task_id],
            label=f"{graphviz.escape(name)}\\n{graphviz.escape(status)}",
            fillcolor=fill,
            color=stroke,
            **extra,
        )
    for source, dest, fallback in _task_edges(nodes):
        if fallback:
            graph.edge(ids[source], ids[dest], label="fallback", style="dashed")
        else:
            graph.edge(ids[source], ids[dest])
    try:
        data: bytes = graph.pipe(format="svg")
    except graphviz.ExecutableNotFound as exc:
        raise RendererMissing(INSTALL_HINT, format="svg", install="graphviz") from exc
    return data.decode("utf-8")


def task_graph(
    nodes: Sequence[TaskNode], fmt: str, *, start: str | None = None, current: str | None = None, title: str = ""
) -> str:
    """``mermaid`` or ``svg`` text of a run's task graph (``ValueError`` for another format)."""
    if fmt == "mermaid":
        return task_graph_mermaid(nodes, start=start, current=current, title=title)
    if fmt == "svg":
        return task_graph_svg(nodes, start=start, current=current, title=title)
    raise ValueError(f"unknown diagram format {fmt!r}; formats: {', '.join(FORMATS)}")
