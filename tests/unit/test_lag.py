"""`consumer.lag`: the lag gauges from librdkafka's statistics and paused partitions'
watermarks. The worker's runs (a paused partition's growing backlog) are in
`test_worker.py`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from consumer.commits import TP, Commits
from consumer.lag import Lag
from consumer.metrics import Metrics

TOPIC = "signal"
P0, P1, P2 = (TOPIC, 0), (TOPIC, 1), (TOPIC, 2)


def gauges() -> tuple[Lag, Metrics, Commits]:
    metrics, commits = Metrics(CollectorRegistry()), Commits()
    commits.assign([P0, P1, P2])
    return Lag(metrics, commits), metrics, commits


def lag_of(metrics: Metrics, tp: TP) -> float | None:
    return metrics.registry.get_sample_value(
        "userpilot_consumer_lag", {"topic": tp[0], "partition": str(tp[1])})


def stats(**parts: dict[str, int]) -> dict[str, object]:
    return {"topics": {TOPIC: {"partitions": {name[1:]: p for name, p in parts.items()}}}}


def test_a_fetched_partitions_lag_is_librdkafkas_and_a_paused_ones_is_left_alone() -> None:
    lag, metrics, _ = gauges()
    lag.on_stats(stats(p0={"consumer_lag": 12}, p1={"consumer_lag": 40}),
                 assigned={P0, P1}, paused={P1})
    assert lag_of(metrics, P0) == 12
    assert lag_of(metrics, P1) is None, "a paused partition's figure is stale: not taken"


def test_partitions_not_owned_get_no_series() -> None:
    lag, metrics, _ = gauges()
    lag.on_stats(stats(p0={"consumer_lag": 12}), assigned=set(), paused=set())
    assert lag_of(metrics, P0) is None


def test_without_a_group_commit_the_lag_counts_from_what_is_known() -> None:
    lag, metrics, commits = gauges()
    # Nothing committed anywhere: from the low watermark (the log's start).
    lag.on_stats(stats(p0={"consumer_lag": -1, "hi_offset": 100, "lo_offset": 30}),
                 assigned={P0}, paused=set())
    assert lag_of(metrics, P0) == 70
    # What this worker would commit beats the low watermark ...
    commits.take(P0, 30)
    commits.finish(P0, 30)
    assert lag.bases([P0]) == {P0: 31}
    # ... the group's commit (from the statistics) beats that ...
    lag.on_stats(stats(p0={"committed_offset": 50, "hi_offset": 100}), assigned={P0},
                 paused=set())
    assert lag.bases([P0]) == {P0: 50}
    assert lag_of(metrics, P0) == 50
    assert metrics.registry.get_sample_value(
        "userpilot_committed_offset", {"topic": TOPIC, "partition": "0"}) == 50, \
        "the group's commit until this worker commits the partition itself"
    # ... and this worker's own acknowledged commit beats everything: it is the newest.
    commits.requested({P0: 31})
    commits.acknowledged([(P0, 31)])
    assert lag.bases([P0]) == {P0: 31}


def test_without_a_group_commit_the_lag_ends_at_the_last_stable_offset() -> None:
    """Review "gaps46": an open transaction's records past the last stable offset cannot
    be read under read_committed (the worker's isolation level), as librdkafka's own lag
    counts; from the high watermark they read as lag with nothing to read."""
    lag, metrics, _ = gauges()
    lag.on_stats(stats(p0={"consumer_lag": -1, "hi_offset": 9, "ls_offset": 4,
                           "lo_offset": 0}), assigned={P0}, paused=set())
    assert lag_of(metrics, P0) == 4
    lag.on_stats(stats(p0={"consumer_lag": -1, "hi_offset": 9, "ls_offset": -1,
                           "lo_offset": 0}), assigned={P0}, paused=set())
    assert lag_of(metrics, P0) == 9, "without a stable offset, the high watermark"


def test_a_paused_partitions_lag_comes_from_the_broker_if_still_paused() -> None:
    lag, metrics, _ = gauges()
    lag.on_stats(stats(p0={"committed_offset": 10}, p1={"committed_offset": 20},
                       p2={"lo_offset": 0}), assigned={P0, P1, P2}, paused={P0, P1, P2})
    asked: list[list[TP]] = []

    def highs(parts: list[TP]) -> dict[TP, int]:
        asked.append(parts)
        return {P0: 110, P1: 220, P2: 5}

    lag.paused([P0, P1, P2], highs, still_paused=lambda: {P0, P2})
    assert asked == [[P0, P1, P2]]
    assert lag_of(metrics, P0) == 100
    assert lag_of(metrics, P1) is None, "resumed meanwhile: the statistics take over"
    assert lag_of(metrics, P2) == 5


def test_an_unanswered_watermark_request_sets_nothing_and_raises_nothing() -> None:
    lag, metrics, _ = gauges()
    lag.on_stats(stats(p0={"committed_offset": 10}), assigned={P0}, paused={P0})

    def down(parts: list[TP]) -> dict[TP, int]:
        raise TimeoutError("broker down")

    lag.paused([P0], down, still_paused=lambda: {P0})
    assert lag_of(metrics, P0) is None


def test_a_released_partition_is_forgotten() -> None:
    lag, _, commits = gauges()
    lag.on_stats(stats(p0={"committed_offset": 10, "lo_offset": 3}), assigned={P0},
                 paused=set())
    assert lag.bases([P0]) == {P0: 10}
    lag.forget([P0])
    commits.release([P0])
    assert lag.bases([P0]) == {}, "no base left: a later owner starts from its own figures"
    asked: list[list[TP]] = []

    def highs(parts: list[TP]) -> dict[TP, int]:
        asked.append(parts)
        return {}

    lag.paused([P0], highs, still_paused=set)
    assert asked == [[]], "a partition without a base is not asked for"


def _all_paused(topics: tuple[str, ...], partitions: int) -> tuple[Lag, Metrics, list[TP]]:
    """A worker owning `partitions` of each topic, all paused, each committed at 0."""
    metrics, commits = Metrics(CollectorRegistry()), Commits()
    parts = [(topic, p) for topic in topics for p in range(partitions)]
    commits.assign(parts)
    lag = Lag(metrics, commits)
    lag.on_stats({"topics": {topic: {"partitions": {str(p): {"committed_offset": 0}
                                                    for p in range(partitions)}}
                             for topic in topics}},
                 assigned=set(parts), paused=set(parts))
    return lag, metrics, parts


def test_paused_partitions_past_the_lookup_budget_are_asked_first_next_time() -> None:
    """The lookups share a time budget (here: the first 10 asked answer): asked in partition
    order every time, the partitions past it (a second topic's) were never asked, and
    their lag stayed at its value from before the pause through a whole outage (review
    "multi45")."""
    lag, metrics, parts = _all_paused(("alpha", "zeta"), 24)
    high = 0

    def budgeted(asked: list[TP]) -> dict[TP, int]:
        return {tp: high for tp in asked[:10]}

    refreshed: list[int] = []
    for _ in range(5):
        high += 100
        lag.paused(parts, budgeted, still_paused=lambda: set(parts))
        refreshed.append(sum(lag_of(metrics, tp) == high for tp in parts))
    assert refreshed == [10] * 5
    assert all((lag_of(metrics, tp) or 0) > 0 for tp in parts), "a partition never asked"

    # A partition that never answers (no leader) does not start every round: review
    # "diff45b" (sorted by when each last answered, it came first and took the budget).
    dead = ("alpha", 3)

    def leaderless(asked: list[TP]) -> dict[TP, int]:
        out: dict[TP, int] = {}
        for tp in asked[:10]:
            if tp == dead:
                out[tp] = -1  # asked, never answered: it waits out what is left
                break
            out[tp] = high
        return out

    before = high
    for _ in range(10):
        high += 100
        lag.paused(parts, leaderless, still_paused=lambda: set(parts))
    stale = [tp for tp in parts if tp != dead and (lag_of(metrics, tp) or 0) <= before]
    assert not stale, f"starved behind the partition without a leader: {stale}"
    lag.forget(parts)


def test_a_run_of_partitions_without_a_leader_is_passed_in_one_round() -> None:
    """None answering, the next round started one partition further: a run of twelve
    leaderless partitions took nine rounds to pass, and the other topic's lag was asked in
    one round of twelve (review "diff45c")."""
    lag, metrics, parts = _all_paused(("alpha", "beta"), 12)
    asked_beta: list[bool] = []

    def alpha_leaderless(asked: list[TP]) -> dict[TP, int]:
        tried = asked[:3]  # what a 1 s budget holds at 0.25 s and more a lookup
        asked_beta.append(any(tp[0] == "beta" for tp in tried))
        return {tp: 100 if tp[0] == "beta" else -1 for tp in tried}

    for _ in range(12):
        lag.paused(parts, alpha_leaderless, still_paused=lambda: set(parts))
    assert all(lag_of(metrics, ("beta", p)) == 100 for p in range(12)), asked_beta
    # ... and however few the budget reaches, every partition is asked in turn (a guess of
    # four skipped some for ever when only three fit, review "diff45d").
    seen: set[TP] = set()

    def three(asked: list[TP]) -> dict[TP, int]:
        seen.update(asked[:3])
        return {tp: -1 for tp in asked[:3]}

    for _ in range(8):
        lag.paused(parts, three, still_paused=lambda: set(parts))
    assert seen == set(parts)
    # An unanswered lookup (-1) sets no lag: not a lag of 0 for a partition without a leader.
    assert all(lag_of(metrics, ("alpha", p)) is None for p in range(12))


def test_records_an_open_transaction_holds_back_and_for_how_long_are_shown() -> None:
    """Review "tx50": under read_committed the lag ends at the last stable offset, so a
    transaction left open held every later record back while the lag read 0. The records
    past it, and how long it has not moved while some are, per fetched partition."""
    metrics, commits = Metrics(CollectorRegistry()), Commits()
    commits.assign([P0, P1])
    now = [100.0]
    lag = Lag(metrics, commits, clock=lambda: now[0])

    def held(tp: TP) -> tuple[float | None, float | None]:
        labels = {"topic": tp[0], "partition": str(tp[1])}
        return (metrics.registry.get_sample_value("userpilot_unstable_records", labels),
                metrics.registry.get_sample_value(
                    "userpilot_stable_offset_stalled_seconds", labels))

    def report(p0: dict[str, int], p1: dict[str, int] | None = None,
               paused: frozenset[TP] = frozenset()) -> None:
        lag.on_stats(stats(p0={"consumer_lag": 0, **p0}, p1={"consumer_lag": 0, **(p1 or {})}),
                     assigned={P0, P1}, paused=paused)

    report({"hi_offset": 20, "ls_offset": 20}, {"hi_offset": 7, "ls_offset": 7})
    assert held(P0) == (0, 0) and held(P1) == (0, 0)
    report({"hi_offset": 35, "ls_offset": 20})
    now[0] = 130.0
    report({"hi_offset": 40, "ls_offset": 20})
    assert held(P0) == (20, 30), "the stable offset stuck for 30 s, 20 records behind it"
    now[0] = 140.0
    report({"hi_offset": 44, "ls_offset": 41})
    assert held(P0) == (3, 0), "it moved: another transaction, not the stuck one"
    now[0] = 150.0
    report({"hi_offset": 44, "ls_offset": 41}, paused=frozenset({P0}))
    assert held(P0) == (3, 0), "a paused partition's statistics are stale: not taken"
    report({"hi_offset": 44, "ls_offset": 41})
    assert held(P0) == (3, 10)
    report({"hi_offset": 44, "ls_offset": 44})
    assert held(P0) == (0, 0)
    report({"hi_offset": 50, "ls_offset": 45})
    assert held(P0) == (5, 0), "held again: counted from now"
    report({"hi_offset": -1, "ls_offset": -1})
    assert held(P0) == (5, 0), "no fetch answer: nothing learnt"
    lag.forget([P0])
    now[0] = 200.0
    report({"hi_offset": 50, "ls_offset": 45})
    assert held(P0) == (5, 0), "taken again: counted anew"


def test_a_partition_no_fetch_answers_for_is_looked_up_after_two_statistics() -> None:
    """Round 59's "noticed" (review "sizes59"): a broker quota starving every fetch left
    the whole backlog without a lag series (the statistics learn high watermarks from fetch
    answers) and the lag alerts silent. Twice without one (a new assignment's first
    statistics may come before its first fetch), the partition is looked up as a paused one
    is; a fetch answer ends that; a paused or released partition is not counted."""
    lag, metrics, _ = gauges()
    blind = {"consumer_lag": -1, "hi_offset": -1, "lo_offset": 0}
    lag.on_stats(stats(p0={"consumer_lag": 3, "hi_offset": 10}, p1=blind, p2=blind),
                 assigned={P0, P1, P2}, paused=set())
    assert lag.unfetched() == set(), "once may be before the first fetch"
    lag.on_stats(stats(p0={"consumer_lag": 3, "hi_offset": 10}, p1=blind, p2=blind),
                 assigned={P0, P1, P2}, paused={P2})
    assert lag.unfetched() == {P1}
    assert lag_of(metrics, P1) is None
    lag.paused(sorted(lag.unfetched()), lambda asked: dict.fromkeys(asked, 500),
               lambda: lag.unfetched())
    assert lag_of(metrics, P1) == 500
    lag.on_stats(stats(p1=blind), assigned={P0, P1, P2}, paused=set())
    lag.forget([P1])
    assert lag.unfetched() == set(), "released: forgotten"
    lag.on_stats(stats(p1=blind), assigned={P0, P1, P2}, paused=set())
    lag.on_stats(stats(p1=blind), assigned={P0, P1, P2}, paused=set())
    assert lag.unfetched() == {P1}
    lag.on_stats(stats(p1={"consumer_lag": 7, "hi_offset": 507}), assigned={P0, P1, P2},
                 paused=set())
    assert lag.unfetched() == set() and lag_of(metrics, P1) == 7


def test_a_partition_without_a_base_counts_from_the_low_watermark_the_broker_gives() -> None:
    """A new group whose fetches a quota starves: nothing committed, no statistics of the
    log's start, so no base and no lag series even when looked up. The broker's low
    watermark is asked for such partitions only, and kept only while they are owned."""
    lag, metrics, commits = gauges()
    asked: list[list[TP]] = []

    def lows(parts: list[TP]) -> dict[TP, int]:
        asked.append(parts)
        return {P0: 100, P1: 5, P2: -1}

    commits.take(P2, 7)
    commits.finish(P2, 7)  # P2 has a base (what this worker would commit)
    lag.paused([P0, P1, P2], lambda parts: dict.fromkeys(parts, 150), lambda: {P0, P2}, lows)
    assert asked == [[P0, P1]], "only the partitions without a base"
    assert lag_of(metrics, P0) is None, "the high watermarks came first: set next round"
    lag.paused([P0, P1, P2], lambda parts: dict.fromkeys(parts, 150), lambda: {P0, P2}, lows)
    assert lag_of(metrics, P0) == 50
    assert lag_of(metrics, P1) is None, "released meanwhile: neither kept nor set"
    assert lag.bases([P1]) == {} and asked[1] == [P0, P1]
    assert lag_of(metrics, P2) == 142


def test_a_low_watermark_asked_of_the_broker_is_asked_again_each_round() -> None:
    """Review "diff60": read once, a looked-up log start was never refreshed, so retention
    moving it overstated the lag for good. Asked again while it is the base; not once
    something else is (the statistics' own, or a commit)."""
    lag, metrics, commits = gauges()
    starts = {P0: 5}
    asked: list[list[TP]] = []

    def lows(parts: list[TP]) -> dict[TP, int]:
        asked.append(parts)
        return {tp: starts[tp] for tp in parts}

    def look() -> None:
        lag.paused([P0], lambda parts: dict.fromkeys(parts, 100), lambda: {P0}, lows)

    look()
    look()  # the high watermarks first: the low one known, the lag is set a round later
    assert lag_of(metrics, P0) == 95
    starts[P0] = 40  # retention removed the log's start
    look()
    look()
    assert lag_of(metrics, P0) == 60 and asked == [[P0]] * 4
    commits.take(P0, 70)
    commits.finish(P0, 70)  # now the worker's own commit is the base
    look()
    assert lag_of(metrics, P0) == 29 and len(asked) == 4
