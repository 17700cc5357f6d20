"""What the command line shows a person: aligned tables, coloured states, progress bars, JSON.

Colours and progress bars only on a terminal (and never with ``NO_COLOR`` set): piped into
another program, the output is plain text, and ``--json`` output is JSON and nothing else.
``rich`` (the progress bars) is imported only when a bar is shown, so ``opscore --help`` and
every piped command start without it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Protocol

import click

STATE_COLOURS = {
    # agents
    "registered": "blue",
    "initializing": "magenta",
    "idle": "green",
    "active": "cyan",
    "error": "red",
    "offline": "yellow",
    "deregistered": "bright_black",
    # runs and tasks
    "pending": "blue",
    "running": "cyan",
    "dispatched": "cyan",
    "paused": "yellow",
    "retrying": "yellow",
    "completed": "green",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "bright_black",
    "skipped": "bright_black",
    # audit outcomes and verdicts
    "applied": "green",
    "rejected": "red",
    "ok": "green",
    "FAILED": "red",
}


def colour_enabled(stream: IO[str] | None = None) -> bool:
    """Colours on ``stream`` (stdout): only on a terminal, and not when ``NO_COLOR`` is set."""
    target = stream if stream is not None else sys.stdout
    return not os.environ.get("NO_COLOR") and hasattr(target, "isatty") and target.isatty()


def state(text: str | None, colour: bool) -> str:
    """A state (or outcome) name, coloured by :data:`STATE_COLOURS` when ``colour``."""
    value = "-" if text is None else text
    hue = STATE_COLOURS.get(value)
    return click.style(value, fg=hue) if colour and hue else value


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    coloured: bool = False  # a state or outcome: coloured on a terminal
    right: bool = False  # numbers


def table(columns: Sequence[Column], rows: Iterable[Sequence[Any]], *, empty: str = "(none)") -> None:
    """Print ``rows`` under ``columns``, aligned (widths of the plain text, colours added after)."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    if not cells:
        click.echo(empty)
        return
    colour = colour_enabled()
    widths = [max(len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    last = len(columns) - 1

    def line(values: Sequence[str], header: bool = False) -> str:
        out = []
        for i, (column, value) in enumerate(zip(columns, values, strict=True)):
            padded = value.rjust(widths[i]) if column.right else (value if i == last else value.ljust(widths[i]))
            if header:
                padded = click.style(padded, bold=True) if colour else padded
            elif column.coloured and colour:
                padded = padded.replace(value, state(value, True), 1)
            out.append(padded)
        return "  ".join(out).rstrip()

    click.echo(line([c.header for c in columns], header=True))
    for row in cells:
        click.echo(line(row))


def fields(pairs: Iterable[tuple[str, Any]], coloured: Iterable[str] = ("state",)) -> None:
    """Print ``label: value`` lines, labels aligned; values of ``coloured`` labels coloured."""
    items = [(label, "-" if value is None else str(value)) for label, value in pairs]
    width = max((len(label) for label, _ in items), default=0)
    colour = colour_enabled()
    marked = set(coloured)
    for label, value in items:
        shown = state(value, True) if colour and label in marked else value
        click.echo(f"{label + ':':<{width + 1}} {shown}")


def to_plain(value: Any) -> Any:
    """A pydantic model (or a list of them) as plain JSON data."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def emit_json(value: Any, stream: IO[str] | None = None) -> None:
    """``value`` as indented JSON on stdout (or ``stream``): what ``--json`` prints."""
    click.echo(json.dumps(to_plain(value), indent=2, ensure_ascii=False), file=stream)


def emit_json_line(value: Any) -> None:
    """``value`` as one line of JSON (JSON Lines: ``audit tail --json``)."""
    click.echo(json.dumps(to_plain(value), ensure_ascii=False, separators=(",", ":")))


class Progress(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class _Silent:
    def advance(self, amount: float = 1) -> None:
        return None


class _Bar:
    def __init__(self, bar: Any, task: Any) -> None:
        self._bar, self._task = bar, task

    def advance(self, amount: float = 1) -> None:
        self._bar.advance(self._task, amount)


@contextmanager
def progress(description: str, total: float | None = None, *, unit: str = "records") -> Iterator[Progress]:
    """A progress bar on stderr while the body runs, only when stderr is a terminal.

    ``total`` ``None`` counts without a bar's end (records of an export whose count is not
    known before). ``unit="bytes"`` shows sizes (a file being verified).
    """
    if not colour_enabled(sys.stderr):
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is None:
        columns += [TextColumn("{task.completed:,.0f} " + unit), TimeElapsedColumn()]
    else:
        columns += [BarColumn(), count, TimeRemainingColumn()]
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield _Bar(bar, bar.add_task(description, total=total))
