"""The engine's per-key locks: exclusive, FIFO, dropped when free, safe under cancellation."""

from __future__ import annotations

import asyncio

from opscore.locks import KeyedLocks


async def _exclusive_fifo_and_dropped() -> None:
    locks = KeyedLocks()
    order: list[int] = []
    assert locks.try_acquire("k")
    assert not locks.try_acquire("k")

    async def waiter(n: int) -> None:
        async with locks.hold("k"):
            order.append(n)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(waiter(n)) for n in range(5)]
    await asyncio.sleep(0)
    assert order == []
    locks.release("k")
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert locks._held == {}


async def _cancelled_waiter_does_not_keep_the_key() -> None:
    locks = KeyedLocks()
    assert locks.try_acquire("k")
    cancelled = asyncio.create_task(locks.acquire("k"))
    later = asyncio.create_task(locks.acquire("k"))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    locks.release("k")
    await asyncio.wait_for(later, 1)
    locks.release("k")
    assert locks._held == {}


async def _cancelled_after_hand_over_passes_it_on() -> None:
    locks = KeyedLocks()
    assert locks.try_acquire("k")
    first = asyncio.create_task(locks.acquire("k"))
    second = asyncio.create_task(locks.acquire("k"))
    await asyncio.sleep(0)
    locks.release("k")  # handed to `first`, which is cancelled before it runs
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert first.cancelled()
    locks.release("k")
    assert locks._held == {}


def test_exclusive_fifo_and_dropped() -> None:
    asyncio.run(_exclusive_fifo_and_dropped())


def test_cancelled_waiter_does_not_keep_the_key() -> None:
    asyncio.run(_cancelled_waiter_does_not_keep_the_key())


def test_cancelled_after_hand_over_passes_it_on() -> None:
    asyncio.run(_cancelled_after_hand_over_passes_it_on())
