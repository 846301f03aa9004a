"""CPU per `RetryPolicy.run` on a send that succeeds at once (the common case of every
request). The tree measured is the one `consumer` imports from: run it from a scratch
directory, ``cd /tmp && PYTHONPATH=<tree> python <this checkout>/bench/retry_call.py``.

Round 27 measured tenacity's machinery at ~40 µs a call before `RetryPolicy.run` made it
only after a first failure (RESULTS.md, "Round 27").
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _per_call(calls: int) -> float:
    from consumer.policy import Attempts, Gate, RetryPolicy

    policy = RetryPolicy(Gate(), max_attempts=5, budget_s=900.0, backoff_multiplier_s=1.0,
                         backoff_max_s=60.0)

    async def nothing() -> None:
        return None

    start = time.process_time()
    for _ in range(calls):
        await policy.run(nothing, Attempts(), before_send=nothing)
    return (time.process_time() - start) / calls * 1e6


def main() -> int:
    from consumer import policy

    print(policy.__file__)
    for _ in range(3):
        print(f"{asyncio.run(_per_call(50_000)):.2f} µs per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
