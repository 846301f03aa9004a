"""Userpilot delivery worker: Signal events from Kafka to Userpilot's Track API."""

__version__ = "0.1.0"


def installed_version() -> str:
    """The installed distribution's version (its metadata); "unknown" from a source tree
    that was never installed. One lookup for the worker's `--version`, its build-info
    metric and the sandbox's `--version`."""
    from importlib import metadata

    try:
        return metadata.version("userpilot-delivery-worker")
    except metadata.PackageNotFoundError:
        return "unknown"
