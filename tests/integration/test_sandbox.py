"""The sandbox over real HTTP: the contract the worker is tested against, and its faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from consumer.sandbox import SandboxConfig, SandboxControl, SandboxThread, fingerprint
from tests.conftest import hang_up_as_default

pytestmark = pytest.mark.integration

WRITE_TOKEN = "sandbox-write-token"
HEADERS = {
    "Authorization": f"Token {WRITE_TOKEN}",
    "X-API-Version": "2020-09-22",
    "Content-Type": "application/json",
}
TRACK = {"user_id": "user_001", "event_name": "feature_used", "metadata": {"feature": "csv"}}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxThread]:
    with SandboxThread(SandboxConfig(port=0, seed=1234)) as running:
        yield running


@pytest.fixture
def control(sandbox: SandboxThread) -> Iterator[SandboxControl]:
    ctl = SandboxControl(sandbox.url)
    ctl.clear_faults()
    ctl.clear_limits()
    ctl.reset()
    yield ctl
    ctl.clear_faults()
    ctl.clear_limits()
    ctl.reset()


@pytest.fixture
def client(sandbox: SandboxThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, timeout=5) as http:
        yield http


def track(client: httpx.Client, body: Any = TRACK, **headers: str) -> httpx.Response:
    return client.post("/v1/track", content=json.dumps(body), headers={**HEADERS, **headers})


def errors_of(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    assert list(body) == ["errors"]
    for error in body["errors"]:
        assert set(error) == {"error_code", "error", "message", "details"}
    errors: list[dict[str, Any]] = body["errors"]
    return errors


def test_accepts_track_identify_and_company_identify(
    client: httpx.Client, control: SandboxControl
) -> None:
    response = track(client)
    assert response.status_code == 202
    assert response.json() == {"status": "accepted"}
    assert response.headers["x-request-id"]
    identify = {"user_id": "user_001", "metadata": {"plan": "pro", "seats": 3}}
    assert client.post("/v1/identify", json=identify, headers=HEADERS).status_code == 202
    company = {"company_id": "c1", "metadata": {"name": "Acme"}}
    assert client.post("/v1/companies/identify", json=company, headers=HEADERS).status_code == 200

    records = control.requests()
    assert [r["path"] for r in records] == ["/v1/track", "/v1/identify", "/v1/companies/identify"]
    assert records[0]["body"] == TRACK
    assert records[0]["request_id"] == response.headers["x-request-id"]
    assert records[0]["token"] == fingerprint(WRITE_TOKEN)
    assert WRITE_TOKEN not in json.dumps(records)
    assert control.bodies() == [TRACK]
    assert control.requests("/v1/identify")[0]["body"] == identify


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"Authorization": "Token wrong"}, 401, "invalid_token"),
        ({"Authorization": "Bearer sandbox-write-token"}, 401, "malformed_token"),
        ({"Authorization": "Token sandbox-read-token"}, 403, "read_token_not_allowed"),
        ({"X-API-Version": "2019-01-01"}, 400, "invalid_api_version"),
        ({"Content-Type": "text/plain"}, 400, "invalid_content_type"),
    ],
)
def test_header_failures(
    client: httpx.Client, control: SandboxControl, change: dict[str, str], status: int, code: str
) -> None:
    response = track(client, **change)
    assert response.status_code == status
    assert response.headers["x-request-id"]
    assert errors_of(response)[0]["error_code"] == code
    assert control.requests() == []


def test_missing_authorization_is_401(client: httpx.Client, control: SandboxControl) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "Authorization"}
    response = client.post("/v1/track", json=TRACK, headers=headers)
    assert response.status_code == 401
    assert errors_of(response)[0]["error_code"] == "missing_token"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        ({"event_name": "e"}, "missing_field"),
        ({"user_id": "u", "event_name": ""}, "invalid_field"),
        ({**TRACK, "metadata": {"items": [{"sku": "a"}]}}, "invalid_metadata"),
        ({**TRACK, "metadata": {"product": {"id": 1}}}, "invalid_metadata"),
    ],
)
def test_invalid_payloads_are_400(
    client: httpx.Client, control: SandboxControl, body: Any, code: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/track", content=content, headers=HEADERS)
    assert response.status_code == 400
    assert errors_of(response)[0]["error_code"] == code
    assert control.requests() == []
    assert control.stats()["by_status"] == {"400": 1}


def test_unknown_path_404_and_wrong_method_405(client: httpx.Client) -> None:
    response = client.post("/v1/events", json=TRACK, headers=HEADERS)
    assert response.status_code == 404
    assert errors_of(response)[0]["error_code"] == "not_found"
    assert response.headers["x-request-id"]
    response = client.get("/v1/track", headers=HEADERS)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_rate_limit_429_per_token_and_retry_after(
    client: httpx.Client, control: SandboxControl
) -> None:
    control.set_faults(rate_limit=5, rate_window_seconds=60)
    statuses = [track(client).status_code for _ in range(5)]
    statuses.append(client.post("/v1/identify", json={"user_id": "u"}, headers=HEADERS).status_code)
    assert statuses == [202] * 6  # identify has its own budget
    limited = track(client)
    assert limited.status_code == 429
    assert "retry-after" not in limited.headers
    assert errors_of(limited)[0]["error_code"] == "rate_limited"
    assert len(control.requests()) == 6
    assert control.stats()["by_status"] == {"202": 6, "429": 1}

    control.set_faults(retry_after=True)
    retry_after = int(track(client).headers["retry-after"])
    assert 1 <= retry_after <= 60


def test_users_companies_attribution_and_delete_over_http(
    client: httpx.Client, control: SandboxControl
) -> None:
    assert track(client).status_code == 202  # unknown user: accepted, not attributed
    identify = {"user_id": "user_001", "metadata": {"plan": "pro"}, "company": {"id": "acme"}}
    assert client.post("/v1/identify", json=identify, headers=HEADERS).status_code == 202
    company = {"company_id": "acme", "metadata": {"name": "Acme"}}
    assert client.post("/v1/companies/identify", json=company, headers=HEADERS).status_code == 200
    assert track(client).status_code == 202
    assert control.attribution() == (1, 1)
    assert [r["attributed"] for r in control.requests("/v1/track")] == [False, True]
    assert control.users() == {"user_001": {"metadata": {"plan": "pro"}, "company": "acme"}}
    assert control.companies() == {"acme": {"metadata": {"name": "Acme"}, "users": ["user_001"]}}

    deleted = client.request("DELETE", "/v1/users", json={"users": ["user_001"]}, headers=HEADERS)
    assert deleted.status_code == 202
    assert "1 users scheduled" in deleted.json()["message"]
    again = client.request("DELETE", "/v1/users", json={"users": ["x"]}, headers=HEADERS)
    assert again.status_code == 429  # one delete per 2 s
    assert control.users() == {}
    stats = control.stats()
    assert (stats["users"], stats["companies"], stats["deleted_users"]) == (0, 1, 1)
    assert client.post("/v1/users", json={"users": ["x"]}, headers=HEADERS).status_code == 405

    control.set_limits(delete_interval_seconds=0)
    assert client.request("DELETE", "/v1/users", json={"users": ["x"]},
                          headers=HEADERS).status_code == 202


def test_rate_window_rolls(client: httpx.Client, control: SandboxControl) -> None:
    control.set_faults(rate_limit=2, rate_window_seconds=0.5)
    assert [track(client).status_code for _ in range(3)] == [202, 202, 429]
    time.sleep(0.6)
    assert track(client).status_code == 202


def test_reset_clears_records_counters_and_rate_limit(
    client: httpx.Client, control: SandboxControl
) -> None:
    control.set_faults(rate_limit=1)
    assert [track(client).status_code for _ in range(2)] == [202, 429]
    control.reset()
    assert control.requests() == []
    assert control.stats()["total"] == 0
    assert track(client).status_code == 202


def test_error_rate_is_statistically_right(client: httpx.Client, control: SandboxControl) -> None:
    control.set_faults(error_rate=0.3, error_codes=[500, 502, 503], rate_limit=0)
    statuses = Counter(track(client).status_code for _ in range(600))
    errors = statuses[500] + statuses[502] + statuses[503]
    assert set(statuses) <= {202, 500, 502, 503}
    assert 120 <= errors <= 240  # 180 expected; +-5 sigma
    assert min(statuses[500], statuses[502], statuses[503]) > 0
    assert len(control.requests()) == statuses[202]


def test_latency_and_jitter(client: httpx.Client, control: SandboxControl) -> None:
    control.set_faults(latency_ms=150, jitter_ms=50)
    started = time.perf_counter()
    assert track(client).status_code == 202
    elapsed = time.perf_counter() - started
    assert elapsed >= 0.15


def test_reset_rate_drops_connections(sandbox: SandboxThread, control: SandboxControl) -> None:
    control.set_faults(reset_rate=1.0)
    with httpx.Client(base_url=sandbox.url, timeout=5) as http, pytest.raises(httpx.TransportError):
        track(http)
    assert control.stats()["by_status"] == {"reset": 1}
    assert control.requests() == []


def test_scripted_sequence(sandbox: SandboxThread, control: SandboxControl) -> None:
    control.set_faults(script=["500", "429", "reset", "timeout:400", "503", "202"])
    seen: list[str] = []
    for _ in range(7):
        with httpx.Client(base_url=sandbox.url, timeout=0.2) as http:
            try:
                seen.append(str(track(http).status_code))
            except httpx.TimeoutException:
                seen.append("timeout")
            except httpx.TransportError:
                seen.append("reset")
    assert seen == ["500", "429", "reset", "timeout", "503", "202", "202"]
    assert control.faults()["script"] == []
    assert len(control.requests()) == 2


def test_hang_never_answers(sandbox: SandboxThread, control: SandboxControl) -> None:
    control.set_faults(script=["hang"])
    with httpx.Client(base_url=sandbox.url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        track(http)
    assert control.requests() == []


def test_rule_fails_one_event_permanently(client: httpx.Client, control: SandboxControl) -> None:
    control.set_faults(
        rules=[
            {"event_name": "poison", "action": "400"},
            {"user_id": "flaky", "action": "503", "times": 2},
        ]
    )
    for _ in range(3):
        response = track(client, {**TRACK, "event_name": "poison"})
        assert response.status_code == 400
        assert errors_of(response)[0]["error_code"] == "bad_request"
    flaky = {**TRACK, "user_id": "flaky"}
    assert [track(client, flaky).status_code for _ in range(3)] == [503, 503, 202]
    assert track(client).status_code == 202
    assert [b["user_id"] for b in control.bodies()] == ["flaky", "user_001"]


def test_runtime_tokens(client: httpx.Client, control: SandboxControl) -> None:
    try:
        control.set_tokens(["rotated"], ["reader"])
        assert track(client).status_code == 401
        assert track(client, Authorization="Token rotated").status_code == 202
        assert track(client, Authorization="Token reader").status_code == 403
    finally:
        control.set_tokens([WRITE_TOKEN], ["sandbox-read-token"])


def test_bad_fault_settings_are_rejected(control: SandboxControl) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as info:
        control.set_faults(error_rate=3)
    assert info.value.code == 400


def _raw_exchange(sandbox: SandboxThread, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_keep_alive_and_pipelining_on_one_connection(
    sandbox: SandboxThread, control: SandboxControl
) -> None:
    body = json.dumps(TRACK).encode()
    request = (
        b"POST /v1/track HTTP/1.1\r\nHost: x\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in HEADERS.items())
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    closing = request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    raw = _raw_exchange(sandbox, request * 3 + closing)
    assert raw.count(b"HTTP/1.1 202 Accepted") == 4
    assert raw.count(b"x-request-id: ") == 4
    assert len(control.requests()) == 4


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"POST /v1/track HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"411"),
        (b"POST /v1/track HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    ],
)
def test_malformed_http_is_refused_and_closed(
    sandbox: SandboxThread, payload: bytes, status: bytes
) -> None:
    raw = _raw_exchange(sandbox, payload)
    assert raw.startswith(b"HTTP/1.1 " + status)
    assert b"connection: close" in raw


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_runs_as_a_separate_process(stop: signal.Signals) -> None:
    """Stopped cleanly (exit 0) by SIGTERM, and by a hang-up as every command is (review
    "diff50c": SIGHUP killed it, exit -1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "consumer.sandbox", "--port=0", "--write-token=proc-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=hang_up_as_default,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("sandbox listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        assert SandboxControl(url).health()
        response = httpx.post(
            f"{url}/v1/track", json=TRACK, headers={**HEADERS, "Authorization": "Token proc-token"}
        )
        assert response.status_code == 202
    finally:
        process.send_signal(stop)
        assert process.wait(timeout=10) == 0
    assert process.stderr is not None
    assert "proc-token" not in process.stderr.read()


def test_thread_start_failure_is_raised_in_the_caller(sandbox: SandboxThread) -> None:
    with pytest.raises(OSError):
        SandboxThread(SandboxConfig(port=sandbox.port)).start()


def test_thread_stop_closes_hung_connections() -> None:
    with SandboxThread() as other:
        SandboxControl(other.url).set_faults(script=["hang"])
        with httpx.Client(base_url=other.url, timeout=5) as http:
            started = time.perf_counter()
            stopper = threading.Timer(0.2, other.stop)
            stopper.start()
            with pytest.raises(httpx.TransportError):
                track(http)
            stopper.join()
            assert time.perf_counter() - started < 4


def test_a_part_sent_request_is_closed_after_the_idle_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "sandbox48": part-sent heads were held for ever; at the descriptor limit the
    sandbox stopped answering even its health check."""
    from consumer.sandbox import server

    monkeypatch.setattr(server, "IDLE_TIMEOUT_S", 0.5)
    with SandboxThread(SandboxConfig(port=0, seed=1)) as running:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/track HTTP/1.1\r\nContent-Le")
            started = time.monotonic()
            assert sock.recv(1024) == b"", "closed without an answer"
            assert time.monotonic() - started < 4
