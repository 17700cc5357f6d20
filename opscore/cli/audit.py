"""``opscore audit``: list and tail through the server; export and verify the database, a file or the server."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from opscore import terminal as term

if TYPE_CHECKING:
    from opscore import audit
    from opscore.checkpoints import Checkpoints
    from opscore.config import Settings
    from opscore.wire import AuditRecord
from opscore.cli.base import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    F,
    Failure,
    Order,
    State,
    T,
    cli,
    json_option,
    pass_state,
)

# -- audit --------------------------------------------------------------------------------------


@cli.group("audit")
def audit_group() -> None:
    """The audit log: list, tail [-f], export, verify.

    list and tail ask the server; export and verify read the database (OPSCORE_DATABASE_URL,
    read-only), a file, or with --server the server.
    """


AUDIT_COLUMNS = [
    term.Column("ID", right=True),
    term.Column("RECORDED"),
    term.Column("ENTITY"),
    term.Column("SEQ", right=True),
    term.Column("EVENT"),
    term.Column("FROM"),
    term.Column("TO"),
    term.Column("OUTCOME", coloured=True),
    term.Column("ACTOR"),
]


def audit_row(r: AuditRecord) -> tuple[Any, ...]:
    outcome = r.outcome if r.reason is None else f"{r.outcome} ({r.reason})"
    return (r.id, r.recordedAt, f"{r.entityType} {r.entityId}", r.seq, r.event, r.source, r.dest, outcome, r.actor)


def audit_line(r: AuditRecord) -> str:
    """One record in one line, for ``audit tail``."""
    colour = term.colour_enabled()
    outcome = term.state(r.outcome, colour) + ("" if r.reason is None else f" ({r.reason})")
    move = f"{r.source or '-'} -> {r.dest or '-'}"
    return (
        f"{r.recordedAt}  #{r.id}  {r.entityType} {r.entityId} seq {r.seq}  {r.event or '-'}  {move}  {outcome}"
        f"  {r.actor}"
    )


def entity_options(fn: F) -> F:
    """``--agent`` / ``--run`` / ``--entity-type`` and ``--outcome``: which records."""
    for option in reversed(
        [
            click.option("--agent", metavar="ID", help="only this agent's records"),
            click.option("--run", metavar="SESSION_ID", help="only this run's records (the run and its tasks)"),
            click.option("--entity-type", type=click.Choice(["agent", "workflow", "task"]), help="only these"),
            click.option("--outcome", type=click.Choice(["applied", "rejected"]), help="only applied or rejected"),
        ]
    ):
        fn = option(fn)
    return fn


@audit_group.command("list")
@entity_options
@click.option("--since", metavar="ISO", help="records recorded at or after this time")
@click.option("--until", metavar="ISO", help="records recorded at or before this time")
@click.option("--newest-first", is_flag=True, help="newest first (default: oldest first)")
@click.option("--limit", type=click.IntRange(min=1), help="at most this many records (default: every record)")
@json_option
@pass_state
def audit_list(
    state: State,
    agent: str | None,
    run: str | None,
    entity_type: str | None,
    outcome: Any,
    since: str | None,
    until: str | None,
    newest_first: bool,
    limit: int | None,
    as_json: bool,
) -> None:
    """Audit records (every page), oldest first.

    --json prints {"items": [record, ...]}.
    """
    if agent is not None and run is not None:
        raise click.UsageError("give at most one of --agent and --run")
    order: Order = "desc" if newest_first else "asc"
    page = min(limit or 1000, 1000)
    with state.client() as client:
        if agent is not None:
            records = client.agents.audit(agent, outcome=outcome, since=since, until=until, order=order, limit=page)
        elif run is not None:
            records = client.runs.audit(run, outcome=outcome, since=since, until=until, order=order, limit=page)
        else:
            records = client.audit.list(
                entity_type=entity_type, outcome=outcome, since=since, until=until, order=order, limit=page
            )
        items = list(islice(records, limit))
    if as_json:
        term.emit_json({"items": items})
    else:
        term.table(AUDIT_COLUMNS, [audit_row(r) for r in items], empty="no records")


@audit_group.command("tail")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=10, show_default=True, help="last records")
@click.option("-f", "--follow", is_flag=True, help="then print each new record as it is committed (Ctrl+C stops)")
@click.option("--agent", metavar="ID", help="only this agent's records")
@click.option("--entity-type", type=click.Choice(["agent", "workflow", "task"]), help="only these")
@click.option("--outcome", type=click.Choice(["applied", "rejected"]), help="only applied or rejected")
@json_option
@pass_state
def audit_tail(
    state: State, count: int, follow: bool, agent: str | None, entity_type: str | None, outcome: Any, as_json: bool
) -> None:
    """The last records, one a line; -f follows the live stream.

    --json prints one JSON record a line (JSON Lines). Ctrl+C ends -f.
    """
    show = term.emit_json_line if as_json else (lambda r: click.echo(audit_line(r)))
    if agent is not None:
        entity_type = "agent"
    with state.client() as client:
        stream = client.stream_audit(entity_type=entity_type, entity_id=agent, outcome=outcome) if follow else None
        if stream is not None:
            stream.open()  # first, so that nothing committed while the last records are read is lost
        try:
            shown: set[int] = set()
            if count:
                if agent is not None:
                    latest = client.agents.audit(agent, outcome=outcome, order="desc", limit=min(count, 1000))
                else:
                    latest = client.audit.list(entity_type=entity_type, outcome=outcome, order="desc", limit=count)
                for record in reversed(list(islice(latest, count))):
                    show(record)
                    shown.add(record.id)
            sys.stdout.flush()
            if stream is None:
                return
            for record in stream:
                if record.id not in shown:  # committed after the stream opened, and listed too
                    show(record)
                    sys.stdout.flush()
        finally:
            if stream is not None:
                stream.close()


def sqlite_missing(conf: Settings) -> str | None:
    """The path of a SQLite database that does not exist (a read-only command cannot create it)."""
    if not conf.database_url.startswith("sqlite:"):
        return None
    from opscore.storage.sqlite import path_from_url

    path = path_from_url(conf.database_url)
    return None if path == ":memory:" or Path(path).exists() else path


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, imported when a command needs the database (not for ``--help``)."""
    import asyncio

    return asyncio.run(coro)


