"""What Ops-Core accepts from a client: ONE definition of acceptable JSON and of an id.

Python's JSON parsers accept more than JSON can carry back out: ``NaN``/``Infinity`` (and
``1e400``, read as infinity), lone surrogates written as ``"\\ud800"``, and nesting as deep as
the interpreter's stack. Stored, each breaks something for everyone later: a NaN is hashed as
``NaN`` but cannot be served as JSON, a lone surrogate cannot be encoded as UTF-8 (it failed
whole SQLite group commits, other clients' writes included), deep nesting cannot be
serialised back. NUL characters cannot be stored in PostgreSQL text. So every route that
stores client data checks it here first, and refuses with a 422 whose ``code`` names the
problem. Size is bounded before parsing, by ``OPSCORE_MAX_BODY_BYTES`` (413).

Ids (agent ids, run ids, definition ids), in a URL path or in a body, follow one rule too:
1 to 256 characters, no control characters (C0, DEL, C1), no ``/``, no lone surrogates and
no U+FFFD (what undecodable bytes such as ``%FF`` become in a path, so ``%FF`` and ``%FE``
would otherwise name the same agent).

Pure functions, no I/O; the API maps the errors to HTTP (``api/errors.py``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from opscore.errors import InvalidId, LoneSurrogate, NestedTooDeep, NonFiniteNumber, NulCharacter

MAX_DEPTH = 32
"""Deepest nesting accepted in a client's JSON value (a body's root is level 0)."""

MAX_ID_LENGTH = 256

_BAD_ID = re.compile("[\x00-\x1f\x7f-\x9f/\ufffd\ud800-\udfff]")


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise NulCharacter(f"{_at(where)}NUL characters (\\u0000) are not accepted")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LoneSurrogate(
                f"{_at(where)}strings must be valid Unicode (no lone surrogates such as \\udfff)"
            ) from exc


def check_json(value: Any, where: str = "", *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse what no JSON output can hold again: NaN/±Infinity, lone surrogates, NUL, deep nesting.

    Walks ``value`` (as parsed: dict, list, str, int, float, bool, None) without recursion,
    so a value nested deeper than the interpreter's stack is refused, not a crash.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        kind = type(item)
        if kind is str:
            _check_text(item, where)
        elif kind is dict:
            if depth >= max_depth:
                raise NestedTooDeep(f"{_at(where)}nested deeper than {max_depth} levels")
            for key, child in item.items():
                if type(key) is str:
                    _check_text(key, where)
                push((child, depth + 1))
        elif kind is list:
            if depth >= max_depth:
                raise NestedTooDeep(f"{_at(where)}nested deeper than {max_depth} levels")
            for child in item:
                push((child, depth + 1))
        elif kind is float and not math.isfinite(item):
            raise NonFiniteNumber(f"{_at(where)}NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers")


def check_id(value: str, what: str = "id") -> str:
    """``value`` when it is an acceptable id, else ``InvalidId`` saying why."""
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidId(f"{what} must be 1 to {MAX_ID_LENGTH} characters long")
    bad = _BAD_ID.search(value)
    if bad is not None:
        char = bad.group()
        shown = "'/'" if char == "/" else f"U+{ord(char):04X}"
        raise InvalidId(
            f"{what} contains {shown}: ids may not hold control characters, '/', lone surrogates "
            "or U+FFFD (bytes that were not UTF-8)"
        )
    return value
