"""Which proxy the environment names for the Userpilot endpoint (`environment_proxy`)."""

from __future__ import annotations

import pytest

from consumer.delivery import UserpilotClient, environment_proxy

VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
        "all_proxy", "no_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARS:
        monkeypatch.delenv(name, raising=False)


def test_no_variables_no_proxy() -> None:
    assert environment_proxy("https://analytex.userpilot.io/v1/track") is None


@pytest.mark.parametrize(("url", "expected"), [
    ("https://analytex.userpilot.io/v1/track", "http://secure:3128"),
    ("http://sandbox:8080/v1/track", "http://plain:3128"),
])
def test_the_proxy_follows_the_scheme(monkeypatch: pytest.MonkeyPatch, url: str,
                                      expected: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain:3128")
    assert environment_proxy(url) == expected


def test_all_proxy_serves_either_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "http://every:3128")
    assert environment_proxy("https://analytex.userpilot.io/v1/track") == "http://every:3128"
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:3128")
    assert environment_proxy("https://analytex.userpilot.io/v1/track") == "http://secure:3128"


def test_lower_case_wins_and_a_bare_host_is_an_http_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:3128")
    monkeypatch.setenv("https_proxy", "lower:3128")
    assert environment_proxy("https://analytex.userpilot.io/v1/track") == "http://lower:3128"


@pytest.mark.parametrize(("no_proxy", "bypassed"), [
    ("analytex.userpilot.io", True),
    ("userpilot.io", True),  # a domain covers its subdomains
    (".userpilot.io", True),
    ("other.com, userpilot.io", True),
    ("*", True),
    ("analytex.userpilot.io:443", True),
    ("pilot.io", False),  # a suffix of the name, not a domain above it
    ("other.com", False),
    ("", False),
])
def test_no_proxy(monkeypatch: pytest.MonkeyPatch, no_proxy: str, bypassed: bool) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    got = environment_proxy("https://analytex.userpilot.io:443/v1/track")
    assert got == (None if bypassed else "http://secure:3128")


def test_the_client_reports_its_proxy_without_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://alice:s3cret@proxy.corp:3128")
    client = UserpilotClient("https://analytex.userpilot.io/v1/track",
                             {"Authorization": "Token t"}, timeout_s=5, max_connections=2)
    assert client.proxy is not None
    assert str(client.proxy.url) == "http://proxy.corp:3128"
    assert client.proxy.auth == ("alice", "s3cret")
