"""``adloop loop``: the process that closes the loop (thin adapter around streams.loop).

It follows the decisions, creatives, campaigns, generation-requests, generation-results
and audit topics from their earliest records (all of its state is on them), and every
``loop_tick_s`` runs :func:`streams.loop.plan` for each campaign × audience. It
publishes generation requests, creatives retired from an audience (with the reason in
their history), and an audit entry for everything it does. Failed requests are
retried a bounded number of times, then reported in the audit trail and the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from adloop.schemas import (
    AuditEntry,
    CampaignSettings,
    Creative,
    Decision,
    GenerationRequest,
    GenerationResult,
    StatusChange,
    decision_key,
)
from adloop.schemas.audit import AuditChain
from adloop.schemas.versioning import bump
from adloop.streams import metrics
from adloop.streams.config import Settings, TopicRole
from adloop.streams.follower import Follower
from adloop.streams.kafka_io import producer_kwargs
from adloop.streams.loop import ACTOR, LoopRules, Retirement, audit, plan
from adloop.streams.registry import CreativeRegistry, registry_follower

log = logging.getLogger("adloop.loop")

_json = msgspec.json.Encoder()


def retire_in_audience(creative: Creative, retirement: Retirement, actor: str) -> Creative:
    """The creative, retired from one audience (from all of them: status retired)."""
    retired = sorted({*creative.retired_audiences, retirement.audience})
    everywhere = bool(creative.audiences) and set(creative.audiences) <= set(retired)
    status = "retired" if everywhere else creative.status
    change = StatusChange(
        at=time.time(),
        actor=actor,
        action="retired" if everywhere else "retired_in_audience",
        status=status,
        reason=retirement.reason,
        audience=retirement.audience,
    )
    return bump(
        creative,
        retired_audiences=retired,
        status=status,
        history=[*creative.history, change],
    )


class LoopController:
    def __init__(self, settings: Settings, rules: LoopRules | None = None) -> None:
        self.settings = settings
        self.rules = rules or LoopRules(request_timeout_s=settings.generation_timeout_s)
        self.registry = CreativeRegistry()
        self.campaigns: dict[str, CampaignSettings] = {}
        self.requests: dict[str, list[GenerationRequest]] = defaultdict(list)
        self.request_ids: set[str] = set()
        # The budget counts every request of a campaign, retries included.
        self.requests_per_campaign: Counter[str] = Counter()
        self.results: dict[str, GenerationResult] = {}
        self.reported: set[str] = set()
        self.answered: set[str] = set()  # results already in the audit trail
        self.decisions: dict[str, Decision] = {}  # latest per campaign|audience
        self.followers: list[Follower[Any]] = [
            registry_follower(settings, self.registry),
            Follower.latest(settings, "decisions", self.decisions),
            Follower.latest(settings, "campaigns", self.campaigns),
            Follower(settings, "generation_requests", self._on_request),
            Follower.latest(settings, "generation_results", self.results),
            Follower(settings, "audit", self._on_audit),
        ]
        self._producer: AIOKafkaProducer | None = None
        writer = f"loop-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.audit_chain = AuditChain(writer, settings.audit_key_bytes())

    # -- state from the topics ----------------------------------------------------------
    def _on_request(self, r: GenerationRequest) -> None:
        if r.request_id not in self.request_ids:
            self.request_ids.add(r.request_id)
            self.requests[decision_key(r.campaign, r.audience)].append(r)
            self.requests_per_campaign[r.campaign] += 1

    def _on_audit(self, a: AuditEntry) -> None:
        request_id = a.details.get("request_id")
        if not isinstance(request_id, str):
            return
        if a.action == "generation_failed":
            self.reported.add(request_id)
        elif a.action == "generation_answered":
            self.answered.add(request_id)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**producer_kwargs(self.settings, acks="all"))
        await self._producer.start()
        # Together: each start lists offsets and reads the true ends, a few fetch waits.
        await asyncio.gather(*(follower.start() for follower in self.followers))
        for follower in self.followers:
            await follower.wait_caught_up()

    async def stop(self) -> None:
        for follower in self.followers:
            await follower.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _audit(self, campaign: str, action: str, reason: str, **fields: Any) -> None:
        """One entry in the campaign's audit trail (keyed by campaign)."""
        entry = self.audit_chain.seal(audit(campaign, action, reason, **fields))
        await self._send("audit", campaign, entry)

    async def _send(self, role: TopicRole, key: str, value: msgspec.Struct) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.settings.topic(role), key=key.encode(), value=_json.encode(value)
        )

    # -- one pass ---------------------------------------------------------------------
    async def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        await self._audit_answers()
        for key, decision in sorted(self.decisions.items()):
            settings = self.campaigns.get(decision.campaign)
            if settings is None:
                continue  # no settings, no automation: the campaign never opted in
            creatives = {
                c.creative_id: c for c in self.registry.campaign_creatives(decision.campaign)
            }
            p = plan(
                decision,
                settings,
                creatives,
                self.requests.get(key, []),
                self.results,
                self.requests_per_campaign[decision.campaign],
                now,
                self.rules,
                frozenset(self.reported),
            )
            for retirement in p.retire:
                creative = self.registry.get(retirement.creative_id)
                if creative is None:
                    continue
                updated = retire_in_audience(creative, retirement, ACTOR)
                await self._send("creatives", updated.creative_id, updated)
                self.registry.put(updated)
                await self._audit(
                    decision.campaign,
                    "retired",
                    retirement.reason,
                    creative_id=updated.creative_id,
                    audience=retirement.audience,
                )
                log.info(
                    "retired",
                    extra={
                        "creative": updated.creative_id,
                        "audience": retirement.audience,
                        "reason": retirement.reason,
                    },
                )
            if p.request is not None:
                r = p.request
                await self._send("generation_requests", r.request_id, r)
                metrics.GENERATION_REQUESTS.inc()
                self._on_request(r)
                await self._audit(
                    decision.campaign,
                    "generation_requested",
                    r.trigger or "",
                    creative_id=r.underperformer.creative_id if r.underperformer else None,
                    audience=r.audience,
                    request_id=r.request_id,
                    n_variants=r.n_variants,
                )
                log.info(
                    "generation requested", extra={"request_id": r.request_id, "trigger": r.trigger}
                )
            for failure in p.failures:
                request_id = failure.split()[1]
                self.reported.add(request_id)
                await self._audit(
                    decision.campaign,
                    "generation_failed",
                    failure,
                    audience=decision.audience,
                    request_id=request_id,
                )
                log.error(
                    "generation failed; check `adloop generator` and its log",
                    extra={"reason": failure},
                )

    async def _audit_answers(self) -> None:
        """Each answered request once in the audit trail: how many written, how many passed."""
        for request_id, r in sorted(self.results.items()):
            if r.status != "ok" or request_id in self.answered:
                continue
            self.answered.add(request_id)
            await self._audit(
                r.campaign,
                "generation_answered",
                f"{r.generated} variants written, {r.passed_filters} passed the filters "
                f"in {r.seconds:.0f} s",
                audience=r.audience,
                request_id=request_id,
                generated=r.generated,
                passed_filters=r.passed_filters,
                seconds=r.seconds,
                creative_ids=" ".join(r.creative_ids),
            )

    async def retrain(self) -> int:
        """Train a new CTR model version from the topics (a child process, so the loop
        keeps ticking); the generator reloads it. Returns the exit code."""
        from adloop.streams.broker import _die_with_parent_preexec
        from adloop.streams.supervisor import settings_env

        s = self.settings
        args = [
            sys.executable,
            "-m",
            "adloop",
            "train-ctr",
            "--from-kafka",
            "--no-progress",
            "--max-steps",
            str(s.ctr_retrain_max_steps),
            "--recent",
            str(s.ctr_retrain_recent_impressions),
        ]
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *args,
            env=settings_env(s),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Killed with the loop, even by SIGKILL: no orphan trainer.
            preexec_fn=_die_with_parent_preexec(),
        )
        try:
            output, _ = await proc.communicate()
        except asyncio.CancelledError:  # the loop is stopping
            proc.kill()
            await proc.wait()
            raise
        tail = output.decode(errors="replace").strip().splitlines()[-3:]
        if proc.returncode == 0:
            log.info(
                "CTR model retrained",
                extra={"seconds": round(time.monotonic() - started, 1), "output": " | ".join(tail)},
            )
        else:
            log.error(
                "CTR retraining failed; run `adloop train-ctr --from-kafka` to see why",
                extra={"code": proc.returncode, "output": " | ".join(tail)},
            )
        return proc.returncode or 0

    async def _retrain_on_schedule(self) -> None:
        interval = self.settings.ctr_retrain_interval_s
        while interval > 0:
            await asyncio.sleep(interval)
            await self.retrain()

    async def run(self) -> None:
        await self.start()
        log.info("loop ready", extra={"tick_s": self.settings.loop_tick_s})
        retraining = asyncio.ensure_future(self._retrain_on_schedule())
        try:
            while True:
                await self.tick()
                await asyncio.sleep(self.settings.loop_tick_s)
        finally:
            retraining.cancel()
            await self.stop()


def run_loop(settings: Settings) -> None:
    from adloop.streams.broker import run_until_signal

    metrics.serve_metrics(settings.metrics_host, settings.metrics_port, "loop")
    run_until_signal(LoopController(settings).run, log)
