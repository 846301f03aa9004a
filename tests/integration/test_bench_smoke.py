"""The benchmark harness cannot rot: `python -m bench --smoke` runs every workload.

Asserts that every workload produced positive figures and every ratio and target row is
there, not that targets are met: CI machines are shared and noisy, so targets are judged
on the full run (tests/bench/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.harness import REPO

WORKLOAD_KEYS = ("consume_decode", "drop_path", "delivery_path", "http_ceiling", "naive",
                 "saturation", "memory", "latency", "mixed_saturation")


def test_smoke_run_reports_every_workload(kafka_bootstrap: str, schema_registry_url: str,
                                          tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "SCHEMA_REGISTRY_URL": schema_registry_url}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out),
         "--logs", str(tmp_path / "logs")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    w = results["workloads"]
    assert set(WORKLOAD_KEYS) <= set(w)

    assert w["consume_decode"]["rate"] > 0
    assert w["drop_path"]["rate"] > 0
    assert w["drop_path"]["requests_sent"] == 0  # every event filtered: nothing posted
    for latency in ("0ms", "20ms"):
        delivery = w["delivery_path"]["by_latency"][latency]
        assert delivery["rate"] > 0
        assert delivery["accepted"] >= w["delivery_path"]["events"]
        ceiling = w["http_ceiling"]["by_latency"][latency]
        assert ceiling["httpx"]["rate"] > 0 and ceiling["aiohttp"]["rate"] > 0
        assert ceiling["worker_client"]["rate"] > 0
        assert w["naive"]["by_latency"][latency]["rate"] > 0
    for label in ("1_worker", "3_workers"):
        sat = w["saturation"][label]
        assert sat["delivered"] > 0 and sat["full_windows"] >= 1
        assert sat["min_window_share"] > 0
    for label in ("1_worker", "3_workers"):
        mixed = w["mixed_saturation"][label]
        assert mixed["full_windows"] >= 1
        assert mixed["track"]["min_window_share"] > 0
        assert mixed["identify"]["min_window_share"] > 0
    assert w["memory"]["peak_rss_mb"] > 0 and w["memory"]["delivered"] > 0
    lat = w["latency"]["added_ms"]
    assert w["latency"]["events"] > 0
    assert 0 < lat["p50"] <= lat["p99"]
    for client in ("worker_client", "raw_socket"):  # the client's own share, same sandbox
        send = w["latency"]["client_send_ms"][client]
        assert 0 < send["p50"] <= send["p99"], client

    ratios = results["ratios"]
    assert w["consume_decode"]["avro_only"]["rate"] > 0
    for key in ("drop_over_consume_decode", "drop_over_consume_avro",
                "delivery_over_client_loop_20ms", "delivery_over_token_limit_0ms",
                "delivery_over_naive_20ms", "drop_cpu_over_consume_avro_cpu",
                "delivery_cpu_over_client_loop_cpu_20ms"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    assert w["drop_path"]["avro_only_after"]["cpu_us_per_event"] > 0
    names = [row["name"] for row in results["targets"]]
    # 3 drop + 3 delivery (rate and CPU) + naive + 2 saturation + RSS + latency
    # + 4 mixed (2 families × 2)
    assert len(names) == 15, names
    assert results["machine"]["cpu_count"] and results["params"]["smoke"] is True
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
