"""Context cells: what the contextual policy counts, learns and serves by (pure).

A *context cell* is a small canonical string of an impression's categorical context
features, ``device=mobile,hour=18``: the features named in ``ADLOOP_CONTEXT_FEATURES``
(``hour/6``: numeric values in buckets of 6), after the privacy policy
(``schemas/privacy.py``: allow-list, personal fields hashed) has cleaned the context.
``-`` is the cell of a context with none of the features; ``other`` holds every cell
past the cap.

Where each piece runs:

* **ingest** (``PartitionContexts``, one per input partition): counts impressions and
  clicks per campaign × audience × cell × creative × placement next to the plain
  counts, in the same RocksDB write batch as the input offsets, so each impression is
  counted once across crashes. At most ``ADLOOP_CONTEXT_CELLS_MAX`` cells per campaign ×
  audience and source partition; later cells count as ``other``. A click lands in its
  impression's cell (the join keeps the cell on the impression's record). Snapshots
  carry the rows that changed since the last flush, and every few seconds all of a
  key's rows, with their cumulative counts.
* **worker** (``merge_rows``, ``learn_rows``, ``compile_policy``): keeps the largest
  cumulative value seen per row and source partition (the counters only grow, so a
  repeated, reordered or re-sent row changes nothing) and feeds the increase to the
  contextual learner as one example per row (clicks and non-clicks, weight = count);
  decisions carry the learner's choice per cell (``Decision.contextual``).
* **serving** (``cell_for_request``): maps a request's context to its cell exactly as
  the ingest did, and draws from that cell's probabilities.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from adloop.bandit.contextual import (
    ContextualLearner,
    learner_from_bytes,
    learner_kind,
    learner_to_bytes,
    make_learner,
    word_features,
)
from adloop.schemas import (
    ContextCell,
    ContextRow,
    ContextualPolicy,
    Creative,
    Impression,
    decision_key,
)
from adloop.schemas.privacy import PrivacyPolicy

log = logging.getLogger("adloop.context")

NO_FEATURES = "-"
OTHER = "other"
#: A key's rows are all re-sent at most this often (wall seconds): a worker whose
#: table lost a write catches up without waiting for every row to change again.
FULL_ROWS_EVERY_S = 5.0
_UNSAFE = str.maketrans({c: "_" for c in ",=| \t\n\r/"})

Row = tuple[str, str, str]  # cell, creative_id, placement


# -- cells --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellFeature:
    name: str
    bucket: float | None = None  # numeric bucket width ("hour/6")

    def value(self, raw: Any) -> str:
        if isinstance(raw, bool):
            return "true" if raw else "false"
        if self.bucket is not None:
            try:
                number = float(raw)
            except (TypeError, ValueError):
                number = math.nan
            if math.isfinite(number):
                return str(int(number // self.bucket * self.bucket))
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        return str(raw).lower().translate(_UNSAFE)[:64] or "_"


def parse_features(spec: str | Sequence[str]) -> tuple[CellFeature, ...]:
    """``"device,hour/6"`` -> the cell features (a bucket width after ``/``)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[CellFeature] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, width = item.partition("/")
        bucket = float(width) if width else None
        if bucket is not None and not bucket > 0:
            raise ValueError(f"context feature {item!r}: the bucket width must be > 0")
        out.append(CellFeature(name.strip(), bucket))
    return tuple(out)


def feature_spec(features: Sequence[CellFeature]) -> list[str]:
    """The features as written in ``ADLOOP_CONTEXT_FEATURES`` (what decisions carry)."""
    return [f.name if f.bucket is None else f"{f.name}/{f.bucket:g}" for f in features]


