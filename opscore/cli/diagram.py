"""``opscore diagram``: the declared machines, and an agent's or a run's position, as Mermaid or SVG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    pass
from opscore.cli.base import State, cli, pass_state

# -- diagrams -----------------------------------------------------------------------------------


def write_diagrams(names: list[str], fmt: str, out: Path | None) -> list[Path]:
    """Render the named machines; into ``out/<name>.<ext>``, or to stdout without ``out``."""
    from opscore import diagrams
    from opscore.machines import MACHINES

    written: list[Path] = []
    texts = [(name, diagrams.render(MACHINES[name], fmt)) for name in names]
    for name, text in texts:
        if out is None:
            sys.stdout.write(text)
            continue
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{name}.{diagrams.EXTENSIONS[fmt]}"
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


@cli.command(
    epilog="Machines are drawn locally from opscore/machines.py; --agent/--workflow ask a running server "
    "(OPSCORE_API_URL, else http://OPSCORE_HOST:OPSCORE_PORT; OPSCORE_API_KEY). SVG needs Graphviz's dot."
)
@click.option("--machine", metavar="NAME", help="one declared machine: agent, workflow or task")
@click.option("--all", "all_", is_flag=True, help="every declared machine")
@click.option("--agent", metavar="ID", help="an agent on a running server: highlighted, with its path")
@click.option("--workflow", metavar="SESSION_ID", help="a workflow run on a running server")
@click.option("--view", type=click.Choice(["lifecycle", "tasks"]), default="lifecycle", show_default=True,
              help="(--workflow) the run on the workflow machine, or its task graph")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["mermaid", "svg"]), default="mermaid", show_default=True)
@click.option("--out", metavar="DIR", help="write <name>.mmd / <name>.svg into DIR instead of stdout")
@click.option("--last", type=int, default=10, show_default=True, help="(--agent/--workflow) transitions to number")
@click.option("--at", metavar="ISO", help="(--agent/--workflow) draw it as it was at this ISO-8601 time")
@pass_state
def diagram(
    state: State,
    machine: str | None,
    all_: bool,
    agent: str | None,
    workflow: str | None,
    view: str,
    fmt: str,
    out: str | None,
    last: int,
    at: str | None,
) -> int:
    """Draw a machine, an agent or a run (Mermaid or SVG).

    Machines are drawn from their declarations; an agent or a run (its position and recent
    path, or with --view tasks its task graph) is asked of the server.
    """
    from opscore import diagrams
    from opscore.errors import OpsCoreError
    from opscore.machines import MACHINES

    chosen = [x for x in (machine, all_ or None, agent, workflow) if x is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --machine NAME, --all, --agent ID and --workflow SESSION_ID")
    target_dir = Path(out) if out else None
    if agent is not None or workflow is not None:
        with state.client() as client:
            if agent is not None:
                text = client.agents.diagram(agent, format=fmt, last=last, at=at)  # type: ignore[arg-type]
                stem = f"agent-{agent}"
            else:
                assert workflow is not None
                if view == "tasks":
                    text = client.runs.diagram(workflow, format=fmt, view="tasks")  # type: ignore[arg-type]
                    stem = f"workflow-{workflow}-tasks"
                else:
                    text = client.runs.diagram(workflow, format=fmt, last=last, at=at)  # type: ignore[arg-type]
                    stem = f"workflow-{workflow}"
        if target_dir is None:
            sys.stdout.write(text)
        else:
            target_dir.mkdir(parents=True, exist_ok=True)
            target = target_dir / f"{stem}.{diagrams.EXTENSIONS[fmt]}"
            target.write_text(text, encoding="utf-8")
            click.echo(target)
        return 0
    names = list(MACHINES) if all_ else [str(machine)]
    if machine is not None and machine not in MACHINES:
        click.echo(f"no machine called {machine!r}; machines: {', '.join(MACHINES)}", err=True)
        return 2
    if target_dir is None and fmt == "svg" and len(names) > 1:
        click.echo("--all --format svg writes one file per machine: add --out DIR", err=True)
        return 2
    try:
        written = write_diagrams(names, fmt, target_dir)
    except OpsCoreError as exc:
        click.echo(exc.detail, err=True)
        return 2
    for target in written:
        click.echo(target)
    return 0
