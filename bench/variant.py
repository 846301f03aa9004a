"""`python -m bench.variant`: the worker exactly as `consumer run` starts it, except
that `UserpilotClient` gets the aiohttp transport. Measures a proposal without editing the
worker; settings come from the same environment variables.
"""

from __future__ import annotations

import asyncio
import os

from prometheus_client import CollectorRegistry

from bench.aiohttp_transport import AiohttpTransport
from consumer.config import load_settings
from consumer.delivery import UserpilotClient
from consumer.health import Health, serve
from consumer.logs import configure_logging
from consumer.metrics import Metrics
from consumer.worker import Worker

__all__ = ["main"]


def main() -> int:
    settings = load_settings(os.environ)
    configure_logging(settings.log_level, settings.log_format, [settings.api_key.reveal()])
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(metrics)
    server = serve(settings.metrics_port, registry, health)
    client = UserpilotClient(
        settings.track_url, settings.headers(), timeout_s=settings.request_timeout_s,
        max_connections=settings.max_connections,
        transport=AiohttpTransport(max_connections=settings.max_connections),
    )
    try:
        return asyncio.run(Worker(settings, metrics, health, client=client).run())
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
