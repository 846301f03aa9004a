"""`consumer.stalls`: the watch that holds requests after a stall long enough for the
group to have taken this member's partitions."""

from __future__ import annotations

import asyncio
import logging

import pytest

from consumer.stalls import TICK_S, StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _passes(watch: StallWatch) -> bool:
    """Whether a request may go out now (`passable` returns without waiting)."""
    task = asyncio.ensure_future(watch.passable())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    done = task.done()
    task.cancel()
    return done


def test_requests_pass_unless_the_loop_stopped_for_the_long_span() -> None:
    clock = Clock()
    watch = StallWatch(7.0, 4.0, clock)

    async def main() -> None:
        assert await _passes(watch)
        clock.now += 6.9  # shorter than a session could expire in: nothing waits
        assert await _passes(watch)

    asyncio.run(main())


def test_after_a_long_stall_requests_wait_for_a_consume_begun_after_the_hold(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    watch = StallWatch(7.0, 4.0, clock)

    async def main() -> None:
        clock.now += 8.0  # frozen: noticed by the first request after it
        with caplog.at_level(logging.WARNING, logger="consumer.stalls"):
            assert not await _passes(watch)
        assert "did not run for 8.0 s" in caplog.text
        noticed = clock.now
        watch.polled(noticed)  # a consume begun at once may not have the loss yet
        assert not await _passes(watch)
        clock.now += 4.0
        watch.polled(noticed + 3.9)
        assert not await _passes(watch)
        watch.polled(noticed + 4.0)  # librdkafka has told by then: its callbacks have run
        assert await _passes(watch)

    asyncio.run(main())


def test_a_waiting_request_goes_once_the_poll_thread_has_served_the_callbacks() -> None:
    clock = Clock()
    watch = StallWatch(7.0, 4.0, clock)

    async def main() -> list[str]:
        order: list[str] = []
        clock.now += 10.0

        async def request() -> None:
            await watch.passable()
            order.append("sent")

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        order.append("consume returned")
        clock.now += 5.0
        watch.polled(clock.now)
        await asyncio.wait_for(task, 1)
        return order

    assert asyncio.run(main()) == ["consume returned", "sent"]


def test_the_ticks_measure_from_the_workers_start_not_the_watchs_making() -> None:
    """Start-up checks run between the watch's making and the worker's loop: not a stall."""
    clock = Clock()
    watch = StallWatch(7.0, 4.0, clock)
    clock.now += 60.0

    async def main() -> bool:
        ticks = asyncio.ensure_future(watch.run())
        await asyncio.sleep(TICK_S * 2)  # real sleeps; the fake clock stands still
        try:
            return await _passes(watch)
        finally:
            ticks.cancel()

    assert asyncio.run(main())
