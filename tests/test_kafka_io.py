"""FetchWaitGovernor, deterministically: a fake consumer, scripted polls and lags.

The integration test on the embedded broker (tests/test_broker.py) only checks the
outcome that matters (every record is read); the mechanism is tested here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from adloop.streams.kafka_io import FetchWaitGovernor

A, B = ("t", 0), ("t", 1)
RECORDS = ["record"]


class FakeConsumer:
    """What the governor touches: the fetcher's max wait; lags come from the test."""

    def __init__(self, wait_ms: int) -> None:
        self._fetcher = SimpleNamespace(_fetch_max_wait_ms=wait_ms)
        self.lags: dict[tuple[str, int], int] = {}


def governed(floor_ms: int = 5, **kwargs: int) -> tuple[FakeConsumer, FetchWaitGovernor]:
    consumer = FakeConsumer(floor_ms)
    governor = FetchWaitGovernor(consumer, floor_ms, lags=lambda: consumer.lags, **kwargs)
    return consumer, governor


def waits(governor: FetchWaitGovernor, polls: list[dict]) -> list[int]:
    """The wait after each poll."""
    out = []
    for records in polls:
        governor.observe(records)
        out.append(governor.wait_ms)
    return out


def test_the_wait_doubles_after_three_empty_polls_of_a_lagging_partition() -> None:
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 100}
    assert waits(governor, [{}] * 9) == [5, 5, 10, 10, 10, 20, 20, 20, 40]
    # The consumer's next fetch request uses it.
    assert consumer._fetcher._fetch_max_wait_ms == 40


def test_a_lagging_partition_that_delivers_starts_its_count_again() -> None:
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 100}
    polls = [{}, {}, {A: RECORDS}, {}, {}, {A: RECORDS}, {}, {}]
    assert waits(governor, polls) == [5] * len(polls)


def test_partitions_are_counted_apart_and_any_one_starving_lengthens_the_wait() -> None:
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 100, B: 100}
    # B delivers every time; A never does.
    assert waits(governor, [{B: RECORDS}] * 3) == [5, 5, 10]


def test_empty_polls_without_a_lag_change_nothing() -> None:
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 0, B: 0}  # caught up: an empty answer is the right answer
    assert waits(governor, [{}] * 50) == [5] * 50


def test_the_wait_stops_at_the_ceiling() -> None:
    consumer, governor = governed(floor_ms=5, ceiling_ms=30)
    consumer.lags = {A: 100}
    after = waits(governor, [{}] * 30)
    assert max(after) == after[-1] == 30
    assert after[:9] == [5, 5, 10, 10, 10, 20, 20, 20, 30]
    assert consumer._fetcher._fetch_max_wait_ms == 30


def test_a_ceiling_below_the_floor_is_the_floor() -> None:
    consumer, governor = governed(floor_ms=50, ceiling_ms=10)
    consumer.lags = {A: 100}
    assert waits(governor, [{}] * 9) == [50] * 9


def test_a_floor_of_zero_can_still_grow() -> None:
    consumer, governor = governed(floor_ms=0)
    consumer.lags = {A: 100}
    assert waits(governor, [{}] * 9) == [0, 0, 1, 1, 1, 2, 2, 2, 4]


def test_the_wait_eases_back_to_the_floor_when_nothing_lags() -> None:
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 100}
    waits(governor, [{}] * 12)
    assert governor.wait_ms == 80
    consumer.lags = {A: 0}
    eased = waits(governor, [{}] * 40)
    assert all(
        later < earlier
        for earlier, later in zip([80, *eased[:-1]], eased, strict=True)
        if earlier > 5
    )
    assert eased[-1] == 5 and min(eased) == 5
    assert consumer._fetcher._fetch_max_wait_ms == 5


def test_a_lagging_partition_holds_the_wait_where_it_is() -> None:
    """Neither grows (it delivers) nor eases (it lags): catching up at this wait."""
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 100}
    waits(governor, [{}] * 6)
    assert governor.wait_ms == 20
    assert waits(governor, [{A: RECORDS}] * 20) == [20] * 20


@pytest.mark.parametrize("empty_run", [0, 1, 2])
def test_on_kafka_the_wait_never_moves(empty_run: int) -> None:
    """Kafka answers as soon as data is there: a lagging partition delivers within a
    poll or two (the fetch in flight), never after ``patience`` empty polls."""
    consumer, governor = governed(floor_ms=500)
    consumer.lags = {A: 1000, B: 0}
    polls = ([{}] * empty_run + [{A: RECORDS}]) * 100
    assert set(waits(governor, polls)) == {500}
    assert consumer._fetcher._fetch_max_wait_ms == 500


def test_without_a_fetcher_only_the_governor_changes() -> None:
    lags = {A: 100}
    governor = FetchWaitGovernor(object(), 5, lags=lambda: lags)
    assert waits(governor, [{}] * 3) == [5, 5, 10]


def test_partitions_the_poll_did_not_ask_for_never_lengthen_the_wait() -> None:
    # Faust keeps its tables' changelog partitions (here B) assigned but reads them only
    # while recovering: their lag grows with the table's own writes. Counted as starved,
    # they drove the worker's wait to the ceiling and click -> decision to ~1 s.
    consumer, governor = governed(floor_ms=5)
    consumer.lags = {A: 0, B: 500}
    for _ in range(12):
        governor.observe({}, among={A})
    assert governor.wait_ms == 5
    # Asked for, B's starvation counts again.
    for _ in range(3):
        governor.observe({}, among={A, B})
    assert governor.wait_ms == 10


def test_librdkafka_config_carries_the_broker_login_and_tls_files() -> None:
    from adloop.streams.config import Settings
    from adloop.streams.kafka_io import librdkafka_config

    settings = Settings(
        broker="kafka://k1:9093,kafka://k2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="exchange",
        sasl_password="s3cret",
        ssl_cafile="/etc/ca.pem",
    )
    config = librdkafka_config(settings, **{"linger.ms": 20})
    assert config == {
        "bootstrap.servers": "k1:9093,k2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "exchange",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "linger.ms": 20,
    }
    # librdkafka knows every name (it reads TLS files at once, so build it without them;
    # building a producer does not connect).
    from confluent_kafka import Producer

    plain = settings.model_copy(update={"security_protocol": "SASL_PLAINTEXT", "ssl_cafile": None})
    Producer(librdkafka_config(plain, **{"linger.ms": 20})).flush(0)
