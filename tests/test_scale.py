"""Scale-out on the embedded broker: two ingest, two worker and two serving processes.

The two ingests share the event partitions (one consumer group, range assignment) and
the two workers the outcome partitions. Mid-stream, at event counts:

1. ``ingest-1`` is SIGKILLed and its state directory deleted: its partitions move to
   ``ingest-2``, which restores their join state from the ingest changelog;
2. ``ingest-1`` comes back with an empty directory and restores the partitions it is
   given back (now written by ``ingest-2``);
3. ``worker-1`` is SIGKILLed and its state directory deleted: ``worker-2`` takes its
   table partitions over (Faust's table changelog); then it comes back, empty, too.

Counts must equal exactly what was published, on both serving replicas, and the dead
letter topic must hold nothing but the sentinels sent at the end (a lost join state
shows as ``duplicate_impression_id`` or ``unknown_impression``). Then a burst of clicks
on one creative: both replicas show the same decision and both select the winner most.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from adloop.schemas import Creative, decision_key
from adloop.streams.config import Settings
from adloop.streams.supervisor import ROLES, instances

from stack import Stack, click, imp

pytestmark = pytest.mark.integration

CAMPAIGN = "k"
CREATIVES = ["c1", "c2", "c3"]
PHASE = 5_000  # impressions published per phase; the next phase waits for its action
PHASES = 5
RATE = 2_500  # impressions/s within a phase, so every action lands mid-stream
WAIT_S = 240.0

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\[[^\]]*\]|\S+)')


def audiences(partitions: int) -> list[str]:
    """Audiences whose decision keys fall on every outcomes partition, twice: the ingest
    publishes snapshots with the default partitioner, so each worker holds some keys."""
    partitioner = DefaultPartitioner()
    chosen: list[str] = []
    hits: Counter[int] = Counter()
    i = 0
    while min((hits[p] for p in range(partitions)), default=0) < 2:
        audience = f"a{i}"
        p = partitioner(decision_key(CAMPAIGN, audience).encode(), range(partitions), [])
        if hits[p] < 2:
            chosen.append(audience)
            hits[p] += 1
        i += 1
    return chosen


def log_events(stack: Stack, name: str, message: str) -> list[dict[str, Any]]:
    """The structured fields of each ``message`` line in process ``name``'s log."""
    try:
        text = stack.sup.log_path(name).read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        _, sep, rest = line.partition(f"] {message}")
        if sep and (not rest or rest.startswith(" ")):
            events.append({k: json.loads(v) for k, v in _FIELD.findall(rest)})
    return events


def assigned(stack: Stack, name: str) -> list[int] | None:
    events = log_events(stack, name, "partitions assigned")
    return events[-1].get("partitions") if events else None


def test_two_of_each_role_share_the_load_and_move_partitions_with_their_state(
    settings: Settings,
) -> None:
    stack = Stack(settings, roles=instances(ROLES, 2)).start()
    try:
        _run(stack)
    finally:
        stack.stop()


