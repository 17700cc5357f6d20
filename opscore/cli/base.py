"""What every command shares: the group, the one ``Settings``, the client, one-line failures."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from opscore import __version__

if TYPE_CHECKING:
    from opscore.client import Client
    from opscore.config import Settings
    from opscore.errors import OpsCoreError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
Order = Literal["asc", "desc"]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class Failure(Exception):
    """A one-line error and the exit status of the command (see the module docstring)."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def show(self) -> None:
        click.echo(f"opscore: {self.message}", err=True)


def describe(exc: OpsCoreError) -> str:
    """An API error in one line: its code, the server's detail, and the fields that help."""
    from opscore.errors import IllegalTransition, Invalid, InvalidDefinition, UnknownState, UnknownTrigger

    text = f"{exc.code}: {exc.detail}"

    def add(label: str, values: list[Any]) -> str:
        listed = ", ".join(str(v) for v in values)
        return "" if not values or listed in exc.detail else f" ({label}: {listed})"

    if isinstance(exc, IllegalTransition):
        triggers = exc.extra.get("allowedTriggers")
        if isinstance(triggers, list):
            text += add("triggers allowed now", triggers)
        else:
            text += add("allowed now", exc.allowed)
    elif isinstance(exc, (UnknownState, UnknownTrigger)):
        text += add("valid", exc.valid)
    elif isinstance(exc, InvalidDefinition):
        text += add("problems", exc.problems)
    elif isinstance(exc, Invalid):
        text += add("problems", [f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.errors])
    request_id = exc.extra.get("requestId")
    if isinstance(request_id, str):
        text += f" [request id {request_id}]"
    return " ".join(text.split())


def failure_of(exc: OpsCoreError) -> Failure:
    from opscore.errors import Unavailable

    return Failure(describe(exc), EXIT_UNREACHABLE if isinstance(exc, Unavailable) else EXIT_REFUSED)


# -- the command's one Settings, and its client -------------------------------------------------


@dataclass
class State:
    """What every command of one invocation shares: the settings (read once, when needed), the URL."""

    url: str | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from pydantic import ValidationError

            from opscore.config import Settings

            try:
                self._settings = Settings()
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise Failure(f"configuration (environment or .env): {problems}", EXIT_USAGE) from exc
        return self._settings

    @property
    def base_url(self) -> str:
        return (self.url or self.settings.opscore_url).rstrip("/")

    @contextmanager
    def client(self) -> Iterator[Client]:
        """A client for ``OPSCORE_API_URL`` with the first ``OPSCORE_API_KEY``; API errors become one line."""
        from opscore.client import Client
        from opscore.config import first_secret
        from opscore.errors import OpsCoreError

        key = first_secret(self.settings.api_key)
        if not key:
            raise Failure(
                "OPSCORE_API_KEY is not set (environment or .env): client commands send it as their bearer key",
                EXIT_USAGE,
            )
        try:
            with Client(self.base_url, key) as client:
                yield client
        except OpsCoreError as exc:
            raise failure_of(exc) from exc


pass_state = click.make_pass_decorator(State, ensure=True)


def settings() -> Settings:
    """The one ``Settings`` of this command (environment, then ``.env``, then defaults)."""
    from opscore.config import Settings

    return Settings()


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON for programs instead of text")(fn)


def json_object(text: str | None, what: str) -> dict[str, Any] | None:
    """A JSON object given on the command line (``--details '{"k": 1}'``); a usage error otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=what) from exc
    if not isinstance(value, dict):
        raise click.BadParameter('must be a JSON object such as \'{"key": "value"}\'', param_hint=what)
    return value


# -- the group ----------------------------------------------------------------------------------

HELP = """Ops-Core: explicit state machines and a hash-chained audit log for fleets of AI agents.

Client commands talk to the server at OPSCORE_API_URL (else http://OPSCORE_HOST:OPSCORE_PORT)
with OPSCORE_API_KEY, read from the environment, then .env. Exit status: 0 done, 1 refused or
not found (the server's detail on stderr), 2 usage or configuration error, 3 Ops-Core
unreachable or unavailable."""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="opscore", message="%(prog)s %(version)s")
@click.option("--url", metavar="URL", help="Ops-Core's URL for client commands (default: OPSCORE_API_URL)")
@click.pass_context
def cli(ctx: click.Context, url: str | None) -> None:
    ctx.obj = State(url=url)
