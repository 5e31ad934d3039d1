"""cloud_service.batching.Coalescer: groups form from what waits while the previous calls are busy."""

from __future__ import annotations

import asyncio

import pytest

from cloud_service.batching import Coalescer


class Recorder:
    """A group function that records its groups and can be held busy."""

    def __init__(self, delay: float = 0.05) -> None:
        self.groups: list[list[int]] = []
        self.delay = delay
        self.running = 0
        self.max_running = 0

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.groups.append(list(items))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await asyncio.sleep(self.delay)
        self.running -= 1
        return [ValueError(f"bad {x}") if x < 0 else 10 * x for x in items]


def test_a_lone_item_goes_at_once_and_later_arrivals_form_one_group():
    async def main() -> None:
        rec = Recorder(delay=0.05)
        c = Coalescer(rec, max_size=32)
        first = asyncio.create_task(c.submit(1))
        await asyncio.sleep(0.01)  # the first call is running now
        rest = [asyncio.create_task(c.submit(i)) for i in range(2, 12)]
        assert await first == 10
        assert await asyncio.gather(*rest) == [10 * i for i in range(2, 12)]
        assert rec.groups == [[1], list(range(2, 12))]
        assert c.sizes == {1: 1, 10: 1}

    asyncio.run(main())


def test_items_submitted_in_the_same_turn_share_a_call():
    async def main() -> None:
        rec = Recorder(delay=0.0)
        c = Coalescer(rec, max_size=32)
        assert await c.submit_many(list(range(20))) == [10 * i for i in range(20)]
        assert rec.groups == [list(range(20))]

    asyncio.run(main())


def test_max_size_and_concurrency_are_respected():
    async def main() -> None:
        rec = Recorder(delay=0.02)
        c = Coalescer(rec, max_size=4, concurrency=2)
        out = await c.submit_many(list(range(19)))
        assert out == [10 * i for i in range(19)]
        assert max(len(g) for g in rec.groups) <= 4 and rec.max_running == 2
        assert sorted(x for g in rec.groups for x in g) == list(range(19))

    asyncio.run(main())


def test_a_failing_item_fails_alone_and_a_failing_call_fails_its_group():
    async def main() -> None:
        rec = Recorder(delay=0.0)
        c = Coalescer(rec, max_size=8)
        out = await c.submit_many([1, -2, 3])
        assert out[0] == 10 and out[2] == 30 and isinstance(out[1], ValueError)
        with pytest.raises(ValueError, match="bad -5"):
            await c.submit(-5)

        async def broken(items: list[int]) -> list[int]:
            raise RuntimeError("tail is down")

        b = Coalescer(broken, max_size=8)
        res = await b.submit_many([1, 2])
        assert all(isinstance(r, RuntimeError) and "tail is down" in str(r) for r in res)
        assert (await c.submit(4)) == 40  # the coalescer keeps working after failures

    asyncio.run(main())


def test_cancelled_callers_are_dropped_from_the_next_group():
    async def main() -> None:
        rec = Recorder(delay=0.05)
        c = Coalescer(rec, max_size=32)
        busy = asyncio.create_task(c.submit(1))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(c.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0)
        waiting[1].cancel()
        await busy
        assert await waiting[0] == 20 and await waiting[2] == 40
        assert rec.groups == [[1], [2, 4]]

    asyncio.run(main())


def test_wrong_result_count_fails_the_group():
    async def main() -> None:
        async def short(items: list[int]) -> list[int]:
            return items[:-1]

        c = Coalescer(short, max_size=8)
        res = await c.submit_many([1, 2])
        assert all(isinstance(r, RuntimeError) for r in res)

    asyncio.run(main())
