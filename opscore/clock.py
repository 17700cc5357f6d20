"""Time as Ops-Core stores and compares it: fixed-width UTC ISO-8601 text.

``2026-11-23T10:00:00.123456+00:00``: always UTC, always microseconds, so two stored times
compare as text in the order of time (SQL ``ORDER BY``, keyset cursors, ``max``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from opscore.errors import InvalidTimestamp

_FAR = 100 * 365 * 86400.0
"""Offsets within this many seconds of now take the fast path of :func:`after`; the rest, datetime's."""

_seconds: dict[int, str] = {}
"""Whole seconds formatted lately, and their text (a few: a transition reads now and now plus the skew allowed)."""

_SECONDS_KEPT = 16


def utc_text(moment: datetime) -> str:
    """``moment`` (aware) as the stored text."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def micros_text(micros: int) -> str:
    """Microseconds since the epoch as the stored text, each second's part formatted once.

    What ``datetime.isoformat(timespec="microseconds")`` gives, for years 1970-9999, at a
    quarter of its cost: three of these a transition (the engine's clock, a report's latest
    allowed time, the store's write time) were 5 % of the state-report path's samples
    (``docs/performance.md``), and every log line's ``time`` is one too (``logs.JsonLines``).
    """
    second, micro = divmod(micros, 1_000_000)
    text = _seconds.get(second)
    if text is None:
        if len(_seconds) >= _SECONDS_KEPT:
            _seconds.clear()  # threads share the dict: a reader that misses formats its second again
        text = _seconds[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{text}.{micro:06d}+00:00"


def _micros(ns: int | None = None) -> int:
    """Now (or ``ns``) in microseconds, rounded to the nearest as ``datetime.now`` rounds.

    Halves go up where datetime's go to even, so this is never behind a ``datetime.now`` read
    before it (truncating could be: a record stamped a microsecond before the caller's clock).
    """
    return ((time.time_ns() if ns is None else ns) + 500) // 1000


def now() -> str:
    """Now, as the stored text."""
    return micros_text(_micros())


def after(seconds: float) -> str:
    """``seconds`` from now (negative: ago), as the stored text."""
    if -_FAR < seconds < _FAR:
        return micros_text(_micros() + round(seconds * 1_000_000))
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def normalise(value: datetime | str) -> str:
    """Any ISO-8601 time (naive means UTC) as the stored text.

    ``InvalidTimestamp`` (422) for text that is no ISO-8601 time and for a valid time with no
    UTC equivalent (``0001-01-01T00:00:00+05:00`` and ``9999-12-31T23:59:59-05:00`` overflow).
    """
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="microseconds")
    except (ValueError, OverflowError) as exc:
        raise InvalidTimestamp(f"{value!s} is not a time between years 1 and 9999 in UTC") from exc


def later(a: str | None, b: str | None) -> str | None:
    """The later of two stored times (``None`` is earlier than any)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b
