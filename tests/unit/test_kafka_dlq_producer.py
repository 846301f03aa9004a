"""`kafka.DeadLetterProducer` after a fatal producer error: a new producer takes over."""

from __future__ import annotations

import asyncio
import ctypes
import glob
import os
import threading
import time
import zlib
from types import SimpleNamespace
from typing import Any, cast

import confluent_kafka
import pytest
from confluent_kafka import KafkaError, KafkaException

from consumer import kafka
from consumer.kafka import DeadLetterProducer


class FakeProducer:
    """A producer whose `produce` raises `refuse` (if set) or queues the record, whose
    `poll` answers the queued records with `answer` (None: acknowledged)."""

    def __init__(self, refuse: KafkaError | None = None,
                 answer: KafkaError | None = None,
                 stopped: KafkaError | None = None) -> None:
        self.refuse = refuse
        self.answer = answer
        self.stopped = stopped  # `poll` raises it, as librdkafka raises a fatal error
        self.queued: list[Any] = []
        self.written: list[bytes | None] = []
        self.purged = threading.Event()
        self._lock = threading.Lock()
        self.partitions: list[int | None] = []  # each record's, as given to `produce`
        self.topic_partitions = 0  # what `list_topics` says (0: it fails)

    def list_topics(self, topic: str, timeout: float) -> Any:
        if not self.topic_partitions:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        found = SimpleNamespace(error=None, partitions=dict.fromkeys(
            range(self.topic_partitions)))
        return SimpleNamespace(topics={topic: found})

    def produce(self, topic: str, *, key: bytes | None, value: bytes | None,
                headers: Any, on_delivery: Any, partition: int | None = None) -> None:
        self.partitions.append(partition)
        if self.refuse is not None:
            raise KafkaException(self.refuse)
        with self._lock:
            self.queued.append((value, on_delivery))

    def poll(self, timeout: float) -> int:
        if self.stopped is not None:
            time.sleep(min(timeout, 0.005))
            raise KafkaException(self.stopped)
        with self._lock:
            queued, self.queued = self.queued, []
        for value, on_delivery in queued:
            if self.answer is None:
                self.written.append(value)
            on_delivery(self.answer, None)
        if not queued:
            time.sleep(min(timeout, 0.005))
        return len(queued)

    def purge(self) -> None:
        self.purged.set()

    def flush(self, timeout: float = 0) -> int:
        self.poll(0)
        return 0


def _fatal(code: int = KafkaError._FATAL) -> KafkaError:
    return KafkaError(code, "Fatal error: Broker: Out of order sequence number", fatal=True)


def _producer(instances: list[FakeProducer]) -> tuple[DeadLetterProducer, list[FakeProducer]]:
    built: list[FakeProducer] = []

    def factory() -> Any:
        built.append(instances[len(built)])
        return built[-1]

    return DeadLetterProducer({}, factory=factory), built


async def _send(producer: DeadLetterProducer, value: bytes) -> None:
    await asyncio.wait_for(producer.send("dlq", key=None, value=value, headers=[]), 5)


def _failing_sends(producer: DeadLetterProducer, times: int) -> None:
    """`times` sends, each raising KafkaException; the producer closed after."""
    async def sends() -> None:
        for _ in range(times):
            with pytest.raises(KafkaException):
                await _send(producer, b"x")

    try:
        asyncio.run(sends())
    finally:
        producer.close(1)


def test_a_producer_refusing_records_for_good_is_replaced_and_the_record_written() -> None:
    stopped = FakeProducer(refuse=_fatal())
    fresh = FakeProducer()
    producer, built = _producer([stopped, fresh])
    try:
        asyncio.run(_send(producer, b"dead letter"))
    finally:
        producer.close(1)
    assert built == [stopped, fresh]
    assert fresh.written == [b"dead letter"]
    assert stopped.purged.wait(5), "the old producer's records were not failed"


