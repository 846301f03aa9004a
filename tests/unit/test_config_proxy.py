"""Which proxy the environment names for Userpilot (`environment_proxy`), and the proxies
start-up refuses (`load_settings`: check-config refuses them first)."""

from __future__ import annotations

import pytest

from consumer.config import environment_proxy, load_settings, redact_userinfo
from consumer.delivery import UserpilotClient
from consumer.errors import ConfigError

TRACK = "https://analytex.userpilot.io/v1/track"
BASE = {"USERPILOT_API_KEY": "wt_1234567890", "USERPILOT_ANALYTICS_ENDPOINT":
        "analytex.userpilot.io", "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "KAFKA_TOPICS": "events", "SCHEMA_REGISTRY_URL": "http://registry:8081"}


def test_no_variables_no_proxy() -> None:
    assert environment_proxy(TRACK, {}) is None


@pytest.mark.parametrize(("url", "expected"), [
    (TRACK, ("HTTPS_PROXY", "http://secure:3128")),
    ("http://sandbox:8080/v1/track", ("HTTP_PROXY", "http://plain:3128")),
])
def test_the_proxy_follows_the_scheme(url: str, expected: tuple[str, str]) -> None:
    env = {"HTTPS_PROXY": "http://secure:3128", "HTTP_PROXY": "http://plain:3128"}
    assert environment_proxy(url, env) == expected


def test_all_proxy_serves_either_scheme_and_yields_to_the_scheme_s_own() -> None:
    assert environment_proxy(TRACK, {"ALL_PROXY": "http://every:3128"}) == (
        "ALL_PROXY", "http://every:3128")
    both = {"ALL_PROXY": "http://every:3128", "HTTPS_PROXY": "http://secure:3128"}
    assert environment_proxy(TRACK, both) == ("HTTPS_PROXY", "http://secure:3128")
    # an empty HTTPS_PROXY names no proxy: ALL_PROXY applies
    assert environment_proxy(TRACK, {**both, "HTTPS_PROXY": " "}) == (
        "ALL_PROXY", "http://every:3128")


def test_lower_case_wins_and_a_bare_host_is_an_http_proxy() -> None:
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "lower:3128"}
    assert environment_proxy(TRACK, env) == ("https_proxy", "http://lower:3128")


def test_an_empty_lower_case_variable_counts_as_unset_as_curl_reads_it() -> None:
    """`https_proxy=` beside `HTTPS_PROXY=...` hid the proxy, and `no_proxy=` beside
    `NO_PROXY=host` the bypass (Python's rule, not curl's; review "http33")."""
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": ""}
    assert environment_proxy(TRACK, env) == ("HTTPS_PROXY", "http://upper:3128")
    bypass = {**env, "NO_PROXY": "userpilot.io", "no_proxy": " "}
    assert environment_proxy(TRACK, bypass) is None


@pytest.mark.parametrize(("no_proxy", "bypassed"), [
    ("analytex.userpilot.io", True),
    ("userpilot.io", True),  # a domain covers its subdomains
    (".userpilot.io", True),
    ("other.com, userpilot.io", True),
    (" , userpilot.io ,", True),
    ("other.com userpilot.io", True),  # blanks part entries, as curl reads them
    ("other.com\tanalytex.userpilot.io", True),
    ("*", True),
    ("ANALYTEX.userpilot.io", True),
    ("pilot.io", False),  # a suffix of the name, not a domain above it
    ("other.com", False),
    ("analytex.userpilot.io:443", False),  # a port matches only a URL naming it
    ("", False),
])
def test_no_proxy(no_proxy: str, bypassed: bool) -> None:
    """Against the URL the worker builds (`Settings.track_url`: no port)."""
    settings = load_settings({**BASE, "NO_PROXY": no_proxy}, check_clients=False)
    env = {"HTTPS_PROXY": "http://secure:3128", "NO_PROXY": no_proxy}
    got = environment_proxy(settings.track_url, env)
    assert got == (None if bypassed else ("HTTPS_PROXY", "http://secure:3128"))


