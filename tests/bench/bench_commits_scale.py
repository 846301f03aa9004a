"""Per-ask cost of `Commits`' window and commit questions at many partitions.

    .venv/bin/python tests/bench/bench_commits_scale.py [--partitions 1000]

The worker asks `in_window_by_family` once or twice a loop pass (the drop path too), and
`in_window_by_partition` / `due_noted` / `settled` while paused or committing. Each
partition here has ten events sent, two thirds of them finished.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from consumer.commits import Commits


def _per_call_us(call: Callable[[], object], n: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=1000)
    args = parser.parse_args()
    commits = Commits()
    parts = [("t", i) for i in range(args.partitions)]
    commits.assign(parts)
    for tp in parts:
        for offset in range(10):
            commits.take(tp, offset)
            commits.sending(tp, offset, "track")
            if offset % 3:
                commits.finish(tp, offset)
    asks: dict[str, Callable[[], object]] = {
        "in_window_by_family": commits.in_window_by_family,
        "in_window_by_partition": commits.in_window_by_partition,
        "due_noted": lambda: commits.due_noted(None, pipelined=True),
        "settled": commits.settled,
    }
    for name, call in asks.items():
        print(f"{args.partitions} partitions  {name:24} {_per_call_us(call):8.1f} µs a call")


if __name__ == "__main__":
    main()
