"""Masking secrets in text we store or log: the one place it is done.

Userpilot's error bodies enter the DLQ and the logs; a gateway that echoes the request
would echo `Authorization: Token …`. Every stored or logged response text goes through
`redact`, which masks each secret in the spellings an echo may use (raw, JSON-escaped,
URL-encoded, HTML-escaped, in another case) and also a secret cut off at either end of the
text by a truncation.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping

__all__ = ["MASK", "MIN_PARTIAL", "Redactor", "kafka_secrets", "redact", "registry_secrets",
           "secret_forms",
           "url_credentials"]

MASK = "***"
MIN_PARTIAL = 4  # a shorter fragment at a cut edge is too likely to be ordinary text
MIN_ALONE = 6  # a proxy password shorter than this is masked only as part of its pair
_SECRET_WORDS = ("secret", "password", "passwd", "token", "key", "credential", "assertion")
_PERCENT = re.compile(r"%[0-9A-F]{2}")


def secret_forms(secrets: Iterable[str]) -> list[str]:
    """Every spelling of every non-empty secret, longest first (so none is half-masked)."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        forms.add(secret)
        forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
        forms.add(json.dumps(secret)[1:-1])
        for quoted in (urllib.parse.quote(secret, safe=""),
                       urllib.parse.quote_plus(secret, safe="")):
            forms.add(quoted)
            # Lowercase escapes are as valid (%2b): a gateway echoing the token into a
            # redirect's Location that way put it into /readyz and the logs.
            forms.add(_PERCENT.sub(lambda m: m.group(0).lower(), quoted))
    return sorted(forms, key=len, reverse=True)


def registry_secrets(url: str | None, user_info: str | None) -> list[str]:
    """The schema registry's credentials in every form a log line or an echoed request
    could show them: those of SCHEMA_REGISTRY_URL's user info (`url_credentials`) and of
    SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (`user:password`: the pair, its Basic form, and
    the password alone when long enough, as for a URL's)."""
    forms = url_credentials(url)
    if user_info:
        user, _, password = user_info.partition(":")
        alone = password or user  # `KEY:` (an API key as the user): the key is the secret
        if len(alone) >= MIN_ALONE:
            forms.append(alone)
        forms += [user_info, base64.b64encode(user_info.encode()).decode()]
    return forms


def kafka_secrets(conf: Mapping[str, str], secret_keys: Iterable[str]) -> list[str]:
    """The librdkafka secrets of `conf` (`secret_keys`) as an echo could show them: each
    value, the `key=value` parts of sasl.oauthbearer.config, and the Basic forms of
    `username:password` and `client.id:client.secret` (an OIDC token endpoint quotes
    `Authorization: Basic …`)."""
    secrets: list[str] = []
    for key in secret_keys:
        value = conf.get(key)
        if not value or len(value) < MIN_ALONE:
            continue  # a short one: masked in its pair below (alone it garbles every line)
        secrets.append(value)
        if key == "sasl.oauthbearer.config":
            # Its parts are mostly not secret (principal, scope, lifeSeconds, extensions:
            # masking `scope=openid`'s value masked "openid" everywhere, review "diff18b"):
            # only those whose name says secret.
            parts = value.split()
            for part in parts:
                name, _, given = part.partition("=")
                if (given and len(given) >= MIN_ALONE
                        and any(w in name.lower() for w in _SECRET_WORDS)):
                    secrets.append(given)
            # librdkafka quotes the rest of a value it cannot parse ("Unrecognized
            # sasl.oauthbearer.config beginning at: ..."): a bare word or a `name:value`
            # part after the first, shown as written (review "secrets49").
            for word in list(re.finditer(r"\S+", value))[1:]:
                rest = value[word.start():].rstrip()
                if len(rest) >= MIN_ALONE:
                    secrets.append(rest)
    # librdkafka takes the OIDC client under two spellings (the newer
    # `…client.credentials.client.id/secret`); the Basic form of either pair is masked
    # (review "diff23": the newer one's was not).
    oidc = "sasl.oauthbearer.client."
    newer = "sasl.oauthbearer.client.credentials.client."
    pairs = ((conf.get("sasl.username"), conf.get("sasl.password")),
             (conf.get(newer + "id") or conf.get(oidc + "id"),
              conf.get(newer + "secret") or conf.get(oidc + "secret")))
    for user, secret in pairs:
        if user and secret:
            pair = f"{user}:{secret}"
            secrets += [pair, base64.b64encode(pair.encode()).decode()]
    for key, value in conf.items():
        # Credentials written into a URL-valued setting (an OIDC token endpoint's
        # `https://id:secret@idp/...`, review config19).
        if isinstance(value, str) and url_valued(key, value):
            secrets += url_credentials(value)
    return secrets


def url_valued(key: str, value: str) -> bool:
    """Whether a librdkafka setting's value is a URL that may hold credentials: one with a
    scheme, or a `*.url` setting written without one (`user:password@idp:8443/token`,
    which libcurl takes as http://; its password was shown, review "logsec52")."""
    return "://" in value or (key.endswith(".url") and "@" in value)


