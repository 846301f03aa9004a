from __future__ import annotations

import pytest

from consumer.sandbox.auth import AuthResult, TokenSet, fingerprint
from consumer.sandbox.errors import Problem

TOKENS = TokenSet(write=["w1", "w2"], read=["r1"])


def test_write_tokens_pass_with_their_fingerprint() -> None:
    assert TOKENS.check("Token w1") == AuthResult(fingerprint("w1"))
    assert TOKENS.check("Token w2") == AuthResult(fingerprint("w2"))


def test_read_token_is_403() -> None:
    result = TOKENS.check("Token r1")
    assert isinstance(result, Problem)
    assert (result.status, result.error_code) == (403, "read_token_not_allowed")


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_token"),
        ("", "missing_token"),
        ("Bearer w1", "malformed_token"),
        ("Token", "malformed_token"),
        ("Token ", "malformed_token"),
        ("w1", "malformed_token"),
        ("Token nope", "invalid_token"),
    ],
)
def test_missing_malformed_or_unknown_is_401(header: str | None, code: str) -> None:
    result = TOKENS.check(header)
    assert isinstance(result, Problem)
    assert (result.status, result.error_code) == (401, code)


def test_fingerprint_is_stable_and_hides_the_token() -> None:
    assert fingerprint("w1") == fingerprint("w1")
    assert fingerprint("w1") != fingerprint("w2")
    assert fingerprint("w1").startswith("sha256:")
    assert len(fingerprint("w1")) == len("sha256:") + 12
    assert "w1" not in fingerprint("w1")


def test_ids_are_fingerprints_only() -> None:
    assert TOKENS.write_ids == sorted([fingerprint("w1"), fingerprint("w2")])
    assert TOKENS.read_ids == [fingerprint("r1")]
