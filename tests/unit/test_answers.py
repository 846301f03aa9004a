"""answers.body_text: an HTTP answer's body as bounded text, whatever it claims to be."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.answers import BODY_LIMIT, Unreadable, body_text, capped, charset_of, whole_body
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


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 30.0), (" 7 ", 7.0), ("1.5", 1.5), ("0", 0.0), ("99999", MAX_RETRY_AFTER_S),
    ("1_000", None), ("1e3", None), ("+30", None), ("-5", None), ("\u0663\u0660", None),
    ("30s", None), ("inf", None), ("", None)])
def test_parse_retry_after_takes_http_s_delta_seconds_only(
        value: str, seconds: float | None) -> None:
    """Review "outage49": float() took `1_000`, `1e3`, `+30` and Arabic-Indic digits, and a
    garbled header held a family for the 600 s cap instead of its own backoff."""
    assert parse_retry_after(value, now=0.0) == seconds


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


def test_whole_body_joins_and_inflates_within_the_limit() -> None:
    assert whole_body([b"ab", b"", b"cd"], None, 4) == b"abcd"
    packed = gzip.compress(b"x" * 1000)
    assert whole_body([packed[:10], packed[10:]], "gzip", 1000) == b"x" * 1000
    assert whole_body([zlib.compress(b"y" * 50)], " Deflate ", 50) == b"y" * 50


@pytest.mark.parametrize("coding", [None, "identity", "gzip", "deflate"])
def test_whole_body_refuses_past_the_limit_before_inflating_the_rest(coding: str | None) -> None:
    data = b"z" * 100_000
    raw = (gzip.compress(data) if coding == "gzip"
           else zlib.compress(data) if coding == "deflate" else data)
    with pytest.raises(Unreadable, match="over 99999 bytes"):
        whole_body([raw], coding, 99_999)
    assert whole_body([raw], coding, 100_000) == data


@pytest.mark.parametrize(("coding", "raw", "said"), [
    ("br", b"...", "Content-Encoding 'br'"),
    ("gzip", b"not gzip", "not the gzip it claims"),
])
def test_whole_body_refuses_what_it_cannot_read(coding: str, raw: bytes, said: str) -> None:
    with pytest.raises(Unreadable, match=said):
        whole_body([raw], coding, 1000)


def test_capped_reads_no_chunk_past_the_limit() -> None:
    read: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(10):
            read.append(i)
            yield b"0123456789"

    assert capped(chunks(), 25) == b"0123456789" * 2 + b"01234"
    assert read == [0, 1, 2]


SQUID_DENIED = """<!DOCTYPE html PUBLIC "-//W3C//DTD HTML 4.01//EN" "http://www.w3.org/TR/html4/strict.dtd">
<html><head>
<meta http-equiv="Content-Type" content="text/html; charset=utf-8">
<title>ERROR: The requested URL could not be retrieved</title>
<style type="text/css"><!--
 body { font-family: verdana, sans-serif; }
--></style>
</head><body id="ERR_ACCESS_DENIED">
<div id="titles"><h1>ERROR</h1><h2>The requested URL could not be retrieved</h2></div>
<div id="content"><p>Access control configuration prevents your request from being allowed
at this time.</p></div></body></html>"""


def test_an_html_block_page_is_quoted_by_its_title_and_text() -> None:
    """Review "ops59": Squid's page quoted its doctype and head; its reason never showed."""
    from consumer.answers import excerpt

    quoted = excerpt(SQUID_DENIED)
    assert quoted.startswith("ERROR: The requested URL could not be retrieved: ERROR The")
    assert "Access control configuration prevents" in excerpt(SQUID_DENIED, 400)
    assert "<" not in quoted and "font-family" not in quoted
    # Tags become blanks: a secret split by one is not joined by the excerpt.
    assert "wt_1234" not in excerpt("<html><body>wt_12<b>34</b></body></html>")
    assert excerpt('{"error": "bad"}') == '{"error": "bad"}'
    # Cut inside its stylesheet (the 1,024 characters kept), the page is quoted by its
    # title alone, not its CSS, and the title once (review "diff59c").
    cut = SQUID_DENIED.replace("body { font-family", "/* Copyright */ body { font-family")
    cut = cut[:cut.index("font-family")]
    assert excerpt(cut) == "ERROR: The requested URL could not be retrieved:"
    assert quoted.count("could not be retrieved") == 2  # the title, then the page's h2


def _long_styled(page: str, css_chars: int = 3000) -> str:
    """`page` with a stylesheet long enough to fill the 1,024 characters kept (Squid's own
    runs to about 2,000)."""
    rules = "".join(f" #e{i} {{ margin: {i}px; }}" for i in range(css_chars // 20))
    return page.replace("body { font-family", rules + " body { font-family")


def test_a_page_keeps_its_title_and_text_past_a_long_head() -> None:
    """Round 59's "noticed": a block page whose head outlasted the 1,024 characters kept
    lost its reason; its head (but the title), styles, scripts and comments are blanked
    before the cut, and it is still an HTML page quoted by title and text."""
    from consumer.answers import BODY_LIMIT, excerpt, html_page, page_kept

    page = _long_styled(SQUID_DENIED).replace(
        "</body>", "<script>var t = 'x';</script><!-- c --></body>")
    assert page.index("Access control") > BODY_LIMIT
    kept = page_kept(page)
    assert html_page(kept) and kept.startswith("<!DOCTYPE html")
    assert "margin" not in kept and "var t" not in kept and "<!-- c" not in kept
    assert "<title>ERROR: The requested URL could not be retrieved</title>" in kept
    quoted = excerpt(kept[:BODY_LIMIT], 400)
    assert quoted.startswith("ERROR: The requested URL could not be retrieved: ERROR")
    assert "Access control configuration prevents" in quoted
    assert page_kept('{"error": "<head>x</head>"}') == '{"error": "<head>x</head>"}'
    untitled = "<html><head><style>p {}</style></head><body>Denied</body></html>"
    assert page_kept(untitled).split() == ["<html>", "<body>Denied</body></html>"]


def test_a_page_of_unclosed_titles_is_read_in_linear_time() -> None:
    """Review "diff60": the title pattern scanned to the end from every unclosed <title>
    (quadratic): a 16 KiB answer of them held the event loop 164 ms a request, 10 s for 64.
    A complexity guard, not a speed goal: 200,000 characters take milliseconds linear and
    ~25 s quadratic, so the bound is generous."""
    import time

    from consumer.answers import excerpt, page_kept

    hostile = "<!DOCTYPE html><html>" + "<title>" * 28_000
    started = time.process_time()
    kept = page_kept(hostile)
    excerpt(kept[:1024])
    assert time.process_time() - started < 3.0
    titled = "<html><head><title>Blocked &amp; logged</title></head><body>x</body></html>"
    assert excerpt(page_kept(titled)).startswith("Blocked &amp; logged:")
