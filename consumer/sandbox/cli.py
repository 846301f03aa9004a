"""``python -m consumer.sandbox`` / ``python -m consumer sandbox``: run the sandbox alone."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from consumer import installed_version
from consumer.sandbox.config import DEFAULT_READ_TOKEN, DEFAULT_WRITE_TOKEN, SandboxConfig
from consumer.sandbox.faults import FaultConfig, FaultError
from consumer.signals import stop_signals

__all__ = ["add_arguments", "build_parser", "config_from_args", "main", "run"]

log = logging.getLogger(__name__)


DESCRIPTION = ("A local stand-in for Userpilot's HTTP API (track, identify, company "
               "identify, delete users), with a control API under /_sandbox/ for records "
               "and fault injection.")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sandbox's flags, on its own parser or on `python -m consumer sandbox`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument(
        "--write-token",
        action="append",
        dest="write_tokens",
        metavar="TOKEN",
        help=f"accepted write token, repeatable (default {DEFAULT_WRITE_TOKEN})",
    )
    parser.add_argument(
        "--read-token",
        action="append",
        dest="read_tokens",
        metavar="TOKEN",
        help=f"read token answered with 403, repeatable (default {DEFAULT_READ_TOKEN})",
    )
    parser.add_argument(
        "--rate-limit", type=int, default=600, help="requests per window per token; 0 = off"
    )
    parser.add_argument("--rate-window", type=float, default=60.0, help="window in seconds")
    parser.add_argument(
        "--identify-rate-limit", type=int, default=None,
        help="identify budget per window per token (default: same as --rate-limit)",
    )
    parser.add_argument(
        "--shared-rate-limit", action="store_true",
        help="track and identify share one budget (default: one each, as Userpilot)",
    )
    parser.add_argument(
        "--delete-interval", type=float, default=2.0,
        help="seconds between DELETE /v1/users calls per token (Userpilot: 2); 0 = off",
    )
    parser.add_argument(
        "--retry-after", action="store_true", help="send Retry-After with 429 responses"
    )
    parser.add_argument("--error-rate", type=float, default=0.0, help="probability of 5xx")
    parser.add_argument(
        "--error-codes",
        default="500,502,503",
        help="comma-separated statuses drawn for --error-rate",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument(
        "--reset-rate", type=float, default=0.0, help="probability of a connection reset"
    )
    parser.add_argument(
        "--script",
        action="append",
        default=[],
        metavar="ACTION",
        help="scripted action (e.g. 500, reset, timeout:2000, 202), repeatable, in order",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for random faults")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """Turn parsed flags into a validated config; raise ``ValueError`` with a clear message."""
    faults = FaultConfig().merged(
        {
            "error_rate": args.error_rate,
            "error_codes": [code.strip() for code in args.error_codes.split(",") if code],
            "latency_ms": args.latency_ms,
            "jitter_ms": args.jitter_ms,
            "reset_rate": args.reset_rate,
            "script": args.script,
        }
    )
    return SandboxConfig(
        host=args.host,
        port=args.port,
        write_tokens=tuple(args.write_tokens or [DEFAULT_WRITE_TOKEN]),
        read_tokens=tuple(args.read_tokens or [DEFAULT_READ_TOKEN]),
        rate_limit=args.rate_limit,
        rate_window_seconds=args.rate_window,
        identify_rate_limit=args.identify_rate_limit,
        shared_rate_limit=args.shared_rate_limit,
        delete_interval_seconds=args.delete_interval,
        retry_after=args.retry_after,
        faults=faults,
        seed=args.seed,
    )


async def _run(config: SandboxConfig) -> None:
    from consumer.sandbox.server import serve  # not for `run`'s parser (see the package)

    server = await serve(config)
    print(f"sandbox listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in stop_signals():
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("sandbox stopping")
    await server.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m consumer.sandbox`: its usage named `__main__.py` (review "config40")."""
    parser = build_parser(prog="python -m consumer.sandbox")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {installed_version()}")
    return run(parser, parser.parse_args(argv))



def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Start the sandbox from parsed flags (`parser` reports flag errors)."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = config_from_args(args)
    except (FaultError, ValueError) as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_run(config))
    except OSError as exc:
        log.error("sandbox could not start: %s", exc)
        return 1
    return 0
