"""Pure parts of the benchmark harness: event templates, percentiles, targets, RSS plateau."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping

import pytest

from bench import events as ev
from bench.cli import _workload_list, build_parser
from bench.procs import RssSample, RssTrace, read_rss
from bench.report import Target, percentile, render_table, targets
from consumer import codec
from consumer.filtering import ConsentPolicy, Drop
from consumer.mapping import DEFAULT_PRESET
from consumer.routing import Send, route


def _decode(value: bytes) -> Mapping[str, object]:
    return codec.decode(value, lambda _id: codec.SCHEMA)


def test_rendered_message_equals_a_fresh_encode_of_the_stamped_event() -> None:
    (tmpl,) = ev.templates(7, "deliver")
    key, value = tmpl.render(ev.Stamp(user=42, seq=123_456, sent_ns=1_764_000_000_123_456_789))
    event = ev.delivered_event()
    event["userId"] = "u0000042"
    event["anonymousId"] = "anon-u0000042"
    event["messageId"] = "m000000000123456"
    event["properties"]["sent_ns"] = "1764000000123456789"
    assert value == codec.encode(7, codec.to_record(event))
    assert key == b"u0000042"


def test_delivery_template_is_sent_and_carries_its_produce_time() -> None:
    (tmpl,) = ev.templates(1, "deliver")
    _, value = tmpl.render(ev.Stamp(3, 9, sent_ns=1_000_000_000_000_000_123))
    decision = route(_decode(value), ConsentPolicy(), DEFAULT_PRESET)
    assert isinstance(decision, Send)
    assert decision.payload["user_id"] == "u0000003"
    assert ev.sent_ns_of(decision.payload["metadata"]) == 1_000_000_000_000_000_123


def test_drop_backlog_cycles_through_every_drop_reason() -> None:
    tmpls = ev.templates(1, "drop")
    reasons = []
    for key, value in ev.messages(tmpls, 6, users=100):
        decision = route(_decode(value), ConsentPolicy(), DEFAULT_PRESET)
        assert isinstance(decision, Drop)
        reasons.append(decision.reason)
        assert key  # anonymous events are keyed by their anonymousId
    assert reasons == ["anonymous", "consent", "unmapped"] * 2


def test_messages_rotate_users() -> None:
    keys = [k for k, _ in ev.messages(ev.templates(1, "deliver"), 5, users=2)]
    assert keys == [b"u0000000", b"u0000001", b"u0000000", b"u0000001", b"u0000000"]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_target_pass_needs_the_bound_and_the_extra_condition() -> None:
    assert Target("x", 0.6, ">=", 0.6).passed
    assert not Target("x", 0.59, ">=", 0.6).passed
    assert Target("x", 50.0, "<=", 50.0).passed
    assert not Target("x", 99.0, ">=", 98.0, extra_ok=False).passed
    assert not Target("x", math.nan, "<=", 1.0).passed


def test_targets_follow_the_workloads_that_ran() -> None:
    results = {
        "ratios": {"drop_over_consume_decode": 0.7, "drop_over_consume_avro": 0.5,
                   "delivery_over_http_ceiling_0ms": 0.4, "delivery_over_client_loop_20ms": 0.95,
                   "delivery_over_token_limit_0ms": 49.0, "delivery_over_naive_20ms": 25.0},
        "workloads": {
            "saturation": {
                "1_worker": {"min_window_share": 0.99, "responses_429": 0},
                "3_workers": {"min_window_share": 0.99, "responses_429": 2},
            },
            "memory": {"peak_rss_mb": 120.0, "backlog_events": 1_000_000},
            "latency": {"added_ms": {"p50": 5.0, "p99": 60.0}},
        },
        "summary": [("1 consume+decode (bare)", "1 ev/s")],
    }
    rows = {row.name: row.passed for row in targets(results)}
    assert rows == {
        "drop path ÷ consume+decode": True,
        "drop path ÷ consume+Avro (no JSON)": False,
        "delivery ÷ plain loop, same client @ 20ms": True,
        "delivery @ 0ms ÷ token limit (10 req/s)": False,
        "delivery ÷ naive @ 20ms": True,
        "saturation, 1 worker (min window share)": True,
        "saturation, 3 workers (min window share)": False,  # 429s received
        "peak RSS, backlog draining": True,
        "added latency p99": False,
    }
    table = render_table(results)
    assert table.count("PASS") == 5 and table.count("MISS") == 4
    assert targets({"ratios": {}, "workloads": {}}) == []


def test_rss_trace_plateau() -> None:
    growing = RssTrace()
    for i in range(12):
        growing.add(RssSample(i, 0, (50 + 10 * i) * 2**20))
    assert not growing.plateaued(0.02)
    flat = RssTrace()
    for i in range(12):
        flat.add(RssSample(i, 0, min(50 + 10 * i, 80) * 2**20))
    assert flat.plateaued(0.02)
    assert flat.peak_hwm == 80 * 2**20
    assert not RssTrace().plateaued()


def test_cpu_ratios_are_targets_too() -> None:
    rows = {row.name: row.passed for row in targets({"ratios": {
        "drop_cpu_over_consume_avro_cpu": 0.81,
        "delivery_cpu_over_client_loop_cpu_20ms": 0.6}, "workloads": {}})}
    assert rows == {"drop path, CPU/event: Avro-only ÷ worker": True,
                    "delivery, CPU/event: plain loop ÷ worker @ 20ms": False}


def test_ratios_average_the_ceiling_around_the_drop_path() -> None:
    from bench.workloads import ratios

    w = {"consume_decode": {"rate": 50.0, "avro_only": {"rate": 100.0, "cpu_us_per_event": 10.0}},
         "drop_path": {"rate": 80.0, "cpu_us_per_event": 16.0,
                       "avro_only_after": {"rate": 60.0, "cpu_us_per_event": 14.0}}}
    out = ratios({"workloads": w})
    assert out["drop_over_consume_avro"] == pytest.approx(1.0)  # 80 ÷ mean(100, 60)
    assert out["drop_cpu_over_consume_avro_cpu"] == pytest.approx(0.75)  # 12 ÷ 16


def test_read_cpu_of_this_process_grows() -> None:
    import os

    from bench.procs import read_cpu

    before = read_cpu(os.getpid())
    sum(i * i for i in range(300_000))
    assert read_cpu(os.getpid()) >= before > 0
    assert math.isnan(read_cpu(2**22 + 12345))  # no such process


def test_compare_refuses_to_run_without_services(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import compare

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert compare.main(["drop"]) == 2


def test_compare_refuses_an_unknown_part(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import compare

    with pytest.raises(SystemExit) as stop:
        compare.main(["others", "--parts", "saturation,speed"])
    assert stop.value.code == 2
    assert "--parts: unknown speed" in capsys.readouterr().err


def test_read_rss_of_this_process() -> None:
    import os

    sample = read_rss(os.getpid())
    assert sample is not None and 0 < sample.rss <= sample.hwm


def test_workload_selection() -> None:
    assert _workload_list("3,1,3") == [1, 3]
    assert build_parser().parse_args([]).workloads == [*range(1, 9), 12]
    assert _workload_list("9,10,11,12") == [9, 10, 11, 12]
    for bad in ("0", "13", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"workloads|numbers"):
            _workload_list(bad)


def test_mixed_targets_are_per_family_and_need_zero_429() -> None:
    fam = {"min_window_share": 0.985}
    results = {"ratios": {}, "workloads": {"mixed_saturation": {
        "1_worker": {"track": fam, "identify": {"min_window_share": 0.9}, "responses_429": 0},
        "3_workers": {"track": {"min_window_share": 0.5}, "identify": fam,
                      "responses_429": 0},
        "3_workers_redis": {"track": fam, "identify": fam, "responses_429": 1},
    }}}
    rows = {row.name: row.passed for row in targets(results)}
    assert rows == {
        "mixed track, 1 worker (min window share)": True,
        "mixed identify, 1 worker (min window share)": False,
        "mixed track, 3 workers redis (min window share)": False,  # a 429
        "mixed identify, 3 workers redis (min window share)": False,
    }, "3 workers on partition shares are reported, not judged"


def test_mixed_messages_alternate_tracks_of_few_users_and_identifies_of_new_ones() -> None:
    track = ev.Template.of(1, ev.delivered_event())
    identify = ev.Template.of(1, ev.identify_event())
    decoded = [(k, codec.decode(v, lambda _i: codec.SCHEMA))
               for k, v in ev.mixed_messages(track, identify, 8, track_users=2)]
    assert [d["type"] for _, d in decoded] == ["track", "identify"] * 4
    assert {d["userId"] for _, d in decoded if d["type"] == "track"} == {"u0000000", "u0000001"}
    identified = [d["userId"] for _, d in decoded if d["type"] == "identify"]
    assert len(set(identified)) == 4 and all(u >= "u1000000" for u in identified)
    assert all(k == d["userId"].encode() for k, d in decoded)
    again = [(k, codec.decode(v, lambda _i: codec.SCHEMA)) for k, v in ev.mixed_messages(
        track, identify, 8, track_users=2, id_base=5_000)]
    assert [k for k, _ in again] == [k for k, _ in decoded], "same users, same partitions"
    assert {d["messageId"] for _, d in again}.isdisjoint({d["messageId"] for _, d in decoded})


def test_latency_legs_pair_each_end_stamp_with_the_latest_start_before_it() -> None:
    from bench.latency_legs import _legs

    # Two events, one at a time: produce (in the body) → consume … send → sandbox receipt.
    stamps = [("c", 10.002), ("r", 10.0023), ("i", 10.0025), ("q", 10.0027), ("h", 10.0028),
              ("s", 10.0030), ("w", 10.0036), ("c", 10.022), ("r", 10.0222), ("i", 10.0224),
              ("q", 10.0226), ("h", 10.0227), ("s", 10.0229), ("w", 10.0234)]
    records = [{"body": {"metadata": {"sent_ns": str(10_000_000_000)}}, "received_at": 10.004},
               {"body": {"metadata": {"sent_ns": str(10_020_000_000)}}, "received_at": 10.0239},
               {"body": {"metadata": {}}, "received_at": 10.5}]  # no stamp: not counted
    legs = _legs(stamps, records)
    assert legs["kafka"] == pytest.approx([2.0, 2.0])
    assert legs["hop"] == pytest.approx([0.3, 0.2])
    assert legs["batch"] == pytest.approx([0.2, 0.2])
    assert legs["decide"] == pytest.approx([0.2, 0.2])
    assert legs["queue"] == pytest.approx([0.1, 0.1])
    assert legs["handle"] == pytest.approx([0.2, 0.2])
    assert legs["client"] == pytest.approx([0.6, 0.5])
    assert legs["wire"] == pytest.approx([0.4, 0.5])


def test_latency_legs_join_the_legs_around_a_step_a_tree_does_not_have() -> None:
    from bench.latency_legs import _legs

    # A tree without some steps (`--tree 5aa140f` has no handler; here none but these).
    stamps = [("c", 10.002), ("r", 10.0023), ("s", 10.0030)]
    records = [{"body": {"metadata": {"sent_ns": str(10_000_000_000)}}, "received_at": 10.004}]
    legs = _legs(stamps, records)
    assert list(legs) == ["kafka", "hop", "batch..handle", "client..wire"]
    assert legs["batch..handle"] == pytest.approx([0.7])
    assert legs["client..wire"] == pytest.approx([1.0])


def test_the_client_leg_loop_runs_and_reports_a_leg_per_request(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench import client_leg

    assert client_leg.main(["--requests", "20", "--warmup", "5"]) == 0
    assert "(20 requests)" in capsys.readouterr().out