@pytest.mark.parametrize(("url", "no_proxy", "bypassed"), [
    ("http://10.1.2.3:8080/v1/track", "10.0.0.0/8", True),
    ("http://10.1.2.3:8080/v1/track", "10.1.2.3/8", True),  # host bits set: the same network
    ("http://10.1.2.3:8080/v1/track", "other.svc, 10.1.0.0/16", True),
    ("http://10.1.2.3:8080/v1/track", "10.1.2.3/32", True),
    ("http://10.1.2.3:8080/v1/track", "192.168.0.0/16", False),
    ("http://10.1.2.3:8080/v1/track", "10.1.2.4", False),
    ("http://[fd00::5]:8080/v1/track", "fd00::/8", True),
    ("http://[fd00::5]:8080/v1/track", "[fd00::/8]", True),
    ("http://[fd00::5]:8080/v1/track", "fd00:0:0::5", True),  # the same address, spelled out
    ("http://[fd00::5]:8080/v1/track", "fe80::/10", False),
    ("http://[fd00::5]:8080/v1/track", "10.0.0.0/8", False),  # another family
    ("https://analytex.userpilot.io/v1/track", "0.0.0.0/0", False),  # a name is no address
    ("http://10.1.2.3:8080/v1/track", "10.0.0.0/99, not/a/net", False),
])
def test_no_proxy_networks_hold_addresses(url: str, no_proxy: str, bypassed: bool) -> None:
    """CIDR entries, as curl (7.86+), Go and requests read them: a cluster's NO_PROXY
    commonly lists its networks, and a Userpilot stand-in addressed by IP sat behind the
    proxy with them."""
    env = {"ALL_PROXY": "http://every:3128", "NO_PROXY": no_proxy}
    assert (environment_proxy(url, env) is None) is bypassed


def test_no_proxy_with_a_port_matches_a_url_naming_it() -> None:
    env = {"HTTP_PROXY": "http://plain:3128", "NO_PROXY": "sandbox:8080"}
    assert environment_proxy("http://sandbox:8080/v1/track", env) is None
    assert environment_proxy("http://sandbox:9090/v1/track", env) == (
        "HTTP_PROXY", "http://plain:3128")


@pytest.mark.parametrize(("url", "shown"), [
    ("http://alice:s3cret@proxy.corp:3128", "http://***@proxy.corp:3128"),
    ("http://alice:p@ss@proxy.corp:3128", "http://***@proxy.corp:3128"),
    ("http://proxy.corp:3128", "http://proxy.corp:3128"),
    ("proxy.corp:3128", "proxy.corp:3128"),
    ("alice:pw@proxy.corp:3128", "***@proxy.corp:3128"),  # no scheme: still redacted
    # Review "secrets49": a query or fragment (where a token may be pasted) was echoed.
    ("http://u:p@reg:8081?k=RG-q", "http://***@reg:8081?***"),
    ("http://reg:8081/x#RG-frag", "http://reg:8081/x#***"),
    ("http://u:p?x@h/a?b#c", "http://***@h/a?***"),
])
def test_redact_userinfo_hides_everything_up_to_the_last_at(url: str, shown: str) -> None:
    assert redact_userinfo(url) == shown


def test_an_unencoded_slash_in_the_password_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "HTTPS_PROXY": "http://alice:pa/ss@proxy.corp:3128"},
                      check_clients=False)
    message = str(caught.value)
    assert "percent-encode" in message
    assert "pa/ss" not in message and "alice" not in message


def test_a_password_with_an_at_sign_is_used_and_never_shown() -> None:
    settings = load_settings({**BASE, "HTTPS_PROXY": "http://alice:p@ss@proxy.corp:3128"},
                             check_clients=False)
    assert settings.proxy is not None
    shown = settings.describe()["userpilot"]["proxy"]
    assert shown == "http://***@proxy.corp:3128"
    client = UserpilotClient(TRACK, {"Authorization": "Token t"}, timeout_s=5,
                             max_connections=2, proxy=settings.proxy.reveal())
    assert client.proxy is not None
    assert client.proxy.headers["Authorization"] == "Basic YWxpY2U6cEBzcw=="  # alice:p@ss


def test_settings_carry_the_proxy_as_a_secret_and_describe_it_redacted() -> None:
    settings = load_settings({**BASE, "HTTPS_PROXY": "http://alice:s3cret@proxy.corp:3128"},
                             check_clients=False)
    assert settings.proxy is not None
    assert settings.proxy.reveal() == "http://alice:s3cret@proxy.corp:3128"
    assert "s3cret" not in repr(settings)
    assert settings.describe()["userpilot"]["proxy"] == "http://***@proxy.corp:3128"


@pytest.mark.parametrize("proxy", ["socks5://proxy.corp:1080", "http://proxy.corp:99999",
                                   "http://:3128", "ftp://proxy.corp"])
def test_a_proxy_the_client_cannot_use_stops_start_up(proxy: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "HTTPS_PROXY": proxy}, check_clients=False)
    assert "HTTPS_PROXY=" in str(caught.value)


@pytest.mark.parametrize("proxy", ["socks5://proxy.corp:1080", "http://proxy.corp:31x8",
                                   "http://puser:PROXYPASS77/x@proxy.corp:3128"])
