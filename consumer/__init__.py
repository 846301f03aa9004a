"""Userpilot delivery worker: Signal events from Kafka to Userpilot's Track API."""

__version__ = "0.1.0"
