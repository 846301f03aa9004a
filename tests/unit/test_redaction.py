"""Unit tests for consumer.redaction: the token never survives in stored or logged text."""

from __future__ import annotations

import html
import json
import urllib.parse

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from consumer.redaction import (
    MASK,
    MAX_ESCAPED_EDGE,
    MIN_PARTIAL,
    Redactor,
    redact,
    secret_forms,
)

TOKEN = "wt_9f8e7d6c5b4a3210"


@pytest.mark.parametrize("spelling", [
    TOKEN,
    f"Token {TOKEN}",
    json.dumps({"headers": {"authorization": f"Token {TOKEN}"}}),
    urllib.parse.quote(f"Token {TOKEN}+x/y", safe=""),
])
def test_every_spelling_of_the_token_is_masked(spelling: str) -> None:
    out = redact(f"echo: {spelling} end", [TOKEN])
    assert TOKEN not in out
    assert MASK in out
    assert out.startswith("echo: ") and out.endswith(" end")


def test_escaped_spellings_of_an_odd_secret() -> None:
    odd = 'a"b\\c/é+d e'
    text = json.dumps({"auth": odd}) + " " + urllib.parse.quote_plus(odd, safe="")
    out = redact(text, [odd])
    for form in secret_forms([odd]):
        assert form not in out
    assert out.count(MASK) == 2


def test_a_fragment_cut_off_at_either_end_is_masked() -> None:
    body = '{"echo":"Authorization: Token ' + TOKEN
    cut = body[:-7]  # truncated upstream in the middle of the token
    out = redact(cut, [TOKEN])
    assert out.endswith(MASK)
    assert TOKEN[:5] not in out
    assert redact(TOKEN[6:] + '" rest', [TOKEN]) == MASK + '" rest'


def test_short_edge_fragments_and_other_text_are_left_alone() -> None:
    assert redact("ends with wt_", [TOKEN]) == "ends with wt_"  # 3 chars: ordinary text
    assert redact("nothing secret here", [TOKEN]) == "nothing secret here"
    assert redact("anything", []) == "anything"
    assert redact("anything", [""]) == "anything"


def test_logs_mode_does_not_touch_edges() -> None:
    redactor = Redactor([TOKEN])
    assert redactor("x " + TOKEN[:8], edges=False) == "x " + TOKEN[:8]
    assert redactor("x " + TOKEN, edges=False) == "x " + MASK


def test_the_longest_spelling_wins() -> None:
    assert redact("Token abcd1234", ["abcd1234", "Token abcd1234"]) == MASK


def test_url_credentials_are_the_password_the_pair_and_its_basic_form() -> None:
    from consumer.redaction import url_credentials

    assert url_credentials("http://al%40ice:p%2Fw0rd@proxy:3128") == [
        "p/w0rd", "al@ice:p/w0rd", "YWxAaWNlOnAvdzByZA=="]
    # Too short to mask alone (it would garble ordinary text): the pair and its Basic form.
    assert url_credentials("http://u:pw@proxy:3128") == ["u:pw", "dTpwdw=="]
    assert url_credentials("http://proxy:3128") == []
    assert url_credentials(None) == []
    # A user name alone (an API key as the user, review "secrets34"): it, and the
    # `KEY:` pair Basic auth sends.
    assert url_credentials("http://PROXYapikey9999@proxy:3128") == [
        "PROXYapikey9999", "PROXYapikey9999:", "UFJPWFlhcGlrZXk5OTk5Og=="]
    assert url_credentials("http://bob@proxy:3128") == ["bob:", "Ym9iOg=="]
    # ... spelled with an empty password, `KEY:@` (review "secrets41"): the same.
    assert url_credentials("http://PROXYapikey9999:@proxy:3128") == [
        "PROXYapikey9999", "PROXYapikey9999:", "UFJPWFlhcGlrZXk5OTk5Og=="]


def test_registry_user_info_of_a_key_alone_masks_the_key() -> None:
    """SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=`KEY:` (an API key as the user): the key was
    masked only beside its colon (review "secrets41")."""
    from consumer.redaction import registry_secrets

    assert "REGkey0123456789" in registry_secrets(None, "REGkey0123456789:")
    assert "p4ssw0rd-long" in registry_secrets(None, "user:p4ssw0rd-long")
    assert "user" not in registry_secrets(None, "user:p4ssw0rd-long")


def test_lowercase_percent_escapes_are_masked_too() -> None:
    """A gateway echoing the token into a redirect's Location with lowercase escapes
    (`%2b`, valid URL encoding) put it into /readyz and the logs."""
    secret = "k3Y+pQ/9zA=="
    for quoted in (urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret, safe="")):
        lower = quoted.replace("%2B", "%2b").replace("%2F", "%2f").replace("%3D", "%3d")
        out = redact(f"Location: https://sso.example/?auth={lower}&x=1", [secret])
        assert lower not in out and "auth=***&x=1" in out


