"""Command line: `python -m consumer <command>` (also installed as `userpilot-worker`).

run           the worker (settings from the environment; see README)
check-config  print the effective configuration, secrets redacted; non-zero on problems
explain       the Event Debugger: deliver/drop decision and request per JSON event line
produce       canonical JSON event lines -> Avro on a topic (fixtures, demo, benchmarks)
replay        re-publish dead-lettered events to their original topic
sandbox       a local stand-in for Userpilot's API
demo          the embedded demo: local broker, registry, sandbox, sample events, worker
delete-users  GDPR: delete users in Userpilot (DELETE /v1/users), batched and paced
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO, cast

from consumer import installed_version
from consumer.config import timeout_seconds, wait_seconds
from consumer.errors import ConfigError, WorkerError
from consumer.logs import error_line
from consumer.replay import add_arguments as add_replay_arguments
from consumer.sandbox.cli import add_arguments as add_sandbox_arguments
from consumer.signals import handled, stop_signals
from consumer.stdout import QuietStream, json_line, printable, stdout_gone, write_line

if TYPE_CHECKING:
    from consumer.config import Settings
    from consumer.health import Health, HealthServer
    from consumer.metrics import Metrics

__all__ = ["hold_after_guard", "main", "wait_for_services"]

log = logging.getLogger("consumer")

# `run`, `replay` and `demo` check Kafka and the registry first: an unreachable service is
# one line within this many seconds each, never a traceback or a silent wait.
REACH_TIMEOUT_S = 10.0
REDIS_CHECK_S = 3.0  # `run`: Redis refusing the credentials (an outage is the fallback's)

GC_YOUNG_THRESHOLD = 10_000
"""Net new container objects between two collections of the youngest generation (Python's
default: 700). See `tune_collector`."""


def tune_collector() -> None:
    """Set the cyclic garbage collector for a long-running worker; called once start-up is
    done.

    - What start-up made (modules, settings, mappings, metrics, the worker's collaborators:
      ~48,000 objects) lives as long as the process: frozen, full collections no longer
      walk it. Their pauses fell from ~20 ms to ~4 ms at 2,000 events/s: turns of the event
      loop in which no answer is read.
    - An event's objects are freed by reference counting when it ends: the event path makes
      no reference cycle, delivered, retried or dead-lettered (tests/unit/test_handler.py).
      So the collector finds nothing, and at Python's default threshold it ran ~270 times a
      second only because ~200 events are alive in flight at any moment (their objects
      promoted, then walked again by full collections): 10 % of the event loop's time. At
      GC_YOUNG_THRESHOLD it runs about twice a second (RESULTS.md, "Round 8"). Cycles made
      elsewhere (a closed connection's transport) are still collected, a little later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


GUARD_EXIT_CODE = 3


def hold_after_guard(health: Health, seconds: float, beat_s: float = 1.0) -> bool:
    """Stay up after the DLQ guard stopped the worker, so a scrape sees it (True if held
    to the end, False when a SIGTERM/SIGINT ended it).

    The guard's gauge lives in this process: exiting at once left it at 1 for ~0.2 s, so a
    30 s scrape interval almost never saw the trip, its alert never fired and the pod only
    crash-looped. Meanwhile the consumer is closed (its partitions go to other members),
    /readyz says why and liveness keeps beating; a signal ends the hold at once.

    Not after a stop on a record batch Kafka's client cannot read: held, the pod answered
    scrapes for two minutes of each restart, and the steady critical UserpilotWorkersDown
    (whose runbook names that stop's line) fired only now and then (review "diff59c").
    """
    if seconds <= 0:
        return True
    health.set_stopping("stopped by the DLQ guard (too many dead letters); see the logs")
    done = threading.Event()
    for sig in stop_signals():
        signal.signal(sig, lambda _sig, _frame: done.set())
    log.critical("DLQ guard tripped: holding %gs before exit code %d so monitoring sees it "
                 "(userpilot_dlq_guard_tripped=1, /readyz unready); SIGTERM ends it now",
                 seconds, GUARD_EXIT_CODE)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        health.beat()
        if done.wait(min(beat_s, left)):
            return False
    return True


def _unreachable(problems: list[str]) -> int:
    for problem in problems:
        error_line(problem, quoted=True)  # one line each: it may quote another party's
    return 1


def _settings(offline: bool = False) -> Settings:
    from consumer.config import load_settings

    return load_settings(os.environ, offline=offline)


def cmd_run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, disable_created_metrics

    from consumer.health import Health, serve
    from consumer.logs import configure_logging
    from consumer.metrics import Metrics

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format, settings.log_secrets(),
                      kafka_debug="debug" in settings.kafka_extra)
    for note in settings.notes:  # what check-config prints as notes: variables ignored
        log.warning("%s", note)
    from consumer import reach

    no_created_series: Callable[[], None] = disable_created_metrics  # untyped upstream
    no_created_series()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(metrics, max_poll_interval_s=settings.max_poll_interval_s)
    server: HealthServer | None = None
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C while it waits for Kafka (for ever by default): exit 130, no traceback
        # (review "diff22b"). `_run_worker` installs the worker's own handling after.
        signal.signal(signal.SIGINT, _terminated)
        # SIGTERM once the probes answer (from here on) is a clean stop, exit 0, as it is
        # once the worker runs: nothing was taken yet. Kubernetes may stop a pod the moment
        # its probes answer.
        signal.signal(signal.SIGTERM, _stopped)
        if signal.SIGHUP in stop_signals():
            signal.signal(signal.SIGHUP, _stopped)
    try:
        health.set_waiting("checking Kafka, the schema registry and Redis"
                           if settings.redis is not None
                           else "checking Kafka and the schema registry")
        # The probes and /metrics before the first check of the services (live, not ready).
        # Started after it, a Kafka and a registry that accept connections but never answer
        # (2 × --timeout) left /healthz down for ~24 s of a liveness probe's ~30 s (review
        # helm24).
        try:
            server = serve(settings.metrics_port, registry, health)
        except OSError as exc:
            raise ConfigError(f"WORKER_METRICS_PORT={settings.metrics_port}: cannot listen "
                              f"({exc.strerror}); choose a free port") from None
        def check() -> list[str]:
            problems = reach.services(
                settings.kafka_config(logger=False), args.timeout,
                registry_url=settings.registry_url,
                registry_auth=settings.registry_auth.reveal() if settings.registry_auth
                else None,
                registry_proxy=settings.registry_proxy.reveal() if settings.registry_proxy
                else None,
                dlq_topic=settings.dlq_topic, group=settings.group_id)
            refused = reach.redis_refusal(settings, min(args.timeout, REDIS_CHECK_S),
                                          observe=metrics.observe_redis)
            return problems + ([refused] if refused is not None else [])

        problems = wait_for_services(check, args.wait, health)
        if problems:
            return _unreachable(problems)
        for warning in reach.interruptible(lambda: reach.topic_notes(
                settings.kafka_config(logger=False), settings.topics, settings.dlq_topic,
                args.timeout), tick=health.beat):
            log.warning("start-up: %s", warning)
        for warning in reach.interruptible(lambda: reach.redis_notes(
                settings, min(args.timeout, REDIS_CHECK_S)), tick=health.beat):
            log.warning("start-up: %s", warning)
        return _run_worker(settings, metrics, health)
    finally:
        if server is not None:
            server.close()