def url_credentials(url: str | None) -> list[str]:
    """The secrets of a URL's user info (a proxy's): the password, `user:password` and
    its Basic form, as a proxy echoing the request (`Proxy-Authorization: Basic …`)
    would show them."""
    if not url:
        return []
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        parts.port  # noqa: B018  (raises ValueError too, as `password` may)
        parts.password  # noqa: B018
    except ValueError:
        # Not a URL (`http://[bad:3128`): a proxy variable the worker does not use is not
        # refused at start-up, and raising here crashed `run` (review "diff55"). What
        # may be credentials is masked whole.
        if "@" not in url:
            return []
        info = url.split("://", 1)[-1].rsplit("@", 1)[0]
        return [url, info] if len(info) >= MIN_ALONE else [url]
    if not parts.password:
        if not parts.username:
            return []
        # A user name alone: an API key as the user (`http://KEY@proxy`, or `KEY:@` as
        # some proxy services spell it, review "secrets41"), sent as `Basic
        # base64("KEY:")`. check-config masked it; an echo of the request in a dead
        # letter or delete-users' output showed it (review "secrets34").
        user = urllib.parse.unquote(parts.username)
        pair = f"{user}:"
        forms = [pair, base64.b64encode(pair.encode()).decode()]
        return [user, *forms] if len(user) >= MIN_ALONE else forms
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password)
    pair = f"{user}:{password}"
    forms = [pair, base64.b64encode(pair.encode()).decode()]
    # The password alone only when it cannot be ordinary text: masking a 3-letter one in
    # every log line would garble them (an echo shows the pair or its Basic form anyway).
    return [password, *forms] if len(password) >= MIN_ALONE else forms


def _cut_edges(text: str, form: str) -> str:
    """Mask a piece of `form` left at the end (or start) of text that was truncated."""
    for size in range(min(len(form) - 1, len(text)), MIN_PARTIAL - 1, -1):
        if text.endswith(form[:size]):
            text = text[:-size] + MASK
            break
    for size in range(min(len(form) - 1, len(text)), MIN_PARTIAL - 1, -1):
        if text.startswith(form[-size:]):
            text = MASK + text[size:]
            break
    return text


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f",
                  "\n": "\\n", "\r": "\\r", "\t": "\\t"}


_HTML_ESCAPES = {"&": "amp;", "<": "lt;", ">": "gt;", '"': "quot;", "'": "apos;"}


