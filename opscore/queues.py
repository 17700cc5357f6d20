"""Draining a thread's queue: the first item when it comes, then what is already waiting behind it.

The SQLite writer thread and the log writer thread both turn a stream of items into batches
(one transaction, one ``write``) this way, and both are told to stop by a ``None`` queued
after the last item. :func:`take` is that loop, once.
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
    batch = [first]
    while limit is None or len(batch) < limit:
        try:
            nxt = items.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
    return batch, False
