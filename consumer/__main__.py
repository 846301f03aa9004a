"""Command line: `python -m consumer <command>` (also installed as `userpilot-worker`).

run           the worker (settings from the environment; see README)
check-config  print the effective configuration, secrets redacted; non-zero on problems
explain       the Event Debugger: deliver/drop decision and request per JSON event line
produce       canonical JSON event lines → Avro on a topic (fixtures, demo, benchmarks)
replay        re-publish dead-lettered events to their original topic
sandbox       a local stand-in for Userpilot's API
demo          the embedded demo: local broker, registry, sandbox, sample events, worker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from consumer.errors import ConfigError, WorkerError
from consumer.replay import add_arguments as add_replay_arguments
from consumer.sandbox.cli import add_arguments as add_sandbox_arguments

if TYPE_CHECKING:
    from consumer.config import Settings

__all__ = ["main"]


def _settings(offline: bool = False) -> Settings:
    from consumer.config import load_settings

    return load_settings(os.environ, offline=offline)


def cmd_run(_args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, disable_created_metrics

    from consumer.health import Health, serve
    from consumer.logs import configure_logging
    from consumer.metrics import Metrics
    from consumer.worker import Worker

    settings = _settings()
    secrets = [settings.api_key.reveal()]
    if settings.registry_auth:
        secrets.append(settings.registry_auth.reveal())
    configure_logging(settings.log_level, settings.log_format, secrets)
    no_created_series: Callable[[], None] = disable_created_metrics  # untyped upstream
    no_created_series()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(metrics)
    server = serve(settings.metrics_port, registry, health)
    try:
        worker = Worker(settings, metrics, health)
        return asyncio.run(worker.run())
    finally:
        server.close()


def cmd_check_config(_args: argparse.Namespace) -> int:
    settings = _settings()
    print(json.dumps(settings.describe(), indent=2, ensure_ascii=False))
    print("configuration OK", file=sys.stderr)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from consumer.explain import explain_lines

    settings = _settings(offline=True)
    with _open(args.file) as stream:
        for doc in explain_lines(stream, settings):
            print(json.dumps(doc, ensure_ascii=False))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from consumer.produce import produce_events

    bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    registry = args.schema_registry_url or os.environ.get("SCHEMA_REGISTRY_URL")
    if not bootstrap or not registry:
        raise ConfigError("produce needs KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL "
                          "(or --bootstrap-servers and --schema-registry-url)")
    with _open(args.file) as stream:
        produce_events(stream, topic=args.topic, bootstrap=bootstrap, registry_url=registry,
                       source=args.file or "<stdin>")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from consumer.replay import main as replay_main

    return replay_main(args)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from consumer.sandbox.cli import run

    return run(args.parser, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from consumer.demo import main as demo_main

    return demo_main(args)


@contextmanager
def _open(path: str | None) -> Iterator[TextIO]:
    """The named file, or stdin for None or "-" (left open: it is not ours)."""
    if path is None or path == "-":
        yield sys.stdin
        return
    with open(path, encoding="utf-8") as stream:
        yield stream


def _version() -> str:
    try:
        return version("userpilot-delivery-worker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _prog() -> str:
    """The name the command was called by: `userpilot-worker`, or `python -m consumer`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not name or name == "__main__.py" or name.startswith("-"):
        return "python -m consumer"
    return name


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or _prog(), description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the worker").set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate and print the configuration").set_defaults(
        func=cmd_check_config)
    p = sub.add_parser("explain", help="show what the worker would send for JSON events")
    p.add_argument("--file", help="JSON lines file (default: stdin)")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("produce", help="produce canonical JSON events as Avro")
    p.add_argument("--topic", required=True)
    p.add_argument("--file", help="JSON lines file (default: stdin)")
    p.add_argument("--bootstrap-servers", help="default: $KAFKA_BOOTSTRAP_SERVERS")
    p.add_argument("--schema-registry-url", help="default: $SCHEMA_REGISTRY_URL")
    p.set_defaults(func=cmd_produce)
    p = sub.add_parser("replay", help="re-publish dead-lettered events")
    add_replay_arguments(p)
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("sandbox", help="run the local Userpilot stand-in")
    add_sandbox_arguments(p)
    p.set_defaults(func=cmd_sandbox, parser=p)
    p = sub.add_parser("demo", help="run the embedded demo end to end")
    p.add_argument("--events", default=None,
                   help="JSON lines (default: schemas/sample-events.jsonl)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
