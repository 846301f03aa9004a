"""Unit tests for the optional Redis settings (issue 12): URL checks, TLS, secret hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import certifi
import pytest

from consumer.config import ENV_VARS, REDIS_ENV_VARS, RedisSettings, Secret, load_settings
from consumer.errors import ConfigError
from tests.unit.test_config import BASE, load, problem

PASSWORD = "r3dis-s3cret"


def test_without_redis_url_nothing_changes() -> None:
    s = load()
    assert s.redis is None
    assert s.rate_limit_shared is False
    assert s.describe()["redis"] is None


def test_every_redis_variable_is_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(certifi.where()).read_bytes())
    s = load(REDIS_URL=f"rediss://:{PASSWORD}@redis.internal:6380/2",
             REDIS_TLS_CA_FILE=str(ca), REDIS_TIMEOUT_SECONDS="0.1",
             REDIS_DEDUP_TTL_SECONDS="3600", USERPILOT_RATE_LIMIT_SHARED="true")
    assert s.redis == RedisSettings(url=Secret(f"rediss://:{PASSWORD}@redis.internal:6380/2"),
                                    tls=True, tls_ca_file=str(ca), timeout_s=0.1,
                                    dedup_ttl_s=3600.0)
    assert s.rate_limit_shared is True
    assert REDIS_ENV_VARS <= ENV_VARS


@pytest.mark.parametrize("url", [
    "redis://localhost", "redis://redis:6379/0", "redis://user:pw@redis:6379/15",
    "rediss://redis.example.com:6380", "redis://10.0.0.7:6379/", "redis://[::1]:6379/0",
])
def test_valid_urls(url: str) -> None:
    s = load(REDIS_URL=url)
    assert s.redis is not None
    assert s.redis.tls is url.startswith("rediss://")


@pytest.mark.parametrize(("url", "fragment"), [
    ("redis:6379", "must start with redis:// or rediss://"),
    ("http://redis:6379", "must start with redis:// or rediss://"),
    ("redis://", "use redis://[:password@]host[:port][/db]"),
    ("redis://redis:99999/0", "invalid port"),
    ("redis://redis:6379/zero", "use redis://[:password@]host[:port][/db]"),
])
def test_invalid_urls_say_what_to_enter(url: str, fragment: str) -> None:
    assert fragment in problem(REDIS_URL=url)


@pytest.mark.parametrize("url", ["redis://:s3cr#et@redis:6379/0", "redis://:s3cr?et@redis/0",
                                 "redis://us#er:pw@redis/0",
                                 # Review secrets18: '[' reads as an IPv6 host's start.
                                 "redis://:s3cr[et]@redis:6379/0",
                                 # Review ops29: these matched no URL and got the generic
                                 # form only, which said nothing of encoding.
                                 "redis://:s3cr/et@redis:6379/0",
                                 "redis://:s3cr@et@redis:6379/0",
                                 "redis://us:s3cr#et/x@redis"])
def test_a_hash_or_question_mark_in_the_credentials_must_be_percent_encoded(url: str) -> None:
    """The Redis client reads the rest as a fragment or query: `run` crashed on it with
    part of the password in the traceback, after check-config had passed it."""
    found = problem(REDIS_URL=url)
    assert "percent-encode" in found
    assert "et@" not in found and "s3cr" not in found and "us#er" not in found


@pytest.mark.parametrize("query", ["?socket_timeout=abc", "?foo=bar", "?db=99", "?", "?protocol=3",
                                   "?ssl_cert_reqs=none&socket_timeout=1"])
def test_query_parameters_that_override_settings_are_refused(query: str) -> None:
    """Never checked before: a bad value crashed `run`, an unknown one failed every event,
    `?db=99` slipped past the database check."""
    assert "query parameters the worker does not take" in problem(
        REDIS_URL=f"redis://redis:6379/0{query}")


@pytest.mark.parametrize("query", ["?pw-SECRET48", "?hunter2&ssl_cert_reqs=none",
                                   "?password=hunter2", "?SECRET48aHVudGVyMg=",
                                   "?SECRET48aHVudGVy=="])
def test_an_unknown_query_parameter_is_counted_not_named(query: str) -> None:
    """Review "config48": a password pasted after the `?` is a key without a value, which
    the refusal named twice (in the URL shown and in the list of unknown parameters)."""
    found = problem(REDIS_URL=f"redis://u:pw@redis:6379/0{query}")
    assert "query parameters the worker does not take" in found
    assert "SECRET48" not in found and "hunter2" not in found, found


@pytest.mark.parametrize("query", ["?ssl_cert_reqs=none",
                                   "?ssl_check_hostname=false&client_name=w",
                                   "?ssl_check_hostname=F", "?ssl_check_hostname="])
def test_query_parameters_that_override_no_setting_pass(query: str) -> None:
    """A managed Redis with a self-signed certificate needs ssl_cert_reqs=none."""
    assert load(REDIS_URL=f"rediss://redis:6380/0{query}").redis is not None


@pytest.mark.parametrize(("url", "fragment"), [
    ("redis://redis:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs applies to TLS only"),
    ("redis://redis:6379/0?ssl_check_hostname=false", "applies to TLS only"),
    ("rediss://redis:6380/0?ssl_cert_reqs=bogus", "ssl_cert_reqs must be one of"),
    ("rediss://redis:6380/0?ssl_check_hostname=off", "ssl_check_hostname must be true"),
    # redis-py compares the flag exactly: "Required" failed every call, after an OK.
    ("rediss://redis:6380/0?ssl_cert_reqs=Required", "ssl_cert_reqs must be one of"),
    ("redis://redis:6379/0?client_name=my%20worker", "client_name must be printable"),
])
def test_query_parameters_are_checked_as_the_redis_client_uses_them(url: str,
                                                                    fragment: str) -> None:
    """`ssl_cert_reqs` on redis:// passed check-config, then every Redis call raised a
    TypeError (not a Redis error): the replica crash-looped with nothing delivered. A bad
    value or client name left it in fallback for good."""
    assert fragment in problem(REDIS_URL=url)


def test_a_refused_redis_url_never_shows_a_secret() -> None:
    """REDIS_URL is a secret: refused, it was echoed whole (a bare password from a
    Secret's wrong key; a `?password=` query)."""
    bare = problem(REDIS_URL=PASSWORD)
    assert PASSWORD not in bare and "not shown: it is a secret" in bare
    query = problem(REDIS_URL=f"redis://redis:6379/0?password={PASSWORD}")
    assert PASSWORD not in query
    # Not even the key: only the parameters the worker takes are named (review "diff48b").
    assert "redis://redis:6379/0?***" in query
    port = problem(REDIS_URL=f"redis://u:{PASSWORD}@redis:70000/0?client_name=x")
    assert PASSWORD not in port and "redis://***@redis:70000/0?client_name=***" in port


def test_password_never_shown() -> None:
    s = load(REDIS_URL=f"redis://default:{PASSWORD}@redis:6379/0")
    assert s.redis is not None
    text = json.dumps(s.describe()) + repr(s) + str(s.redis)
    assert PASSWORD not in text
    assert s.describe()["redis"]["url"] == "redis://***@redis:6379/0"
    for broken in (f"redis://:{PASSWORD}@redis:70000/0", f"redis:{PASSWORD}@redis",
                   f"redis//:{PASSWORD}@redis", f"redis://:{PASSWORD}@/0"):
        with pytest.raises(ConfigError) as info:
            load_settings({**BASE, "REDIS_URL": broken})
        assert PASSWORD not in str(info.value), broken


def test_tls_ca_file_needs_rediss_and_a_readable_file(tmp_path: Path) -> None:
    assert "use rediss://" in problem(REDIS_URL="redis://redis:6379",
                                      REDIS_TLS_CA_FILE=str(tmp_path))
    not_pem = "not a readable PEM file of CA certificates"
    assert not_pem in problem(REDIS_URL="rediss://redis:6380",
                              REDIS_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    (tmp_path / "half.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert not_pem in problem(REDIS_URL="rediss://redis:6380",
                              REDIS_TLS_CA_FILE=str(tmp_path / "half.pem"))
    assert "REDIS_URL is not" in problem(REDIS_TLS_CA_FILE=str(tmp_path / "ca.pem"))


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("REDIS_TIMEOUT_SECONDS", "0", "out of range"),
    ("REDIS_TIMEOUT_SECONDS", "1e-300", ">= 0.005"),
    ("REDIS_TIMEOUT_SECONDS", "9", "out of range"),
    ("REDIS_DEDUP_TTL_SECONDS", "10", "out of range"),
    ("USERPILOT_RATE_LIMIT_SHARED", "maybe", "not a boolean"),
])
def test_ranges(name: str, value: str, fragment: str) -> None:
    assert fragment in problem(REDIS_URL="redis://redis", **{name: value})


def test_a_database_past_15_is_taken_offline() -> None:
    """A Redis may have more than 16 (`databases 32`); one that has not is refused when
    reached (review "ops31")."""
    assert load(REDIS_URL="redis://redis:6379/16").redis is not None


def test_a_dedup_ttl_below_the_retry_budget_is_noted() -> None:
    """Review redis44: records expiring while an earlier event of their partition still
    retries leave them to be sent again after a restart; said at start-up, not refused."""
    from consumer.config import load_settings

    env = {**BASE, "REDIS_URL": "redis://r:6379/0"}
    low = load_settings({**env, "REDIS_DEDUP_TTL_SECONDS": "600"})
    assert any("REDIS_DEDUP_TTL_SECONDS=600 is below USERPILOT_RETRY_BUDGET_SECONDS=900"
               in note for note in low.notes)
    default = load_settings(env)
    assert not any("REDIS_DEDUP_TTL_SECONDS" in note for note in default.notes)