def test_kafka_secrets_mask_secret_parts_not_every_word_of_the_oauthbearer_config() -> None:
    """Review diff18b: every part of sasl.oauthbearer.config was masked, `scope=openid`'s
    value included: "openid" (or "consumer") became *** in every log line."""
    from consumer.redaction import kafka_secrets

    keys = {"sasl.oauthbearer.config", "sasl.password"}
    plain = kafka_secrets({"sasl.oauthbearer.config": "principal=consumer scope=openid"}, keys)
    assert "openid" not in plain and "consumer" not in plain
    assert redact("scope openid for consumer", plain) == "scope openid for consumer"
    secret = kafka_secrets({"sasl.oauthbearer.config":
                            "principal=admin client_secret=S3CR3T-OAUTH-abc"}, keys)
    assert "S3CR3T-OAUTH-abc" in secret and "admin" not in secret
    short = kafka_secrets({"sasl.username": "svc", "sasl.password": "pw1"}, keys)
    assert "pw1" not in short and "svc:pw1" in short


@pytest.mark.parametrize("config", [
    "principal=svc lifeSeconds=3600 SEKRIT-XYZ-96", "principal=svc pwd:SEKRIT-XYZ-95",
    "principal=svc  scope=a\tSEKRIT-XYZ-94 "])
def test_the_rest_of_an_oauthbearer_config_librdkafka_cannot_parse_is_masked(
        config: str) -> None:
    """Review "secrets49": librdkafka quotes a value it cannot parse from the part it
    stopped at ("Unrecognized sasl.oauthbearer.config beginning at: ..."); a bare word or a
    `name:value` part was shown as written, in `run`'s refusal and check-config's."""
    from consumer.redaction import kafka_secrets

    secrets = kafka_secrets({"sasl.oauthbearer.config": config}, {"sasl.oauthbearer.config"})
    for start in range(1, len(config.split())):
        rest = config[config.index(config.split()[start]):].rstrip()
        line = ("Failed to acquire SASL OAUTHBEARER token: Unrecognized "
                f"sasl.oauthbearer.config beginning at: {rest}")
        assert "SEKRIT" not in redact(line, secrets), line


def test_a_mask_joining_what_precedes_it_into_the_secret_is_masked_again() -> None:
    """Review prop18: one pass left "hunter2***" of "hunter2hunter2***"."""
    out = redact("x-hunter2hunter2***", ["hunter2***"])
    assert "hunter2***" not in out
    assert redact(out, ["hunter2***"]) == out


def test_a_secret_echoed_with_some_characters_escaped_is_masked() -> None:
    """Review replay35: PHP's json_encode writes "/" as "\\/" and .NET's encoder "+" as
    "\\u002B"; a gateway echoing the Authorization header so put the token into a dead
    letter's `userpilot.error.body`."""
    token = "Sandbox/write+Token99"
    php = '{"echo":{"authorization":"Token Sandbox\\/write+Token99"}}'
    dotnet = '{"echo":{"authorization":"Token Sandbox\\/write\\u002BToken99"}}'
    partly_encoded = "location: /x?t=Sandbox%2fwrite%2BToken99&y=1"
    for text in (php, dotnet, partly_encoded):
        assert "Token99" not in redact(text, [token]), text
    assert redact(dotnet, [token]) == '{"echo":{"authorization":"Token ***"}}'
    # Text with backslashes or percent signs but no secret is left as it is.
    assert redact("C:\\dir 50% off \\u002B", [token]) == "C:\\dir 50% off \\u002B"


_SPELLINGS = st.sampled_from(["raw", "json_u", "json_U", "percent", "percent_lower", "short"])


def _spelled(char: str, how: str) -> str:
    code = ord(char)
    if how.startswith("json") and code < 0x10000:
        escape = f"\\u{code:04x}"
        return escape.upper().replace("\\U", "\\u") if how == "json_U" else escape
    if how.startswith("percent"):
        encoded = "".join(f"%{b:02X}" for b in char.encode())
        return encoded.lower() if how == "percent_lower" else encoded
    if how == "short" and char == "/":
        return "\\/"
    return char


@given(secret=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=6,
                      max_size=24),
       hows=st.lists(_SPELLINGS, min_size=24, max_size=24),
       before=st.text(max_size=8), after=st.text(max_size=8))
def test_any_mix_of_escaped_characters_is_masked(secret: str, hows: list[str], before: str,
                                                 after: str) -> None:
    echoed = "".join(_spelled(c, how) for c, how in zip(secret, hows, strict=False))
    text = f"{before}\x00{echoed}\x00{after}"
    assert echoed not in redact(text, [secret], edges=False)


@given(secret=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=6,
                      max_size=24),
       hows=st.lists(_SPELLINGS, min_size=24, max_size=24),
       keep=st.integers(min_value=MIN_PARTIAL, max_value=23),
       other=st.text(alphabet="<> ", max_size=8))