def test_a_fatal_error_poll_raises_fails_the_waiting_send_and_a_new_producer_writes() -> None:
    """librdkafka raises a fatal error from `poll` (review "diff45"): it ended the dlq-poll
    thread, and the dead letter waiting on the stopped producer, and every later one, was
    never answered."""
    stopped = FakeProducer(stopped=_fatal())
    fresh = FakeProducer()
    producer, built = _producer([stopped, fresh])

    async def both() -> None:
        with pytest.raises(KafkaException, match="the DLQ producer stopped"):
            await _send(producer, b"first")  # the handler writes it again later
        await _send(producer, b"first")

    try:
        asyncio.run(both())
        assert producer._thread.is_alive(), "the dlq-poll thread ended"
    finally:
        producer.close(1)
    assert built == [stopped, fresh]
    assert fresh.written == [b"first"]


_LIBS = glob.glob(os.path.join(os.path.dirname(confluent_kafka.__file__) + ".libs",
                               "librdkafka*.so*"))


def _make_fatal(producer: Any) -> None:
    """librdkafka's own test hook (`rd_kafka_test_fatal_error`), reached through the
    confluent-kafka handle's first field (`rk`, after the object header), checked by the
    client name it answers before it is used."""
    lib = ctypes.CDLL(_LIBS[0])
    lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_name.restype = ctypes.c_char_p
    lib.rd_kafka_test_fatal_error.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    rk = ctypes.c_void_p.from_address(id(producer) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    assert rk and lib.rd_kafka_name(rk).startswith(b"fatal-test#producer"), "not the handle"
    assert lib.rd_kafka_test_fatal_error(rk, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
                                         b"an unclean leader election") == 0


@pytest.mark.skipif(not _LIBS, reason="confluent-kafka without its bundled librdkafka")
def test_a_real_fatal_error_is_survived_against_librdkafkas_mock_cluster() -> None:
    """The same with librdkafka itself: its in-process mock cluster, the worker's producer
    settings, a fatal error raised by librdkafka's test hook between two dead letters."""
    producer = DeadLetterProducer({"test.mock.num.brokers": 1, "client.id": "fatal-test"})

    async def scenario() -> None:
        await asyncio.wait_for(
            producer.send("dlq", key=b"k", value=b"before", headers=[]), 10)
        _make_fatal(producer._producer)
        await asyncio.sleep(0.5)  # the dlq-poll thread meets it first, as it mostly does
        for _ in range(40):  # as the handler does: a failed dead letter is written again
            try:
                await asyncio.wait_for(
                    producer.send("dlq", key=b"k", value=b"after", headers=[]), 10)
                return
            except KafkaException:
                await asyncio.sleep(0.25)
        raise AssertionError("no dead letter was written after the fatal error")

    try:
        asyncio.run(scenario())
        assert producer._thread.is_alive(), "the dlq-poll thread ended"
    finally:
        producer.close(2)


def test_a_non_fatal_error_keeps_the_producer() -> None:
    busy = FakeProducer(answer=KafkaError(KafkaError.REQUEST_TIMED_OUT, "timed out"))
    producer, built = _producer([busy, FakeProducer()])
    _failing_sends(producer, 2)
    assert built == [busy]


def test_producers_fatal_at_once_are_not_rebuilt_in_a_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "REBUILD_EVERY_S", 60.0)
    instances = [FakeProducer(refuse=_fatal()) for _ in range(5)]
    producer, built = _producer(instances)
    _failing_sends(producer, 3)
    assert len(built) == 2  # the first, and one new one: not one per send


def test_a_retired_producers_late_fatal_error_does_not_stop_its_successor() -> None:
    """Seen by the dlq-poll thread just as the new producer took over, the old one's error
    was pinned on the new one and failed its sends (review "diff45b")."""
    stopped = FakeProducer(refuse=_fatal())
    fresh = FakeProducer()
    producer, built = _producer([stopped, fresh])
    try:
        asyncio.run(_send(producer, b"x"))  # rebuilt on the way
        producer._fatal_seen(cast(Any, stopped), "the old one's error, late")
        assert producer._fatal is None
        asyncio.run(_send(producer, b"y"))
    finally:
        producer.close(1)
    assert built == [stopped, fresh] and fresh.written == [b"x", b"y"]


