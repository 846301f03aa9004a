"""answers.body_text: an HTTP answer's body as bounded text, whatever it claims to be."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.answers import BODY_LIMIT, body_text, charset_of
from consumer.delivery import MAX_RETRY_AFTER_S, parse_retry_after


def test_plain_text_in_its_charset() -> None:
    assert body_text("é".encode("latin-1"), charset="iso-8859-1") == "é"
    assert body_text("é".encode()) == "é"
    assert body_text(b"\xff ok") == "\ufffd ok"


@pytest.mark.parametrize("charset", ["utf-16", "idna", "hex", "rot13", "base64", "nope", ""])
def test_charsets_that_cannot_decode_fall_back_to_utf8(charset: str) -> None:
    assert body_text(b"abcd", charset=charset) in ("abcd", "扡摣")


def test_compressed_bodies_are_inflated_only_as_far_as_kept() -> None:
    bomb = gzip.compress(b"A" * (32 * 1024 * 1024))
    assert body_text(bomb, encoding="gzip") == "A" * BODY_LIMIT
    assert body_text(zlib.compress(b"zlib"), encoding="deflate") == "zlib"
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert body_text(raw.compress(b"raw") + raw.flush(), encoding="Deflate ") == "raw"
    assert "not the gzip it claims" in body_text(b"plain", encoding="gzip")
    assert "not decoded" in body_text(b"\x00\x01", encoding="br")
    assert body_text(b"as is", encoding="identity") == "as is"


def test_charset_of_reads_the_content_type_parameter() -> None:
    assert charset_of({"content-type": 'text/plain; Charset="UTF-16"'}) == "UTF-16"
    assert charset_of({"content-type": "application/json"}) is None
    assert charset_of({}) is None


@given(st.binary(max_size=4096),
       st.text(max_size=30) | st.none() | st.sampled_from(
           ["utf-7", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "punycode", "idna"]),
       st.sampled_from(["", "gzip", "deflate", "br", "identity", "x-gzip", "zstd"]) | st.text())
def test_body_text_never_raises_and_stays_bounded(raw: bytes, charset: str | None,
                                                  encoding: str) -> None:
    text = body_text(raw, charset=charset, encoding=encoding)
    assert len(text) <= BODY_LIMIT + 80
    text.encode("utf-8")  # no lone surrogate: the dead letter's headers take it


@given(st.text(max_size=80))
def test_parse_retry_after_never_raises(value: str) -> None:
    """OverflowError from a date too large for datetime stopped the worker on a 429."""
    result = parse_retry_after(value, now=0.0)
    assert result is None or 0.0 <= result <= MAX_RETRY_AFTER_S


@pytest.mark.parametrize("value", [
    "Mon, 01 Jan 2026 00:00:00 +99999999999999999999",
    "Mon, 01 Jan 99999999999 00:00:00 GMT",
    "Mon, 99999999999 Jan 2026 00:00:00 GMT",
    "Mon, 01 Jan 2026 99999999999:00:00 GMT",
])
def test_parse_retry_after_overflowing_dates_are_no_hint(value: str) -> None:
    assert parse_retry_after(value, now=0.0) is None


def test_an_unknown_content_encoding_is_not_quoted() -> None:
    """Review secrets18: quoted lower-cased, an echoed token escaped its redaction."""
    text = body_text(b"x" * 10, encoding="S3CR3T-TOKEN-xyz")
    assert "s3cr3t" not in text.lower() and "10 bytes" in text


@pytest.mark.parametrize("raw,charset", [(b"+2D0-", "utf-7"), (b"\x3d\xd8", "utf-16-le"),
                                         (b"\xd8\x3d", "utf-16-be")])
def test_a_charset_that_yields_lone_surrogates_gives_text_utf8_can_take(
        raw: bytes, charset: str) -> None:
    """utf-7 decodes "+2D0-" to a lone surrogate even with "replace": the dead letter's
    headers could not encode it and the worker stopped, on every restart (review
    "poison21")."""
    text = body_text(raw, charset=charset)
    text.encode("utf-8")  # raises on a surrogate
    assert "\ufffd" in text
