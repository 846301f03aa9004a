"""Cutting a huge object's metadata to Userpilot's limits: before round 24 (two json.dumps
per field and per step) against now, on the same objects in one run, results compared.

    .venv/bin/python tests/bench/bench_truncate.py [--keys 2000,100000,300000] [--rounds 3]

Prints each round's times and their ratio (the machines are shared and noisy: read the
ratios). Review "poison24": a 300,000-key record held the event loop for seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from consumer import mapping
from consumer.mapping import DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_METADATA_KEYS, TRUNCATED_KEY


def _size_before(key: str, value: Any) -> int:
    return (len(json.dumps(key, ensure_ascii=False).encode("utf-8"))
            + len(json.dumps(value, ensure_ascii=False).encode("utf-8")) + 2)


def _truncate_before(metadata: dict[str, Any], max_bytes: int,
                     max_keys: int) -> tuple[dict[str, Any], tuple[str, ...]]:
    sizes = {key: _size_before(key, value) for key, value in metadata.items()}
    total = 1 + sum(sizes.values())
    removed: list[str] = []
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        marker = _size_before(TRUNCATED_KEY, len(removed))
        if total + marker <= max_bytes and len(metadata) - len(removed) + 1 <= max_keys:
            break
        removed.append(key)
        total -= sizes[key]
    gone = frozenset(removed)
    kept = {k: v for k, v in metadata.items() if k not in gone}
    kept[TRUNCATED_KEY] = len(removed)
    return kept, tuple(removed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="2000,100000,300000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    limits = (DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_METADATA_KEYS)
    for n in (int(k) for k in args.keys.split(",")):
        metadata: dict[str, Any] = {f"key_{i}": (f"valué {i}" if i % 3 else i * 1.5)
                                    for i in range(n)}
        for rnd in range(args.rounds):
            start = time.perf_counter()
            before = _truncate_before(metadata, *limits)
            old = time.perf_counter() - start
            start = time.perf_counter()
            now = mapping._truncate(metadata, *limits)
            new = time.perf_counter() - start
            assert before == now, "the results differ"
            print(f"{n} keys, round {rnd}: before {old * 1000:.0f} ms, now {new * 1000:.0f} ms, "
                  f"now/before {new / old:.2f}")


if __name__ == "__main__":
    main()