def wait_for_services(check: Callable[[], list[str]], wait_s: float, health: Health,
                      first_delay_s: float = 1.0, max_delay_s: float = 30.0) -> list[str]:
    """Run the start-up `check` until it passes; its problems when one is a setting to fix,
    or when services stayed unreachable for `wait_s` seconds.

    Why wait: a pod started while Kafka or the registry is down (a cluster restart, a
    broker upgrade) exited 1 and Kubernetes restarted it at growing intervals, up to five
    minutes apart: delivery resumed minutes after the outage, and the pod crash-looped
    meanwhile. It now stays up, live and not ready (/readyz names what it waits for), and
    tries again after `first_delay_s`, doubling to `max_delay_s`."""
    from consumer import reach

    deadline = time.monotonic() + wait_s
    delay = first_delay_s
    while True:
        problems = reach.interruptible(check, tick=health.beat)
        if not problems or any(not isinstance(p, reach.Unreachable) for p in problems):
            health.set_waiting(None)
            return problems
        left = deadline - time.monotonic()
        if left <= 0:
            return problems
        pause = min(delay, left)
        for problem in problems:
            log.error("start-up: %s; trying again in %.3g s (run --wait bounds this)",
                      problem, pause)
        # "waiting: <problem>": each problem is a sentence of its own ("Kafka at b:9092 not
        # reachable within 2 s (...): check ..."), which "waiting for" garbled (review
        # "docs53").
        health.set_waiting("waiting: " + "; ".join(problems))
        until = time.monotonic() + pause
        while (rest := until - time.monotonic()) > 0:  # a SIGTERM ends it (`_stopped`)
            if STOP_ASKED:  # ... even one whose SystemExit was swallowed
                raise SystemExit(0)
            health.beat()
            time.sleep(min(1.0, rest))
        delay = min(max_delay_s, delay * 2)


