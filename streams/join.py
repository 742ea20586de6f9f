"""adloop's counting rules, pure: what counts, once, and why the rest does not.

One implementation for every place that needs them: the ingest stage (over its
RocksDB write-back store), the CTR training labels (``streams.ctr_data``) and the
replay's expected counts and engine ceiling (``bench.replay``), both over the
in-memory ``MemoryStore``. Nothing here reads a clock, touches Kafka or does I/O:
wall time is an argument (``now_wall``), and state lives in a ``JoinStore``.

The rules, per input partition (the README's "Counting rules" says the same):

* **Event time in range.** An event whose timestamp is more than
  ``max_clock_skew_s`` ahead of the wall clock, or more than ``max_event_age_s``
  behind it, is ``timestamp_out_of_range``; it never moves the partition's event
  time. Callers without a wall clock (offline readers of history) pass
  ``now_wall=None`` and skip this rule: the wall time that matters is the one at
  which the event arrived, which they do not know.
* **One impression per id.** The first impression of an ``impression_id`` counts; a
  second is ``duplicate_impression_id`` while the first is retained.
* **Retention.** An impression is retained while the partition's event time (its
  *watermark*: the newest counted impression's timestamp) is less than
  ``retention_s`` (attribution window + click wait + 60 s) past it, rounded up to
  time buckets of ``retention_s / 16``: precisely, while ``bucket(ts) > horizon``,
  where ``bucket(t) = floor(t / bucket_s)`` and ``horizon = floor((watermark -
  retention_s) / bucket_s) - 1``, so at least ``retention_s``, at most one bucket
  more. A forgotten impression is gone for every rule: a click on it is unknown,
  and **an id sent again after its impression was forgotten counts again** (an
  exchange that reuses ids after the retention is counted as it sends). An
  impression already behind the horizon when it arrives is ``expired_impression``:
  its duplicates could not be recognised, so counting it would risk counting an id
  twice. Lookups apply the horizon themselves; ``Join.sweep`` only lets the store
  reclaim the space, so when a store sweeps never changes a count.
* **One click, one conversion per impression, inside the window.** A click joins
  its impression if ``click.ts - impression.ts <= attribution_window_s``
  (``late_click`` otherwise), once (``duplicate_click``); conversions likewise
  (``late_conversion``, ``duplicate_conversion``) and add their value. A click more
  than ``max_clock_skew_s`` *before* its impression is ``click_before_impression``
  (a conversion: ``conversion_before_impression``, as the late and duplicate codes
  are split): two clocks may disagree by the skew, not more.
* **Early clicks wait.** A click or conversion whose impression is not there is
  parked for ``click_wait_s``: until its impression is counted (then it is judged
  as above), or until its wait ends, in event time (the watermark passes
  ``click.ts + click_wait_s``) or, once the impressions partition is caught up, in
  wall time (``click_wait_s`` after it arrived); then ``unknown_impression``.
  Wall-time expiry happens in ``expire_parked`` (the caller says when, and whether
  it is caught up); event-time expiry is also judged when the impression comes,
  at the watermark before it, so the result does not depend on when
  ``expire_parked`` runs. With ``click_wait_s == 0`` nothing waits. Parked events
  are indexed by when their wait ends (two heaps), so expiring them costs nothing
  per flush while none is due.
* **The key contract.** A record's Kafka key is its ``impression_id`` (UTF-8):
  partitioning by it is what puts a click on its impression's partition. The
  adapter that sees keys checks it with ``key_matches``; ``key_mismatch`` otherwise.

Outcomes: ``Join.add_impression`` returns None (counted) or a reason code;
``Join.attribute`` returns the ``ImpressionRecord`` the event was counted on, or a
code (``PARKED`` included). ``reason`` turns a code into the sentence a dead letter
carries. Wall time (``now_wall``) is an argument: it bounds event times and stamps a
parked event's arrival; callers without a wall clock pass None, and their events
never expire by wall time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from adloop.schemas import Click, Conversion, CreativeCounts, Impression

# --- settings: one default per concept ------------------------------------------------------

#: How far an event's clock may run ahead of ours (ADLOOP_MAX_CLOCK_SKEW_S), and how far
#: a click may precede its impression: exchanges' clocks are not ours.
DEFAULT_MAX_CLOCK_SKEW_S: Final = 300.0
#: Oldest event time accepted, behind the wall clock (ADLOOP_MAX_EVENT_AGE_S): a week
#: covers an exchange that re-sends after an outage; older is a broken clock or a replay.
DEFAULT_MAX_EVENT_AGE_S: Final = 7 * 24 * 3600.0
#: Retention beyond window + click wait, so a click parked while its impression was
#: late still finds it.
RETENTION_MARGIN_S: Final = 60.0

# --- outcomes -----------------------------------------------------------------------------

PARKED: Final = "parked"  # not a dead letter: waiting for its impression
DUPLICATE_IMPRESSION_ID: Final = "duplicate_impression_id"
EXPIRED_IMPRESSION: Final = "expired_impression"
UNKNOWN_IMPRESSION: Final = "unknown_impression"
LATE_CLICK: Final = "late_click"
LATE_CONVERSION: Final = "late_conversion"
DUPLICATE_CLICK: Final = "duplicate_click"
DUPLICATE_CONVERSION: Final = "duplicate_conversion"
CLICK_BEFORE_IMPRESSION: Final = "click_before_impression"
CONVERSION_BEFORE_IMPRESSION: Final = "conversion_before_impression"
TIMESTAMP_OUT_OF_RANGE: Final = "timestamp_out_of_range"
KEY_MISMATCH: Final = "key_mismatch"

#: Every dead-letter code these rules produce.
REASON_CODES: Final = (
    DUPLICATE_IMPRESSION_ID,
    EXPIRED_IMPRESSION,
    UNKNOWN_IMPRESSION,
    LATE_CLICK,
    LATE_CONVERSION,
    DUPLICATE_CLICK,
    DUPLICATE_CONVERSION,
    CLICK_BEFORE_IMPRESSION,
    CONVERSION_BEFORE_IMPRESSION,
    TIMESTAMP_OUT_OF_RANGE,
    KEY_MISMATCH,
)

# Flags of an impression record.
CLICKED: Final = 1
CONVERTED: Final = 2


# --- records ----------------------------------------------------------------------------------


class ImpressionRecord(msgspec.Struct, array_like=True, gc=False):
    """What the join keeps of a counted impression. The field order is the ingest's
    on-disk format (RocksDB): append, never reorder."""

    campaign: str
    audience: str
    creative_id: str
    placement: str
    timestamp: float
    offset: int  # source offset (the ingest's); 0 where there is none
    flags: int = 0  # CLICKED | CONVERTED
    # The impression's context cell (streams/context.py) when the contextual policy
    # counts cells, so its click lands in the same cell; "" when not counted by cell.
    cell: str = ""


class ParkedEvent(msgspec.Struct, array_like=True, gc=False):
    """A click/conversion waiting for its impression. The ingest keeps the original
    bytes and key, to decode it again when the impression comes or to dead-letter it
    as sent. The field order is the ingest's on-disk format."""

    role: str  # "clicks" | "conversions"
    impression_id: str
    timestamp: float
    offset: int
    arrived_wall: float  # wall time it arrived; +inf where no wall clock is known
    original: bytes = b""
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class JoinRules:
    attribution_window_s: float = 3600.0
    click_wait_s: float = 30.0
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S
    max_event_age_s: float = DEFAULT_MAX_EVENT_AGE_S
    # None: attribution window + click wait + RETENTION_MARGIN_S.
    retention_s: float | None = None

    @property
    def retention(self) -> float:
        if self.retention_s is not None:
            return self.retention_s
        return self.attribution_window_s + self.click_wait_s + RETENTION_MARGIN_S

    @property
    def bucket_s(self) -> float:
        """Width of the retention's time buckets: sixteen per retention (the ingest
        writes one expiry-index entry per bucket and flush, not one per impression)."""
        return max(self.retention / 16.0, 1.0)


