"""Every ordered pair of agent states, generated from the declaration (shared by unit and HTTP tests)."""

from __future__ import annotations

from collections import deque

import pytest

from opscore.machines import AGENT, transition_rows

STATES: list[str] = list(AGENT["states"])
DECLARED: dict[tuple[str, str], str] = {(r["source"], r["dest"]): r["trigger"] for r in transition_rows(AGENT)}


def path_to(state: str) -> list[str]:
    """The shortest list of triggers that takes a new agent from ``initial`` to ``state``."""
    start = AGENT["initial"]
    paths: dict[str, list[str]] = {start: []}
    todo = deque([start])
    while todo:
        here = todo.popleft()
        for (source, dest), trigger in DECLARED.items():
            if source == here and dest not in paths:
                paths[dest] = [*paths[here], trigger]
                todo.append(dest)
    return paths[state]


def pair_params(pairs: list[tuple[str, str]] | None = None) -> list[object]:
    every = pairs if pairs is not None else [(s, t) for s in STATES for t in STATES]
    return [pytest.param(s, t, id=f"{s}-to-{t}") for s, t in every]