def test_no_producer_is_built_after_close() -> None:
    """A recovery queued before close() ran after it: a producer nothing polls or closes
    (review "diff45b")."""
    first = FakeProducer()
    producer, built = _producer([first, FakeProducer()])
    producer.close(1)
    producer._fatal_seen(cast(Any, first), "fatal after the close")
    assert built == [first]
    # A send after close() on a producer in a fatal state raises, not loops for ever on the
    # event loop (review "diff45c").
    first.refuse = _fatal()
    raised: list[BaseException] = []

    def late() -> None:
        try:
            asyncio.run(_send(producer, b"late"))
        except BaseException as exc:  # what it raised is the point
            raised.append(exc)

    thread = threading.Thread(target=late, daemon=True)  # a spin must fail, not hang, the test
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "send() after close() spins on the event loop"
    assert len(raised) == 1 and isinstance(raised[0], KafkaException), raised
    assert built == [first]


def test_an_unread_policy_leaves_the_last_verdict_standing() -> None:
    """Review "dlq54": a check that could not read the DLQ's settings (a broker restarting)
    was taken as "fine" while the topic was known compacted: keyed dead letters went in
    until the next check, 5 minutes later, and compaction removed them."""
    from consumer.reach import PolicyUnread

    answers: list[str | Exception | None] = [
        "the DLQ topic 'dlq' has cleanup.policy=compact", PolicyUnread("unread"), None]

    def policy(topic: str) -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    fresh = FakeProducer()
    producer = DeadLetterProducer({}, policy=policy, check_s=0.0,
                                  factory=lambda: cast(Any, fresh))
    producer._policy_due = 0.0  # as if start-up's check were long ago

    async def sends() -> list[str]:
        out = []
        for _ in range(3):
            try:
                await _send(producer, b"x")
                out.append("written")
            except KafkaException as exc:
                out.append(exc.args[0].name())
        return out

    try:
        assert asyncio.run(sends()) == ["INVALID_CONFIG", "INVALID_CONFIG", "written"]
    finally:
        producer.close(1)
    assert fresh.written == [b"x"]


def test_a_record_without_a_key_goes_to_its_users_partition() -> None:
    """Review "dlq54": librdkafka spreads keyless records at random, so one user's dead
    letters of a keyless topic landed on several DLQ partitions and `replay` wrote an older
    identify after a newer one. Placed by the user, as librdkafka places a key (CRC32);
    a keyed record is left to librdkafka; with the count unknown, so is a keyless one."""
    fresh = FakeProducer()
    fresh.topic_partitions = 8
    producer = DeadLetterProducer({}, factory=lambda: cast(Any, fresh))

    async def sends() -> None:
        for user in (b"u0", b"u1", b"u0"):
            await asyncio.wait_for(producer.send("dlq", key=None, value=b"x", headers=[],
                                                 placement=user), 5)
        await asyncio.wait_for(producer.send("dlq", key=b"k", value=b"x", headers=[],
                                             placement=b"k"), 5)
        await asyncio.wait_for(producer.send("dlq", key=None, value=b"x", headers=[]), 5)

    try:
        asyncio.run(sends())
    finally:
        producer.close(1)
    u0, u1 = zlib.crc32(b"u0") % 8, zlib.crc32(b"u1") % 8
    assert u0 != u1
    assert fresh.partitions == [u0, u1, u0, None, None]


def test_a_keyless_record_is_left_to_librdkafka_while_the_count_is_unknown() -> None:
    fresh = FakeProducer()  # list_topics fails
    producer = DeadLetterProducer({}, factory=lambda: cast(Any, fresh))
    try:
        asyncio.run(asyncio.wait_for(producer.send("dlq", key=None, value=b"x", headers=[],
                                                   placement=b"u0"), 5))
    finally:
        producer.close(1)
    assert fresh.partitions == [None] and fresh.written == [b"x"]


