"""The benchmark harness: `python -m bench [--smoke] [--workloads 1,2] [--out F]`.

Runs the workloads of the benchmark issue on the real broker/registry and the sandbox and
reports each headline figure as a ratio measured in the same run. See tests/bench/RESULTS.md.
"""

from __future__ import annotations

from bench.cli import main

__all__ = ["main"]