class ContextCells:
    """Maps a context to its canonical cell, the same way in every process."""

    def __init__(self, features: Sequence[CellFeature], privacy: PrivacyPolicy) -> None:
        self.features = tuple(features)
        self.privacy = privacy
        self.names = tuple(f.name for f in self.features)
        # raw feature values -> cell: contexts repeat, and the privacy policy's hashing
        # is the costly part of a cell.
        self._cache: dict[tuple[Any, ...], str] = {}
        dropped = [n for n in self.names if not privacy.allows_context_key(n)]
        dropped = [n for n in dropped if n not in privacy.personal_fields]
        if dropped:
            log.warning(
                "context features not in the allow-list (ADLOOP_CONTEXT_KEYS) are never "
                "kept, so they never form a cell",
                extra={"features": dropped},
            )

    def cell(self, context: Mapping[str, Any]) -> str:
        raw = tuple(map(context.get, self.names))
        found = self._cache.get(raw)
        if found is not None:
            return found
        present = {n: context[n] for n in self.names if n in context}
        # The privacy policy first: only what adloop may keep forms a cell.
        clean = self.privacy.clean_context(present)
        parts = [f"{f.name}={f.value(clean[f.name])}" for f in self.features if f.name in clean]
        cell = ",".join(parts) or NO_FEATURES
        if len(self._cache) > 65_536:
            self._cache.clear()
        self._cache[raw] = cell
        return cell


def cell_items(cell: str) -> dict[str, str]:
    """``"device=mobile,hour=18"`` -> ``{"device": "mobile", "hour": "18"}``."""
    if cell in (NO_FEATURES, ""):
        return {}
    if cell == OTHER:
        return {"cell": OTHER}
    out: dict[str, str] = {}
    for part in cell.split(","):
        name, _, value = part.partition("=")
        out[name] = value
    return out


def learner_context(placement: str, cell: str) -> dict[str, str]:
    """What the learner sees of a row: the placement and the cell's features, and the
    whole cell when it combines several (so the model can learn a combination that is
    more than the sum of its parts). The audience is the model's key."""
    items = cell_items(cell)
    context = {"placement": placement, **items}
    if len(items) > 1:
        context["cell"] = cell
    return context


# -- ingest: counting by cell ---------------------------------------------------------------


class _KeyRows:
    """One campaign × audience's rows in one partition."""

    __slots__ = ("cells", "dirty", "full_sent_at", "key", "rows")

    def __init__(self, key: str, rows: list[ContextRow]) -> None:
        self.key = key
        self.rows: dict[Row, ContextRow] = {(r.cell, r.creative_id, r.placement): r for r in rows}
        self.cells: set[str] = {r.cell for r in rows if r.cell != OTHER}
        self.dirty: set[Row] = set()
        self.full_sent_at = -math.inf


_rows_encoder = msgspec.msgpack.Encoder()
_rows_decoder = msgspec.msgpack.Decoder(list[ContextRow])


