"""The confirm's cost: one SET (before round 24) against the confirm script that also
clears a group's progress note, through the same bounded call, alternating in one run.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python tests/bench/bench_redis_confirm.py \
        [--calls 3000] [--rounds 8]

Prints the per-call time of each and their ratio per round (the machines are shared and
noisy: read the ratios, not the times).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import time
import uuid

from consumer.redisstore import RedisStore


async def _measure(calls: int, rounds: int) -> list[float]:
    store = RedisStore(os.environ["REDIS_URL"], timeout_s=2.0)
    client = store._client
    ratios = []
    try:
        for rnd in range(rounds):
            keys = [f"ud:bench:{uuid.uuid4().hex}" for _ in range(calls)]
            start = time.perf_counter()
            for key in keys:
                await store._call("confirm", functools.partial(client.set, key, "d",
                                                               px=60000))
            plain = (time.perf_counter() - start) / calls * 1e6
            keys = [f"ud:bench:{uuid.uuid4().hex}" for _ in range(calls)]
            start = time.perf_counter()
            for key in keys:
                await store.confirm(key, 60000)
            script = (time.perf_counter() - start) / calls * 1e6
            ratios.append(script / plain)
            print(f"round {rnd}: SET {plain:.1f} µs, confirm script {script:.1f} µs, "
                  f"ratio {script / plain:.2f}")
    finally:
        await store.close()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    ratios = asyncio.run(_measure(args.calls, args.rounds))
    print(f"median ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
