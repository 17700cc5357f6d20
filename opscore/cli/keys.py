"""``opscore keys``: new entries for ``OPSCORE_KEYS_FILE`` and a signing key for checkpoints."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from opscore import terminal as term

if TYPE_CHECKING:
    pass
from opscore.cli.base import EXIT_REFUSED, EXIT_USAGE, Failure, cli, json_option

# -- keys ---------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Keys for OPSCORE_KEYS_FILE: a new secret and the entry to add."""


@keys.command("create")
@click.option("--name", required=True, help="the key's name (audit records show key:<name>)")
@click.option(
    "--scope",
    "scopes",
    required=True,
    multiple=True,
    type=click.Choice(["report", "read", "operate", "admin"]),
    help="a scope (repeat for several)",
)
@click.option("--agents", "agents_globs", multiple=True, metavar="GLOB", help="(report) only agent ids matching")
@json_option
def keys_create(name: str, scopes: tuple[str, ...], agents_globs: tuple[str, ...], as_json: bool) -> None:
    """Make a new key: print its secret once, and the entry to add to OPSCORE_KEYS_FILE (its hash only)."""
    from opscore.keys import InvalidApiKeys, new_key

    try:
        secret, entry = new_key(name, scopes, agents_globs)
    except InvalidApiKeys as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc
    if as_json:
        term.emit_json({"secret": secret, "entry": entry})
        return
    click.echo("Secret (shown once; its user sends it as Authorization: Bearer <secret>):")
    click.echo(f"  {secret}")
    click.echo("Add this entry to the list in OPSCORE_KEYS_FILE (JSON or YAML), then restart Ops-Core:")
    click.echo(f"  {json.dumps(entry)}")


@keys.command("signing-key")
@click.option("--out", "out", required=True, metavar="FILE", help="the private key's file (the public key: FILE.pub)")
@json_option
def keys_signing_key(out: str, as_json: bool) -> None:
    """Make an Ed25519 key for OPSCORE_SIGNING_KEY (mode 600) and its public key beside it; never overwrites."""
    from opscore.checkpoints import make_signing_key

    try:
        private, public, key_id = make_signing_key(out)
    except OSError as exc:  # FileExistsError included
        raise Failure(f"keys signing-key: {exc} (never overwritten: move it away first)", EXIT_REFUSED) from exc
    if as_json:
        term.emit_json({"privateKey": str(private), "publicKey": str(public), "keyId": key_id})
        return
    click.echo(f"Private key: {private} (mode 600; key id {key_id})")
    click.echo(f"Public key:  {public}")
    click.echo(f"Set OPSCORE_SIGNING_KEY={private} on every replica and restart; keep {public} with whoever")
    click.echo("verifies, out of the database's reach: opscore audit verify --checkpoints FILE --public-key PEM")
