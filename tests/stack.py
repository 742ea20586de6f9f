"""Test helpers: run adloop's real processes against the embedded broker."""

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

    def start(self) -> Stack:
        self.sup.start()
        self.sup.wait_http_ready(timeout=120)
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

    def publish(self, role: str, key: str | bytes | None, value: Any) -> None:
        if isinstance(value, dict):
            value = json.dumps(value).encode()
        if isinstance(key, str):
            key = key.encode()
        self.producer.send(self.settings.topic(role), value=value, key=key)

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
        timeout: float = 60.0,
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

    def dead_letters(self, expected: int, timeout: float = 30.0) -> list[dict]:
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
        # At least one pass: with expected=0 the topic is still read (and must be empty).
        while True:
            for record in consumer:
                letter = json.loads(record.value)
                letter["original"] = base64.b64decode(letter["original_b64"])
                letters.append(letter)
            if len(letters) >= expected or time.monotonic() >= deadline:
                break
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