def _run_worker(settings: Settings, metrics: Metrics, health: Health) -> int:
    from consumer.worker import Worker

    try:
        worker = Worker(settings, metrics, health)
    except Exception:
        if STOP_ASKED:
            # The start-up SIGTERM's SystemExit, raised while the Kafka client's C code
            # built a client, came out as that code's own error (a TypeError, "expected
            # configuration property name as type unicode string"; once in CI): the stop
            # was asked, and nothing was taken yet.
            return 0
        raise
    # Before the worker runs: a SIGTERM from then on (Kubernetes stopping a pod that has
    # just started) is a clean stop, not death by the default signal action (exit -15).
    for sig in stop_signals():
        signal.signal(sig, lambda _sig, _frame: worker.stop(signalled=True))
    if STOP_ASKED:  # a SIGTERM whose SystemExit was swallowed on the way here
        worker.stop(signalled=True)
    tune_collector()  # start-up is done: what it made is frozen (the probe server runs already)
    code = asyncio.run(worker.run())
    if code == GUARD_EXIT_CODE and not worker.signalled:
        # Not after a SIGTERM (Kubernetes sends one): the pod is going away anyway.
        hold_after_guard(health, settings.dlq_guard_hold_s)
    if worker.kafka_abandoned:
        # The consumer is still inside librdkafka's close (Kafka unreachable): destroying
        # it at interpreter exit would wait for the broker again. Everything else is done.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_check_config(args: argparse.Namespace) -> int:
    """0 when valid (and, with --online, every service answered); 2 on a setting;
    with --online 8 + 1 (Userpilot) + 2 (Kafka) + 4 (schema registry) + 16 (Redis, when
    REDIS_URL is set) for what failed."""
    settings = _settings()
    text = json.dumps(settings.describe(), indent=2, ensure_ascii=False)
    try:
        # What stdout can write (a variable holding bytes that are not UTF-8, or an ASCII
        # stdout with a non-ASCII value: a traceback and exit 1, review config19).
        text.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        text = json.dumps(settings.describe(), indent=2)
    write_line(text)  # `check-config | head`: the verdict is the exit code
    for note in settings.notes:
        print(f"note: {note}".encode(sys.stderr.encoding or "utf-8", "backslashreplace")
              .decode(sys.stderr.encoding or "utf-8"), file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    if not args.online:
        return 0
    from consumer import reach
    from consumer.logs import configure_command_logging

    configure_command_logging(settings.log_format, settings.log_secrets())

    timeout = args.timeout
    checks: tuple[tuple[int, str, Callable[[], str | None]], ...] = (
        (1, "userpilot", lambda: reach.userpilot(settings, timeout)),
        # The DLQ topic is not among the topics that must exist: like `run`, the check
        # refuses a missing one only where the brokers create none, with the command
        # that creates it (review newcomer24: refused where the first dead letter
        # creates it, without that advice where it does not).
        (2, "kafka", lambda: reach.kafka(settings.kafka_config(), timeout, settings.topics,
                                         settings.dlq_topic, settings.group_id)),
        (4, "schema registry", lambda: reach.registry(
            settings.registry_url,
            settings.registry_auth.reveal() if settings.registry_auth else None, timeout,
            settings.registry_proxy.reveal() if settings.registry_proxy else None)),
        *(((16, "redis", lambda: reach.redis(settings, timeout)),)
          if settings.redis is not None else ()),
    )
    failed = 0
    # Every line masked as `run`'s logs are: a Kafka problem quoting an OIDC endpoint's
    # echo through a proxy showed the proxy's password (review "secrets55").
    from consumer.redaction import Redactor

    masked = Redactor(settings.log_secrets())
    for bit, name, check in checks:
        problem = check()
        if problem is None:
            print(f"online OK: {name}", file=sys.stderr)
        else:
            failed |= bit
            print(f"online FAILED: {name}: {printable(masked(problem))}", file=sys.stderr)
    if not failed & 2:  # what `run` warns of at start-up, once Kafka answered
        for warning in reach.topic_notes(settings.kafka_config(), settings.topics,
                                         settings.dlq_topic, timeout):
            print(f"online note: kafka: {masked(warning)}", file=sys.stderr)
    if settings.redis is not None and not failed & 16:
        for warning in reach.redis_notes(settings, timeout):
            print(f"online note: redis: {masked(warning)}", file=sys.stderr)
    return 8 + failed if failed else 0


def _lines(stream: Iterable[bytes]) -> Iterator[bytes]:
    """A file's lines as `produce` reads them (`bytes.splitlines`: a lone `\r` ends one too),
    numbered alike, but read as they come: `explain` gates what `produce` sends, and a file
    of `\r` lines was one bad line to it, two good events to `produce` (review "cli40")."""
    for raw in stream:
        yield from raw.splitlines() or [b""]


def _stdin() -> BinaryIO:
    """Standard input's bytes; OSError when the shell closed it (`explain <&-`: then
    `sys.stdin` is None, and reading it was an AttributeError's traceback)."""
    if sys.stdin is None:
        raise OSError(errno.EBADF, "standard input is closed")
    return sys.stdin.buffer


def cmd_explain(args: argparse.Namespace) -> int:
    """Exit 0 when every line is valid, 1 when any line (or the file) is not."""
    from consumer.config import load_settings
    from consumer.explain import explain_lines, is_valid

    settings = load_settings(os.environ, offline=True, check_clients=False)
    path = args.file
    label = "stdin" if path in (None, "-") else path
    try:
        stream = _stdin() if path in (None, "-") else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        error_line(f"{label}: cannot read the file ({exc.strerror or exc})", os.environ)
        return 1
    valid = True
    out = sys.stdout.buffer

    unwritten: list[OSError] = []

    def write(data: bytes | None) -> bool:
        """One line (None: flush); False when the output failed, which is never the
        input's failure: explain named its input file unreadable on a full disk (review
        "cli50"). A closed pipe is raised: the reader has seen enough."""
        try:
            if data is None:
                out.flush()
            else:
                out.write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            unwritten.append(exc)
            return False
        return True

    try:
        with stream:
            for doc in explain_lines(_lines(stream), settings):
                valid = valid and is_valid(doc)
                text = json_line(doc)  # one line whatever an id holds (review "ids47")
                try:
                    line = text.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate in a refused key: escape it
                    line = json.dumps(doc).encode("ascii")
                if not write(line + b"\n"):
                    break
            else:
                write(None)
        if unwritten:  # `> file` on a full disk
            stdout_gone()
            error_line(f"cannot write the output ({unwritten[0].strerror or unwritten[0]})",
                       os.environ)
            return 1
    except BrokenPipeError:  # `explain ... | head`: the reader has seen enough
        stdout_gone()
        return 0 if valid else 1
    except OSError as exc:  # e.g. a directory: open works, read fails
        error_line(f"{label}: cannot read the file ({exc.strerror or exc})", os.environ)
        return 1
    return 0 if valid else 1


def cmd_produce(args: argparse.Namespace) -> int:
    from consumer.config import load_settings, topic_problem
    from consumer.produce import produce_events

    problem = topic_problem(args.topic)
    if problem is not None:
        # Refused before anything else: Kafka refused it only after the schema was
        # registered under the bad name's subject (review "config35").
        raise ConfigError(f"--topic {args.topic!r}, {problem}")
    # A flag given blank is refused, not passed over: blank, it fell through to the offline
    # placeholders (`unused:9092`, review "config48").
    for flag, given, variable in (("--bootstrap-servers", args.bootstrap_servers,
                                   "KAFKA_BOOTSTRAP_SERVERS"),
                                  ("--schema-registry-url", args.schema_registry_url,
                                   "SCHEMA_REGISTRY_URL")):
        if given is not None and not given.strip():
            raise ConfigError(f"{flag} is blank: give a value, or leave the flag out to use "
                              f"{variable}")
    bootstrap = (args.bootstrap_servers or "").strip() or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS", "").strip()
    registry = (args.schema_registry_url or "").strip() or os.environ.get(
        "SCHEMA_REGISTRY_URL", "").strip()
    if not bootstrap or not registry:
        raise ConfigError("produce needs KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL "
                          "(or --bootstrap-servers and --schema-registry-url)")
    # The worker's own Kafka and registry settings (KAFKA_* pass-through, secret files,
    # registry basic auth), validated as `run` validates them.
    settings = load_settings({**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                              "SCHEMA_REGISTRY_URL": registry}, offline=True)
    path = args.file
    label = "stdin" if path in (None, "-") else path
    try:
        if path in (None, "-"):
            lines = _stdin().read().splitlines()
        else:
            with open(path, "rb") as stream:
                lines = stream.read().splitlines()
    except OSError as exc:
        error_line(f"{label}: cannot read the file ({exc.strerror or exc})", os.environ)
        return 1
    from consumer.logs import configure_command_logging

    configure_command_logging(settings.log_format, settings.log_secrets())
    conf = settings.kafka_config()
    # A signal stops the sending between records: what went is waited for and counted.
    signalled: list[int] = []
    with handled(lambda signum, _frame: signalled.append(signum), stop_signals()):
        # The validated values: a flag given with a stray space was checked stripped and
        # used as given (review config25).
        produce_events(lines, topic=args.topic, bootstrap=settings.bootstrap_servers,
                       registry_url=settings.registry_url,
                       source=path or "<stdin>", extra_conf=conf, timeout=args.timeout,
                       registry_auth=settings.registry_auth.reveal()
                       if settings.registry_auth else None,
                       registry_proxy=settings.registry_proxy.reveal()
                       if settings.registry_proxy else None, stopping=lambda: bool(signalled))
    return 128 + signalled[0] if signalled else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    from consumer.replay import main as replay_main

    try:
        return replay_main(args)
    except KafkaException as exc:  # the broker went away mid-run: one line, no traceback
        err = exc.args[0] if exc.args else exc
        text = err.str() if hasattr(err, "str") else str(err)
        from consumer.redaction import Redactor

        text = Redactor(_settings(offline=True).log_secrets())(text)  # valid: replay ran
        error_line(f"replay stopped: Kafka failed ({text}); what was committed stays "
                   "replayed, run it again to continue", os.environ, quoted=True)
        return 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from consumer.sandbox.cli import run

    return run(args.parser, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from consumer.demo import main as demo_main

    return demo_main(args)


def cmd_delete_users(args: argparse.Namespace) -> int:
    from consumer.gdpr import main as delete_users_main

    return delete_users_main(args)


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
    release = installed_version()  # once: every subcommand shows it too
    parser.add_argument("--version", action="version", version=f"%(prog)s {release}")
    # Not `required`: argparse names a missing command before an unknown option, and
    # `--bogus` said "the following arguments are required: command" (review "config48");
    # `main` asks for the command.
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser(
        "run", help="run the worker",
        description="Run the worker (settings from the environment; see README). It first "
        "checks that Kafka and the schema registry answer: while one is unreachable it logs "
        "why and tries again (1 s, doubling to 30 s) for up to --wait seconds, then exits "
        "1; a problem that is a setting (credentials the brokers or the registry refuse) "
        "exits 1 at once.")
    p.add_argument("--timeout", type=timeout_seconds, default=REACH_TIMEOUT_S,
                   help="seconds each start-up check of Kafka and the registry may take "
                   "(default 10)")
    p.add_argument("--wait", type=wait_seconds, default=math.inf, metavar="S",
                   help="how long to keep trying while Kafka or the registry is unreachable "
                   "at start-up, live and not ready (default: until they answer; 0: exit 1 "
                   "at once)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "check-config", help="validate and print the configuration",
        description="Validate the configuration exactly as `run` does at start-up and print "
        "it, secrets redacted. Exit 0 when valid, 2 when a setting is wrong. With --online, "
        "also resolve the Userpilot host and check the token (an empty Track: Userpilot "
        "answers 400 and records nothing, 401/403 to a wrong token), reach Kafka (topics "
        "included), the schema registry and Redis (when REDIS_URL is set), each within "
        "--timeout seconds; exit 8 + 1 (Userpilot) + 2 (Kafka) + 4 (registry) + 16 (Redis) "
        "for the ones that failed, e.g. 10 = Kafka only.")
    p.add_argument("--online", action="store_true",
                   help="also check that Userpilot, Kafka, the registry and Redis answer")
    p.add_argument("--timeout", type=timeout_seconds, default=10.0,
                   help="seconds per online check (default 10)")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("explain", help="show what the worker would send for JSON events")
    p.add_argument("--file", help="JSON lines file (default: stdin)")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser(
        "produce", help="produce canonical JSON events as Avro",
        description="Validate every JSON event line, then produce them as Avro (Confluent "
        "wire format) and wait for every acknowledgement. Uses the same KAFKA_* and "
        "SCHEMA_REGISTRY_* settings as `run`. With Kafka or the registry unreachable it "
        "fails with one line within --timeout seconds (default 10) and sends nothing.")
    p.add_argument("--topic", required=True)
    p.add_argument("--timeout", type=timeout_seconds, default=10.0,
                   help="seconds to wait for Kafka and the registry to answer (default 10)")
    p.add_argument("--file", help="JSON lines file (default: stdin)")
    p.add_argument("--bootstrap-servers", help="default: $KAFKA_BOOTSTRAP_SERVERS")
    p.add_argument("--schema-registry-url", help="default: $SCHEMA_REGISTRY_URL")
    p.set_defaults(func=cmd_produce)
    p = sub.add_parser(
        "replay", help="re-publish dead-lettered events",
        description="Re-publish dead-lettered events to their original topic (value-less "
        "dead letters are fetched back from the source topic). Uses the same KAFKA_* "
        "settings as `run`. With Kafka unreachable it fails with one line within --timeout "
        "seconds (default 10) and replays nothing.")
    add_replay_arguments(p)
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("sandbox", help="run the local Userpilot stand-in")
    add_sandbox_arguments(p)
    p.set_defaults(func=cmd_sandbox, parser=p)
    p = sub.add_parser(
        "demo", help="run the embedded demo end to end",
        description="Produce sample events, deliver them to an embedded sandbox and report. "
        "Uses KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL when set (else starts local "
        "services); an unreachable one is reported in one line within --timeout seconds "
        "each (default 10).")
    p.add_argument("--timeout", type=timeout_seconds, default=REACH_TIMEOUT_S,
                   help="seconds to wait for Kafka and the registry (default 10)")
    p.add_argument("--events", default=None,
                   help="JSON lines (default: schemas/sample-events.jsonl)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("delete-users", help="GDPR: delete users in Userpilot, in paced batches")
    from consumer.gdpr import add_arguments as add_delete_users_arguments
    add_delete_users_arguments(p)
    p.set_defaults(func=cmd_delete_users)
    for command in sub.choices.values():  # `run --version` too, not only the main command
        command.add_argument("--version", action="version",
                             version=f"{parser.prog} {release}")
    return parser


STOP_ASKED: list[int] = []
"""Signals `_stopped` received. Its SystemExit is lost when the signal lands in a callback
the interpreter calls from C (a weakref's, a garbage collection's: "Exception ignored"): the
worker then ran on, SIGTERM and all (seen once under load in
`test_sigterm_as_soon_as_the_probes_answer_is_a_clean_exit`). `_run_worker` reads it."""


def _stopped(signum: int, _frame: object) -> None:
    """SIGTERM (or a hang-up) while `run` starts (checks Kafka and the registry, or waits
    for them): a clean stop, exit 0; the probes already answer, so this is how Kubernetes
    stops a pod that has not reached its Kafka yet."""
    STOP_ASKED.append(signum)
    raise SystemExit(0)


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM or a hang-up before a command installs its own handling: stop now (exit
    128 + the signal: 143, 129). As PID 1 of
    a container (the image's exec-form ENTRYPOINT, no init) a signal without a handler is
    ignored: a pod deleted while the worker started ran on, joined the group and delivered
    until kubelet's SIGKILL (review helm19)."""
    raise SystemExit(128 + signum)


def _closed_streams_to_devnull() -> None:
    """A command started with stdout or stderr closed (`>&-`) has None there: check-config
    and explain failed with a traceback (`'NoneType' object has no attribute 'encoding'`)
    after their work was done (review "config48"). What nobody can read goes nowhere, and
    so does what stderr's reader left unread (`QuietStream`; kept to the end: Python's
    own flush at exit turned a broken stderr into exit 120)."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    if not isinstance(sys.stderr, QuietStream):
        sys.stderr = cast(TextIO, QuietStream(sys.stderr))


def main(argv: Sequence[str] | None = None) -> int:
    _closed_streams_to_devnull()
    # Ctrl-C is Python's KeyboardInterrupt (below); the others stop now, exit 128+signal.
    stopping = [signum for signum in stop_signals() if signum != signal.SIGINT]
    with handled(_terminated, stopping):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.error("a command is required (one of those above; --help says each)")
        return int(args.func(args))
    except ConfigError as exc:
        error_line(str(exc), os.environ)
        return 2
    except WorkerError as exc:
        error_line(str(exc))
        return 1
    except KeyboardInterrupt:
        # Ctrl-C where a command has no handling of its own (a start-up reach check): a
        # plain stop, not a traceback.
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