class PartitionContexts:
    """The ingest's context-cell counts for one input partition.

    ``load(key)`` reads a key's stored rows (RocksDB); ``changes()`` gives what to write
    with the next checkpoint, ``committed()`` forgets it once written. The hot path
    (``cell``, ``count_impression``, ``count_click``) does a few dictionary lookups per
    event and builds no key string.
    """

    def __init__(
        self,
        cells: ContextCells,
        cap: int,
        load: Callable[[str], bytes | None],
        storage_key: Callable[[str], bytes],
    ) -> None:
        self.cells = cells
        self.cap = cap
        self._load = load
        self._storage_key = storage_key
        self._keys: dict[tuple[str, str], _KeyRows] = {}
        # (campaign, audience, cell, creative, placement) -> (its key's rows, the row,
        # (cell, creative, placement)): one lookup per counted event.
        self._row_cache: dict[tuple[str, str, str, str, str], tuple[_KeyRows, ContextRow, Row]] = {}
        self._changed: set[_KeyRows] = set()

    def _key_rows(self, campaign: str, audience: str) -> _KeyRows:
        rows = self._keys.get((campaign, audience))
        if rows is None:
            key = decision_key(campaign, audience)
            raw = self._load(key)
            rows = self._keys[(campaign, audience)] = _KeyRows(
                key, _rows_decoder.decode(raw) if raw else []
            )
        return rows

    def cell(self, imp: Impression) -> str:
        """The impression's cell: its own, or ``other`` when its key is at the cap."""
        cell = self.cells.cell(imp.context) if imp.context else NO_FEATURES
        rows = self._keys.get((imp.campaign, imp.audience))
        if rows is None:
            rows = self._key_rows(imp.campaign, imp.audience)
        if cell in rows.cells or len(rows.cells) < self.cap:
            return cell
        return OTHER

    def _row(
        self, campaign: str, audience: str, cell: str, creative: str, placement: str
    ) -> ContextRow:
        ident = (campaign, audience, cell, creative, placement)
        found = self._row_cache.get(ident)
        if found is None:
            rows = self._key_rows(campaign, audience)
            row_id = (cell, creative, placement)
            row = rows.rows.get(row_id)
            if row is None:
                row = rows.rows[row_id] = ContextRow(cell, creative, placement)
                if cell != OTHER:
                    rows.cells.add(cell)
            found = self._row_cache[ident] = (rows, row, row_id)
        rows, row, row_id = found
        rows.dirty.add(row_id)
        self._changed.add(rows)
        return row

    def count_impression(self, imp: Impression, cell: str) -> None:
        self._row(imp.campaign, imp.audience, cell, imp.creative_id, imp.placement).impressions += 1

    def count_click(self, record: Any) -> None:
        """A counted click on an impression record (``ImpressionRecord``) with a cell."""
        row = self._row(
            record.campaign, record.audience, record.cell, record.creative_id, record.placement
        )
        row.clicks += 1

    def snapshot_rows(self, key: str, now: float) -> list[ContextRow]:
        """The rows of ``key`` (a decision key) for the next snapshot: those changed
        since the last checkpoint, or all of them every ``FULL_ROWS_EVERY_S``."""
        campaign, _, audience = key.partition("|")
        rows = self._keys.get((campaign, audience))
        if rows is None:
            return []
        if now - rows.full_sent_at >= FULL_ROWS_EVERY_S:
            rows.full_sent_at = now
            return list(rows.rows.values())
        return [rows.rows[r] for r in rows.dirty]

    def changes(self) -> Iterator[tuple[bytes, bytes]]:
        """(storage key, encoded rows) of every key changed since the last checkpoint."""
        for rows in self._changed:
            yield self._storage_key(rows.key), _rows_encoder.encode(list(rows.rows.values()))

    def committed(self) -> None:
        for rows in self._changed:
            rows.dirty.clear()
        self._changed.clear()


def partition_contexts(
    settings: Any, load: Callable[[str], bytes | None], storage_key: Callable[[str], bytes]
) -> PartitionContexts | None:
    """The ingest's counter for one partition, or None when no policy reads cells."""
    if not settings.counts_context_cells:
        return None
    cells = ContextCells(parse_features(settings.context_features), settings.privacy_policy())
    return PartitionContexts(cells, settings.context_cells_max, load, storage_key)


# -- worker: merging rows, learning, compiling ------------------------------------------------

# partition -> "cell|creative|placement" -> [impressions, clicks]
HeldRows = dict[int, dict[str, list[int]]]
Increment = tuple[str, str, str, int, int]  # cell, creative, placement, d_imps, d_clicks


def row_key(cell: str, creative_id: str, placement: str) -> str:
    # Cells carry no '|' (their values are sanitized), registered creative ids neither;
    # the placement comes last, so it may.
    return f"{cell}|{creative_id}|{placement}"


def split_row_key(key: str) -> Row:
    cell, creative_id, placement = key.split("|", 2)
    return cell, creative_id, placement