def rules_from_settings(settings: Any) -> JoinRules:
    """The rules a deployment's settings configure (ADLOOP_ATTRIBUTION_WINDOW_S,
    ADLOOP_CLICK_WAIT_S, ADLOOP_MAX_CLOCK_SKEW_S, ADLOOP_MAX_EVENT_AGE_S)."""
    return JoinRules(
        attribution_window_s=settings.attribution_window_s,
        click_wait_s=settings.click_wait_s,
        max_clock_skew_s=settings.max_clock_skew_s,
        max_event_age_s=settings.max_event_age_s,
    )


def key_matches(key: bytes | None, impression_id: str) -> bool:
    """The key contract: a record's Kafka key is its impression_id in UTF-8."""
    return key is not None and key == impression_id.encode()


# --- storage ----------------------------------------------------------------------------------


class JoinStore(Protocol):
    """Where the join keeps its state. ``Join`` reads and writes only through this, so
    a store decides durability: the ingest's writes back to RocksDB atomically with the
    input offsets; ``MemoryStore`` keeps dicts.

    ``get`` may return a record the rules already consider forgotten (behind the
    horizon); ``Join`` checks. A record returned by ``get`` and then changed is handed
    back with ``update``.
    """

    watermark: float  # newest counted impression time; 0 when none
    expired_through: int  # last expiry bucket handed to forget_through; -1 when none

    def get(self, impression_id: str) -> ImpressionRecord | None: ...

    def add(self, impression_id: str, record: ImpressionRecord, bucket: int) -> None:
        """A newly counted impression, in expiry bucket ``bucket``. It may replace a
        forgotten record of the same id that the store still holds."""

    def update(self, impression_id: str, record: ImpressionRecord) -> None: ...

    def forget_through(self, bucket: int) -> None:
        """Reclaim the records of buckets <= ``bucket``, now or later, but never a
        record added again since in a newer bucket."""

    def parked(self, impression_id: str) -> list[ParkedEvent] | None:
        """Events waiting for ``impression_id``, in arrival order (None when none)."""

    def set_parked(self, impression_id: str, events: list[ParkedEvent]) -> None:
        """Replace the events waiting for ``impression_id`` (an empty list: none)."""

    def all_parked(self) -> Iterable[ParkedEvent]: ...