def redact(url: str) -> str:
    """A database URL without its password (error messages never show a secret)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def _open_store(conf: Settings) -> Any:
    from opscore.errors import OpsCoreError
    from opscore.storage import open_store

    missing = sqlite_missing(conf)
    if missing is not None:
        raise Failure(
            f"no database at {missing}: run this in the folder holding opscore.db, set OPSCORE_DATABASE_URL, "
            "or add --server to ask a running Ops-Core (audit verify --file checks an export offline)",
            EXIT_USAGE,
        )
    # the driver's own warnings would print as stray lines: the one-line error below says it
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    logging.getLogger("psycopg").propagate = False
    store = open_store(
        conf.database_url,
        readonly=True,
        pool_min=conf.pg_pool_min,
        pool_max=conf.pg_pool_max,
        pool_timeout=conf.pg_pool_timeout,
        pooler=conf.pg_pooler,
    )
    try:
        await store.open()
    except OpsCoreError as exc:
        raise Failure(f"cannot open the database {redact(conf.database_url)}: {exc.detail}", EXIT_UNREACHABLE) from exc
    except Exception as exc:  # a driver's error: one line, never a traceback
        raise Failure(f"cannot open the database {redact(conf.database_url)}: {exc}", EXIT_UNREACHABLE) from exc
    return store


async def _verify_db(conf: Settings, signed: Checkpoints | None = None) -> audit.Verification:
    from opscore import checkpoints

    store = await _open_store(conf)
    try:
        with term.progress("verifying the database"):
            result: audit.Verification = await checkpoints.verify_database(store, signed)
        return result
    finally:
        await store.close()


async def _export_db(conf: Settings, out: IO[str]) -> int:
    """The database's records up to the heads read first, then the trailer (opscore.checkpoints.export_database)."""
    from opscore import checkpoints

    store = await _open_store(conf)
    try:
        with term.progress("exporting") as bar:

            def write(line: str) -> None:
                out.write(line)
                bar.advance(1)

            count, _ = await checkpoints.export_database(store, write)
    finally:
        await store.close()
    return count


def export_server(state: State, out: IO[str]) -> int:
    """Every record through the API, written exactly as served (so it verifies offline), then the heads.

    The heads are read first (``GET /audit/heads``) and each chain is written up to its head,
    so the file is consistent while the server keeps writing (:func:`opscore.audit.export_records`).
    """
    from opscore import audit as audit_log

    count = 0
    with state.client() as client, term.progress("exporting") as bar:
        heads: dict[tuple[str, str], audit_log.Head] = {}
        for page in client.audit.heads():
            for h in page:
                heads[(h["entityType"], h["entityId"])] = audit_log.Head(
                    h["entityType"], h["entityId"], h["seq"], h["hash"], h["state"], h["revision"]
                )
        for page in client.audit.records(limit=1000):
            for line in audit_log.export_records(page, heads):
                out.write(line + "\n")
                count += 1
            bar.advance(len(page))
        for line in audit_log.export_trailer(heads, count):
            out.write(line + "\n")
    return count


