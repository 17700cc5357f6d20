"""Write ``docs/cli.md`` from the commands' own ``--help`` (``tests/test_cli_reference.py`` keeps it fresh).

python scripts/cli_reference.py           # rewrite docs/cli.md
python scripts/cli_reference.py --check   # exit 1 when it is stale
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opscore.cli import cli  # noqa: E402 - after the path, so the checkout's own package is read

TARGET = ROOT / "docs" / "cli.md"
WIDTH = 100
SETTINGS = {**cli.context_settings, "max_content_width": WIDTH}

INTRO = """\
# `opscore` command line reference

Generated from the commands' own `--help` by `python scripts/cli_reference.py`;
`tests/test_cli_reference.py` fails when this file is stale.

Client commands talk to Ops-Core at `OPSCORE_API_URL` (else `http://OPSCORE_HOST:OPSCORE_PORT`)
with `OPSCORE_API_KEY`, read from the environment, then `.env`, like every other setting. They
print text for people (aligned tables, states coloured only on a terminal) and, with `--json`,
JSON for programs: a listing prints `{"items": [...]}` holding every page, `audit tail --json`
one record a line. A failure is one line on stderr, `opscore: <code>: <the server's detail>`,
and an exit status:

| status | meaning |
|---|---|
| 0 | done |
| 1 | refused or not found (401, 403, 404, 409, 412, 422), or `audit verify` found a problem |
| 2 | usage or configuration error (bad options, no key, no database where one was expected) |
| 3 | Ops-Core (or the database) could not be reached or was unavailable (503) |

`-` names standard output (`audit export --out -`) or standard input (`definitions upload -`).
"""


def commands(group: click.Group, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    for name in sorted(group.commands):
        command = group.commands[name]
        yield [*path, name], command
        if isinstance(command, click.Group):
            yield from commands(command, [*path, name])


def generate() -> str:
    root = click.Context(cli, info_name="opscore", terminal_width=WIDTH, **SETTINGS)
    parts = [INTRO, "## `opscore`\n", "```text", cli.get_help(root), "```\n"]
    contexts = {(): root}
    for path, command in commands(cli, []):
        parent = contexts[tuple(path[:-1])]
        ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=WIDTH, **SETTINGS)
        contexts[tuple(path)] = ctx
        level = "#" * min(len(path) + 2, 4)
        parts += [f"{level} `opscore {' '.join(path)}`\n", "```text", command.get_help(ctx), "```\n"]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    fresh = generate()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != fresh:
            print("docs/cli.md is stale: run `python scripts/cli_reference.py`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