class MemoryStore:
    """A ``JoinStore`` in dicts: for offline joins (CTR labels, replay expectations) and
    tests."""

    def __init__(self) -> None:
        self.watermark = 0.0
        self.expired_through = -1
        self.records: dict[str, ImpressionRecord] = {}
        self._bucket_of: dict[str, int] = {}
        self._by_bucket: dict[int, list[str]] = {}
        self._parked: dict[str, list[ParkedEvent]] = {}

    def get(self, impression_id: str) -> ImpressionRecord | None:
        return self.records.get(impression_id)

    def add(self, impression_id: str, record: ImpressionRecord, bucket: int) -> None:
        self.records[impression_id] = record
        self._bucket_of[impression_id] = bucket
        ids = self._by_bucket.get(bucket)
        if ids is None:
            ids = self._by_bucket[bucket] = []
        ids.append(impression_id)

    def update(self, impression_id: str, record: ImpressionRecord) -> None:
        self.records[impression_id] = record

    def forget_through(self, bucket: int) -> None:
        for old in [b for b in self._by_bucket if b <= bucket]:
            for impression_id in self._by_bucket.pop(old):
                # An id added again since lives in a newer bucket: keep that record.
                if self._bucket_of.get(impression_id) == old:
                    del self.records[impression_id]
                    del self._bucket_of[impression_id]

    def parked(self, impression_id: str) -> list[ParkedEvent] | None:
        return self._parked.get(impression_id)

    def set_parked(self, impression_id: str, events: list[ParkedEvent]) -> None:
        if events:
            self._parked[impression_id] = events
        else:
            self._parked.pop(impression_id, None)

    def all_parked(self) -> Iterable[ParkedEvent]:
        for events in self._parked.values():
            yield from events


# --- counting --------------------------------------------------------------------------------


def count_attributed(cell: CreativeCounts, event: Click | Conversion) -> None:
    """What a counted click or conversion adds to its impression's cell."""
    if type(event) is Click:
        cell.clicks += 1
    else:
        cell.conversions += 1
        cell.conversion_value += event.value  # type: ignore[union-attr]


