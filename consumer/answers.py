"""The text of an HTTP answer's body for messages, logs and the DLQ: bounded, never raising.

Only the first `BODY_LIMIT` characters of an error body are ever kept, so only that much is
decoded. Whatever the answer claims is untrusted: a charset Python cannot or will not decode
text with (`utf-16` without a BOM, `idna`, `hex`), a `Content-Encoding` the server applied
although we asked for `identity`, a gzip body that inflates to gigabytes. Each becomes
readable text or a short note, never an exception: one odd answer from a gateway must not
stop a replica (it did: the 503 that carried it crashed the worker on every restart).
"""

from __future__ import annotations

import codecs
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from consumer.codec import replace_surrogates
from consumer.stdout import printable

__all__ = ["BODY_LIMIT", "MAX_BODY_BYTES", "PAGE_LIMIT", "Unreadable", "body_text", "capped",
           "charset_of", "excerpt", "html_page", "page_kept", "raw_chunks", "whole_body"]

BODY_LIMIT = 1024
"""Characters of an error body kept in exceptions, logs and dead letters."""

MAX_BODY_BYTES = 64 * 1024
"""Bytes of any answer read from the wire; the rest is left unread (the connection is closed
instead of pooled). Userpilot's answers are a few bytes."""

PAGE_LIMIT = 16 * BODY_LIMIT
"""Characters of an HTML page read to find its text (`page_kept`) before the cut."""


def body_text(raw: bytes, *, charset: str | None = None, encoding: str | None = None,
              limit: int = BODY_LIMIT) -> str:
    """At most `limit` characters of `raw` (a body as it came off the wire): `encoding` is
    its Content-Encoding, `charset` the Content-Type's."""
    coding = (encoding or "").strip().lower()
    if coding in ("gzip", "x-gzip", "deflate"):
        inflated = _inflate(raw, coding, 4 * limit)
        if inflated is None:
            return f"(a body of {len(raw)} bytes that is not the {coding} it claims)"
        raw = inflated
    elif coding not in ("", "identity"):
        # Not quoted: lower-cased, an echoed token no longer matched its redaction
        # (review "secrets18"), and the coding's name says nothing an operator needs.
        return f"(a body of {len(raw)} bytes in a Content-Encoding not decoded here)"
    return _decode(raw[:4 * limit], charset)[:limit]  # enough bytes for `limit` in UTF-8


class Streamed(Protocol):
    """The parts of an httpx response `raw_chunks` reads (this module imports no httpx)."""

    @property
    def is_stream_consumed(self) -> bool: ...
    @property
    def content(self) -> bytes: ...
    def iter_raw(self) -> Iterator[bytes]: ...


def raw_chunks(response: Streamed) -> Iterable[bytes]:
    """A streamed answer's body as it came, in chunks; whole when a transport read it
    already (httpx's mock one, in tests)."""
    return (response.content,) if response.is_stream_consumed else response.iter_raw()


class Unreadable(ValueError):
    """`whole_body`: an answer over its limit, or in a Content-Encoding not read here."""


def capped(chunks: Iterable[bytes], limit: int) -> bytes:
    """The first `limit` bytes of a body from its raw chunks; the rest is never read."""
    kept: list[bytes] = []
    size = 0
    for chunk in chunks:
        kept.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(kept)[:limit]


def whole_body(chunks: Iterable[bytes], encoding: str | None, limit: int) -> bytes:
    """A whole body from its raw chunks (`encoding` its Content-Encoding), inflated, of at
    most `limit` bytes inflated; `Unreadable` past that, before more is read or inflated.

    Why: read whole and inflated as it came (httpx's `iter_bytes`), a 255 KB gzip answer
    held 512 MB, the chart's memory limit (review "http41"). A client asks for `identity`;
    this also bounds a server that compresses anyway."""
    coding = (encoding or "").strip().lower()
    inflater: Any = None
    if coding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == "deflate":
        inflater = zlib.decompressobj(zlib.MAX_WBITS)
    elif coding not in ("", "identity"):
        raise Unreadable(f"an answer in Content-Encoding {coding[:40]!r}, not read here")
    out = bytearray()
    for chunk in chunks:
        if inflater is not None:
            try:
                # At most one byte past the limit is inflated: enough to know it is over.
                chunk = inflater.decompress(chunk, limit + 1 - len(out))
            except zlib.error:
                raise Unreadable(f"an answer that is not the {coding} it claims") from None
        out += chunk
        if len(out) > limit:
            raise Unreadable(f"an answer over {limit} bytes")
    return bytes(out)


