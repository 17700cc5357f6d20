"""Time as Ops-Core stores and compares it: fixed-width UTC ISO-8601 text.

``2026-11-23T10:00:00.123456+00:00``: always UTC, always microseconds, so two stored times
compare as text in the order of time (SQL ``ORDER BY``, keyset cursors, ``max``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from opscore.errors import InvalidTimestamp


def utc_text(moment: datetime) -> str:
    """``moment`` (aware) as the stored text."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def now() -> str:
    """Now, as the stored text."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def after(seconds: float) -> str:
    """``seconds`` from now (negative: ago), as the stored text."""
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