def test_a_burst_of_keyless_dead_letters_asks_the_count_once_off_the_default_pool() -> None:
    """Review "diff54a": 30 dead letters at once made 30 lookups (5 s each with Kafka away)
    on asyncio's default pool, where aiohttp resolves Userpilot's host: a lookup there
    waited 24.8 s. One lookup, on the producer's own thread."""
    fresh = FakeProducer()
    fresh.topic_partitions = 8
    threads: list[str] = []
    lookups = 0
    listed = fresh.list_topics

    def slow_list(topic: str, timeout: float) -> Any:
        nonlocal lookups
        lookups += 1
        threads.append(threading.current_thread().name)
        time.sleep(0.2)
        return listed(topic, timeout)

    fresh.list_topics = slow_list  # type: ignore[method-assign]
    producer = DeadLetterProducer({}, factory=lambda: cast(Any, fresh))

    async def burst() -> None:
        await asyncio.gather(*(
            asyncio.wait_for(producer.send("dlq", key=None, value=b"x", headers=[],
                                           placement=f"u{i}".encode()), 5)
            for i in range(30)))

    try:
        asyncio.run(burst())
    finally:
        producer.close(1)
    assert lookups == 1 and threads[0].startswith("dlq-partitions")
    assert None not in fresh.partitions and len(fresh.written) == 30


def test_with_another_partitioner_a_keyless_record_is_left_to_it() -> None:
    """Review "diff54a": KAFKA_PARTITIONER=murmur2_random reaches the DLQ producer; placed
    by CRC32 beside records librdkafka placed by murmur2, a user's records split."""
    fresh = FakeProducer()
    fresh.topic_partitions = 8
    producer = DeadLetterProducer({"partitioner": "murmur2_random"},
                                  factory=lambda: cast(Any, fresh))
    try:
        asyncio.run(asyncio.wait_for(producer.send("dlq", key=None, value=b"x", headers=[],
                                                   placement=b"u0"), 5))
    finally:
        producer.close(1)
    assert fresh.partitions == [None]


def test_a_broker_throttling_the_dead_letter_producer_is_said_apart_from_the_consumer(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Round 59's "noticed": a producer quota (producer_byte_rate) slowed every dead letter,
    their partitions' commits behind them, with no line saying why. The worker's DLQ producer
    is built with a throttle callback whose line names it, limited once a minute per broker
    apart from the consumer's line about the same broker."""
    import logging

    seen: list[dict[str, Any]] = []
    real = confluent_kafka.Producer

    def capture(settings: dict[str, Any]) -> Any:
        seen.append(dict(settings))
        return real(settings)

    monkeypatch.setattr(kafka, "Producer", capture)
    producer = DeadLetterProducer({"test.mock.num.brokers": 1, "client.id": "throttle-test"})
    try:
        callback = seen[0]["throttle_cb"]
        caplog.set_level(logging.WARNING, logger="consumer.kafka.throttle")
        throttled = SimpleNamespace(broker_name="kafka-0:9092", broker_id=0, throttle_time=2.0)
        kafka.KafkaSource._on_throttle(throttled)  # the consumer's, same broker
        for _ in range(3):
            callback(throttled)
        callback(SimpleNamespace(broker_name="kafka-1:9092", broker_id=1, throttle_time=0.1))
    finally:
        producer.close(1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "consumer.kafka.throttle"]
    assert len(lines) == 2, lines
    assert "throttles this worker's consumer for 2.0 s" in lines[0]
    assert lines[1].startswith("kafka kafka-0:9092/0: the broker throttles this worker's "
                               "dead-letter producer for 2.0 s"), lines[1]
    assert "producer_byte_rate" in lines[1] and "dead letters" in lines[1]