def _run(stack: Stack) -> None:
    s = stack.settings
    stack.register(
        *(Creative(creative_id=c, campaign=CAMPAIGN, headline=f"Ad {c}") for c in CREATIVES)
    )
    auds = audiences(s.partitions)
    replicas = {name: stack.replica(name) for name in ("serve-1", "serve-2")}

    def counts(replica: str) -> dict[str, dict[str, tuple[int, int]]]:
        api = replicas[replica]
        out = {}
        for audience in auds:
            status, body = api.get(f"/v1/campaigns/{CAMPAIGN}/audiences/{audience}/decision")
            rows = body.get("creatives", []) if status == 200 else []
            out[audience] = {r["creative_id"]: (r["impressions"], r["clicks"]) for r in rows}
        return out

    def counted() -> int:
        return sum(n for by_c in counts("serve-1").values() for n, _ in by_c.values())

    def until(
        predicate: Callable[[], bool], what: str, state: Callable[[], object] | None = None
    ) -> None:
        stack.wait_for(predicate, timeout=WAIT_S, what=what, state=state or counted)

    # Both ingests and both workers hold partitions before anything is published.
    half = s.partitions // 2
    until(
        lambda: (
            all(len(assigned(stack, f"ingest-{n}") or []) == half for n in (1, 2))
            and all(assigned(stack, f"worker-{n}") for n in (1, 2))
        ),
        "both ingests and both workers assigned",
        lambda: {n: assigned(stack, n) for n in ("ingest-1", "ingest-2", "worker-1", "worker-2")},
    )
    ingest_1 = set(assigned(stack, "ingest-1") or [])

    expected = {a: {c: [0, 0] for c in CREATIVES} for a in auds}
    # Warm-up: one impression per audience, counted, so both workers are deciding (their
    # keys) before the stream starts and "counted" below follows it closely.
    for audience in auds:
        stack.publish(
            "impressions", f"w-{audience}", imp(f"w-{audience}", "c1", audience, campaign=CAMPAIGN)
        )
        expected[audience]["c1"][0] += 1
    stack.flush()
    until(lambda: counted() == len(auds), "the warm-up counted")
    gates = [threading.Event() for _ in range(PHASES)]
    done = threading.Event()
    failures: list[BaseException] = []
    published = [0]  # impressions sent so far

    def produce() -> None:
        try:
            for phase in range(PHASES):
                if not gates[phase].wait(timeout=3 * WAIT_S):
                    raise TimeoutError(f"phase {phase} never opened")
                started = time.monotonic()
                for j in range(PHASE):
                    i = phase * PHASE + j
                    creative, audience = CREATIVES[i % 3], auds[(i // 3) % len(auds)]
                    impression_id = f"e{i}"
                    stack.publish(
                        "impressions",
                        impression_id,
                        imp(impression_id, creative, audience, campaign=CAMPAIGN),
                    )
                    expected[audience][creative][0] += 1
                    published[0] += 1
                    if i % 7 == 0:
                        stack.publish("clicks", impression_id, click(impression_id))
                        expected[audience][creative][1] += 1
                    ahead = j / RATE - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                stack.flush()
            done.set()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    gates[0].set()
    producer.start()

    def kill(name: str) -> None:
        stack.sup.kill(name)
        # Dead until the test starts it again (Supervisor.check would report it).
        del stack.sup.children[name]

    def restored(name: str, after: int) -> list[dict[str, Any]]:
        return log_events(stack, name, "changelog restored")[after:]

    # 1. ingest-1 dies with its state directory, mid-stream.
    until(lambda: counted() >= PHASE * 0.3, "first events counted")
    seen_2 = len(log_events(stack, "ingest-2", "changelog restored"))
    in_flight = published[0] - counted()
    kill("ingest-1")
    assert in_flight > 0, "the kill should land while events are on their way"
    shutil.rmtree(s.data_dir / "ingest-1")
    gates[1].set()
    until(
        lambda: (
            ingest_1
            <= {
                e["partition"]
                for e in restored("ingest-2", seen_2)
                if e["mode"] in ("full", "incremental")
            }
        ),
        "ingest-2 restored ingest-1's partitions from the changelog",
        lambda: restored("ingest-2", seen_2),
    )
    until(lambda: counted() >= PHASE * 1.6, "ingest-2 counting every partition")

    # 2. ingest-1 comes back empty and restores what it is given.
    seen_1 = len(log_events(stack, "ingest-1", "changelog restored"))
    stack.sup.start("ingest-1")
    gates[2].set()
    until(
        lambda: any(e["mode"] == "full" and e["records"] > 0 for e in restored("ingest-1", seen_1)),
        "ingest-1 restored its partitions from the changelog",
        lambda: restored("ingest-1", seen_1),
    )
    until(lambda: counted() >= PHASE * 2.6, "both ingests counting again")

    # 3. worker-1 dies with its state directory; worker-2 takes its table partitions over.
    kill("worker-1")
    shutil.rmtree(s.data_dir / "worker-1")
    gates[3].set()
    until(lambda: counted() >= PHASE * 3.6, "worker-2 deciding every key")
    stack.sup.start("worker-1")
    assignments = len(log_events(stack, "worker-1", "partitions assigned"))
    until(
        lambda: (
            len(log_events(stack, "worker-1", "partitions assigned")) > assignments
            and bool(assigned(stack, "worker-1"))
        ),
        "worker-1 back with partitions",
    )
    gates[4].set()
    producer.join(timeout=3 * WAIT_S)
    assert not failures, failures
    assert done.is_set()

    want = {a: {c: tuple(v) for c, v in by_c.items()} for a, by_c in expected.items()}
    for replica in replicas:
        until(
            lambda replica=replica: counts(replica) == want,  # type: ignore[misc]
            f"exact counts on {replica}",
            lambda replica=replica: counts(replica),  # type: ignore[misc]
        )

    # Dead letters: none but a sentinel per partition, sent last (an undecodable
    # impression): once each sentinel's letter is there, every event before it in its
    # partition has been judged.
    for p in range(s.partitions):
        stack.producer.send(
            s.topic("impressions"), value=b"sentinel", key=f"sentinel-{p}".encode(), partition=p
        )
    stack.flush()
    letters: list[dict] = []

    def sentinels_in() -> bool:
        letters[:] = stack.dead_letters(expected=s.partitions, timeout=1.0)
        return {d["partition"] for d in letters if d["original"] == b"sentinel"} == set(
            range(s.partitions)
        )

    until(sentinels_in, "the sentinels' dead letters", lambda: letters)
    assert [(d["reason_code"], d["original"]) for d in letters] == [
        ("malformed_json", b"sentinel")
    ] * s.partitions

    _burst_and_select(stack, replicas)


def _burst_and_select(stack: Stack, replicas: dict[str, Any]) -> None:
    """A burst of clicks on c2 in a fresh audience: both replicas show the same decision
    and both select c2 more than any other creative."""
    audience = "burst"
    want = {"c1": (300, 0), "c2": (300, 120), "c3": (300, 0)}
    for i in range(900):
        creative = CREATIVES[i % 3]
        impression_id = f"b{i}"
        stack.publish(
            "impressions", impression_id, imp(impression_id, creative, audience, campaign=CAMPAIGN)
        )
        if creative == "c2" and i % 5 < 2:
            stack.publish("clicks", impression_id, click(impression_id))
    stack.flush()

    def decisions() -> dict[str, Any]:
        out = {}
        for name, api in replicas.items():
            status, body = api.get(f"/v1/campaigns/{CAMPAIGN}/audiences/{audience}/decision")
            out[name] = body if status == 200 else None
        return out

    def same_and_final() -> bool:
        got = list(decisions().values())
        if any(d is None for d in got):
            return False
        rows = [
            {r["creative_id"]: (r["impressions"], r["clicks"]) for r in d["creatives"]} for d in got
        ]
        return rows[0] == rows[1] == want and got[0] == got[1]

    stack.wait_for(
        same_and_final,
        timeout=WAIT_S,
        what="the burst's decision on both replicas",
        state=decisions,
    )
    for name, api in replicas.items():
        assert decisions()[name]["best_creative_id"] == "c2", name
        chosen = Counter(api(CAMPAIGN, audience, "feed")["creative_id"] for _ in range(200))
        assert chosen.most_common(1)[0][0] == "c2", (name, chosen)