def merge_rows(held: HeldRows, contexts: Mapping[int, Sequence[ContextRow]]) -> list[Increment]:
    """Take a snapshot's rows; returns what they add, row by row.

    Each row's counters only grow at its source, so the merge keeps the largest value
    seen per counter and the increase is what was not learned yet: a repeated, older
    or reordered snapshot adds nothing, and a row that went missing comes back whole.
    """
    out: list[Increment] = []
    for partition, rows in contexts.items():
        mine = held.setdefault(partition, {})
        for row in rows:
            key = row_key(row.cell, row.creative_id, row.placement)
            before = mine.get(key)
            if before is None:
                before = mine[key] = [0, 0]
            d_imps = row.impressions - before[0]
            d_clicks = row.clicks - before[1]
            if d_imps <= 0 and d_clicks <= 0:
                continue
            d_imps, d_clicks = max(d_imps, 0), max(d_clicks, 0)
            before[0] += d_imps
            before[1] += d_clicks
            out.append((row.cell, row.creative_id, row.placement, d_imps, d_clicks))
    return out


def row_totals(held: HeldRows) -> dict[Row, tuple[int, int]]:
    """(impressions, clicks) per row, summed over source partitions."""
    out: dict[Row, list[int]] = {}
    for rows in held.values():
        for key, (imps, clicks) in rows.items():
            total = out.setdefault(split_row_key(key), [0, 0])
            total[0] += imps
            total[1] += clicks
    return {row: (t[0], t[1]) for row, t in out.items()}


CreativeFeatures = Callable[[str], Mapping[str, float]]


def text_features_of(creative: Creative | None) -> dict[str, float]:
    """A creative's text as features (words of its headline and description)."""
    if creative is None:
        return {}
    return word_features(f"{creative.headline} {creative.description}")


def learn_rows(
    model: ContextualLearner,
    increments: Sequence[Increment],
    features_of: CreativeFeatures,
) -> None:
    """One example per increment: its impressions and clicks, weight = its count.

    A click can arrive in a later increment than its impression (the click wait):
    the Thompson learner's counts are its sufficient statistics, so it learns exactly
    the counted totals whatever the split; Vowpal Wabbit learns such a click as one
    more example (``VowpalContextual.learn_increment``).
    """
    for cell, creative_id, placement, d_imps, d_clicks in sorted(increments):
        model.add_arm(creative_id, features_of(creative_id))
        context = learner_context(placement, cell)
        model.learn_increment(context, creative_id, d_imps, d_clicks)


def load_model(raw: bytes | None, kind: str) -> ContextualLearner:
    """The key's model, or a fresh one of the configured kind (also when the kind changed:
    the caller then relearns the held totals)."""
    if raw:
        model = learner_from_bytes(raw)
        if learner_kind(model) == kind:
            return model
    return make_learner(kind)


def relearn_totals(model: ContextualLearner, held: HeldRows, features_of: CreativeFeatures) -> None:
    """Feed a fresh model every counted row at once (a new or reconfigured model)."""
    learn_rows(
        model,
        [(c, cr, p, i, k) for (c, cr, p), (i, k) in row_totals(held).items()],
        features_of,
    )


def dumps(model: ContextualLearner) -> bytes:
    return learner_to_bytes(model)


def _no_text(_: str) -> Mapping[str, float]:
    return {}


@dataclass(frozen=True)
class ContextSetup:
    """How the contextual policy is configured (ADLOOP_POLICY=contextual)."""

    learner: str = "logistic_ts"  # ADLOOP_CONTEXT_LEARNER
    features: tuple[str, ...] = ("device", "hour/6")  # ADLOOP_CONTEXT_FEATURES
    # creative_id -> its text features (words, or an embedding's projection).
    features_of: CreativeFeatures = field(default=_no_text, compare=False)


@dataclass
class Compiled:
    """The decision's contextual parts."""

    policy: ContextualPolicy
    placements: dict[str, dict[str, float]]
    wins: dict[str, list[str]] = field(default_factory=dict)
    effects: dict[str, dict[str, float]] = field(default_factory=dict)


