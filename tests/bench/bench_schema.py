"""Decode cost of the Signal schema: JSON-text free-form fields vs a typed recursive union.

    .venv/bin/python tests/bench/bench_schema.py [--events 20000]

Both variants decode the same events in the same run (wire bytes → canonical dict);
the figure that matters is the ratio, since the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import random
import time
from typing import Any, cast

import fastavro

from consumer import codec

VALUE = {
    "type": "record", "name": "Value", "fields": [{"name": "v", "type": [
        "null", "boolean", "long", "double", "string",
        {"type": "array", "items": "Value"},
        {"type": "map", "values": "Value"},
    ]}],
}


def to_value(x: Any) -> dict[str, Any]:
    if isinstance(x, dict):
        return {"v": {k: to_value(v) for k, v in x.items()}}
    if isinstance(x, list):
        return {"v": [to_value(v) for v in x]}
    return {"v": x}


def from_value(x: dict[str, Any]) -> Any:
    v = x["v"]
    if isinstance(v, dict):
        return {k: from_value(i) for k, i in v.items()}
    if isinstance(v, list):
        return [from_value(i) for i in v]
    return v


def typed_schema() -> Any:
    raw = json.loads(codec.SCHEMA_TEXT)
    raw["name"] = "SignalEventTyped"
    for f in raw["fields"]:
        if f["name"] in ("properties", "traits"):
            f["type"] = ["null", copy.deepcopy(VALUE) if f["name"] == "properties" else "Value"]
    return fastavro.parse_schema(raw)


def sample(rng: random.Random, i: int) -> dict[str, Any]:
    return {
        "type": "track", "event": "Product Viewed", "userId": f"user_{i}",
        "anonymousId": f"anon_{i}", "messageId": f"m-{i}", "timestamp": "2026-11-26T10:00:00Z",
        "properties": {
            "order_id": f"ORD-{i}", "total": rng.random() * 500, "currency": "USD",
            "coupon": None, "first": rng.random() < 0.5, "count": rng.randint(0, 10**6),
            "products": [{"product_id": f"SKU-{j}", "name": "Wireless Headphones",
                          "price": 79.99, "quantity": j + 1} for j in range(3)],
            "plan": {"tier": "pro", "limits": {"seats": 5}},
        },
        "context": {"page": {"url": "https://example.com/p", "path": "/p"},
                    "consent": {"analytics": True}, "locale": "en-GB"},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(1)
    events = [sample(rng, i) for i in range(args.events)]
    json_wire = [codec.encode(1, codec.to_record(e)) for e in events]
    typed = typed_schema()
    typed_wire = []
    for e in events:
        rec = codec.to_record(e)
        rec["properties"] = to_value(e["properties"])
        buf = io.BytesIO()
        buf.write(b"\0\0\0\0\1")
        fastavro.schemaless_writer(buf, typed, rec)
        typed_wire.append(buf.getvalue())

    def lookup(_id: int) -> Any:
        return codec.SCHEMA

    def run_json() -> float:
        start = time.perf_counter()
        for b in json_wire:
            codec.decode(b, lookup)
        return time.perf_counter() - start

    def run_typed() -> float:
        start = time.perf_counter()
        for b in typed_wire:
            rec = cast(dict[str, Any],
                       fastavro.schemaless_reader(io.BytesIO(b[5:]), typed, None))
            rec["properties"] = from_value(rec["properties"])
        return time.perf_counter() - start

    best_json = min(run_json() for _ in range(3))
    best_typed = min(run_typed() for _ in range(3))
    n = len(events)
    print(f"events: {n}, wire bytes/event: JSON text {sum(map(len, json_wire)) / n:.0f}, "
          f"typed union {sum(map(len, typed_wire)) / n:.0f}")
    print(f"decode µs/event: JSON text {best_json / n * 1e6:.1f}, "
          f"typed union {best_typed / n * 1e6:.1f}")
    print(f"typed ÷ JSON-text decode time: {best_typed / best_json:.2f}")


if __name__ == "__main__":
    main()
