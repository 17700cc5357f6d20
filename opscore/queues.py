"""Draining a thread's queue: the first item when it comes, then what is already waiting behind it.

The SQLite writer thread and the log writer thread both turn a stream of items into batches
(one transaction, one ``write``) this way, and both are told to stop by a ``None`` queued
after the last item. :func:`take` is that loop, once; :func:`drain` is its second half, for a
thread woken by something other than the queue itself.
"""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def take(items: queue.SimpleQueue[T | None], limit: int | None = None) -> tuple[list[T], bool]:
    """Block for one item, then take the queued ones without waiting (at most ``limit`` in all).

    Returns the batch and whether the stop marker (``None``) was taken: everything queued
    before it is in the batch (unless ``limit`` cut it short, in which case the marker is
    still queued and a later call returns it).
    """
    first = items.get()
    if first is None:
        return [], True
    return drain(items, limit, [first])


def drain(
    items: queue.SimpleQueue[T | None], limit: int | None = None, batch: list[T] | None = None
) -> tuple[list[T], bool]:
    """What is queued, without waiting (appended to ``batch``, up to ``limit`` in all); stopped as :func:`take` says."""
    batch = [] if batch is None else batch
    while limit is None or len(batch) < limit:
        try:
            nxt = items.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
    return batch, False
