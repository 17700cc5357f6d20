"""``opscore.queues.take`` and ``drain``: the batching loop of the SQLite writer thread and the log writer thread."""

from __future__ import annotations

import queue

from opscore.queues import drain, take


def queued(*items: int | None) -> queue.SimpleQueue[int | None]:
    q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for item in items:
        q.put(item)
    return q


def test_takes_everything_waiting_up_to_the_stop_marker() -> None:
    q = queued(1, 2, 3, None, 4)
    assert take(q) == ([1, 2, 3], True)
    assert q.get_nowait() == 4  # nothing behind the marker is taken


def test_stops_at_the_limit_and_leaves_the_rest_queued() -> None:
    q = queued(1, 2, 3, None)
    assert take(q, limit=2) == ([1, 2], False)
    assert take(q, limit=2) == ([3], True)


def test_returns_what_was_waiting_without_waiting_for_more() -> None:
    assert take(queued(7)) == ([7], False)


def test_the_marker_alone_is_an_empty_batch_and_stop() -> None:
    assert take(queued(None, 1)) == ([], True)


def test_drain_takes_what_is_waiting_without_blocking() -> None:
    assert drain(queued()) == ([], False)
    q = queued(1, 2, 3, None, 4)
    assert drain(q, limit=2) == ([1, 2], False)
    assert drain(q, batch=[0]) == ([0, 3], True)
    assert q.get_nowait() == 4
