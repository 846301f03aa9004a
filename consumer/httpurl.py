"""httpx's own verdict on a URL the worker's HTTP clients will be built with, offline.

An adapter (it imports httpx). `config` checks URLs with the standard library's parser,
which takes what httpx refuses (`10.0.0.256`, a tab in a password): such a setting passed
`check-config` and `run` then crashed with a traceback at start-up (review "cmds17"). The
parser that will use the URL decides.
"""

from __future__ import annotations

import httpx

__all__ = ["url_problem"]


def url_problem(url: str) -> str | None:
    """Why httpx refuses `url` (its reason, never the URL: it may hold a password), or
    None."""
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        reason = str(exc)
        if "@" in url:  # the reason may quote a part of the user info: its kind only
            reason = reason.split(":", 1)[0]
        return reason.replace(url, "<the URL>")
    return None
