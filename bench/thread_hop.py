"""`python -m bench.thread_hop`: what one wake-up from a blocked thread to the event loop costs.

The worker's poll thread blocks in librdkafka and hands each batch to the event loop; this
measures that hop alone on this machine (no Kafka): a thread blocked on a `threading.Event`
set 20 ms later, then back to the loop through `run_in_executor` (as the worker does) and
through `call_soon_threadsafe` straight to a future (the least a hand-made hop could cost).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

SET_AFTER_S = 0.02


def _set_later(event: threading.Event) -> None:
    time.sleep(SET_AFTER_S)
    event.set()


async def _measure(rounds: int) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    event = threading.Event()

    def blocked() -> float:
        event.wait()
        event.clear()
        return time.perf_counter()

    executor_hops: list[float] = []
    with ThreadPoolExecutor(1) as executor:
        for _ in range(rounds):
            threading.Thread(target=_set_later, args=(event,)).start()
            woke = await loop.run_in_executor(executor, blocked)
            executor_hops.append(time.perf_counter() - woke)

    direct_hops: list[float] = []
    for _ in range(rounds):
        future: asyncio.Future[float] = loop.create_future()

        def blocked_then_hand_over(future: asyncio.Future[float] = future) -> None:
            loop.call_soon_threadsafe(future.set_result, blocked())

        threading.Thread(target=blocked_then_hand_over).start()
        threading.Thread(target=_set_later, args=(event,)).start()
        woke = await future
        direct_hops.append(time.perf_counter() - woke)
    return executor_hops, direct_hops


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.thread_hop",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    executor_hops, direct_hops = asyncio.run(_measure(args.rounds))
    print(f"run_in_executor hop p50 {statistics.median(executor_hops) * 1e6:.0f} µs, "
          f"call_soon_threadsafe hop p50 {statistics.median(direct_hops) * 1e6:.0f} µs "
          f"({args.rounds} each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
