"""`demo`: the whole product on one machine, end to end, in under a minute.

Local broker and registry (started by services/ctl.py when not given), the Userpilot
sandbox, sample events covering every preset row plus anonymous, no-consent, unmapped
and identify events, the worker delivering them, then a summary of what was delivered,
dropped (by reason) and committed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from prometheus_client import CollectorRegistry

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKEN = "demo-write-token"


def _services_env() -> dict[str, str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("SCHEMA_REGISTRY_URL"):
        return {"KAFKA_BOOTSTRAP_SERVERS": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
                "SCHEMA_REGISTRY_URL": os.environ["SCHEMA_REGISTRY_URL"]}
    ctl = [sys.executable, str(ROOT / "services" / "ctl.py")]
    subprocess.run([*ctl, "up"], check=True)
    out = subprocess.run([*ctl, "env"], check=True, capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return {k.removeprefix("export "): v.strip("'\"") for k, v in env.items()}




def main(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from consumer.config import load_settings
    from consumer.health import Health
    from consumer.logs import configure_logging
    from consumer.metrics import Metrics
    from consumer.produce import produce_events
    from consumer.sandbox.client import SandboxControl
    from consumer.sandbox.config import SandboxConfig
    from consumer.sandbox.server import SandboxThread
    from consumer.worker import Worker

    configure_logging("WARNING")
    events_file = Path(args.events or ROOT / "schemas" / "sample-events.jsonl")
    services = _services_env()
    from consumer import reach

    problems = reach.services({"bootstrap.servers": services["KAFKA_BOOTSTRAP_SERVERS"]},
                              args.timeout, registry_url=services["SCHEMA_REGISTRY_URL"])
    if problems:
        for problem in problems:
            print(f"error: demo not started: {problem}", file=sys.stderr)
        return 1
    topic = f"signal-demo-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": services["KAFKA_BOOTSTRAP_SERVERS"]})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result()
    with events_file.open(encoding="utf-8") as stream:
        sent = produce_events(stream, topic=topic,
                              bootstrap=services["KAFKA_BOOTSTRAP_SERVERS"],
                              registry_url=services["SCHEMA_REGISTRY_URL"],
                              source=str(events_file))

    with SandboxThread(SandboxConfig(port=0, write_tokens=(DEMO_TOKEN,))) as sandbox:
        env = {
            **services,
            "USERPILOT_API_KEY": DEMO_TOKEN,
            "USERPILOT_ANALYTICS_ENDPOINT": sandbox.url.split("://", 1)[1],
            "USERPILOT_INSECURE_HTTP": "true",
            "KAFKA_TOPICS": topic,
            "KAFKA_GROUP_ID": f"{topic}-worker",
            "WORKER_METRICS_PORT": "0",
            "WORKER_COMMIT_INTERVAL_SECONDS": "0.5",
        }
        settings = load_settings(env)
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        worker = Worker(settings, metrics, Health(metrics))

        async def run() -> int:
            task = asyncio.create_task(worker.run())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.5)
                committed = sum(worker.committed.values())
                if worker.assigned and committed >= sent and not worker.in_flight:
                    break
            worker.stop()
            return await task

        code = asyncio.run(run())
        records = SandboxControl(sandbox.url).bodies("/v1/track")

    delivered = Counter(r["event_name"] for r in records)
    dropped: Counter[str] = Counter()
    for metric in registry.collect():
        if metric.name == "userpilot_events_dropped":
            for s in metric.samples:
                if s.name.endswith("_total") and s.value:
                    label = s.labels["reason"] + (f":{s.labels['category']}"
                                                  if s.labels.get("category") else "")
                    dropped[label] += int(s.value)
    committed_total = sum(worker.committed.values())
    print(f"\nUserpilot delivery worker demo — topic {topic}, {sent} events produced")
    print(f"delivered to the sandbox: {sum(delivered.values())}")
    for name, count in sorted(delivered.items()):
        print(f"  {name:<24} {count}")
    print(f"dropped: {sum(dropped.values())}")
    for reason, count in sorted(dropped.items()):
        print(f"  {reason:<24} {count}")
    print(f"committed offsets: {committed_total} of {sent} (all partitions)")
    ok = code == 0 and committed_total == sent and sum(delivered.values()) + sum(
        dropped.values()) == sent
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1
