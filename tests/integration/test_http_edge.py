"""The worker's HTTP edge as users deploy it: behind an egress proxy, with NO_PROXY, and
over TLS with a private CA, against the real broker, registry and sandbox.

The proxy and the TLS terminator are real processes (`relay.py`) started by the tests.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from consumer.sandbox import SandboxControl, SandboxThread
from tests.certificates import self_signed
from tests.conftest import create_topic
from tests.integration.harness import (
    WRITE_TOKEN,
    WorkerThread,
    caught_up,
    delivered_seqs,
    produce,
    track_event,
    wait_until,
    worker_env,
)
from tests.integration.test_cli_online import cli

RELAY = Path(__file__).with_name("relay.py")
Sandbox = tuple[SandboxThread, SandboxControl]
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "all_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")


@contextmanager
def relay(*args: str) -> Iterator[int]:
    """Start relay.py with `args`; yields its port; stops it afterwards."""
    proc = subprocess.Popen([sys.executable, str(RELAY), *args], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield int(line.split()[-1])
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


def worker_behind(env: dict[str, str], **proxy_env: str) -> WorkerThread:
    """A worker whose environment also holds `proxy_env` (settings read the proxy
    variables from the environment they are given, as `run` reads the process's)."""
    return WorkerThread({**env, **proxy_env})


def _events(topic: str, kafka: str, registry: str, count: int) -> None:
    produce(kafka, registry, topic, [track_event(f"u{i % 5}", i) for i in range(count)])


def _deliver_behind_proxy(kafka: str, registry: str, topic: str, sandbox: Sandbox,
                         tmp_path: Path, count: int, no_proxy: str) -> tuple[float, str]:
    """Deliver `count` events with a real forward proxy in HTTP_PROXY and `no_proxy` in
    NO_PROXY; returns the worker's 202 count and what the proxy logged."""
    server, control = sandbox
    _events(topic, kafka, registry, count)
    log = tmp_path / "proxy.log"
    log.touch()
    with relay("proxy", "--log", str(log)) as port:
        # The sandbox is addressed as localhost; the registry (127.0.0.1) stays direct.
        endpoint = server.url.replace("127.0.0.1", "localhost")
        env = worker_env(kafka, registry, endpoint, topic, f"{topic}-g")
        with worker_behind(env, HTTP_PROXY=f"http://127.0.0.1:{port}",
                           NO_PROXY=no_proxy) as w:
            wait_until(caught_up(kafka, f"{topic}-g", topic), 60, "all committed")
            accepted = w.metric("userpilot_responses_total", status="202", endpoint="track")
    assert sum(delivered_seqs(control).values()) == count
    return accepted, log.read_text()


def test_requests_go_through_the_proxy_from_the_environment(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    accepted, log = _deliver_behind_proxy(
        kafka_bootstrap, schema_registry_url, topic_factory(partitions=2), sandbox, tmp_path,
        20, no_proxy="127.0.0.1")
    assert accepted == 20
    proxied = [line for line in log.splitlines() if "/v1/track" in line]
    assert len(proxied) == 20
    assert all(line.startswith("POST http://localhost:") for line in proxied)


def test_no_proxy_bypasses_the_proxy(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    accepted, log = _deliver_behind_proxy(
        kafka_bootstrap, schema_registry_url, topic_factory(partitions=1), sandbox, tmp_path,
        10, no_proxy="127.0.0.1,localhost")
    assert accepted == 10
    assert log == ""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed CA certificate that is also the server's, for localhost (cert, key)."""
    return self_signed(tmp_path_factory.mktemp("tls"))


@contextmanager
def tls_front(server: SandboxThread, certificate: tuple[Path, Path]) -> Iterator[int]:
    """A TLS terminator (relay.py) with `certificate` in front of the sandbox; yields its
    port, served as https://localhost:<port>."""
    cert, key = certificate
    upstream = server.url.split("://", 1)[1]
    with relay("tls", "--cert", str(cert), "--key", str(key), "--upstream", upstream) as port:
        yield port


def test_tls_with_a_private_ca_from_userpilot_ca_bundle(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, certificate: tuple[Path, Path],
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    _events(topic, kafka_bootstrap, schema_registry_url, 10)
    cert, _ = certificate
    with tls_front(server, certificate) as port:
        env = worker_env(kafka_bootstrap, schema_registry_url, f"https://localhost:{port}",
                         topic, f"{topic}-g", USERPILOT_INSECURE_HTTP="false",
                         USERPILOT_CA_BUNDLE=str(cert))
        with WorkerThread(env) as w:
            assert w.worker.s.track_url == f"https://localhost:{port}/v1/track"
            wait_until(caught_up(kafka_bootstrap, f"{topic}-g", topic), 60, "all committed")
    assert sum(delivered_seqs(control).values()) == 10


def test_tls_without_the_ca_delivers_nothing_and_dead_letters_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, certificate: tuple[Path, Path],
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    _events(topic, kafka_bootstrap, schema_registry_url, 3)
    with tls_front(server, certificate) as port:
        env = worker_env(kafka_bootstrap, schema_registry_url, f"https://localhost:{port}",
                         topic, f"{topic}-g", USERPILOT_INSECURE_HTTP="false")
        assert "USERPILOT_CA_BUNDLE" not in env and "SSL_CERT_FILE" not in os.environ
        with WorkerThread(env) as w:
            wait_until(lambda: sum(w.metric("userpilot_responses_total",
                                            status="connection_error", endpoint=e)
                                   for e in ("track", "identify")) >= 3, 30,
                       "refused handshakes")
            assert w.metric("userpilot_events_delivered_total", event_name="feature_used") == 0
            assert w.metric("userpilot_dead_lettered_total", reason="retries_exhausted") == 0
            # A setting to fix, not an outage: once it lasts, paused with /readyz and the
            # gauge saying so (review "faults29": retried as connection errors for ever,
            # the pod stayed ready).
            wait_until(lambda: w.metric("userpilot_integration_up") == 0, 60,
                       "the gate closed as misconfigured")
            ready, why = w.worker.health.ready()
            assert not ready and "USERPILOT_CA_BUNDLE" in why, why
    assert sum(delivered_seqs(control).values()) == 0


# ------------------------------------------------------------------ check-config --online
# The token check goes through the worker's own client: what passes here is what `run`
# reaches (the same proxy, CA bundle and classification).


def _online(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return cli(["check-config", "--online", "--timeout", "5"], env)


def test_check_config_online_goes_through_the_proxy(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    server, _ = sandbox
    topic = topic_factory(partitions=1)
    create_topic(kafka_bootstrap, f"{topic}.userpilot.dlq")
    log = tmp_path / "proxy.log"
    log.touch()
    with relay("proxy", "--log", str(log)) as port:
        endpoint = server.url.replace("127.0.0.1", "localhost")
        env = worker_env(kafka_bootstrap, schema_registry_url, endpoint, topic, f"{topic}-g",
                         HTTP_PROXY=f"http://someone:pw@127.0.0.1:{port}",
                         NO_PROXY="127.0.0.1")
        result = _online(env)
    assert result.returncode == 0, result.stderr
    assert "online OK: userpilot" in result.stderr
    assert f'"proxy": "http://***@127.0.0.1:{port}"' in result.stdout
    assert "pw" not in result.stdout + result.stderr
    # The proxy's credentials reach it (as the proxy's own header, review "env60").
    assert [line.split() for line in log.read_text().splitlines()] == [
        ["POST", f"{endpoint}/v1/track", "auth=Basic",
         base64.b64encode(b"someone:pw").decode()]]


def test_check_config_online_trusts_the_ca_bundle_and_says_so_without_it(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, certificate: tuple[Path, Path],
) -> None:
    server, _ = sandbox
    topic = topic_factory(partitions=1)
    create_topic(kafka_bootstrap, f"{topic}.userpilot.dlq")
    cert, _ = certificate
    with tls_front(server, certificate) as port:
        env = worker_env(kafka_bootstrap, schema_registry_url, f"https://localhost:{port}",
                         topic, f"{topic}-g", USERPILOT_INSECURE_HTTP="false")
        trusted = _online({**env, "USERPILOT_CA_BUNDLE": str(cert)})
        untrusted = _online(env)
    assert trusted.returncode == 0, trusted.stderr
    assert "online OK: userpilot" in trusted.stderr
    assert untrusted.returncode == 9, untrusted.stderr
    assert "online FAILED: userpilot" in untrusted.stderr
    assert "USERPILOT_CA_BUNDLE" in untrusted.stderr


def test_check_config_refuses_a_proxy_the_worker_cannot_use(
    kafka_bootstrap: str, schema_registry_url: str, sandbox: Sandbox,
) -> None:
    server, _ = sandbox
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, "t", "g",
                     HTTP_PROXY="socks5://user:pw@proxy.corp:1080")
    result = cli(["check-config"], env)
    assert result.returncode == 2
    assert "HTTP_PROXY=socks5://***@proxy.corp:1080" in result.stderr
    assert "SOCKS is not supported" in result.stderr


def test_delete_users_trusts_the_ca_bundle_as_the_worker_does(
    sandbox: Sandbox, certificate: tuple[Path, Path],
) -> None:
    """`delete-users` runs "with the worker's own USERPILOT_* settings", but built its
    client without USERPILOT_CA_BUNDLE: behind a private CA every batch failed (six
    minutes of retries each) where the worker delivered."""
    server, control = sandbox
    cert, _ = certificate
    with tls_front(server, certificate) as port:
        env = {**os.environ, "USERPILOT_API_KEY": WRITE_TOKEN,
               "USERPILOT_ANALYTICS_ENDPOINT": f"localhost:{port}",
               "USERPILOT_RETRY_MAX_ATTEMPTS": "1"}

        def delete(**extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "consumer", "delete-users", "--interval", "0"],
                input="u1\nu2\n", capture_output=True, text=True, env={**env, **extra},
                cwd=Path(__file__).resolve().parents[2], timeout=120, check=False)

        trusted = delete(USERPILOT_CA_BUNDLE=str(cert))
        untrusted = delete()
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.endswith("deleted 2, failed 0\n")
    assert [r["body"] for r in control.requests("/v1/users")] == [{"users": ["u1", "u2"]}]
    assert untrusted.returncode == 1
    assert "USERPILOT_CA_BUNDLE" in untrusted.stderr + untrusted.stdout
