"""The Faust worker: the posterior table and the decisions it publishes.

The agent iterates *outcome snapshots* from the ingest stage (one message per
campaign x audience x source partition per flush), not raw events: that keeps
Faust's per-message cost off the hot path. The table value is the latest
snapshot per source partition (``PosteriorState``), stored in RocksDB
(rocksdict) with a changelog topic, so a restarted or moved worker resumes
with exactly the same counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import faust
import msgspec
import numpy as np

from adloop.bandit import BetaPrior
from adloop.bandit.priors import shrinkage_prior
from adloop.schemas import Creative, OutcomeSnapshot, split_decision_key
from adloop.streams import metrics
from adloop.streams.config import Settings
from adloop.streams.context import ModelCache, context_setup, load_model
from adloop.streams.posterior import (
    DEFAULT_PRIOR_STRENGTH,
    PosteriorState,
    build_decision,
    decode_state,
    encode_state,
    learn_contexts,
    learn_increments,
    prior_for,
)
from adloop.streams.registry import CreativeRegistry, registry_follower

log = logging.getLogger("adloop.worker")


def _faust_credentials(settings: Settings) -> Any:
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=settings.kafka_client_kwargs().get("ssl_context"),
        )
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(settings.kafka_client_kwargs()["ssl_context"])
    return None


def faust_settings(settings: Settings) -> dict[str, Any]:
    """faust.App keyword arguments derived from our Settings (pass-through last)."""
    scheme = "kafka"
    if settings.fetch_max_wait_ms is not None:
        from adloop.streams.faust_transport import register
        from adloop.streams.kafka_io import consumer_kwargs

        scheme = register(settings.fetch_max_wait_ms, consumer_kwargs(settings))
    conf: dict[str, Any] = {
        "broker": ";".join(f"{scheme}://{h}" for h in settings.bootstrap_servers.split(",")),
        "store": "rocksdb://",
        "datadir": str(settings.state_dir("worker")),
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "web_enabled": settings.worker_web_port > 0,
        "web_port": settings.worker_web_port or 6066,
        "web_host": settings.api_host,
        "web_bind": settings.api_host,
        "stream_recovery_delay": 0.0,
        "topic_allow_declare": True,
    }
    credentials = _faust_credentials(settings)
    if credentials is not None:
        conf["broker_credentials"] = credentials
    if settings.session_timeout_s:
        conf["broker_session_timeout"] = settings.session_timeout_s
        conf["broker_heartbeat_interval"] = settings.heartbeat_interval_s or 0.5
        conf["broker_rebalance_timeout"] = max(settings.session_timeout_s, 5.0)
    conf.update(settings.faust_options)
    return conf


class PosteriorWorker:
    """Builds the Faust app: topics, the posterior table, the agent, the registry task."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CreativeRegistry()
        self.rng = np.random.default_rng()
        self.app = faust.App(settings.group_id("worker"), **faust_settings(settings))
        self.outcomes = self.app.topic(
            settings.topic("outcomes"),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )
        self.decisions = self.app.topic(
            settings.topic("decisions"),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )
        # bytes key/value types make Faust store and changelog them raw: we encode
        # PosteriorState with msgpack ourselves.
        self.posteriors = self.app.Table(
            "posteriors",
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.partitions,
        )
        self._snapshot_decoder = msgspec.json.Decoder(OutcomeSnapshot)
        self._json = msgspec.json.Encoder()
        self.engine_config = settings.engine_config()
        # ADLOOP_POLICY=contextual: the learner's setup, and the models of the keys
        # seen lately (deserializing a Vowpal Wabbit model costs milliseconds).
        self.context = (
            context_setup(settings, self.registry) if settings.counts_context_cells else None
        )
        self._models = ModelCache()
        # Campaign-level counts per creative and audience, from the keys this worker
        # holds: where a creative new to an audience borrows its prior.
        self._campaign_counts: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
        self.registry_ready = asyncio.Event()
        # Decisions for a key are computed and enqueued under this lock, so a
        # republish triggered by a creative change never lands after (and
        # overwrites) a newer decision from the agent.
        self._publish_lock = asyncio.Lock()
        self._dirty: set[bytes] = set()
        # When each dirty key became dirty: the oldest are decided first.
        self._dirty_since: dict[bytes, float] = {}
        # When each key's decision was last published: a key is decided at most once per
        # interval, and at once when its last decision is older than that (a click on a
        # quiet key shows without waiting for the next tick).
        self._published_at: dict[bytes, float] = {}
        self._interval_s = settings.decision_interval_ms / 1000
        self._wake = asyncio.Event()
        self.app.agent(self.outcomes, name="apply-outcomes")(self._apply_outcomes)
        self.app.task(self._follow_registry)
        self.app.task(self._publisher)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.posteriors.on_recover(self._on_recovered)

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        # With several workers (README "Scaling out"), which outcome partitions (and
        # posterior table partitions) this one holds: for operators and the scale test.
        topic = self.settings.topic("outcomes")
        partitions = sorted(tp.partition for tp in assigned if tp.topic == topic)
        # In the message: Faust's log format drops structured extras.
        log.info("partitions assigned partitions=%s", json.dumps(partitions))

    async def _on_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        # Keys of revoked partitions are no longer ours to decide; the ones kept are
        # marked again once the table is recovered (_on_recovered).
        self._dirty.clear()
        self._dirty_since.clear()

    async def _on_recovered(self) -> None:
        """The table is recovered for the partitions this worker now holds: decide
        every key again.

        A decision is published on the timer after its snapshot is applied, while the
        outcome offsets are committed on Faust's commit interval: a worker killed
        between the two had committed snapshots whose decision never reached the
        decisions topic, and no snapshot comes again for a key whose traffic ended. So
        the decisions published are those of the recovered table, not only of the
        snapshots still to come (one decision per held key per rebalance).
        """
        now = time.perf_counter()
        for key in list(self.posteriors):
            self._dirty.add(key)
            self._dirty_since.setdefault(key, now)
        log.info("table recovered; deciding its keys again keys=%d", len(self._dirty))

    def prior_of(self, campaign: str, audience: str) -> Any:
        """Prior for a creative in this audience: its predicted CTR, else what it earns
        in the campaign's other audiences (empirical Bayes), else uniform."""

        def prior(creative_id: str) -> BetaPrior:
            creative = self.registry.get(creative_id)
            if creative is not None and creative.predicted_ctr is not None:
                return prior_for(creative)
            elsewhere = [
                counts
                for other, counts in self._campaign_counts.get(campaign, {})
                .get(creative_id, {})
                .items()
                if other != audience
            ]
            if elsewhere:
                imps, clicks = (np.array(x) for x in zip(*elsewhere, strict=True))
                return shrinkage_prior(imps, clicks, default_strength=DEFAULT_PRIOR_STRENGTH)
            return BetaPrior()

        return prior

    def decision_bytes(self, key: str, state: PosteriorState) -> bytes:
        campaign, audience = split_decision_key(key)
        by_creative = self._campaign_counts.setdefault(campaign, {})
        for creative_id, counts in state.totals().items():
            by_creative.setdefault(creative_id, {})[audience] = (counts.impressions, counts.clicks)
        decision = build_decision(
            campaign,
            audience,
            state,
            self.registry.servable(campaign, audience),
            self.registry.creatives,
            self.rng,
            time.time(),
            engine_config=self.engine_config,
            prior_of=self.prior_of(campaign, audience),
            context=self.context,
            context_model=self._context_model(key, state),
        )
        metrics.DECISIONS.inc()
        if decision.last_event_at:
            metrics.EVENT_TO_DECISION.labels("worker").observe(
                max(0.0, decision.updated_at - decision.last_event_at)
            )
        return self._json.encode(decision)

    def _context_model(self, key: str, state: PosteriorState) -> Any:
        """The key's contextual model, kept deserialized between snapshots and decisions
        (its last fit is the next one's starting point)."""
        if self.context is None or state.context_model is None:
            return None
        model = self._models.get(key.encode(), state.context_model)
        if model is None:
            model = load_model(state.context_model, self.context.learner)
            self._models.put(key.encode(), state.context_model, model)
        return model

    async def _apply_outcomes(self, stream: Any) -> Any:
        # Decisions list the registered creatives: know them before the first one.
        await self.registry_ready.wait()
        async for event in stream.events():
            key = event.key
            snapshot = self._snapshot_decoder.decode(event.value)
            state = decode_state(self.posteriors.get(key))
            increments = state.apply(snapshot)
            alarms = learn_increments(
                state,
                increments,
                self.engine_config,
                self.prior_of(snapshot.campaign, snapshot.audience),
                snapshot.last_event_at,
            )
            if self.context is not None:
                model = learn_contexts(
                    state, snapshot, self.context, self._models.get(key, state.context_model)
                )
                self._models.put(key, state.context_model, model)
            for reason in alarms:
                log.info(
                    "change detected",
                    extra={
                        "campaign": snapshot.campaign,
                        "audience": snapshot.audience,
                        "reason": reason,
                    },
                )
            self.posteriors[key] = encode_state(state)
            # Decisions are coalesced: a burst of snapshots for a key (one per
            # source partition per ingest flush) yields one decision per tick.
            self._dirty.add(key)
            now = time.perf_counter()
            self._dirty_since.setdefault(key, now)
            if now - self._published_at.get(key, 0.0) >= self._interval_s:
                self._wake.set()

    async def _publisher(self) -> None:
        """Publishes dirty keys when woken by one that is due, else every interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval_s)
            self._wake.clear()
            await self._publish_dirty()
            if len(self._published_at) > 4096:
                # An entry older than an interval means what a missing one does.
                cutoff = time.perf_counter() - self._interval_s
                self._published_at = {k: t for k, t in self._published_at.items() if t > cutoff}

    async def _publish_dirty(self) -> None:
        # Decisions list the registered creatives: none before the registry is read.
        if not self._dirty or not self.registry_ready.is_set():
            return
        async with self._publish_lock:
            # A time budget per round: keys left over stay dirty for the next one (and
            # coalesce more snapshots meanwhile), so decisions over many creatives can
            # delay decisions, never the agent that keeps the counts.
            started = time.perf_counter()
            deadline = started + self._interval_s
            for key in sorted(self._dirty, key=lambda k: self._dirty_since.get(k, 0.0)):
                if time.perf_counter() > deadline:
                    break
                if started - self._published_at.get(key, 0.0) < self._interval_s:
                    continue  # decided less than an interval ago: coalesce until due
                self._dirty.discard(key)
                self._dirty_since.pop(key, None)
                self._published_at[key] = time.perf_counter()
                raw = self.posteriors.get(key)
                if raw is None:  # not (or no longer) held here
                    continue
                state = decode_state(raw)
                await self.decisions.send(key=key, value=self.decision_bytes(key.decode(), state))
                await asyncio.sleep(0)  # let the agent run between decisions

    async def _follow_registry(self) -> None:
        follower = registry_follower(self.settings, self.registry, on_change=self._on_creative)
        await follower.start()
        try:
            await follower.caught_up.wait()
            self.registry_ready.set()
            # Faust cancels app tasks at shutdown; until then the follower runs.
            await asyncio.Event().wait()
        finally:
            await follower.stop()

    def _on_creative(self, creative: Creative) -> None:
        if self.registry_ready.is_set():
            self.app.loop.create_task(self._republish(creative.campaign))

    async def _republish(self, campaign: str) -> None:
        """A creative changed: republish the decisions of its campaign held here."""
        prefix = f"{campaign}|".encode()
        async with self._publish_lock:
            for key, raw in list(self.posteriors.items()):
                if key.startswith(prefix):
                    value = self.decision_bytes(key.decode(), decode_state(raw))
                    await self.decisions.send(key=key, value=value)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    metrics.serve_metrics(settings.metrics_host, settings.metrics_port, "worker")
    worker = PosteriorWorker(settings)
    faust.Worker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
