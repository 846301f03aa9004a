"""``python -m consumer.sandbox``."""

from __future__ import annotations

import sys

from consumer.sandbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
