"""How many timestamps fall in the busiest rolling window: the one measure every rate test uses."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["max_in_window"]


def max_in_window(times: Iterable[float], period: float) -> int:
    """Most times in any closed window ``[t, t + period]``.

    Closed at both ends, the worst case: two sends exactly ``period`` apart both count, so a
    limiter that spaces them so is held to the stricter reading (a fake clock makes such
    ties exact; with real clocks they do not occur).
    """
    ordered = sorted(times)
    return max((bisect.bisect_right(ordered, t + period) - i for i, t in enumerate(ordered)),
               default=0)
