"""Entry point for `python -m consumer.bench`."""

from __future__ import annotations

from consumer.bench.cli import main

raise SystemExit(main())
