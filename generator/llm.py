"""Variant generation: prompt → engine → parse → filters → dedupe, streamed.

``VariantGenerator`` turns generation requests into filtered variants with the engine
``LlmConfig.engine`` selects (``generator.engines``: transformers fp32/bf16 or
CTranslate2 int8, all decoding with the rules of ``generator.decoding``).

* **Per-slot retries.** A round samples, per request, about as many answers as its
  missing variants need at the pass rate seen so far (``oversample`` before any is
  seen); each finished answer is screened at once, and once a request has its n
  variants its remaining rows stop. Nothing that passed is ever re-sampled.
* **Streaming.** ``stream()`` yields a request's passing variants as they are ready —
  each batch scored by the CTR model in one call when a scorer is given — so a caller
  can publish the first new creative within seconds, then a final event with the
  request's outcome. ``generate()`` is the same run, answered at the end.
* **Relevance.** Given a loaded ``SentenceEncoder`` (``relevance=``), each request's
  filters end with a ``RelevanceRule`` for its brief (``generator.relevance``): a
  variant must be about the product and key message; rejections count as ``relevance``.
* **Languages.** The bundled SmolLM2 writes English only: a request in another
  language raises ``UnsupportedLanguageError`` (``reason_code`` for a dead letter)
  naming ``ADLOOP_LLM_MODEL``, before any model is loaded. A configured multilingual
  model writes it; the language filter still rejects any variant not in the brief's
  language, so English text never passes for a ``zh`` brief.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from adloop.generator.decoding import (
    AnswerShape,
    claim_sequences,
    copy_sequences,
    echo_ids,
    echo_sequences,
)
from adloop.generator.engines import (
    Engine,
    RowJob,
    RowResult,
    SamplingConfig,
    TransformersEngine,
    load_engine,
)
from adloop.generator.filters import (
    Answer,
    ClaimsRule,
    FilterConfig,
    VariantFilter,
    screen_answers,
)
from adloop.generator.loading import (
    DEFAULT_MODEL_ID,
    LlmConfig,
    LoadedModel,
    ModelLoadError,
    _conversion_key,
    _load_gguf,
    _write_conversion_cache,
    default_gguf_path,
    load_model,
)
from adloop.generator.parsing import Variant
from adloop.generator.prompts import (
    ANSWER_PREFIX,
    PROMPT_VERSION,
    PromptLimits,
    language_name,
    plan_prompt,
)
from adloop.schemas.records import GenerationRequest, Rejection

__all__ = [
    "DEFAULT_MODEL_ID",
    "GenerationOutcome",
    "LlmConfig",
    "LoadedModel",
    "ModelLoadError",
    "SamplingConfig",
    "UnsupportedLanguageError",
    "VariantBatch",
    "VariantGenerator",
    "_conversion_key",
    "_load_gguf",
    "_write_conversion_cache",
    "default_gguf_path",
    "load_model",
]

log = logging.getLogger("adloop.generator")

# The bundled model's languages (SmolLM2 is trained on English text).
DEFAULT_MODEL_LANGUAGES = ("en",)
# Languages not written in Latin script: their answers need byte-level pieces of
# characters, which are banned for Latin-script briefs (generator.decoding).
_NON_LATIN = (
    "ru uk bg sr mk be kk ky mn tg el ar fa ur ps he hi mr ne sa bn ta te th ka hy ja zh ko"
)
NON_LATIN_LANGUAGES = frozenset(_NON_LATIN.split())
# Earlier creatives (newest first) whose headlines decoding bans, with their frames:
# each costs four banned sequences, checked at every step of the headline.
BANNED_EARLIER_CREATIVES = 20
# A weak prior for a request's pass rate in later rounds: worth this many answers.
_PRIOR_ANSWERS = 4.0


def _brief_words(request: GenerationRequest) -> str:
    """The words a banned frame may not be (``decoding.headline_frames``)."""
    return f"{request.brief.product} {request.brief.key_message}"


class UnsupportedLanguageError(ValueError):
    """The configured model does not write the request's language. Not retryable with
    the same settings: a dead letter (``reason_code``), not a failed attempt."""

    reason_code = "unsupported_language"

    def __init__(self, request_ids: Sequence[str], language: str, model: str) -> None:
        self.request_ids = list(request_ids)
        self.language = language
        super().__init__(
            f"request(s) {', '.join(self.request_ids)} ask for {language_name(language)} "
            f"({language}), but the configured LLM {model} writes English only. Set "
            "ADLOOP_LLM_MODEL to a multilingual causal LM (a Hugging Face id or local "
            "directory, e.g. Qwen/Qwen2.5-0.5B-Instruct), or list the languages it "
            "writes in ADLOOP_LLM_LANGUAGES"
        )


@dataclass
class GenerationOutcome:
    """What became of one request: accepted variants (at most n) and every rejection."""

    request_id: str
    variants: list[Variant]
    rejections: list[Rejection]
    # Answers the engine started (rows), and variants parsed from finished ones.
    sequences: int = 0
    parsed: int = 0
    rounds: int = 0
    # Variants that passed everything but were not needed (beyond n_variants).
    surplus: int = 0
    seconds: float = 0.0
    # The call's time limit ended it: a round not started or sampling cut short.
    deadline_reached: bool = False
    filters_passed: list[str] = field(default_factory=list)
    # Answers finished and screened; rows stopped because the request was complete.
    screened: int = 0
    cancelled: int = 0
    # Answers whose variant passed every filter and was new (before the cut to n).
    passed: int = 0
    tokens: int = 0
    # Seconds from the call's start to this request's first passing variant.
    first_variant_s: float | None = None
    engine: str = ""

    @property
    def rejections_by_rule(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejections:
            counts[r.rule] = counts.get(r.rule, 0) + 1
        return counts

    @property
    def pass_rate(self) -> float:
        """Share of finished answers whose variant passed every filter."""
        return self.passed / self.screened if self.screened else 0.0


@dataclass
class VariantBatch:
    """One event of ``VariantGenerator.stream``."""

    request_id: str
    index: int  # the request's position in the call
    # Newly passing variants, in order, and their CTR scores (when a scorer was given).
    variants: list[Variant]
    scores: list[Any]
    # Position of variants[0] among the request's passing variants (0-based): stable
    # creative ids are f"{request_id}-v{first + i + 1}".
    first: int
    seconds: float  # since the call started
    done: bool = False  # the request is finished; ``outcome`` (or ``error``) is set
    outcome: GenerationOutcome | None = None
    error: Exception | None = None


@dataclass
class _RequestRun:
    index: int
    request: GenerationRequest
    variant_filter: VariantFilter
    outcome: GenerationOutcome
    job: RowJob
    accepted: list[Variant] = field(default_factory=list)
    # The job's banned sequences before the request's own headlines were added.
    base_bad: list[list[int]] | None = None


class _Sink:
    """Screens each finished answer the moment an engine reports it."""

    def __init__(
        self,
        runs: list[_RequestRun],
        threshold: float,
        started: float,
        deadline: float | None,
        stop: Callable[[], bool],
        on_accept: Callable[[int, list[Variant], int], None] | None,
    ) -> None:
        self.runs = {id(run.job): run for run in runs}
        self.threshold = threshold
        self.started = started
        self.deadline = deadline
        self.deadline_hit = False
        self.stop = stop
        self.on_accept = on_accept

    def row_done(self, job: RowJob, result: RowResult) -> None:
        run = self.runs[id(job)]
        outcome, request = run.outcome, run.request
        screened = screen_answers(
            request,
            [Answer(result.text, result.complete)],
            run.variant_filter,
            run.accepted,
            self.threshold,
        )
        outcome.screened += 1
        outcome.tokens += result.tokens
        outcome.parsed += screened.parsed
        outcome.rejections.extend(screened.rejections)
        if not screened.accepted:
            return
        outcome.passed += len(screened.accepted)
        wanted = request.n_variants - len(run.accepted)
        run.accepted.extend(screened.accepted)
        fresh = screened.accepted[: max(0, wanted)]
        if fresh and outcome.first_variant_s is None:
            outcome.first_variant_s = time.perf_counter() - self.started
        if fresh and self.on_accept is not None:
            self.on_accept(run.index, fresh, request.n_variants - wanted)

    def job_open(self, job: RowJob) -> bool:
        run = self.runs[id(job)]
        return len(run.accepted) < run.request.n_variants

    def interrupted(self) -> bool:
        if self.stop():
            return True
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.deadline_hit = True  # reported as GenerationOutcome.deadline_reached
            return True
        return False


class VariantGenerator:
    """Batched, streamed generation for many requests at once: prompt → sample →
    parse → filter → dedupe, in rounds until each request has its n variants."""

    prompt_version = PROMPT_VERSION

    def __init__(
        self,
        llm: LlmConfig | None = None,
        sampling: SamplingConfig | None = None,
        filters: FilterConfig | None = None,
        loaded: LoadedModel | Engine | None = None,
        relevance: Any = None,
        relevance_threshold: float | None = None,
    ) -> None:
        """``relevance``: a loaded ``SentenceEncoder`` (``generator.relevance``); each
        request's filters then end with a ``RelevanceRule`` for its brief, so every
        variant is about the product and key message. None: that rule is off."""
        self.llm_config = llm or LlmConfig()
        self.relevance = relevance
        self.relevance_threshold = relevance_threshold
        self.sampling = sampling or SamplingConfig()
        self.filter_config = filters or FilterConfig()
        if isinstance(loaded, LoadedModel):  # a model loaded by the caller: transformers
            name = "transformers-bf16" if loaded.dtype == "bfloat16" else "transformers-fp32"
            loaded = TransformersEngine(loaded, name, self.llm_config.cpu_threads)
        self._engine: Engine | None = loaded
        # Set from another thread to end a generate() call at its next token (shutdown).
        self.cancelled = threading.Event()
        self.limits = PromptLimits(
            max_headline_chars=self.filter_config.max_headline_chars,
            max_description_chars=self.filter_config.max_description_chars,
        )

    # -- the model ---------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self.llm_config)
        return self._engine

    @property
    def loaded(self) -> Engine:
        """The engine, loaded on first use (callers touch it to load early)."""
        return self.engine

    @property
    def model_version(self) -> str:
        return self.engine.version

    @property
    def languages(self) -> tuple[str, ...] | None:
        """Languages the configured model writes; None: any."""
        if self.llm_config.languages is not None:
            return self.llm_config.languages
        if self.llm_config.model_id == DEFAULT_MODEL_ID and self.llm_config.gguf_file is None:
            return DEFAULT_MODEL_LANGUAGES
        return None

    def refusal(self, request: GenerationRequest) -> UnsupportedLanguageError | None:
        """Why this model cannot answer ``request`` (None: it can). No model load."""
        languages = self.languages
        if languages is None or request.brief.language in languages:
            return None
        return UnsupportedLanguageError(
            [request.request_id], request.brief.language, self.llm_config.model_id
        )

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ``UnsupportedLanguageError`` for a request this model must refuse."""
        if (error := self.refusal(request)) is not None:
            raise error

    def prompt_text(self, request: GenerationRequest) -> str:
        plan = plan_prompt(request, self.limits)
        chat = self.engine.tokenizer.apply_chat_template(
            plan.messages, tokenize=False, add_generation_prompt=True
        )
        return chat + ANSWER_PREFIX

    # -- the two ways to call it --------------------------------------------------------
    def generate(
        self, requests: Sequence[GenerationRequest], time_limit_s: float | None = None
    ) -> list[GenerationOutcome]:
        """One outcome per request, in order. Requests are batched together.

        With ``time_limit_s``, no new round starts and sampling stops once it has
        passed: the variants that passed the filters by then are the answer. Raises
        ``UnsupportedLanguageError`` (before loading anything) when a request asks
        for a language the model does not write.
        """
        refused = [r for r in requests if self.refusal(r) is not None]
        if refused:
            raise UnsupportedLanguageError(
                [r.request_id for r in refused],
                refused[0].brief.language,
                self.llm_config.model_id,
            )
        return self._run(list(requests), time_limit_s, None, lambda: False)

    def stream(
        self,
        requests: Sequence[GenerationRequest],
        *,
        time_limit_s: float | None = None,
        scorer: Any = None,
        placement: str = "any",
    ) -> Iterator[VariantBatch]:
        """Passing variants as they are ready, then one ``done`` event per request.

        Sampling runs on a background thread; each event carries the variants that
        passed since the last one (for one request), scored together by ``scorer``
        (a ``CtrScorer``) when given. A refused request (``refusal``) gets a ``done``
        event with ``error`` at once; the others are generated. Closing the iterator
        early stops sampling at the next token.
        """
        started = time.perf_counter()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        closed = threading.Event()
        accepted_ids = [i for i, r in enumerate(requests) if self.refusal(r) is None]
        for i, request in enumerate(requests):
            if (error := self.refusal(request)) is not None:
                yield VariantBatch(
                    request.request_id,
                    i,
                    [],
                    [],
                    0,
                    time.perf_counter() - started,
                    True,
                    None,
                    error,
                )

        def on_accept(index: int, variants: list[Variant], first: int) -> None:
            events.put(("variants", (accepted_ids[index], variants, first)))

        def work() -> None:
            try:
                subset = [requests[i] for i in accepted_ids]
                outcomes = self._run(subset, time_limit_s, on_accept, closed.is_set)
                events.put(("done", outcomes))
            except BaseException as exc:  # handed to the consumer, raised there
                events.put(("error", exc))

        if not accepted_ids:
            return
        thread = threading.Thread(target=work, name="adloop-generate", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = events.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    for index, outcome in zip(accepted_ids, payload, strict=True):
                        yield VariantBatch(
                            outcome.request_id,
                            index,
                            [],
                            [],
                            len(outcome.variants),
                            time.perf_counter() - started,
                            True,
                            outcome,
                        )
                    return
                # Everything else already waiting joins this batch: one CTR call.
                ready = [payload]
                while True:
                    try:
                        more_kind, more = events.get_nowait()
                    except queue.Empty:
                        break
                    if more_kind != "variants":
                        events.put((more_kind, more))  # handled on the next turn
                        break
                    ready.append(more)
                yield from self._scored(requests, ready, scorer, placement, started)
        finally:
            closed.set()
            thread.join(timeout=60)

    def _scored(
        self,
        requests: Sequence[GenerationRequest],
        ready: list[tuple[int, list[Variant], int]],
        scorer: Any,
        placement: str,
        started: float,
    ) -> Iterator[VariantBatch]:
        merged: dict[int, tuple[list[Variant], int]] = {}
        for index, variants, first in ready:
            if index in merged:
                merged[index][0].extend(variants)
            else:
                merged[index] = (list(variants), first)
        scores: list[Any] = []
        if scorer is not None:
            from adloop.generator.ctr import CtrInput

            items = [
                CtrInput(requests[i].audience, placement, v.headline, v.description)
                for i, (variants, _) in merged.items()
                for v in variants
            ]
            scores = scorer.score(items)
        offset = 0
        for index, (variants, first) in merged.items():
            batch_scores = scores[offset : offset + len(variants)] if scores else []
            offset += len(variants)
            yield VariantBatch(
                requests[index].request_id,
                index,
                variants,
                batch_scores,
                first,
                time.perf_counter() - started,
            )

    # -- one run ----------------------------------------------------------------------
    def _run(
        self,
        requests: list[GenerationRequest],
        time_limit_s: float | None,
        on_accept: Callable[[int, list[Variant], int], None] | None,
        closed: Callable[[], bool],
    ) -> list[GenerationOutcome]:
        started = time.perf_counter()
        deadline = None if time_limit_s is None else started + time_limit_s
        engine = self.engine
        runs = [self._prepare(i, request, engine) for i, request in enumerate(requests)]
        by_job = {id(run.job): run for run in runs}
        sink = _Sink(
            runs,
            self.sampling.similarity_threshold,
            started,
            deadline,
            lambda: self.cancelled.is_set() or closed(),
            on_accept,
        )
        for round_index in range(self.sampling.max_rounds):
            if sink.interrupted():
                break
            jobs = []
            for run in runs:
                missing = run.request.n_variants - len(run.accepted)
                if missing <= 0:
                    continue
                run.job.rows = self._rows_for(run.outcome, missing, round_index)
                run.outcome.sequences += run.job.rows
                run.outcome.rounds = round_index + 1
                jobs.append(run.job)
            if not jobs:
                break
            seed = self.sampling.seed
            round_seed = None if seed is None else seed + 1000 * round_index
            first = self.sampling.first_batch
            if round_index == 0 and first and any(job.rows > first for job in jobs):
                # A small first call, so the first passing variants stream out after a
                # few decode steps of a few rows, not after the whole round (a step's
                # cost grows with its rows on CPU). The rest of the round is then sized
                # on the pass rate those rows showed, not on the prior.
                planned = {id(job): job.rows for job in jobs}
                for job in jobs:
                    job.rows = min(job.rows, first)
                engine.sample(jobs, self.sampling, round_seed, sink)
                rest = []
                for job in jobs:
                    run = by_job[id(job)]
                    run.outcome.sequences -= planned[id(job)] - job.rows
                    missing = run.request.n_variants - len(run.accepted)
                    if missing > 0 and not sink.interrupted():
                        job.rows = self._rows_for(run.outcome, missing, 1)
                        run.outcome.sequences += job.rows
                        rest.append(job)
                jobs = rest
                round_seed = None if round_seed is None else round_seed + 500
            if jobs and not sink.interrupted():
                self._ban_accepted(jobs, by_job, engine)
                engine.sample(jobs, self.sampling, round_seed, sink)
        elapsed = time.perf_counter() - started
        outcomes = []
        for run in runs:
            outcome = run.outcome
            outcome.cancelled = outcome.sequences - outcome.screened
            outcome.deadline_reached = sink.deadline_hit
            outcome.surplus = max(0, len(run.accepted) - run.request.n_variants)
            outcome.variants = run.accepted[: run.request.n_variants]
            outcome.seconds = elapsed
            outcomes.append(outcome)
            log.info(
                "variants generated",
                extra={
                    "request_id": run.request.request_id,
                    "engine": engine.name,
                    "accepted": len(outcome.variants),
                    "wanted": run.request.n_variants,
                    "answers": outcome.screened,
                    "cancelled": outcome.cancelled,
                    "parsed": outcome.parsed,
                    "rounds": outcome.rounds,
                    "deadline_reached": outcome.deadline_reached,
                    "rejected": outcome.rejections_by_rule,
                    "first_variant_s": (
                        None
                        if outcome.first_variant_s is None
                        else round(outcome.first_variant_s, 2)
                    ),
                    "seconds": round(elapsed, 2),
                },
            )
        return outcomes

    def _prepare(self, index: int, request: GenerationRequest, engine: Engine) -> _RequestRun:
        plan = plan_prompt(request, self.limits)
        shape = AnswerShape(
            max_headline_chars=self.limits.max_headline_chars,
            max_description_chars=self.limits.max_description_chars,
            min_headline_chars=self.filter_config.min_headline_chars,
            with_description=plan.with_description,
        )
        claims = ClaimsRule.for_brief(request.brief)
        allowed = claims.allowed
        tokenizer = engine.tokenizer
        latin = request.brief.language not in NON_LATIN_LANGUAGES
        # Copies of the examples, the winners, the underperformer and the key's newest
        # earlier creatives, and those headlines with one end word changed, would be
        # rejected as duplicates: never let the model write them.
        known = [*plan.example_headlines, *(w.headline for w in request.winners)]
        if request.underperformer is not None:
            known.append(request.underperformer.headline)
        known += [c.headline for c in request.earlier_creatives[:BANNED_EARLIER_CREATIVES]]
        brief = _brief_words(request)
        job = RowJob(
            key=index,
            prompt_ids=engine.chat_prompt(plan.messages, ANSWER_PREFIX),
            rows=0,
            shape=shape,
            allowed_figures=allowed,
            banned_ids=sorted(
                {
                    *engine.rules.banned_for(allowed, plan.with_description, latin),
                    *echo_ids(tokenizer),
                }
            ),
            bad_sequences=[
                *copy_sequences(tokenizer, known, brief),
                *echo_sequences(tokenizer),
            ],
            banned_phrases=claim_sequences(tokenizer, claims.banned_phrases()),
        )
        variant_filter = VariantFilter(
            request.brief, self.filter_config, relevance=self._relevance_rule(request)
        )
        outcome = GenerationOutcome(
            request.request_id, [], [], filters_passed=variant_filter.rule_names, engine=engine.name
        )
        return _RequestRun(index, request, variant_filter, outcome, job)

    @staticmethod
    def _ban_accepted(jobs: list[RowJob], by_job: dict[int, _RequestRun], engine: Engine) -> None:
        """Before a later engine call: the request's own passing headlines join the
        banned copies, so the model does not spend rows on repeats of them."""
        for job in jobs:
            run = by_job[id(job)]
            if not run.accepted:
                continue
            if run.base_bad is None:
                run.base_bad = list(job.bad_sequences)
            headlines = [v.headline for v in run.accepted]
            own = copy_sequences(engine.tokenizer, headlines, _brief_words(run.request))
            job.bad_sequences = [*run.base_bad, *own]

    def _relevance_rule(self, request: GenerationRequest) -> Any:
        if self.relevance is None:
            return None
        from adloop.generator.relevance import DEFAULT_RELEVANCE_THRESHOLD, RelevanceRule

        threshold = self.relevance_threshold
        return RelevanceRule(
            self.relevance,
            request.brief,
            DEFAULT_RELEVANCE_THRESHOLD if threshold is None else threshold,
        )

    def _rows_for(self, outcome: GenerationOutcome, missing: int, round_index: int) -> int:
        """Answers to sample for ``missing`` variants: ``oversample`` per variant in the
        first round, then as many as the request's pass rate so far needs."""
        if round_index == 0 or outcome.screened == 0:
            return max(1, math.ceil(missing * self.sampling.oversample))
        prior = 1.0 / self.sampling.oversample
        rate = (outcome.passed + _PRIOR_ANSWERS * prior) / (outcome.screened + _PRIOR_ANSWERS)
        cap = max(missing, self.sampling.max_batch_sequences or self.engine.default_batch)
        return max(1, min(cap, math.ceil(missing / max(rate, 0.1))))
