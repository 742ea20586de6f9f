"""Test helpers: run adloop's real processes against the embedded broker.

Waiting: every wait here polls until its condition holds and fails only when it never
does, after a generous limit (``WAIT_S``); none is a speed target (bench/ measures
speed). To show that something did *not* happen, publish sentinels after the events
under test and wait until they are processed (:meth:`Stack.settle`,
:meth:`Stack.settled_dead_letters`): partitions are processed independently, so there
is one sentinel per partition.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from adloop.bench.exchange import HttpSelector
from adloop.bench.harness import free_port
from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.kafka_io import kafka_python_kwargs
from adloop.streams.supervisor import ROLES, Supervisor
from adloop.streams.topics import ensure_topics_sync

#: The limit of every wait for a condition (seconds).
WAIT_S = 120.0
#: The creative whose impressions and clicks are the sentinels of Stack.settle.
SENTINEL = "zz-sentinel"


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


class Stack:
    """ingest + worker + serve as child processes, plus clients for the test."""

    def __init__(self, settings: Settings, roles: tuple[str, ...] = ROLES) -> None:
        # Serving instance n listens on api_port + n - 1: a run of free ports.
        ports = len([r for r in roles if r.startswith("serve")]) or 1
        self.settings = settings.with_overrides(api_port=free_ports(ports))
        ensure_topics_sync(self.settings)
        self.sup = Supervisor(self.settings, roles=roles)
        self.producer = KafkaProducer(
            **kafka_python_kwargs(KafkaProducer, self.settings, acks="all", linger_ms=2)
        )
        self.api: HttpSelector | None = None
        self._sentinels: dict[tuple[str, str], int] = {}
        self._sentinel_rounds = 0

    def start(self) -> Stack:
        self.sup.start()
        self.sup.wait_http_ready(timeout=WAIT_S)
        self.api = HttpSelector.local(self.settings)
        return self

    def replica(self, name: str) -> HttpSelector:
        """A client of serving instance ``name`` (``serve-2``), with the admin token."""
        assert self.api is not None
        return HttpSelector(self.settings.api_host, self.sup.api_port(name), self.api.token)

    def stop(self) -> None:
        self.producer.close()
        self.sup.stop()

    def register(self, *creatives: Creative) -> None:
        assert self.api is not None
        for creative in creatives:
            self.api.register(creative)

    def publish(
        self, role: str, key: str | bytes | None, value: Any, partition: int | None = None
    ) -> None:
        if isinstance(value, dict):
            value = json.dumps(value).encode()
        if isinstance(key, str):
            key = key.encode()
        self.producer.send(self.settings.topic(role), value=value, key=key, partition=partition)

    def flush(self) -> None:
        self.producer.flush()

    def get(self, path: str) -> tuple[int, dict]:
        assert self.api is not None
        return self.api.get(path)

    def decision(self, campaign: str, audience: str) -> dict | None:
        status, body = self.get(f"/v1/campaigns/{campaign}/audiences/{audience}/decision")
        return body if status == 200 else None

    def counts(self, campaign: str, audience: str) -> dict[str, tuple[int, int]]:
        decision = self.decision(campaign, audience)
        if decision is None:
            return {}
        return {r["creative_id"]: (r["impressions"], r["clicks"]) for r in decision["creatives"]}

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = WAIT_S,
        what: str = "condition",
        state: Callable[[], object] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sup.check()
            if predicate():
                return
            time.sleep(0.1)
        logs = "".join(
            f"\n--- {name} log ---\n{self.sup.tail(name)}"
            for name in self.sup.roles
            if not name.startswith("serve")
        )
        raise AssertionError(
            f"timed out waiting for {what}; state: {state() if state else '-'}{logs}"
        )

    def settle(self, campaign: str, audiences: list[str]) -> None:
        """Return once every event published so far to the impressions and clicks
        topics is reflected in these audiences' decisions.

        Publishes, per audience and per partition, one impression of the ``SENTINEL``
        creative and its click, and waits until the decisions count all of them. Each
        source partition is read in order and its counts are cumulative, so when a
        partition's sentinel is counted, so is everything published before it there.
        The sentinel creative is registered on first use; callers leave it out of
        their expectations (``without_sentinel``).
        """
        if not any(c == campaign for c, _ in self._sentinels):
            self.register(Creative(creative_id=SENTINEL, campaign=campaign, headline="Sentinel"))
        self._sentinel_rounds += 1
        for audience in audiences:
            for p in range(self.settings.partitions):
                iid = f"{SENTINEL}-{self._sentinel_rounds}-{audience}-{p}"
                value = imp(iid, SENTINEL, audience, campaign)
                self.publish("impressions", iid, value, partition=p)
                self.publish("clicks", iid, click(iid), partition=p)
            self._sentinels[(campaign, audience)] = (
                self._sentinels.get((campaign, audience), 0) + self.settings.partitions
            )
        self.flush()

        def counted() -> dict[str, tuple[int, int] | None]:
            return {a: self.counts(campaign, a).get(SENTINEL) for a in audiences}

        want = {a: (self._sentinels[(campaign, a)],) * 2 for a in audiences}
        self.wait_for(lambda: counted() == want, what="sentinels counted", state=counted)

    def without_sentinel(self, campaign: str, audience: str) -> dict[str, tuple[int, int]]:
        return {c: n for c, n in self.counts(campaign, audience).items() if c != SENTINEL}

    def settled_dead_letters(self) -> list[dict]:
        """Every dead letter of the events published so far (none still to come).

        Publishes one malformed impression per partition and reads the dead-letter
        topic until all of their letters are there: the ingest reads each partition in
        order and publishes a flush's dead letters before it moves on, so any letter
        for an earlier event is there too. Returns the others.
        """
        self._sentinel_rounds += 1
        originals = set()
        for p in range(self.settings.partitions):
            original = f"{SENTINEL} {self._sentinel_rounds}-{p}: not JSON".encode()
            originals.add(original)
            self.publish("impressions", f"{SENTINEL}-{p}", original, partition=p)
        self.flush()
        letters = self.dead_letters(
            until=lambda read: originals <= {letter["original"] for letter in read}
        )
        missing = originals - {letter["original"] for letter in letters}
        assert not missing, f"sentinel dead letters missing after {WAIT_S:.0f} s: {missing}"
        mine = SENTINEL.encode()
        return [letter for letter in letters if not letter["original"].startswith(mine)]

    def dead_letters(
        self,
        expected: int | None = None,
        timeout: float = WAIT_S,
        until: Callable[[list[dict]], bool] | None = None,
    ) -> list[dict]:
        """The dead-letter topic from the start, read until ``expected`` letters (or
        ``until(letters)``) and then until it is quiet; what is there after
        ``timeout`` otherwise."""
        if until is None:
            until = lambda read: len(read) >= (expected or 0)  # noqa: E731
        consumer = KafkaConsumer(
            **kafka_python_kwargs(
                KafkaConsumer, self.settings, auto_offset_reset="earliest", consumer_timeout_ms=500
            )
        )
        topic = self.settings.topic("dead_letter")
        tps = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        letters: list[dict] = []
        deadline = time.monotonic() + timeout
        done = False
        while time.monotonic() < deadline:
            for record in consumer:  # until 500 ms without a record
                letter = json.loads(record.value)
                letter["original"] = base64.b64decode(letter["original_b64"])
                letters.append(letter)
            if done:
                break
            done = until(letters)  # then one more read, to the quiet end
        consumer.close()
        return letters


#: Event time of the test events: fixed for the session (the counting rules run on event
#: time), an hour before the wall clock (the ingest refuses event times more than
#: ADLOOP_MAX_EVENT_AGE_S behind it, or ADLOOP_MAX_CLOCK_SKEW_S ahead).
T0 = float(int(time.time())) - 3600.0


def imp(
    impression_id: str,
    creative: str,
    audience: str = "students",
    campaign: str = "spring",
    ts: float = T0,
    **extra: object,
) -> dict:
    return {
        "schema_version": 1,
        "impression_id": impression_id,
        "timestamp": ts,
        "campaign": campaign,
        "audience": audience,
        "placement": "feed",
        "creative_id": creative,
        "propensity": 0.5,
        "policy": "thompson",
        **extra,
    }


def click(impression_id: str, ts: float = T0 + 5) -> dict:
    return {"schema_version": 1, "impression_id": impression_id, "timestamp": ts}