@contextmanager
def output(path: str) -> Iterator[IO[str]]:
    """``-`` is standard output; anything else a file, written whole or not at all."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as fh:
            yield fh
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


@audit_group.command("export")
@click.option("--out", "out", required=True, metavar="FILE", help="the JSON Lines file to write ('-': standard output)")
@click.option("--server", is_flag=True, help="read through a running Ops-Core's API instead of the database")
@json_option
@pass_state
def audit_export(state: State, out: str, server: bool, as_json: bool) -> None:
    """Write every audit record as JSON Lines, one canonical record a line, verifiable offline.

    Reads the database (OPSCORE_DATABASE_URL, read-only: safe beside a running server), or with
    --server the API of OPSCORE_API_URL. A summary goes to stdout, or to stderr when --out is '-'.
    """
    try:
        with output(out) as fh:
            count = export_server(state, fh) if server else run_async(_export_db(state.settings, fh))
    except OSError as exc:
        raise Failure(f"cannot write {out}: {exc.strerror or exc}", EXIT_USAGE) from exc
    summary = {"exported": count, "file": out}
    stream = sys.stderr if out == "-" else sys.stdout
    if as_json:
        term.emit_json(summary, stream=stream)
    else:
        click.echo(f"exported {count} records to {'standard output' if out == '-' else out}", file=stream)


def verify_file(path: str, signed: Checkpoints | None = None) -> audit.Verification:
    """An export: its records, its trailer of heads and end line, and the signed heads when given."""
    from opscore import checkpoints

    try:
        size = os.path.getsize(path)
        with open(path, encoding="utf-8") as fh, term.progress(f"verifying {path}", size, unit="bytes") as bar:

            def lines() -> Iterator[str]:
                for line in fh:
                    bar.advance(len(line.encode("utf-8")))
                    yield line

            return checkpoints.verify_export(lines(), signed)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise Failure(f"audit verify: {path}: {reason}", EXIT_REFUSED) from exc


def show_verdict(verdict: dict[str, Any], as_json: bool) -> None:
    if as_json:
        term.emit_json(verdict)
        return
    colour = term.colour_enabled()
    totals = f"{verdict['entities']} entities, {verdict['records']} records"
    if verdict["ok"]:
        click.echo(f"{term.state('ok', colour)}: every chain verified ({totals})")
        return
    problems = verdict["problems"]
    click.echo(f"{term.state('FAILED', colour)}: {len(problems)} problems in {totals}")
    for p in problems:
        seq = "" if p.get("seq") is None else f" seq {p['seq']}"
        click.echo(f"  {p.get('entityType')} {p.get('entityId')}{seq}: {p.get('problem')}")


def read_signed(path: str, public_keys: tuple[str, ...]) -> Checkpoints:
    """The checkpoint file, every line's signature and chain checked (opscore.checkpoints)."""
    from opscore import checkpoints

    try:
        return checkpoints.read_checkpoint_file(path, public_keys)
    except (OSError, ValueError) as exc:  # unreadable file, or a key that is not an Ed25519 PEM
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise Failure(f"audit verify: {reason}", EXIT_USAGE) from exc


@audit_group.command("verify")
@click.option("--file", "file", metavar="FILE", help="an exported JSON Lines file: needs no database and no server")
@click.option("--server", is_flag=True, help="ask a running Ops-Core to verify its database (GET /audit/verify)")
@click.option(
    "--checkpoints", "checkpoint_file", metavar="FILE", help="signed checkpoints (OPSCORE_CHECKPOINT_FILE) to hold to"
)
@click.option(
    "--public-key",
    "public_keys",
    metavar="PEM",
    multiple=True,
    help="public key of the checkpoints' signing key (repeat for every key that signed, e.g. across a rotation)",
)
@json_option
@pass_state
def audit_verify(
    state: State,
    file: str | None,
    server: bool,
    checkpoint_file: str | None,
    public_keys: tuple[str, ...],
    as_json: bool,
) -> None:
    """Recompute every hash chain and replay it against each entity's head, state and revision; exit 1 if wrong.

    Checks the database (OPSCORE_DATABASE_URL, read-only), an export (--file), or asks the
    server (--server). With --checkpoints FILE --public-key PEM, also every signed checkpoint:
    a record a checkpoint covers that was edited, deleted, reordered or rewritten with every
    hash recomputed, or a chain that ends before its signed head, is named (entity and seq).
    """
    if file is not None and server:
        raise click.UsageError("give at most one of --file and --server")
    if bool(checkpoint_file) != bool(public_keys):
        raise click.UsageError("--checkpoints FILE needs --public-key PEM, and the reverse")
    if server and checkpoint_file:
        raise click.UsageError("--checkpoints checks the database or an export (--file), not --server")
    signed = read_signed(checkpoint_file, public_keys) if checkpoint_file else None
    if file is not None:
        verdict = verify_file(file, signed).to_dict()
    elif server:
        with state.client() as client:
            verdict = client.audit.verify().model_dump(mode="json")
    else:
        verdict = run_async(_verify_db(state.settings, signed)).to_dict()
    show_verdict(verdict, as_json)
    if not verdict["ok"]:
        raise click.exceptions.Exit(EXIT_REFUSED)