def _hex(digits: str) -> str:
    """`digits` matched in either case (JSON and URL escapes allow both)."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in digits)


def _char_spellings(char: str) -> str:
    """A regex for one character of a secret as an encoder may write it: itself, a JSON
    ``\\uXXXX`` (a surrogate pair beyond the BMP), a short JSON escape (PHP's ``\\/``),
    or percent-encoded UTF-8 (``+`` for a space). The character itself comes last: tried
    first, a secret ending in ``\\`` matched the ``\\`` of its escape ``\\u005c`` and left
    ``u005c`` unmasked after the mask (hypothesis found it, round 43)."""
    spellings: list[str] = []
    code = ord(char)
    if code < 0x10000:
        spellings.append(r"\\u" + _hex(f"{code:04x}"))
    else:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        spellings.append(r"\\u" + _hex(f"{high:04x}") + r"\\u" + _hex(f"{low:04x}"))
    if char in _SHORT_ESCAPES:
        spellings.append(re.escape(_SHORT_ESCAPES[char]))
    spellings.append("".join("%" + _hex(f"{b:02x}")
                             for b in char.encode("utf-8", "surrogatepass")))
    if char == " ":
        spellings.append(r"\+")
    if char in _HTML_ESCAPES:
        # An HTML error page echoing the request (`&amp;` for `&`): the token was kept in
        # a dead letter's error body so (review "secrets55").
        spellings.append(f"&(?:{_HTML_ESCAPES[char]}|#0*{code};|#[xX]0*{_hex(f'{code:x}')};)")
    spellings.append(re.escape(char))
    return "(?:" + "|".join(spellings) + ")"


def _mixed_spellings(secrets: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for every secret with each character in any of its escaped spellings:
    encoders escape what they choose (PHP's json_encode writes ``/`` as ``\\/``, .NET's
    ``+`` as ``\\u002B``, a gateway percent-encodes some characters only), so the whole
    forms of `secret_forms` missed a token echoed so into a dead letter (review
    "replay35")."""
    unique = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not unique:
        return None
    # Long ones in any case too (`Redactor._folded`): an echo both escaped and case-changed.
    return re.compile("|".join(("(?i:{})" if _token_like(s) else "{}").format(
        "".join(_char_spellings(c) for c in s)) for s in unique))


MAX_ESCAPED_EDGE = 256
"""The longest secret whose cut pieces are looked for in escaped spellings too."""
_CUT_ESCAPE = (r"(?:(?:\\u[0-9a-fA-F]{4})?\\(?:u[0-9a-fA-F]{0,3})?"
               r"|(?:%[0-9a-fA-F]{2}){0,3}%[0-9a-fA-F]?|(?:%[0-9a-fA-F]{2}){1,3})?")
"""The start of the next character's escape, cut off with the text (`\\`, `\\u00`, `%2`,
`%C3` of `%C3%A9`): left after the masked piece it showed where the cut fell, and a piece
followed by it was not masked at all (review "dlq40")."""


def _mixed_edges(secrets: Iterable[str]) -> tuple[re.Pattern[str], re.Pattern[str]] | None:
    """Two regexes: a piece of a secret, at least MIN_PARTIAL of its characters each in any
    of `_char_spellings`, that ends the text (its start: the rest was cut off) and one
    that starts it (its end). `_cut_edges` knows the whole forms only: a token echoed
    percent-encoded or `\\u`-escaped across the cut of a body kept 17 of its 19
    characters in the exception and the dead letter (review "http40")."""
    ends: list[str] = []
    starts: list[str] = []
    # One nested group per character: Python's regex compiler recurses through them, and a
    # secret of ~500 characters raised RecursionError (a Kafka PEM key, review "diff40").
    # The long ones (keys, certificates) never travel to an HTTP server that could echo
    # them: their whole forms and `_cut_edges` cover them.
    fitting = {s for s in secrets if MIN_PARTIAL < len(s) <= MAX_ESCAPED_EDGE}
    for secret in sorted(fitting, key=len, reverse=True):
        chars = [_char_spellings(c) for c in secret]
        # A prefix: the first MIN_PARTIAL characters, then each further one while there
        # (never the whole: that is `_mixed`'s).
        tail = ""
        for spelled in reversed(chars[MIN_PARTIAL:-1]):
            tail = f"(?:{spelled}{tail})?"
        ends.append("".join(chars[:MIN_PARTIAL]) + tail)
        head = ""
        for spelled in chars[1:-MIN_PARTIAL]:
            head = f"(?:{head}{spelled})?"
        starts.append(head + "".join(chars[-MIN_PARTIAL:]))
    if not ends:
        return None
    return (re.compile("(?:" + "|".join(ends) + ")" + _CUT_ESCAPE + r"\Z"),
            re.compile(r"\A(?:" + "|".join(starts) + ")"))


_ENTITY = re.compile(r"&(?:#|amp;|lt;|gt;|quot;|apos;)", re.IGNORECASE)


def _entity(text: str) -> bool:
    """Whether `text` holds an HTML character reference `_char_spellings` knows: a bare
    `&` (a query string) need not run the escaped spellings' regex."""
    return "&" in text and _ENTITY.search(text) is not None


def _token_like(secret: str) -> bool:
    """Long, or holding a digit: no word of a log line in another case."""
    return len(secret) >= 12 or (len(secret) >= MIN_ALONE
                                 and any(c.isdigit() for c in secret))


class Redactor:
    """`redact` with the spellings worked out once (for the logging formatter's hot path)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        secrets = list(secrets)
        self.forms = secret_forms(secrets)
        self._mixed = _mixed_spellings(secrets)
        self._mixed_edges = _mixed_edges(secrets)
        # An echo that changed the case (a gateway lower-casing header values): only forms
        # that look like tokens, never ordinary text in another case (a proxy user named
        # `worker` masked "Worker" in every line, review "diff55").
        folded = [form for form in self.forms if _token_like(form)]
        self._folded_forms = [form.lower() for form in folded]
        self._folded = (re.compile("|".join(re.escape(form) for form in folded), re.IGNORECASE)
                        if folded else None)

    def __call__(self, text: str, *, edges: bool = True) -> str:
        if not text or not self.forms:
            return text
        if self._mixed is not None and ("\\" in text or "%" in text or _entity(text)):
            # Before the whole forms: the plain form of a secret ending in `\\` masked the
            # `\\` of its escape `\\u005c` and left `u005c` after the mask (round 43).
            text = self._mixed.sub(MASK, text)
        for _ in range(3):  # a mask may join what precedes it into a secret again
            before = text
            for form in self.forms:
                if form in text and form != MASK:
                    text = text.replace(form, MASK)
            if text == before:
                break
        if self._folded is not None:
            lowered = text.lower()
            if any(form in lowered for form in self._folded_forms):
                text = self._folded.sub(MASK, text)
        if edges:
            if self._mixed_edges is not None and ("\\" in text or "%" in text
                                                  or _entity(text)):
                # First: a plain piece inside an escaped one would be masked alone.
                end, start = self._mixed_edges
                text = end.sub(MASK, text, count=1)
                text = start.sub(MASK, text, count=1)
            for form in self.forms:
                text = _cut_edges(text, form)
        return text


def redact(text: str, secrets: Iterable[str], *, edges: bool = True) -> str:
    """`text` with every secret replaced by ***; with `edges`, also a fragment of one at
    either end (for text that was truncated, such as a response body)."""
    return Redactor(secrets)(text, edges=edges)