def compile_policy(
    model: ContextualLearner,
    held: HeldRows,
    placements: Sequence[str],
    servable_ids: Sequence[str],
    features_of: CreativeFeatures,
    floor: float,
    features: Sequence[str],
    max_wins: int = 8,
) -> Compiled:
    """The model's serving distribution per placement × cell (cells with traffic, ``-``
    and ``other``), with the exploration floor, and what explains it per creative.

    The model's creatives are the servable ones while it compiles, and its own again
    afterwards (the worker compiles with the model it keeps learning).
    """
    own = list(model.arm_ids)
    own_features = {a: dict(getattr(model, "arm_features", {}).get(a) or {}) for a in own}
    try:
        for creative_id in [a for a in own if a not in set(servable_ids)]:
            model.remove_arm(creative_id)
        for creative_id in servable_ids:
            model.add_arm(creative_id, features_of(creative_id))
        return _compile(model, held, placements, floor, features, max_wins)
    finally:
        for creative_id in [a for a in model.arm_ids if a not in own]:
            model.remove_arm(creative_id)
        for creative_id in own:
            if creative_id not in model.arm_ids:
                model.add_arm(creative_id, own_features[creative_id])


def _compile(
    model: ContextualLearner,
    held: HeldRows,
    placements: Sequence[str],
    floor: float,
    features: Sequence[str],
    max_wins: int,
) -> Compiled:
    totals = row_totals(held)
    traffic: dict[tuple[str, str], list[int]] = {}
    for (cell, _, placement), (imps, clicks) in totals.items():
        t = traffic.setdefault((placement, cell), [0, 0])
        t[0] += imps
        t[1] += clicks
    for placement in {*placements, *(pl for pl, _ in traffic)}:
        traffic.setdefault((placement, NO_FEATURES), [0, 0])
        traffic.setdefault((placement, OTHER), [0, 0])
    order = sorted(traffic, key=lambda pc: (pc[0], -traffic[pc][0], pc[1]))
    ids = list(model.arm_ids)
    table = model.serving_table([learner_context(p, c) for p, c in order]) if ids else None
    cells: list[ContextCell] = []
    by_placement: dict[str, dict[str, float]] = {}
    wins: dict[str, list[str]] = {}
    for i, (placement, cell) in enumerate(order):
        if table is None:
            break
        p = table[i]
        p = p / p.sum() if p.sum() > 0 else np.full(len(ids), 1.0 / len(ids))
        if floor > 0:
            p = (1.0 - floor) * p + floor / len(ids)
        probabilities = {cid: float(p[j]) for j, cid in enumerate(ids)}
        best = ids[int(np.argmax(p))]
        imps, clicks = traffic[(placement, cell)]
        cells.append(
            ContextCell(
                placement=placement,
                cell=cell,
                impressions=imps,
                clicks=clicks,
                best_creative_id=best,
                probabilities=probabilities,
            )
        )
        if cell == NO_FEATURES:
            by_placement[placement] = probabilities
        if imps and cell not in (NO_FEATURES, OTHER) and len(wins.get(best, [])) < max_wins:
            wins.setdefault(best, []).append(f"{placement} {cell}")
    learned_imps, learned_clicks = (round(x) for x in model.learned)
    return Compiled(
        policy=ContextualPolicy(
            learner=learner_kind(model),
            version=learned_imps + learned_clicks,
            features=list(features),
            learned_impressions=learned_imps,
            learned_clicks=learned_clicks,
            cells=cells,
        ),
        placements=by_placement,
        wins=wins,
        effects={cid: model.effects(cid) for cid in ids},
    )