def charset_of(headers: Mapping[str, str]) -> str | None:
    """The charset parameter of an answer's Content-Type, if any."""
    for param in headers.get("content-type", "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


def _inflate(raw: bytes, coding: str, limit: int) -> bytes | None:
    """The first `limit` bytes of the inflated body; the rest is never inflated (a 1 MB
    gzip body can hold 1 GB). Deflate as zlib data, else raw deflate (servers send both)."""
    tries = ((16 + zlib.MAX_WBITS,) if coding != "deflate"
             else (zlib.MAX_WBITS, -zlib.MAX_WBITS))
    for wbits in tries:
        try:
            return zlib.decompressobj(wbits).decompress(raw, limit)
        except zlib.error:
            continue
    return None


def _decode(raw: bytes, charset: str | None) -> str:
    """Text in the answer's charset when that is a text encoding Python can apply, else
    UTF-8; undecodable bytes become U+FFFD."""
    name = "utf-8"
    if charset:
        try:
            info = codecs.lookup(charset.strip())
        except (LookupError, ValueError):
            info = None
        # Binary transforms (hex, base64, zlib) are codecs too; they are not charsets.
        if info is not None and getattr(info, "_is_text_encoding", True):
            name = info.name
    try:
        text = raw.decode(name, "replace")
    except Exception:  # e.g. idna raises despite "replace"
        return raw.decode("utf-8", "replace")
    # Some codecs (utf-7, utf-16 with "replace") still yield lone surrogates, which no
    # UTF-8 encoding of the text takes: a 400 answered in utf-7 crashed the worker as its
    # dead letter's headers were written, on every restart (review "poison21").
    return replace_surrogates(text)


# No "<" inside: `.*?` scanned to the end from every unclosed <title>, quadratic (a 16 KiB
# page of them held the event loop 10 s, review "diff60").
_TITLE = re.compile(r"<title[^>]*>([^<]*)</title", re.I)
# An element left unclosed by the cut at BODY_LIMIT runs to the end (Squid's stylesheet
# outlasted the 1,024 characters: its CSS was quoted, review "diff59c").
_UNSEEN = re.compile(r"<(head|script|style|title)\b.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)",
                     re.I | re.S)
_TAG = re.compile(r"<[^>]*>")
_HEAD = re.compile(r"<head\b", re.I)


def page_kept(body: str) -> str:
    """An HTML page with what no reader sees blanked (its head but for the title, scripts,
    styles, comments), before the cut at `BODY_LIMIT`: Squid's block page spends its first
    1,024 characters on its stylesheet, and the reason it gives came after the cut (round
    59's "noticed"). Other bodies as they are. Blanks, never nothing, as in `excerpt`."""
    if not html_page(body):
        return body
    title = _TITLE.search(body)
    if title is None:
        return _UNSEEN.sub(" ", body)
    # The title where the head was: the page's doctype and <html> stay first (`html_page`).
    head = _HEAD.search(body, 0, title.start())
    at = title.start() if head is None else head.start()
    return (_UNSEEN.sub(" ", body[:at]) + f"<title>{title.group(1)}</title>"
            + _UNSEEN.sub(" ", body[at:]))


def excerpt(body: str, limit: int = 160) -> str:
    """An answer's body (redacted already) as a pause or outage line quotes it: whitespace
    collapsed, cut at `limit` characters, printable. A proxy's block page said why in it
    while the line said only "token refused" (review "egress59"); of an HTML page, its
    title and text, not its markup (Squid's page quoted its doctype and head, review
    "ops59")."""
    if html_page(body):
        # Tags become blanks, never nothing, and entities stay as they are: the body was
        # redacted as received, and a secret split by a tag or written as entities must
        # not come out whole here.
        title = _TITLE.search(body)
        text = _TAG.sub(" ", _UNSEEN.sub(" ", body))
        body = f"{title.group(1)}: {text}" if title else text
    text = " ".join(body.split())
    return printable(text[:limit] + ("…" if len(text) > limit else ""))


def html_page(body: str) -> bool:
    """The answer is an HTML page: Userpilot's API answers JSON, so it is a block page of
    something in between (a proxy, firewall or TLS-inspecting gateway)."""
    head = body[:512].lstrip().lower()
    return head.startswith(("<!doctype html", "<html")) or "<html" in head