def test_a_piece_of_an_escaped_secret_cut_off_at_either_end_is_masked(
        secret: str, hows: list[str], keep: int, other: str) -> None:
    """Review http40: a token echoed percent-encoded or `\\u`-escaped across the cut of a
    body kept all but its last characters (the whole forms only were looked for at the
    cut): any piece of MIN_PARTIAL characters or more, spelled any way, is masked."""
    assume(not set(secret) & set("<> "))  # the rest of the text holds none of it
    keep = min(keep, len(secret) - 1)
    spelled = [_spelled(c, how) for c, how in zip(secret, hows, strict=False)]
    head, tail = "".join(spelled[:keep]), "".join(spelled[len(secret) - keep:])
    assert redact(f"{other}\x00{head}", [secret]) == f"{other}\x00{MASK}"
    assert redact(f"{tail}\x00{other}", [secret]) == f"{MASK}\x00{other}"


def test_a_short_piece_of_an_escaped_secret_at_an_edge_is_left_alone() -> None:
    token = "Sandbox/write+Token99"
    assert redact("x %53%61%6E", [token]) == "x %53%61%6E"  # 3 characters: ordinary text
    assert redact("x %53%61%6E%64", [token]) == "x " + MASK


@pytest.mark.parametrize("cut", ["\\", "\\u", "\\u0", "\\u00", "\\u002", "%", "%2", "%C3",
                                 "%C3%"])
def test_a_piece_cut_inside_the_next_escape_is_masked(cut: str) -> None:
    """Review dlq40: a body cut inside an escape (PHP writes "/" as "\\/", .NET "+" as
    "\\u002B") left the escaped secret's piece in front of it unmasked: 31 of the 32
    characters of a proxy's Basic credentials in a dead letter."""
    token = "wt_9f8e7d6c+5b4a3210"
    out = redact('{"authorization":"Token wt_9f8e7d6c' + cut, [token])
    assert "9f8e" not in out
    assert out == '{"authorization":"Token ' + MASK


def test_a_cut_escape_alone_is_left_alone() -> None:
    assert redact("50% off \\", ["wt_9f8e7d6c+5b4a3210"]) == "50% off \\"


def test_a_secret_of_kilobytes_is_masked_and_builds_no_runaway_pattern() -> None:
    """Review diff40: one nested group per character for the escaped cut pieces raised
    RecursionError at ~500 characters: a Kafka PEM key (~1.7 KB) stopped `run` as its
    logging was set up."""
    pem = "-----BEGIN PRIVATE KEY-----\n" + "MIIEv" * 400 + "\n-----END PRIVATE KEY-----"
    redactor = Redactor([pem, TOKEN])
    assert redactor(f"x {pem} y") == f"x {MASK} y"
    assert redactor("cut: " + pem[:300]) == "cut: " + MASK  # its plain piece at the cut
    longest = "k" * MAX_ESCAPED_EDGE  # the longest whose escaped pieces are looked for
    assert redact("x " + "%6B" * (MAX_ESCAPED_EDGE - 2), [longest]) == "x " + MASK


def test_a_secret_ending_in_a_backslash_spelled_as_its_escape_is_masked_whole() -> None:
    """Hypothesis, round 43: the raw `\\` was tried before its `\\u005c` spelling, so the
    piece's mask ended inside the escape and `u005c` was left after it."""
    secret = "00000000\\"
    assert redact("00000000\\u005c\x00", [secret]) == f"{MASK}\x00"
    assert redact("0000\\u005c\x00", [secret]) == f"{MASK}\x00"  # its end, the rest cut off


def test_a_secret_echoed_html_escaped_or_in_another_case_is_masked() -> None:
    """Review "secrets55": an HTML 400 page echoing the request kept `Token
    TOKEN&amp;SECRET&lt;7a9f&gt;` in the dead letter's error body and delete-users' output,
    and a gateway lower-casing it `token token&secret<7a9f>`."""
    token = "TOKEN&SECRET<7a9f>'\""
    masked = Redactor([token])
    for echo in (html.escape(token), html.escape(token, quote=False), token.lower(),
                 token.upper(), "TOKEN&#38;SECRET&#x3C;7a9f&#62;'\""):
        assert masked(f"<p>Token {echo} refused</p>") == "<p>Token *** refused</p>", echo
    assert masked("fish &amp; chips") == "fish &amp; chips"
    assert Redactor(["abc"])("ABC abc") == "ABC ***", "a short one is not case-folded"
    assert Redactor(["worker:"])("consumer.Worker: Worker started; worker: 3") == (
        "consumer.Worker: Worker started; *** 3"), "nor a word (review diff55)"


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=6,
               max_size=40))
def test_any_ascii_secret_html_escaped_or_case_changed_leaves_nothing(secret: str) -> None:
    """In another case only when it looks like a token (12 characters, or a digit among
    6 or more): a proxy user `worker` masked "Worker" in every line (review "diff55")."""
    masked = Redactor([secret])
    assert masked(f"said: {html.escape(secret)}.") == "said: ***."
    if len(secret) >= 12 or any(c.isdigit() for c in secret):
        for echo in (secret.swapcase(), html.escape(secret.upper())):
            assert masked(f"said: {echo}.") == "said: ***.", echo
    elif secret.swapcase() != secret:
        assert masked(f"said: {secret.swapcase()}.") == f"said: {secret.swapcase()}."
