"""`demo`: the whole product on one machine, end to end, in under a minute.

Local broker and registry (started by services/ctl.py when not given), the Userpilot
sandbox, sample events covering every preset row plus anonymous, no-consent, unmapped,
identify and group events, the worker delivering them, then a summary of what was
delivered, dropped (by reason) and committed, the users and companies the sandbox now
knows, and how many Track events it could attribute to a user. The same events are then
delivered again (own consumer group, fresh sandbox) with ensure-user off, to show the
unattributed Track events it prevents.
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
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from consumer.stdout import write_line

if TYPE_CHECKING:
    from consumer.worker import Worker

__all__ = ["main", "summary"]

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKEN = "demo-write-token"


def _services_env() -> dict[str, str] | str:
    """Kafka's and the registry's addresses: the environment's, else those of the services
    the repository's scripts start; or why there are none (one line)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("SCHEMA_REGISTRY_URL"):
        return {"KAFKA_BOOTSTRAP_SERVERS": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
                "SCHEMA_REGISTRY_URL": os.environ["SCHEMA_REGISTRY_URL"]}
    script = ROOT / "services" / "ctl.py"
    if not script.is_file():
        # Installed (a wheel, the image): the scripts that start Kafka stay in the repository;
        # a traceback came out of the missing script (review "sandbox45").
        return ("set KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL (only a checkout of the "
                "repository starts Kafka and the registry itself, `make demo`)")
    ctl = [sys.executable, str(script)]
    try:
        subprocess.run([*ctl, "up"], check=True)
        out = subprocess.run([*ctl, "env"], check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        return (f"starting Kafka and the registry failed ({script.name} {exc.cmd[2]} exited "
                f"{exc.returncode}); or set KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL")
    env = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return {k.removeprefix("export "): v.strip("'\"") for k, v in env.items()}


def _default_events() -> Path:
    """The sample events: the checkout's, else the working directory's (the image's
    /app/schemas; the wheel does not carry them)."""
    beside = ROOT / "schemas" / "sample-events.jsonl"
    return beside if beside.is_file() else Path.cwd() / "schemas" / "sample-events.jsonl"




def main(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from consumer.config import load_settings
    from consumer.health import Health
    from consumer.logs import configure_logging, librdkafka_logger
    from consumer.metrics import Metrics
    from consumer.produce import ProduceError, parse_lines, produce_events
    from consumer.sandbox.client import SandboxControl
    from consumer.sandbox.config import SandboxConfig
    from consumer.sandbox.server import SandboxThread
    from consumer.worker import Worker

    configure_logging("WARNING")
    events_file = Path(args.events) if args.events else _default_events()
    # Read and checked before anything is created: a traceback (or a clean error) came
    # after a new topic, left behind (reviews config25, diff25).
    try:
        lines = events_file.read_bytes().splitlines()
        if not parse_lines(lines, str(events_file)):
            print(f"error: demo not started: {events_file} holds no events", file=sys.stderr)
            return 1
    except OSError as exc:
        print(f"error: {events_file}: cannot read the file ({exc.strerror or exc})",
              file=sys.stderr)
        return 1
    except ProduceError as exc:
        print(f"error: demo not started: {exc}", file=sys.stderr)
        return 1
    services = _services_env()
    if isinstance(services, str):
        print(f"error: demo not started: {services}", file=sys.stderr)
        return 1
    from consumer import reach

    problems = reach.services({"bootstrap.servers": services["KAFKA_BOOTSTRAP_SERVERS"]},
                              args.timeout, registry_url=services["SCHEMA_REGISTRY_URL"])
    if problems:
        for problem in problems:
            print(f"error: demo not started: {problem}", file=sys.stderr)
        return 1
    topic = f"signal-demo-{int(time.time())}-{os.getpid()}"  # two demos in one second
    admin_conf: dict[str, Any] = {"bootstrap.servers": services["KAFKA_BOOTSTRAP_SERVERS"],
                                  "logger": librdkafka_logger()}
    admin = AdminClient(admin_conf)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result()
    sent = produce_events(lines, topic=topic, bootstrap=services["KAFKA_BOOTSTRAP_SERVERS"],
                          registry_url=services["SCHEMA_REGISTRY_URL"], source=str(events_file))

    def deliver(ensure_user: bool) -> tuple[int, Worker, CollectorRegistry, dict[str, Any]]:
        """One worker (own consumer group) against a fresh sandbox; what the sandbox saw."""
        group = f"{topic}-worker" + ("" if ensure_user else "-no-ensure-user")
        with SandboxThread(SandboxConfig(port=0, write_tokens=(DEMO_TOKEN,))) as sandbox:
            env = {
                **services,
                "USERPILOT_API_KEY": DEMO_TOKEN,
                "USERPILOT_ANALYTICS_ENDPOINT": sandbox.url.split("://", 1)[1],
                "USERPILOT_INSECURE_HTTP": "true",
                "USERPILOT_ENSURE_USER": "true" if ensure_user else "false",
                "KAFKA_TOPICS": topic,
                "KAFKA_GROUP_ID": group,
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
            control = SandboxControl(sandbox.url)
            seen = {"requests": control.requests(), "users": control.users(),
                    "companies": control.companies(), "attribution": control.attribution()}
        return code, worker, registry, seen

    code, worker, registry, seen = deliver(ensure_user=True)
    off_code, _, _, off = deliver(ensure_user=False)
    write_line(summary(topic, sent, worker, registry, seen, off))  # any stdout (LANG=C)
    committed_total = sum(worker.committed.values())
    delivered, dropped = _outcomes(registry)
    ok = (code == 0 and off_code == 0 and committed_total == sent
          and sum(delivered.values()) + sum(dropped.values()) == sent
          and seen["attribution"][1] == 0)
    write_line("demo OK" if ok else "demo FAILED")  # `demo | head -1`: no traceback (cli50)
    return 0 if ok else 1


def _outcomes(registry: CollectorRegistry) -> tuple[Counter[str], Counter[str]]:
    """Events delivered (by event name; identify/group by type) and dropped (by reason)."""
    delivered: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for metric in registry.collect():
        for s in metric.samples:
            if not s.name.endswith("_total") or not s.value:
                continue
            if metric.name == "userpilot_events_delivered":
                delivered[s.labels["event_name"]] += int(s.value)
            elif metric.name == "userpilot_events_dropped":
                label = s.labels["reason"] + (f":{s.labels['category']}"
                                              if s.labels.get("category") else "")
                dropped[label] += int(s.value)
    return delivered, dropped


def summary(topic: str, sent: int, worker: Any, registry: CollectorRegistry,
            seen: dict[str, Any], off: dict[str, Any]) -> str:
    """What the demo prints: events, requests, users and companies, attribution."""
    delivered, dropped = _outcomes(registry)
    paths = Counter(r["path"] for r in seen["requests"])
    ensured = sum(1 for r in seen["requests"]  # `calls.ensure_user_call`'s bare body
                  if r["path"] == "/v1/identify" and r["body"].get("metadata") == {}
                  and set(r["body"]) == {"user_id", "metadata"})
    attributed, unattributed = seen["attribution"]
    off_attributed, off_unattributed = off["attribution"]
    lines = [
        f"\nUserpilot delivery worker demo — topic {topic}, {sent} events produced",
        f"delivered: {sum(delivered.values())} events",
        *(f"  {name:<24} {count}" for name, count in sorted(delivered.items())),
        f"dropped: {sum(dropped.values())}",
        *(f"  {reason:<24} {count}" for reason, count in sorted(dropped.items())),
        f"requests to the sandbox: {sum(paths.values())}",
        f"  {'track':<24} {paths['/v1/track']}",
        f"  {'identify':<24} {paths['/v1/identify']} ({ensured} ensure-user)",
        f"  {'company identify':<24} {paths['/v1/companies/identify']}",
        f"users created: {len(seen['users'])} ({', '.join(sorted(seen['users']))})",
        f"companies created: {len(seen['companies'])} ("
        + ", ".join(f"{c}: {', '.join(sorted(v['users']))}"
                    for c, v in sorted(seen["companies"].items())) + ")",
        f"track events attributed: {attributed}, unattributed: {unattributed}",
        f"  with USERPILOT_ENSURE_USER=false: attributed {off_attributed}, "
        f"unattributed {off_unattributed}",
        f"committed offsets: {sum(worker.committed.values())} of {sent} (all partitions)",
    ]
    return "\n".join(lines)