# --- the join -------------------------------------------------------------------------------

Outcome = ImpressionRecord | str  # the record counted on, or a code (PARKED included)


class Join:
    """The rules over one partition's store. Cheap to build: a store reloaded after a
    crash gets a new ``Join``, which rebuilds its expiry heaps from the parked events."""

    def __init__(self, rules: JoinRules, store: JoinStore) -> None:
        self.rules = rules
        self.store = store
        self._window = rules.attribution_window_s
        self._wait = rules.click_wait_s
        self._skew = rules.max_clock_skew_s
        self._max_age = rules.max_event_age_s
        self._retention = rules.retention
        self._bucket_s = rules.bucket_s
        # The retention horizon (a bucket number) of the watermark it was computed at:
        # recomputed when a lookup needs it and the watermark moved, not per impression.
        self._horizon_watermark = store.watermark
        self._horizon = self._horizon_at(store.watermark)
        # The watermark before the last counted impression: take_released judges the
        # waits of that impression's parked events there (it never ends their wait).
        self._watermark_before = store.watermark
        # Parked events ordered by when their wait ends, in event time and in wall time.
        # An event released or expired through one heap keeps its entry in the other
        # until popped (checked against the store then); _compact bounds them.
        self._seq = itertools.count()
        self._by_event_time: list[tuple[float, int, ParkedEvent]] = []
        self._by_wall_time: list[tuple[float, int, ParkedEvent]] = []
        self.parked_count = 0  # events parked now
        for event in store.all_parked():
            self._index_parked(event)
        # Bound once: the hot path calls them per event.
        self._get = store.get
        self._add = store.add

    @property
    def watermark(self) -> float:
        return self.store.watermark

    def _horizon_at(self, watermark: float) -> int:
        # The last bucket that ends at or before watermark - retention: an impression is
        # forgotten only when it is more than the retention behind the watermark.
        return int((watermark - self._retention) // self._bucket_s) - 1

    def horizon(self) -> int:
        """The retention horizon: impressions of buckets up to it are forgotten."""
        watermark = self.store.watermark
        if watermark != self._horizon_watermark:
            self._horizon_watermark = watermark
            self._horizon = self._horizon_at(watermark)
        return self._horizon

    def retained(self, record: ImpressionRecord | None) -> bool:
        """Whether a stored record is still within retention (not forgotten)."""
        return record is not None and record.timestamp // self._bucket_s > self.horizon()

    # -- impressions -----------------------------------------------------------------------
    def add_impression(
        self,
        imp: Impression,
        now_wall: float | None,
        offset: int = 0,
        cell: str = "",
        arrival_watermark: float | None = None,
    ) -> str | None:
        """Count an impression: None, or the reason code it is not counted. Then, if
        ``has_parked(imp.impression_id)``, call ``take_released`` for its early clicks.
        ``cell``: its context cell, kept on the record for its clicks.
        ``arrival_watermark``: the partition's watermark when the impression was read,
        for one applied later (it waited for the creative registry): it is judged as
        it would have been then, not against impressions read after it."""
        timestamp = imp.timestamp
        if now_wall is not None and not (
            timestamp - now_wall <= self._skew and now_wall - timestamp <= self._max_age
        ):
            return TIMESTAMP_OUT_OF_RANGE
        store = self.store
        bucket_s = self._bucket_s
        old = self._get(imp.impression_id)
        if old is not None and old.timestamp // bucket_s > self.horizon():
            return DUPLICATE_IMPRESSION_ID
        bucket = int(timestamp // bucket_s)
        watermark = store.watermark
        seen = watermark if arrival_watermark is None else min(watermark, arrival_watermark)
        # At or after the watermark it is retained; only an older one needs the horizon.
        if timestamp < seen and bucket <= self.horizon():
            return EXPIRED_IMPRESSION
        self._add(
            imp.impression_id,
            ImpressionRecord(
                imp.campaign,
                imp.audience,
                imp.creative_id,
                imp.placement,
                timestamp,
                offset,
                0,
                cell,
            ),
            bucket,
        )
        self._watermark_before = seen
        if timestamp > watermark:
            store.watermark = timestamp
        return None

    # -- clicks and conversions ---------------------------------------------------------------
    def attribute(
        self,
        event: Click | Conversion,
        now_wall: float | None,
        offset: int = 0,
        original: bytes = b"",
        key: bytes | None = None,
    ) -> Outcome:
        """Join a click or conversion to its impression: the record it counted on, or a
        code. An event whose impression is not there is parked (``PARKED``) with
        ``offset``, ``original`` and ``key``, which come back with it."""
        timestamp = event.timestamp
        if now_wall is not None and not (
            timestamp - now_wall <= self._skew and now_wall - timestamp <= self._max_age
        ):
            return TIMESTAMP_OUT_OF_RANGE
        is_click = type(event) is Click
        record = self._get(event.impression_id)
        if record is None or record.timestamp // self._bucket_s <= self.horizon():
            if self._wait > 0:
                self._park(
                    ParkedEvent(
                        "clicks" if is_click else "conversions",
                        event.impression_id,
                        timestamp,
                        offset,
                        math.inf if now_wall is None else now_wall,
                        original,
                        key,
                    )
                )
                return PARKED
            return UNKNOWN_IMPRESSION
        if timestamp < record.timestamp - self._skew:
            return CLICK_BEFORE_IMPRESSION if is_click else CONVERSION_BEFORE_IMPRESSION
        if timestamp - record.timestamp > self._window:
            return LATE_CLICK if is_click else LATE_CONVERSION
        flag = CLICKED if is_click else CONVERTED
        if record.flags & flag:
            return DUPLICATE_CLICK if is_click else DUPLICATE_CONVERSION
        record.flags |= flag
        self.store.update(event.impression_id, record)
        return record

    # -- parking ---------------------------------------------------------------------------------
    def _park(self, event: ParkedEvent) -> None:
        store = self.store
        waiting = store.parked(event.impression_id)
        store.set_parked(event.impression_id, [*waiting, event] if waiting else [event])
        self._index_parked(event)

    def _index_parked(self, event: ParkedEvent) -> None:
        seq = next(self._seq)
        heapq.heappush(self._by_event_time, (event.timestamp, seq, event))
        heapq.heappush(self._by_wall_time, (event.arrived_wall, seq, event))
        self.parked_count += 1

    def has_parked(self, impression_id: str) -> bool:
        """Whether events wait for this impression (check ``parked_count`` first: it
        is an attribute, and zero on the hot path)."""
        return self.parked_count > 0 and self.store.parked(impression_id) is not None

    def take_released(self, impression_id: str) -> tuple[list[ParkedEvent], list[ParkedEvent]]:
        """The events parked for an impression just counted by ``add_impression``, out of
        the store: (to attribute now, in arrival order; whose wait had ended in event
        time before the impression came: ``unknown_impression``). Attribute the first
        with ``attribute(event, None)``: their event times were checked on arrival."""
        store = self.store
        waiting = store.parked(impression_id)
        if not waiting:
            return [], []
        store.set_parked(impression_id, [])
        self.parked_count -= len(waiting)
        limit = self._watermark_before - self._wait
        ready: list[ParkedEvent] = []
        expired: list[ParkedEvent] = []
        for ev in waiting:
            (expired if ev.timestamp < limit else ready).append(ev)
        self._compact()
        return ready, expired

    def expire_parked(self, now_wall: float | None, caught_up: bool) -> list[ParkedEvent]:
        """Parked events whose wait is over, out of the store: the watermark is more than
        ``click_wait_s`` past them, or (only when ``caught_up``: the impressions
        partition is read to its end) they arrived more than ``click_wait_s`` of wall
        time ago. Each is an ``unknown_impression``."""
        expired: list[ParkedEvent] = []
        if not self.parked_count:
            return expired
        self._pop_until(self._by_event_time, self.store.watermark - self._wait, expired)
        if caught_up and now_wall is not None:
            self._pop_until(self._by_wall_time, now_wall - self._wait, expired)
        self._compact()
        return expired

    def _pop_until(
        self, heap: list[tuple[float, int, ParkedEvent]], limit: float, out: list[ParkedEvent]
    ) -> None:
        while heap and heap[0][0] < limit:
            event = heapq.heappop(heap)[2]
            if self._unpark(event):
                out.append(event)

    def _unpark(self, event: ParkedEvent) -> bool:
        """Take one event out of the store; False when it is no longer there."""
        store = self.store
        waiting = store.parked(event.impression_id)
        if not waiting or not any(ev is event for ev in waiting):
            return False
        store.set_parked(event.impression_id, [ev for ev in waiting if ev is not event])
        self.parked_count -= 1
        return True

    def _compact(self) -> None:
        # Released events leave entries in both heaps, expired ones in the other heap;
        # a partition that is never caught up would never pop its wall-time heap.
        if len(self._by_wall_time) > 2 * self.parked_count + 1024:
            self._by_event_time.clear()
            self._by_wall_time.clear()
            self.parked_count = 0
            for event in self.store.all_parked():
                self._index_parked(event)

    # -- retention -----------------------------------------------------------------------------
    def sweep(self) -> int | None:
        """Let the store reclaim the impressions behind the retention horizon; returns
        the horizon bucket when it moved (rules never depend on when this runs)."""
        store = self.store
        horizon = self.horizon()
        if horizon <= store.expired_through:
            return None
        store.forget_through(horizon)
        store.expired_through = horizon
        return horizon

    # -- sentences ---------------------------------------------------------------------------
    def reason(
        self,
        code: str,
        impression_id: str,
        *,
        kind: str = "click",
        timestamp: float | None = None,
        now_wall: float | None = None,
        key: bytes | None = None,
    ) -> str:
        """``reason`` with these rules, and the impression's time looked up where the
        sentence needs it."""
        impression_timestamp = None
        if code in (CLICK_BEFORE_IMPRESSION, CONVERSION_BEFORE_IMPRESSION):
            record = self.store.get(impression_id)
            impression_timestamp = record.timestamp if record is not None else None
        return reason(
            code,
            self.rules,
            impression_id,
            kind=kind,
            timestamp=timestamp,
            now_wall=now_wall,
            impression_timestamp=impression_timestamp,
            key=key,
        )


def _show_key(key: bytes | None) -> str:
    if key is None:
        return "null"
    try:
        return repr(key.decode())
    except UnicodeDecodeError:
        return repr(key)


def reason(
    code: str,
    rules: JoinRules,
    impression_id: str,
    *,
    kind: str = "click",
    timestamp: float | None = None,
    now_wall: float | None = None,
    impression_timestamp: float | None = None,
    key: bytes | None = None,
) -> str:
    """The sentence a dead letter carries for ``code`` (the code itself when unknown).
    ``kind``: impression, click or conversion."""
    window = rules.attribution_window_s
    skew = rules.max_clock_skew_s
    if code == TIMESTAMP_OUT_OF_RANGE:
        what = f"{kind} {impression_id!r}"
        if timestamp is None or now_wall is None:
            return f"{what}: event time outside the accepted range"
        if timestamp > now_wall:
            return (
                f"{what} has event time {timestamp:.3f}, {timestamp - now_wall:.0f} s ahead of "
                f"the clock (at most {skew:g} s, ADLOOP_MAX_CLOCK_SKEW_S)"
            )
        return (
            f"{what} has event time {timestamp:.3f}, {now_wall - timestamp:.0f} s in the past "
            f"(at most {rules.max_event_age_s:g} s, ADLOOP_MAX_EVENT_AGE_S)"
        )
    if code in (CLICK_BEFORE_IMPRESSION, CONVERSION_BEFORE_IMPRESSION):
        what = "click" if code == CLICK_BEFORE_IMPRESSION else "conversion"
        gap = ""
        if timestamp is not None and impression_timestamp is not None:
            gap = f" by {impression_timestamp - timestamp:.0f} s"
        return (
            f"{what} on {impression_id!r} precedes its impression{gap}, more than the "
            f"{skew:g} s two clocks may disagree (ADLOOP_MAX_CLOCK_SKEW_S)"
        )
    if code == KEY_MISMATCH:
        return (
            f"record key {_show_key(key)} is not the impression_id {impression_id!r}: events "
            "are partitioned by impression_id, so the join looks for an impression on the "
            "partition of its key"
        )
    sentences = {
        DUPLICATE_IMPRESSION_ID: f"impression_id {impression_id!r} was already counted",
        EXPIRED_IMPRESSION: f"impression {impression_id!r} is more than the {rules.retention:g} s "
        "retention behind the newest impression of its partition: a duplicate of it could not "
        "be recognised any more",
        UNKNOWN_IMPRESSION: f"no impression {impression_id!r} arrived within "
        f"{rules.click_wait_s:g} s (ADLOOP_CLICK_WAIT_S), or it expired",
        LATE_CLICK: f"click on {impression_id!r} is outside the {window:g} s "
        "attribution window (ADLOOP_ATTRIBUTION_WINDOW_S)",
        LATE_CONVERSION: f"conversion on {impression_id!r} is outside the {window:g} s "
        "attribution window",
        DUPLICATE_CLICK: f"impression {impression_id!r} was already clicked; "
        "a click is counted once",
        DUPLICATE_CONVERSION: f"impression {impression_id!r} already converted",
    }
    return sentences.get(code, code)


Cell = tuple[str, str, str, str]  # campaign, audience, creative_id, placement


class Tally:
    """A ``Join`` with its counts per campaign × audience × creative × placement and its
    dead letters by code, in memory: the rules applied end to end, as the ingest applies
    them, for offline readers and tests. Parked events come back as their JSON bytes."""

    def __init__(self, rules: JoinRules, store: JoinStore | None = None) -> None:
        self.join = Join(rules, store if store is not None else MemoryStore())
        self.cells: dict[Cell, CreativeCounts] = {}
        self.dead_letters: Counter[str] = Counter()
        self._decoders = {
            "clicks": msgspec.json.Decoder(Click),
            "conversions": msgspec.json.Decoder(Conversion),
        }
        self._encode = msgspec.json.Encoder().encode

    def _cell(self, rec: ImpressionRecord | Impression) -> CreativeCounts:
        ident = (rec.campaign, rec.audience, rec.creative_id, rec.placement)
        cell = self.cells.get(ident)
        if cell is None:
            cell = self.cells[ident] = CreativeCounts()
        return cell

    def impression(self, imp: Impression, now_wall: float | None = None) -> str | None:
        """None when counted, else the dead-letter code. Releases its parked events."""
        join = self.join
        code = join.add_impression(imp, now_wall)
        if code is not None:
            self.dead_letters[code] += 1
            return code
        self._cell(imp).impressions += 1
        if join.has_parked(imp.impression_id):
            ready, expired = join.take_released(imp.impression_id)
            if expired:
                self.dead_letters[UNKNOWN_IMPRESSION] += len(expired)
            for parked in ready:
                event = self._decoders[parked.role].decode(parked.original)
                self.attribute(event, None)
        return None

    def attribute(
        self, event: Click | Conversion, now_wall: float | None = None, offset: int = 0
    ) -> str | None:
        """None when counted, else ``PARKED`` or the dead-letter code."""
        outcome = self.join.attribute(event, now_wall, offset, self._encode(event))
        if type(outcome) is str:
            if outcome != PARKED:
                self.dead_letters[outcome] += 1
            return outcome
        count_attributed(self._cell(outcome), event)  # type: ignore[arg-type]
        return None

    def expire_parked(self, now_wall: float | None, caught_up: bool) -> list[ParkedEvent]:
        expired = self.join.expire_parked(now_wall, caught_up)
        if expired:
            self.dead_letters[UNKNOWN_IMPRESSION] += len(expired)
        return expired

    def counts(self) -> dict[Cell, tuple[int, int, int, float]]:
        """(impressions, clicks, conversions, conversion value) per cell."""
        return {
            cell: (c.impressions, c.clicks, c.conversions, c.conversion_value)
            for cell, c in self.cells.items()
        }
