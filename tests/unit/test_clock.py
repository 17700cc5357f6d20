"""The stored text of now: the fast formatter gives exactly what ``datetime.isoformat`` gives."""

from __future__ import annotations

import random
import re
import threading
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest

from opscore import clock

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STORED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")


def _datetime_text(micros: int) -> str:
    return (EPOCH + timedelta(microseconds=micros)).isoformat(timespec="microseconds")


@pytest.mark.parametrize(
    "micros",
    [
        0,
        999_999,
        1_000_000,
        951_782_400_000_000,  # 2000-02-29T00:00:00, a leap day
        1_796_000_000_999_999,  # the last microsecond of a second
        253_402_300_799_999_999,  # 9999-12-31T23:59:59.999999
    ],
)
def test_the_fast_text_is_isoformat_at_the_edges(micros: int) -> None:
    assert clock.micros_text(micros) == _datetime_text(micros)


def test_the_fast_text_is_isoformat_for_random_moments_in_and_out_of_order() -> None:
    """The per-second cache is replaced, never stale: moments jump back and forth across seconds."""
    rng = random.Random(15)
    for _ in range(20_000):
        micros = rng.randrange(0, 4_102_444_800_000_000)  # 1970 to 2100
        for m in (micros, micros + 1, micros - 1_000_000):
            assert clock.micros_text(m) == _datetime_text(m)


def test_now_and_after_are_the_stored_text_of_the_moment() -> None:
    before = datetime.now(UTC)
    now, later, earlier = clock.now(), clock.after(300), clock.after(-86_400.5)
    after = datetime.now(UTC)
    for text in (now, later, earlier):
        assert STORED.match(text), text
    assert before <= datetime.fromisoformat(now) <= after
    assert before + timedelta(seconds=300) <= datetime.fromisoformat(later) <= after + timedelta(seconds=300)
    assert datetime.fromisoformat(earlier) <= after - timedelta(seconds=86_400.5)


def test_after_far_away_keeps_datetimes_answer() -> None:
    """Past the fast path's range: datetime's text, or its OverflowError beyond year 9999."""
    assert clock.after(200 * 365 * 86_400.0).startswith(str(datetime.now(UTC).year + 199)[:3])
    with pytest.raises(OverflowError):
        clock.after(1e13)


def test_threads_formatting_at_once_never_pair_one_second_with_anothers_text() -> None:
    failures: list[tuple[int, str]] = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20_000):
            micros = rng.randrange(1_700_000_000_000_000, 1_700_000_010_000_000)  # ten seconds
            text = clock.micros_text(micros)
            if text != _datetime_text(micros):
                failures.append((micros, text))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("ns", [0, 499, 500, 501, 1_499, 1_500, 1_501, 2_500, 1_796_000_000_123_456_789])
def test_now_rounds_to_the_nearest_microsecond_never_below_datetimes_rounding(ns: int) -> None:
    """``datetime.now`` rounds half to even; a truncating clock would stamp a record before the caller's read."""
    micros = clock._micros(ns)
    assert abs(Fraction(micros) - Fraction(ns, 1000)) <= Fraction(1, 2)
    assert micros >= round(Fraction(ns, 1000))  # Fraction rounds half to even, as datetime does


def test_now_and_now_plus_the_allowed_skew_are_each_formatted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transition reads now and a time minutes ahead (the newest report time allowed): two seconds, both kept.

    One second kept made every transition format both seconds again.
    """
    formatted: list[float] = []
    strftime = clock.time.strftime

    def counting(fmt: str, moment: clock.time.struct_time) -> str:
        formatted.append(clock.time.mktime(moment))
        return strftime(fmt, moment)

    monkeypatch.setattr(clock.time, "strftime", counting)
    monkeypatch.setattr(clock, "_seconds", {})  # as at start-up: earlier tests may have filled it to a clear
    base = 1_796_000_000_000_000
    texts = [clock.micros_text(base + n + (300_000_000 if n % 2 else 0)) for n in range(1000)]
    assert texts == [_datetime_text(base + n + (300_000_000 if n % 2 else 0)) for n in range(1000)]
    assert len(formatted) <= 2