def test_the_schema_registry_s_proxy_is_checked_too(proxy: str) -> None:
    """Userpilot over https, the registry over http: HTTP_PROXY served the registry's
    client only and was never checked; `run` crashed with a traceback at start-up, one
    of them quoting the proxy's password."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "HTTP_PROXY": proxy}, check_clients=False)
    text = str(caught.value)
    assert "HTTP_PROXY" in text and "the schema registry" in text
    assert "PROXYPASS77" not in text


def test_a_proxy_both_use_is_reported_once() -> None:
    env = {**BASE, "SCHEMA_REGISTRY_URL": "https://registry:8081",
           "HTTPS_PROXY": "socks5://proxy.corp:1080"}
    with pytest.raises(ConfigError) as caught:
        load_settings(env, check_clients=False)
    assert str(caught.value).count("HTTPS_PROXY=") == 1


def test_a_bypassed_proxy_is_not_checked() -> None:
    """A SOCKS proxy set for other tools in the pod is fine when NO_PROXY covers Userpilot."""
    settings = load_settings({**BASE, "HTTPS_PROXY": "socks5://proxy.corp:1080",
                              "NO_PROXY": "userpilot.io"}, check_clients=False)
    assert settings.proxy is None


def test_the_client_reports_its_proxy_without_credentials() -> None:
    client = UserpilotClient(TRACK, {"Authorization": "Token t"}, timeout_s=5,
                             max_connections=2, proxy="http://alice:s3cret@proxy.corp:3128")
    assert client.proxy is not None
    assert str(client.proxy.url) == "http://proxy.corp:3128"
    assert client.proxy.auth is None  # sent as a header, not aiohttp's deprecated proxy_auth
    assert "s3cret" not in repr(client.proxy) and "YWxpY2U6czNjcmV0" not in repr(client.proxy)
    assert client.proxy.headers["Authorization"] == "Basic YWxpY2U6czNjcmV0"


@pytest.mark.parametrize("extra", [
    {"HTTPS_PROXY": "socks5://proxy.corp:1080", "NO_PROXY": "userpilot.io"},
    {"NO_PROXY": "localhost,127.0.0.1,[::1],.svc"},
    {"NO_PROXY": "localhost,intranet.bücher.de"},
])
def test_the_registry_client_reads_only_the_proxy_named_for_it(
        extra: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's own reading of the environment (`trust_env`) parsed every proxy variable and
    NO_PROXY entry, used or not: each of these passed check-config, and `run` crashed
    building the registry's client (review "cmds17"). It is given its proxy instead."""
    from consumer.registry import Registry

    settings = load_settings({**BASE, **extra}, check_clients=False)
    assert settings.registry_proxy is None
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    Registry(settings.registry_url, proxy=None)  # raised ImportError / InvalidURL


def test_the_registry_gets_the_proxy_the_environment_names_for_it() -> None:
    settings = load_settings({**BASE, "HTTP_PROXY": "http://bob:pw@proxy.corp:3128"},
                             check_clients=False)
    assert settings.registry_proxy is not None
    assert settings.registry_proxy.reveal() == "http://bob:pw@proxy.corp:3128"
    assert "pw@" not in repr(settings)
    bypassed = load_settings({**BASE, "HTTP_PROXY": "http://proxy.corp:3128",
                              "NO_PROXY": "registry"}, check_clients=False)
    assert bypassed.registry_proxy is None


@pytest.mark.parametrize("proxy", ["http://u:pw@10.0.0.256:3128", "http://u:pw@[2001:db8::1:3128"])
def test_a_proxy_only_the_http_client_would_refuse_is_refused(proxy: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "HTTPS_PROXY": proxy}, check_clients=False)
    text = str(caught.value)
    assert "HTTPS_PROXY=" in text and "pw" not in text


@pytest.mark.parametrize("no_proxy", ["localhost,127.0.0.1,::1", "[::1]", " ::1 "])
def test_no_proxy_names_an_ipv6_registry_with_or_without_brackets(no_proxy: str) -> None:
    """curl matches `::1` for http://[::1]:8081; httpx's own reading did too, before the
    registry's proxy was resolved here (review "diff17")."""
    env = {"HTTP_PROXY": "http://proxy.corp:3128", "NO_PROXY": no_proxy}
    assert environment_proxy("http://[::1]:8081/apis", env) is None
    assert environment_proxy("http://[::2]:8081/apis", env) is not None


@pytest.mark.parametrize("proxy", ["http://u:%E2%82%ACuro99@proxy.corp:3128",
                                   "http://u:€uro99@proxy.corp:3128",
                                   "http://j%C3%BCrgen:pw@proxy.corp:3128"])