class ModelCache:
    """The worker's deserialized models, valid while the table holds the same bytes."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._models: dict[Any, tuple[bytes, ContextualLearner]] = {}

    def get(self, key: Any, raw: bytes | None) -> ContextualLearner | None:
        found = self._models.get(key)
        if found is None or raw is None or found[0] != raw:
            return None
        return found[1]

    def put(self, key: Any, raw: bytes | None, model: ContextualLearner) -> None:
        if raw is None:
            return
        self._models.pop(key, None)
        if len(self._models) >= self.size:
            self._models.pop(next(iter(self._models)))
        self._models[key] = (raw, model)


def context_setup(settings: Any, registry: Any) -> ContextSetup:
    """The worker's setup from its settings; creatives' text features from its registry
    (``registry.get(creative_id)``), cached per creative version."""
    cache: dict[tuple[str, int, str], Mapping[str, float]] = {}
    mode = settings.context_text
    embed = EmbeddingFeatures() if mode == "embedding" else None

    def features_of(creative_id: str) -> Mapping[str, float]:
        if mode == "none":
            return {}
        creative = registry.get(creative_id)
        if creative is None:
            return {}
        ident = (creative_id, creative.version, creative.headline)
        found = cache.get(ident)
        if found is None:
            found = embed(creative) if embed is not None else text_features_of(creative)
            if len(cache) > 100_000:
                cache.clear()
            cache[ident] = found
        return found

    return ContextSetup(
        learner=settings.context_learner,
        features=tuple(feature_spec(parse_features(settings.context_features))),
        features_of=features_of,
    )


class EmbeddingFeatures:
    """A creative's text as a fixed 8-dimensional projection of the CTR backbone's
    sentence embedding (mean-pooled all-MiniLM-L6-v2). Loads the backbone on first use:
    about 6 s and 0.5 GB in the worker, then ~5-15 ms per creative on a CPU."""

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None

    def __call__(self, creative: Creative) -> dict[str, float]:
        import torch

        from adloop.bandit.contextual import project_embedding

        if self._model is None:
            from adloop.generator.ctr import load_backbone

            model, self._tokenizer, _ = load_backbone(None)
            self._model = getattr(model, "bert", model).eval()
        text = f"{creative.headline} {creative.description}".strip()
        with torch.no_grad():
            enc = self._tokenizer([text], return_tensors="pt", truncation=True, max_length=64)
            hidden = self._model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None]
            vector = ((hidden * mask).sum(1) / mask.sum(1))[0].numpy()
        return project_embedding(vector)


# -- serving ----------------------------------------------------------------------------------


class RequestCells:
    """Serving's side: a request's context to the decision's cell, as the ingest maps
    it (same features, same privacy policy), with a small cache per feature list."""

    def __init__(self, privacy: PrivacyPolicy, cap: int = 64) -> None:
        self.privacy = privacy
        self._by_features: dict[tuple[str, ...], ContextCells] = {}
        self._cap = cap

        # The latest policy's entries by (placement, cell), per campaign x audience.
        self._index: dict[int, tuple[ContextualPolicy, dict[tuple[str, str], ContextCell]]] = {}

    def cell(self, policy: ContextualPolicy, context: Mapping[str, Any]) -> str:
        spec = tuple(policy.features)
        cells = self._by_features.get(spec)
        if cells is None:
            if len(self._by_features) >= self._cap:
                self._by_features.clear()
            cells = self._by_features[spec] = ContextCells(parse_features(spec), self.privacy)
        return cells.cell(context) if context else NO_FEATURES

    def entry(
        self, policy: ContextualPolicy, placement: str, context: Mapping[str, Any]
    ) -> ContextCell | None:
        """The policy's entry for the request: its cell's, else the placement's
        ``other`` (see ``lookup_cell``)."""
        found = self._index.get(id(policy))
        if found is None or found[0] is not policy:
            if len(self._index) > 65_536:
                self._index.clear()
            found = self._index[id(policy)] = (
                policy,
                {(e.placement, e.cell): e for e in policy.cells},
            )
        index = found[1]
        cell = self.cell(policy, context)
        return index.get((placement, cell)) or index.get((placement, OTHER))


def lookup_cell(policy: ContextualPolicy, placement: str, cell: str) -> ContextCell | None:
    """The decision's entry for this placement and cell; ``other`` of the placement
    when the cell has none (a context the ingest has not counted yet, or past the cap:
    what the model learned for unknown contexts)."""
    fallback = None
    for entry in policy.cells:
        if entry.placement != placement:
            continue
        if entry.cell == cell:
            return entry
        if entry.cell == OTHER:
            fallback = entry
    return fallback
