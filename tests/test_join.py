"""The counting rules (streams/join.py), pure: every rule with an injected wall clock."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adloop.schemas import Click, Conversion, Impression, decision_key
from adloop.streams.config import Settings
from adloop.streams.join import (
    CLICK_BEFORE_IMPRESSION,
    CLICKED,
    CONVERSION_BEFORE_IMPRESSION,
    DEFAULT_MAX_CLOCK_SKEW_S,
    DEFAULT_MAX_EVENT_AGE_S,
    DUPLICATE_CLICK,
    DUPLICATE_CONVERSION,
    DUPLICATE_IMPRESSION_ID,
    EXPIRED_IMPRESSION,
    KEY_MISMATCH,
    LATE_CLICK,
    LATE_CONVERSION,
    PARKED,
    TIMESTAMP_OUT_OF_RANGE,
    UNKNOWN_IMPRESSION,
    Join,
    JoinRules,
    MemoryStore,
    Tally,
    key_matches,
    reason,
    rules_from_settings,
)

T0 = 1_700_000_000.0
RULES = JoinRules(attribution_window_s=600.0, click_wait_s=30.0)


def imp(
    impression_id: str, ts: float = T0, creative: str = "c1", audience: str = "a"
) -> Impression:
    return Impression(
        impression_id=impression_id,
        timestamp=ts,
        campaign="spring",
        audience=audience,
        placement="feed",
        creative_id=creative,
        propensity=0.5,
        policy="thompson",
    )


def click(impression_id: str, ts: float = T0 + 5) -> Click:
    return Click(impression_id=impression_id, timestamp=ts)


def conversion(impression_id: str, ts: float = T0 + 30, value: float = 0.0) -> Conversion:
    return Conversion(impression_id=impression_id, timestamp=ts, value=value)


CELL = ("spring", "a", "c1", "feed")


def test_rules_come_from_the_settings() -> None:
    rules = rules_from_settings(Settings(attribution_window_s=100, click_wait_s=10))
    assert (rules.attribution_window_s, rules.click_wait_s) == (100, 10)
    assert rules.retention == 100 + 10 + 60
    assert rules.bucket_s == pytest.approx(170 / 16)
    assert JoinRules(retention_s=8.0).bucket_s == 1.0  # at least a second
    # Settings without the skew and age fields get the join's defaults.
    assert (rules.max_clock_skew_s, rules.max_event_age_s) == (300.0, 7 * 86400.0)
    assert (DEFAULT_MAX_CLOCK_SKEW_S, DEFAULT_MAX_EVENT_AGE_S) == (300.0, 604_800.0)


def test_the_first_impression_of_an_id_counts_and_a_second_is_a_duplicate() -> None:
    tally = Tally(RULES)
    assert tally.impression(imp("i1")) is None
    assert tally.impression(imp("i1", T0 + 1, creative="c2")) == DUPLICATE_IMPRESSION_ID
    assert tally.impression(imp("i2")) is None
    assert tally.counts() == {CELL: (2, 0, 0, 0.0)}
    assert tally.dead_letters == {DUPLICATE_IMPRESSION_ID: 1}
    assert tally.join.watermark == T0


def test_a_click_counts_inside_the_window_only_and_once() -> None:
    tally = Tally(RULES)
    for i in range(3):
        tally.impression(imp(f"i{i}"))
    assert tally.attribute(click("i0", T0 + 600)) is None  # the window is inclusive
    assert tally.attribute(click("i1", T0 + 600.5)) == LATE_CLICK
    assert tally.attribute(click("i0", T0 + 10)) == DUPLICATE_CLICK
    # A late click does not use up the impression's click.
    assert tally.attribute(click("i1", T0 + 7)) is None
    assert tally.counts() == {CELL: (3, 2, 0, 0.0)}
    record = tally.join.store.get("i0")
    assert record is not None and record.flags == CLICKED


def test_a_conversion_counts_once_with_its_value_and_independently_of_clicks() -> None:
    tally = Tally(RULES)
    tally.impression(imp("i1"))
    assert tally.attribute(click("i1")) is None
    assert tally.attribute(conversion("i1", value=12.5)) is None
    assert tally.attribute(conversion("i1", value=99.0)) == DUPLICATE_CONVERSION
    tally.impression(imp("i2"))
    assert tally.attribute(conversion("i2", T0 + 601, value=3.0)) == LATE_CONVERSION
    assert tally.counts() == {CELL: (2, 1, 1, 12.5)}


def test_an_early_click_is_parked_and_joined_when_its_impression_comes() -> None:
    tally = Tally(RULES)
    assert tally.attribute(click("i1"), now_wall=T0 + 5) == PARKED
    assert tally.join.parked_count == 1
    assert tally.counts() == {}
    assert tally.impression(imp("i1"), now_wall=T0 + 6) is None
    assert tally.counts() == {CELL: (1, 1, 0, 0.0)}
    assert tally.join.parked_count == 0 and not tally.dead_letters
    # Nothing is left to expire, whatever the clocks say.
    assert tally.expire_parked(now_wall=T0 + 10_000, caught_up=True) == []


def test_a_parked_click_expires_when_event_time_passes_its_wait() -> None:
    tally = Tally(RULES)
    tally.attribute(click("ghost", T0), now_wall=T0)
    tally.impression(imp("other", T0 + 30))  # exactly the wait: not over yet
    assert tally.expire_parked(now_wall=T0, caught_up=False) == []
    tally.impression(imp("later", T0 + 31))
    [expired] = tally.expire_parked(now_wall=T0, caught_up=False)
    assert (expired.impression_id, expired.role) == ("ghost", "clicks")
    assert tally.dead_letters == {UNKNOWN_IMPRESSION: 1}
    # Its impression now comes too late: counted, the click is not.
    tally.impression(imp("ghost", T0 + 31))
    assert tally.counts()[CELL] == (3, 0, 0, 0.0)


def test_a_parked_click_expires_by_wall_time_only_once_impressions_are_caught_up() -> None:
    tally = Tally(RULES)
    tally.attribute(click("ghost", T0), now_wall=T0 + 2)
    # Event time stands still (no impressions); the wall clock runs on.
    assert tally.expire_parked(now_wall=T0 + 33, caught_up=False) == []
    assert tally.expire_parked(now_wall=T0 + 32, caught_up=True) == []
    [expired] = tally.expire_parked(now_wall=T0 + 33, caught_up=True)
    assert expired.arrived_wall == T0 + 2
    assert tally.join.parked_count == 0


def test_the_wait_of_a_released_click_is_judged_before_its_impression_moved_event_time() -> None:
    tally = Tally(RULES)
    tally.attribute(click("i1", T0), now_wall=T0)
    tally.attribute(click("i2", T0), now_wall=T0)
    # The impression of i1 is 40 s after its click (more than the 30 s wait) but nothing
    # had moved event time past the click's wait before it came: joined.
    assert tally.impression(imp("i1", T0 + 40)) is None
    # Now event time is 40 s past i2's click: its wait ended, even if expire_parked has
    # not run yet, so the result does not depend on when a flush happens.
    assert tally.impression(imp("i2", T0 + 40)) is None
    assert tally.counts()[CELL] == (2, 1, 0, 0.0)
    assert tally.dead_letters == {UNKNOWN_IMPRESSION: 1}


def test_without_a_click_wait_nothing_is_parked() -> None:
    tally = Tally(JoinRules(attribution_window_s=600.0, click_wait_s=0.0))
    assert tally.attribute(click("ghost")) == UNKNOWN_IMPRESSION
    assert tally.join.parked_count == 0


def test_the_retention_sweep_forgets_old_impressions_and_a_resent_id_counts_again() -> None:
    """The rule: an impression is retained while the watermark is less than the retention
    (window + click wait + 60 s, here 690 s) past it, rounded up to buckets of 1/16 of
    it. After that its id may count again: ids are unique within the retention only."""
    rules = RULES
    store = MemoryStore()
    tally = Tally(rules, store)
    tally.impression(imp("old", T0))
    tally.impression(imp("new", T0 + rules.retention))
    # Still inside the retention (bucket rounding keeps it a little longer, never less).
    assert tally.impression(imp("old", T0 + rules.retention)) == DUPLICATE_IMPRESSION_ID
    later = T0 + rules.retention + 2 * rules.bucket_s
    tally.impression(imp("newer", later))
    # Forgotten as soon as the watermark passed it, before any sweep: a click on it is
    # unknown, and the id counts again.
    assert not tally.join.retained(store.get("old"))
    assert tally.attribute(click("old", T0 + 5)) == PARKED
    assert tally.impression(imp("old", later)) is None
    assert tally.counts()[CELL] == (4, 0, 0, 0.0)
    # The sweep reclaims the space of what the rules forgot; the id added again stays.
    horizon = tally.join.sweep()
    assert horizon is not None and tally.join.sweep() is None
    assert store.get("old") is not None and store.get("old").timestamp == later  # type: ignore[union-attr]
    assert set(store.records) == {"old", "new", "newer"}
    # The click parked above, on the forgotten impression, was far behind event time
    # when the id came again: its wait had ended.
    assert tally.dead_letters == {DUPLICATE_IMPRESSION_ID: 1, UNKNOWN_IMPRESSION: 1}


def test_reloading_the_store_keeps_every_rule() -> None:
    store = MemoryStore()
    join = Join(RULES, store)
    join.add_impression(imp("i1"), None)
    join.attribute(click("ghost"), T0 + 100)
    again = Join(RULES, store)  # after a restart
    assert again.parked_count == 1 and again.watermark == T0
    assert again.add_impression(imp("i1"), None) == DUPLICATE_IMPRESSION_ID
    expired = again.expire_parked(T0 + 131, caught_up=True)
    assert [e.impression_id for e in expired] == ["ghost"]


def test_reason_sentences_name_the_rule_and_its_setting() -> None:
    assert reason(DUPLICATE_IMPRESSION_ID, RULES, "i1") == "impression_id 'i1' was already counted"
    late = reason(LATE_CLICK, RULES, "i1")
    assert "600 s attribution window" in late and "ADLOOP_ATTRIBUTION_WINDOW_S" in late
    assert "conversion on 'i1'" in reason(LATE_CONVERSION, RULES, "i1")
    unknown = reason(UNKNOWN_IMPRESSION, RULES, "i9")
    assert "'i9'" in unknown and "30 s (ADLOOP_CLICK_WAIT_S)" in unknown
    assert "counted once" in reason(DUPLICATE_CLICK, RULES, "i1")
    assert "already converted" in reason(DUPLICATE_CONVERSION, RULES, "i1")
    assert reason("something_else", RULES, "i1") == "something_else"


# -- event-time hygiene and the key contract ------------------------------------------------------


def test_event_times_beyond_the_clock_skew_or_the_maximum_age_are_refused() -> None:
    tally = Tally(RULES)
    wall = T0
    assert tally.impression(imp("ahead", wall + 301), wall) == TIMESTAMP_OUT_OF_RANGE
    assert tally.impression(imp("old", wall - 7 * 86400 - 1), wall) == TIMESTAMP_OUT_OF_RANGE
    # A refused impression never moves the partition's event time.
    assert tally.join.watermark == 0.0
    assert tally.impression(imp("week", wall - 7 * 86400), wall) is None  # bounds inclusive
    assert tally.impression(imp("edge", wall + 300), wall) is None
    assert tally.join.watermark == wall + 300
    assert tally.attribute(click("edge", wall + 301), wall) == TIMESTAMP_OUT_OF_RANGE
    assert tally.attribute(click("edge", wall + 300), wall) is None
    # The id of a refused impression was never counted: it may come again, in range.
    assert tally.impression(imp("ahead", wall), wall) is None
    assert tally.dead_letters == {TIMESTAMP_OUT_OF_RANGE: 3}
    # Without a wall clock (offline readers) the range is not checked.
    assert tally.impression(imp("far", wall + 10 * 86400), None) is None


def test_a_click_or_conversion_before_its_impression_beyond_the_skew_is_refused() -> None:
    tally = Tally(RULES)
    tally.impression(imp("i1", T0))
    assert tally.attribute(click("i1", T0 - 300.5)) == CLICK_BEFORE_IMPRESSION
    assert tally.attribute(conversion("i1", T0 - 301, value=5.0)) == CONVERSION_BEFORE_IMPRESSION
    # Within the skew it counts: two clocks may disagree that much.
    assert tally.attribute(click("i1", T0 - 300)) is None
    assert tally.attribute(conversion("i1", T0 - 1, value=5.0)) is None
    assert tally.counts() == {CELL: (1, 1, 1, 5.0)}


def test_an_impression_behind_the_retention_horizon_is_refused_so_it_cannot_count_twice() -> None:
    tally = Tally(RULES)
    tally.impression(imp("i1", T0))
    later = T0 + RULES.retention + 2 * RULES.bucket_s
    tally.impression(imp("i2", later))
    # i1 sent again with its own (old) time: its first copy is forgotten, so it could
    # not be recognised as a duplicate; refused rather than counted twice.
    assert tally.impression(imp("i1", T0)) == EXPIRED_IMPRESSION
    assert tally.impression(imp("i3", T0 + 1)) == EXPIRED_IMPRESSION
    # Behind the watermark but inside the retention: counted.
    assert tally.impression(imp("i4", later - RULES.retention)) is None
    assert tally.counts()[CELL] == (3, 0, 0, 0.0)


def test_the_key_contract() -> None:
    assert key_matches(b"i1", "i1")
    assert key_matches("café-1".encode(), "café-1")  # UTF-8
    assert not key_matches(b"i2", "i1")
    assert not key_matches(None, "i1")
    text = reason(KEY_MISMATCH, RULES, "i1", key=b"i2")
    assert "record key 'i2' is not the impression_id 'i1'" in text
    assert "record key null" in reason(KEY_MISMATCH, RULES, "i1", key=None)
    assert "b'\\xff'" in reason(KEY_MISMATCH, RULES, "i1", key=b"\xff")


def test_parked_events_are_expired_from_an_index_not_a_scan() -> None:
    join = Join(RULES, MemoryStore())
    for i in range(3000):  # arriving one per second of wall time, event times ascending
        join.attribute(click(f"c{i}", T0 + i), now_wall=T0 + i)
    assert join.parked_count == 3000
    # Event time passes the wait of the first 100 only (T0 + 130 - 30 s of wait).
    join.add_impression(imp("x", T0 + 130), None)
    assert len(join.expire_parked(None, caught_up=False)) == 100
    # Wall time passes the wait of 50 more, once caught up.
    expired = join.expire_parked(T0 + 180, caught_up=True)
    assert sorted(int(ev.impression_id[1:]) for ev in expired) == list(range(100, 150))
    # Released events leave stale index entries; they are never expired twice and the
    # index is rebuilt before it outgrows the parked events.
    for i in range(150, 2900):
        join.add_impression(imp(f"c{i}", T0 + 130), None)
        ready, late = join.take_released(f"c{i}")
        assert len(ready) + len(late) == 1
    assert join.parked_count == 100
    assert len(join._by_wall_time) <= 2 * 100 + 1024
    assert len(join.expire_parked(T0 + 1e6, caught_up=True)) == 100
    assert join.parked_count == 0


def test_reason_sentences_for_event_time_rules() -> None:
    ahead = reason(
        TIMESTAMP_OUT_OF_RANGE, RULES, "i1", kind="impression", timestamp=T0 + 400, now_wall=T0
    )
    assert ahead.startswith("impression 'i1' has event time") and "400 s ahead" in ahead
    assert "ADLOOP_MAX_CLOCK_SKEW_S" in ahead
    old = reason(TIMESTAMP_OUT_OF_RANGE, RULES, "i1", timestamp=T0 - 9 * 86400, now_wall=T0)
    assert "777600 s in the past" in old and "ADLOOP_MAX_EVENT_AGE_S" in old
    before = reason(
        CLICK_BEFORE_IMPRESSION, RULES, "i1", timestamp=T0 - 400, impression_timestamp=T0
    )
    assert before.startswith("click on 'i1' precedes its impression by 400 s")
    assert "conversion on 'i1'" in reason(CONVERSION_BEFORE_IMPRESSION, RULES, "i1")
    assert "690 s retention" in reason(EXPIRED_IMPRESSION, RULES, "i1")
    # Join.reason looks the impression's time up itself.
    join = Join(RULES, MemoryStore())
    join.add_impression(imp("i1", T0), None)
    text = join.reason(CLICK_BEFORE_IMPRESSION, "i1", timestamp=T0 - 500)
    assert "by 500 s" in text


# -- the ingest's store: the same rules over RocksDB, across restarts ---------------------------


def test_the_ingest_store_sweeps_forgotten_impressions_and_keeps_a_resent_id(
    tmp_path: Path,
) -> None:
    from adloop.streams.ingest import PartitionState, open_store

    db = open_store(tmp_path / "ingest")
    settings = Settings(attribution_window_s=600.0, click_wait_s=30.0)
    state = PartitionState(db, 0, settings)
    rules = state.rules
    assert state.add_impression(imp("old", T0), 0, T0) is None
    assert state.attribute(click("ghost"), T0, 0, b"{}", b"ghost") == PARKED
    db.write(state.write_batch({"impressions": 1, "clicks": 1}).batch)
    state.committed()
    later = T0 + rules.retention + 2 * rules.bucket_s
    # The id comes again after it was forgotten, in the same flush as the sweep of its
    # first record: the sweep deletes the old record, the new one is written after it.
    assert state.add_impression(imp("newer", later), 1, later) is None
    assert state.add_impression(imp("old", later), 2, later) is None
    db.write(state.write_batch({"impressions": 3}).batch)
    state.committed()
    reloaded = PartitionState(db, 0, settings)
    assert reloaded.watermark == later and reloaded.expired_through >= 0
    assert reloaded.checkpoint.offsets == {"impressions": 3, "clicks": 1}
    assert reloaded.get("old") is not None and reloaded.get("old").timestamp == later  # type: ignore[union-attr]
    assert reloaded.add_impression(imp("old", later), 3, later) == DUPLICATE_IMPRESSION_ID
    assert reloaded.join.parked_count == 1
    counts = reloaded.counts("spring|a")
    assert counts["c1"]["feed"].impressions == 3
    db.close()


# -- property: any interleaving, any crash, the counts the rules say ------------------------------

# Small bounds so a few dozen events cross every one: window 60 s, wait 10 s, skew 30 s,
# age 1000 s, retention 130 s in buckets of 8.125 s.
PROP_RULES = JoinRules(
    attribution_window_s=60.0, click_wait_s=10.0, max_clock_skew_s=30.0, max_event_age_s=1000.0
)
WALL0 = 1_700_000_000.0
IDS = [f"i{n}" for n in range(4)]


@dataclass(frozen=True)
class Op:
    kind: str  # impression | click | conversion | flush | crash
    ident: int = 0  # index into IDS
    offset: float = 0.0  # event time - wall time
    creative: int = 0
    value: float = 0.0
    caught_up: bool = False  # flush: is the impressions partition read to its end
    dt: float = 0.0  # wall time that passes before this op


# Mostly events, sometimes a flush or a crash; event times mostly in range of the wall
# clock, some beyond the skew or the age; wall time mostly standing or creeping.
_ops = st.builds(
    Op,
    kind=st.sampled_from(["impression"] * 4 + ["click"] * 4 + ["conversion", "flush", "crash"]),
    ident=st.integers(0, len(IDS) - 1),
    offset=st.sampled_from([-2000, -200, -70, -45, -31, -12, -5, 0, 0, 3, 8, 20, 30, 31, 2000]),
    creative=st.integers(0, 1),
    value=st.sampled_from([0.0, 2.0, 5.0]),
    caught_up=st.booleans(),
    dt=st.sampled_from([0, 0, 0, 1, 5, 20, 60]),
)


def _walls(ops: list[Op]) -> list[float]:
    walls, wall = [], WALL0
    for op in ops:
        wall += op.dt
        walls.append(wall)
    return walls


def _event(op: Op, wall: float) -> Impression | Click | Conversion:
    ts = wall + op.offset
    if op.kind == "impression":
        return imp(IDS[op.ident], ts, creative=f"c{op.creative}")
    if op.kind == "click":
        return click(IDS[op.ident], ts)
    return conversion(IDS[op.ident], ts, value=op.value)


Counts = dict[tuple[str, str, str, str], tuple[int, int, int, float]]


def reference(ops: list[Op], rules: JoinRules) -> tuple[Counts, Counter[str]]:
    """The rules as the module docstring states them, on plain lists and dicts: no
    store, no index, no crash. Wall-time expiry happens at flushes."""
    bs, retention, wait = rules.bucket_s, rules.retention, rules.click_wait_s
    skew = rules.max_clock_skew_s
    watermark = 0.0
    impressions: dict[str, list] = {}  # id -> [cell, ts, clicked, converted]
    parked: list[tuple[str, Click | Conversion, float]] = []  # (id, event, arrived)
    counts: dict[tuple[str, str, str, str], list] = {}
    dead: Counter[str] = Counter()

    def live(impression_id: str) -> list | None:
        found = impressions.get(impression_id)
        horizon = int((watermark - retention) // bs) - 1
        return found if found is not None and found[1] // bs > horizon else None

    def in_range(ts: float, wall: float) -> bool:
        return ts - wall <= skew and wall - ts <= rules.max_event_age_s

    def attribute(event: Click | Conversion, wall: float | None) -> None:
        if wall is not None and not in_range(event.timestamp, wall):
            dead[TIMESTAMP_OUT_OF_RANGE] += 1
            return
        is_click = type(event) is Click
        found = live(event.impression_id)
        if found is None:
            parked.append((event.impression_id, event, wall if wall is not None else 0.0))
        elif event.timestamp < found[1] - skew:
            dead[CLICK_BEFORE_IMPRESSION if is_click else CONVERSION_BEFORE_IMPRESSION] += 1
        elif event.timestamp - found[1] > rules.attribution_window_s:
            dead[LATE_CLICK if is_click else LATE_CONVERSION] += 1
        elif found[2 if is_click else 3]:
            dead[DUPLICATE_CLICK if is_click else DUPLICATE_CONVERSION] += 1
        else:
            found[2 if is_click else 3] = True
            cell = counts[found[0]]
            if is_click:
                cell[1] += 1
            else:
                cell[2] += 1
                cell[3] += event.value  # type: ignore[union-attr]

    for op, wall in zip(ops, _walls(ops), strict=True):
        if op.kind == "impression":
            event = _event(op, wall)
            assert isinstance(event, Impression)
            bucket = event.timestamp // bs
            if not in_range(event.timestamp, wall):
                dead[TIMESTAMP_OUT_OF_RANGE] += 1
            elif live(event.impression_id) is not None:
                dead[DUPLICATE_IMPRESSION_ID] += 1
            elif bucket <= int((watermark - retention) // bs) - 1:
                dead[EXPIRED_IMPRESSION] += 1
            else:
                cell = ("spring", "a", event.creative_id, "feed")
                impressions[event.impression_id] = [cell, event.timestamp, False, False]
                counts.setdefault(cell, [0, 0, 0, 0.0])[0] += 1
                before, watermark = watermark, max(watermark, event.timestamp)
                waiting = [p for p in parked if p[0] == event.impression_id]
                parked = [p for p in parked if p[0] != event.impression_id]
                for _, early, _ in waiting:
                    if early.timestamp < before - wait:
                        dead[UNKNOWN_IMPRESSION] += 1
                    else:
                        attribute(early, None)
        elif op.kind in ("click", "conversion"):
            attribute(_event(op, wall), wall)  # type: ignore[arg-type]
        elif op.kind == "flush":
            keep = []
            for p in parked:
                over = p[1].timestamp < watermark - wait or (op.caught_up and p[2] < wall - wait)
                if over:
                    dead[UNKNOWN_IMPRESSION] += 1
                else:
                    keep.append(p)
            parked = keep
    return {cell: (c[0], c[1], c[2], c[3]) for cell, c in counts.items()}, dead


def run_memory(ops: list[Op], rules: JoinRules) -> tuple[Counts, Counter[str]]:
    """A Tally over a MemoryStore; a flush expires parked events, sweeps and saves a copy
    of the state (store, counts, dead letters) with the position; a crash drops the live
    objects and resumes from the copy."""
    tally = Tally(rules)
    saved = (copy.deepcopy(tally.join.store), {}, Counter(), 0)
    crashed: set[int] = set()
    walls = _walls(ops)
    i = 0
    while i < len(ops):
        op, wall = ops[i], walls[i]
        i += 1
        if op.kind == "impression":
            tally.impression(_event(op, wall), wall)  # type: ignore[arg-type]
        elif op.kind in ("click", "conversion"):
            tally.attribute(_event(op, wall), wall)  # type: ignore[arg-type]
        elif op.kind == "flush":
            tally.expire_parked(wall, op.caught_up)
            tally.join.sweep()
            saved = (
                copy.deepcopy(tally.join.store),
                copy.deepcopy(tally.cells),
                Counter(tally.dead_letters),
                i,
            )
        elif i - 1 not in crashed:
            crashed.add(i - 1)
            store, cells, dead, i = copy.deepcopy(saved)
            tally = Tally(rules, store)
            tally.cells, tally.dead_letters = cells, dead
    return tally.counts(), +tally.dead_letters


def run_ingest_store(
    ops: list[Op], rules: JoinRules, db: Any, partition: int
) -> tuple[Counts, Counter[str]]:
    """The ingest's PartitionState over RocksDB, driven as the ingest drives it: a flush
    expires parked events and writes one batch with the position; a crash drops the
    object (its write-back buffer lost) and reloads from the database."""
    from adloop.streams.ingest import PartitionState

    def load() -> PartitionState:
        return PartitionState(db, partition, Settings(), rules)

    decoders = {
        "clicks": msgspec.json.Decoder(Click),
        "conversions": msgspec.json.Decoder(Conversion),
    }
    state = load()
    committed: Counter[str] = Counter()
    pending: Counter[str] = Counter()
    crashed: set[int] = set()
    walls = _walls(ops)
    i = 0

    def outcome(code: str | None) -> None:
        if code is not None and code != PARKED:
            pending[code] += 1

    while i < len(ops):
        op, wall = ops[i], walls[i]
        i += 1
        if op.kind == "impression":
            event = _event(op, wall)
            assert isinstance(event, Impression)
            code = state.add_impression(event, i, wall)
            outcome(code)
            if code is None and state.join.has_parked(event.impression_id):
                ready, expired = state.join.take_released(event.impression_id)
                pending[UNKNOWN_IMPRESSION] += len(expired)
                for parked in ready:
                    outcome(state.attribute(decoders[parked.role].decode(parked.original), None))
        elif op.kind in ("click", "conversion"):
            event = _event(op, wall)
            raw = msgspec.json.encode(event)
            outcome(state.attribute(event, wall, i, raw, event.impression_id.encode()))  # type: ignore[arg-type]
        elif op.kind == "flush":
            pending[UNKNOWN_IMPRESSION] += len(state.join.expire_parked(wall, op.caught_up))
            db.write(state.write_batch({"ops": i}).batch)
            state.committed()
            committed += pending
            pending.clear()
        elif i - 1 not in crashed:
            crashed.add(i - 1)
            state = load()
            pending.clear()
            i = state.checkpoint.offsets.get("ops", 0)
    counts: Counts = {}
    for creative, by_placement in state.counts(decision_key("spring", "a")).items():
        for placement, c in by_placement.items():
            cell = ("spring", "a", creative, placement)
            counts[cell] = (c.impressions, c.clicks, c.conversions, c.conversion_value)
    return counts, committed + pending


@pytest.fixture(scope="module")
def rocks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from adloop.streams.ingest import open_store

    db = open_store(tmp_path_factory.mktemp("join-prop"))
    yield db
    db.close()


_partitions = itertools.count()


@settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(_ops, min_size=5, max_size=80))
# The boundaries, always: a click exactly at the end of the window; an id sent again
# exactly at the end of its retention; an id sent again after it was forgotten, in the
# flush that sweeps its first record, then a crash.
@example(ops=[Op("impression"), Op("click", dt=60)])
@example(ops=[Op("impression"), Op("impression", 1, dt=130), Op("impression")])
@example(
    ops=[
        Op("impression"),
        Op("flush"),
        Op("impression", 1, dt=150),
        Op("impression"),
        Op("flush"),
        Op("crash"),
        Op("impression"),
    ]
)
def test_counts_equal_the_rules_whatever_the_order_duplicates_clocks_and_crashes(
    ops: list[Op], rocks: Any
) -> None:
    want = reference(ops, PROP_RULES)
    assert run_memory(ops, PROP_RULES) == want
    # A fresh partition of the shared database per example.
    assert run_ingest_store(ops, PROP_RULES, rocks, next(_partitions)) == want
