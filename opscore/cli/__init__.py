"""``opscore``: the command line. Serve, simulate, and talk to a running server through ``opscore.client``.

Commands (``opscore COMMAND --help`` for each; docs/cli.md is generated from that help)::

    opscore serve | simulate                                      run Ops-Core / a stand-in AgentKit
    opscore agents list | show | report | trigger | register      agents            (client)
    opscore runs list | show | start | pause | resume | cancel | retry   runs       (client)
    opscore definitions upload | list | show                      workflow definitions (client)
    opscore audit list | tail [-f]                                the audit log     (client)
    opscore audit export | verify                                 the database, a file, or --server
    opscore diagram                                               machines, agents and runs drawn
    opscore keys create | signing-key                             keys for OPSCORE_KEYS_FILE

Every default comes from the one ``Settings`` (environment, then ``.env``, then defaults),
built once per command and only by commands that need it: the CLI, the server and the
simulator read the same configuration, and ``opscore --help`` starts without reading it.
Client commands print for people (aligned tables, states coloured on a terminal) and, with
``--json``, for programs. A failure is one line on stderr and an exit status: 1 the server
refused or found nothing (its ``detail``), 2 a usage or configuration error, 3 Ops-Core could
not be reached or was unavailable. Never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import click

from opscore.cli import agents, audit, diagram, keys, runs, serve  # noqa: F401 - each registers its commands
from opscore.cli.base import Failure, cli, failure_of
from opscore.cli.serve import ensure_env, simulator_config

__all__ = ["cli", "ensure_env", "main", "parse", "simulator_config"]


def parse(argv: list[str]) -> argparse.Namespace:
    """The options a command line (``["simulate", "--port", "9"]``, command names first) gives its
    command, as attributes, defaults included; tests and tools read them."""
    command: click.Command = cli
    words = list(argv)
    name = "opscore"
    while isinstance(command, click.Group):
        if not words or words[0] not in command.commands:
            raise click.UsageError(f"no command {' '.join(argv)!r}")
        name = words.pop(0)
        command = command.commands[name]
    return argparse.Namespace(**command.make_context(name, words).params)


def main(argv: list[str] | None = None) -> int:
    """Run one command line; its exit status. Usage errors exit with status 2 (``SystemExit``)."""
    from opscore.errors import OpsCoreError

    try:
        result = cli.main(args=argv, prog_name="opscore", standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from exc
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):  # Ctrl+C (how `audit tail -f` ends): no traceback
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Failure as exc:
        exc.show()
        return exc.exit_code
    except OpsCoreError as exc:
        failure = failure_of(exc)
        failure.show()
        return failure.exit_code
    return result if isinstance(result, int) else 0