def test_a_proxy_credential_outside_ascii_stops_start_up(proxy: str) -> None:
    """Review secrets34: aiohttp writes proxy credentials in Latin-1. A "€" failed every
    request before it left ("unusable answer from Userpilot", the partition stuck, the pod
    ready); an "ä" went out as other bytes than delete-users' UTF-8. Refused, unshown."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "HTTPS_PROXY": proxy}, check_clients=False)
    text = str(caught.value)
    assert "outside ASCII" in text and "HTTPS_PROXY=http://***@proxy.corp:3128" in text
    assert "uro99" not in text and "rgen" not in text
    # Only Userpilot's client is affected: a registry-only proxy (UTF-8, httpx) is taken.
    settings = load_settings({**BASE, "SCHEMA_REGISTRY_URL": "http://registry:8081",
                              "HTTP_PROXY": proxy}, check_clients=False)
    assert settings.proxy is None


def _refusals(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, **env})
    return str(info.value)


def test_a_proxy_user_holding_a_colon_is_refused_up_front() -> None:
    """Review http35: `us%3Aer` passed check-config; aiohttp then refused every request
    before it left (Basic authentication cannot carry a ':' in the user)."""
    said = _refusals(HTTPS_PROXY="http://us%3Aer:s3cr3t-pw@proxy:3128")
    assert "holds ':' (written %3A), which Basic authentication cannot carry" in said
    assert "s3cr3t-pw" not in said
    # In the password it is fine.
    load_settings({**BASE, "HTTPS_PROXY": "http://user:p%3Aw@proxy:3128"})


@pytest.mark.parametrize("password", ["Se#Kr1t-pw", "Se?Kr1t-pw", "Se/Kr1t-pw"])
def test_a_proxy_password_with_a_character_that_ends_the_address_is_named_not_shown(
        password: str) -> None:
    """Review config35: a "#" in the password was reported as a port that is not a number;
    and the message quoted the URL, whose password the parser could not mask."""
    said = _refusals(HTTP_PROXY=f"http://user:{password}@proxy:3128")
    assert "percent-encode it" in said and "# as %23" in said
    assert "Kr1t-pw" not in said


@pytest.mark.parametrize("name", ["redis_url", "kafka_security_protocol", "kafka_dlq_topic"])
def test_a_lower_case_setting_of_ours_is_refused(name: str) -> None:
    """Review config35: `redis_url` and `kafka_security_protocol` were ignored without a
    word: the worker ran without Redis and in plaintext."""
    said = _refusals(**{name: "redis://r:6379/0" if name == "redis_url" else "x"})
    assert f"{name} is not a setting of this worker: names are upper case; write " \
        f"{name.upper()}" in said


@pytest.mark.parametrize(("extra", "noted"), [
    ({"HTTP_PROXY": "http://alice:s3cret@proxy.corp:3128"}, True),
    ({"http_proxy": "proxy.corp:3128"}, True),
    ({"HTTP_PROXY": "http://proxy.corp:3128", "HTTPS_PROXY": "http://proxy.corp:3128"}, False),
    ({"HTTP_PROXY": "http://proxy.corp:3128", "ALL_PROXY": "http://proxy.corp:3128"}, False),
    ({"HTTP_PROXY": "http://proxy.corp:3128", "NO_PROXY": ".userpilot.io"}, False),
    ({"HTTP_PROXY": "  "}, False),
    ({}, False),
])
def test_an_http_proxy_alone_is_noted_as_not_serving_userpilot(
        extra: dict[str, str], noted: bool) -> None:
    """Round 59's "noticed": HTTP_PROXY alone serves http:// URLs only, so an https://
    Userpilot was reached directly; behind an egress proxy every request failed on a
    connection error while the variable seemed to name the way out. A note (check-config
    prints it, `run` logs it), without the proxy's credentials."""
    settings = load_settings({**BASE, **extra}, check_clients=False)
    notes = [n for n in settings.notes if "HTTPS_PROXY is not" in n]
    assert bool(notes) is noted, settings.notes
    if noted:
        assert "reached directly" in notes[0] and "https://analytex.userpilot.io" in notes[0]
        assert "add analytex.userpilot.io to NO_PROXY" in notes[0]
        # Not "unset HTTP_PROXY": BASE's http:// registry is reached through it (diff60).
        assert "unset" not in notes[0]
        assert "s3cret" not in notes[0]


def test_an_http_proxy_alone_is_not_noted_for_a_plain_http_endpoint() -> None:
    """`USERPILOT_INSECURE_HTTP=true` (the sandbox): HTTP_PROXY does serve an http:// URL."""
    settings = load_settings({**BASE, "USERPILOT_ANALYTICS_ENDPOINT": "localhost:8080",
                              "USERPILOT_INSECURE_HTTP": "true",
                              "HTTP_PROXY": "http://proxy.corp:3128"}, check_clients=False)
    assert not [n for n in settings.notes if "HTTPS_PROXY is not" in n]
    assert settings.proxy is not None
