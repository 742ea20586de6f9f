"""Engines that sample answers from the LLM: transformers (fp32 or bf16) and CTranslate2
(int8), behind one interface, with the same decoding rules (``generator.decoding``).

``Engine.sample(jobs, sampling, seed, sink)`` runs rows of prompts and reports each row
to ``sink.row_done`` the moment it is finished (streaming), stops a prompt's other rows
once ``sink.job_open`` says its request has enough, and everything at
``sink.interrupted`` (shutdown, a deadline).

* **transformers** applies the rules inside ``generate``: a logits processor bans
  tokens (markup, unstated figures, per row the digits that cannot continue a stated
  figure) and adds the bonus for ending a field; a stopping criterion finishes rows.
  Each distinct prompt is prefilled once and its KV cache copied to its rows. bf16 on
  CPU runs on AMX (this project's Xeon): 118 vs 66 tokens/s for fp32 (issue figures).
* **CTranslate2** (int8, 191 tokens/s in the issue's measurement) has no logits hook in
  Python. Banned tokens go in ``suppress_sequences``; a per-token callback stops rows
  that are complete or doomed; the ending bonus is applied afterwards from the step
  logits it returns, which samples exactly the same distribution (``_cut_point``).
  Descriptions run as a second call that continues each surviving headline, so a row
  whose headline failed never pays for a description. The prompt is a
  ``static_prompt``: computed once per call instead of once per row (16 rows of a
  380-token prompt: 22.5 s plain, 8.8 s static, measured on two loaded cores).

``resolve_engine`` says which engine ``auto`` means here and why; ``load_engine``
builds it (once per process and config), converting the model for CTranslate2 on
first use into ``<models_dir>/llm/ctranslate2/`` with a progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adloop.generator.decoding import (
    DESCRIPTION_LABEL,
    SEPARATOR,
    AnswerShape,
    RowView,
    TokenRules,
    extra_end_probability,
    inspect,
)
from adloop.generator.loading import (
    DEFAULT_GGUF_DISTRIBUTION,
    DEFAULT_GGUF_FILE,
    DEFAULT_MODEL_ID,
    LlmConfig,
    LoadedModel,
    ModelLoadError,
    _conversion_key,
    _load_gguf,
    _pick_device,
    _stop_token_ids,
    _write_conversion_cache,
    default_gguf_path,
    load_model,
)
from adloop.generator.parsing import DEFAULT_SIMILARITY_THRESHOLD

log = logging.getLogger("adloop.generator")

# What ``auto`` picks, per device type, and why (see resolve_engine).
AUTO_ENGINE = {"cpu": "ctranslate2-int8", "cuda": "transformers-bf16"}
CT2_COMPUTE_TYPE = {"cpu": "int8", "cuda": "int8_float16"}


@dataclass(frozen=True)
class SamplingConfig:
    # Measured on five briefs with the decoding rules: 0.8 / 0.9 kept 69 % of answers
    # passing with distinct headlines; 0.9 / 0.95 wrote more junk, 0.5-0.7 more copies.
    # With the relevance rule (CTranslate2, 5 briefs x 4 seeds, 300+ answers each):
    # top_p 0.9 passed 51 %, 0.75 57 %; 0.6 at temperature 1.0 46 %. The tail that
    # top_p 0.75 cuts is where the off-topic headlines come from.
    temperature: float = 0.8
    top_p: float = 0.75
    # Cap on new tokens per answer; the answer's shape sets its own budget
    # (Engine.token_budget) and the character limits stop rows long before either.
    max_new_tokens: int = 128
    # Seeds the engine before each call: same requests + seed = same answers (on one
    # device, engine and build). None: not seeded.
    seed: int | None = None
    # First round: answers sampled per variant still missing (≈ 1 / the expected pass
    # rate). Later rounds size themselves on the pass rate seen so far.
    oversample: float = 1.6
    # Most rows in one engine call; None: 16 on CPU (beyond that a decode step grows
    # linearly on one core), 256 on GPU.
    max_batch_sequences: int | None = None
    # Rounds per request: rows for the variants still missing, until none are.
    max_rounds: int = 4
    # Rows per request in the first call of the first round (0: no separate call), so
    # the first passing variants stream out early.
    first_batch: int = 4
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD
    # transformers: prefill each distinct prompt once and share its KV cache.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.max_rounds < 1 or self.oversample <= 0:
            raise ValueError("max_new_tokens and max_rounds must be >= 1, oversample > 0")


@dataclass
class RowJob:
    """``rows`` answers to one prompt, under one request's rules."""

    key: int  # the caller's request index
    prompt_ids: list[int]
    rows: int
    shape: AnswerShape
    allowed_figures: frozenset[str] = frozenset()
    banned_ids: list[int] = field(default_factory=list)
    # Banned in the headline only (copies of known headlines) ...
    bad_sequences: list[list[int]] = field(default_factory=list)
    # ... and in every field (claims the brief does not make).
    banned_phrases: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class RowResult:
    """One finished answer: the text after the prompt's ``Headline:``, one line."""

    text: str
    # Ended by the model, the stop rules or a doom verdict (not cut by the token budget).
    complete: bool
    doomed: str | None
    tokens: int


class RowSink(Protocol):
    def row_done(self, job: RowJob, result: RowResult) -> None: ...

    def job_open(self, job: RowJob) -> bool:
        """False once the job's request has all its variants: its rows stop."""
        ...

    def interrupted(self) -> bool:
        """True when every row should stop now (shutdown, the call's deadline)."""
        ...


@dataclass
class SampleStats:
    tokens: int = 0
    rows: int = 0
    seconds: float = 0.0


class Engine:
    """One loaded model, ready to sample; subclasses implement ``sample``."""

    name: str
    device: str
    version: str
    tokenizer: Any
    stop_ids: list[int]
    source: str
    load_seconds: float
    cpu_threads: int | None

    @functools.cached_property
    def rules(self) -> TokenRules:
        # About a second for SmolLM2's 49k tokens; once per engine.
        return TokenRules.build(self.tokenizer, self.stop_ids)

    @property
    def default_batch(self) -> int:
        return 16 if self.device.startswith("cpu") else 256

    @staticmethod
    def token_budget(shape: AnswerShape, cap: int) -> int:
        """New tokens an answer may take: one per character of each field's limit, plus
        the separator and label; never above ``cap``. Latin text (4+ characters a token
        in SmolLM2) is stopped by its character limit long before; the budget matters
        for scripts a byte-level tokenizer spells in one or two tokens a character."""
        budget = shape.max_headline_chars + 2
        if shape.with_description:
            budget += shape.max_description_chars + 4
        return max(1, min(cap, budget))

    def sample(
        self, jobs: Sequence[RowJob], sampling: SamplingConfig, seed: int | None, sink: RowSink
    ) -> SampleStats:
        raise NotImplementedError

    def throughput(self, prompt_ids: list[int], rows: int, new_tokens: int, seed: int) -> float:
        """Seconds to sample exactly ``new_tokens`` for ``rows`` answers to one prompt,
        without the decoding rules (the raw speed ``adloop bench generator`` reports)."""
        raise NotImplementedError

    def chat_prompt(self, messages: list[dict[str, str]], answer_prefix: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def cpu_threads(threads: int | None, device: str) -> Iterator[None]:
    if threads is None or not device.startswith("cpu"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _answer_line(text: str) -> str:
    return text.partition("\n")[0]


# --- transformers -------------------------------------------------------------------------


class TransformersEngine(Engine):
    def __init__(self, loaded: LoadedModel, name: str, cpu_threads: int | None) -> None:
        self.loaded = loaded
        self.name = name
        self.device = loaded.device
        self.version = loaded.version
        self.tokenizer = loaded.tokenizer
        self.stop_ids = loaded.stop_token_ids
        self.source = loaded.source
        self.load_seconds = loaded.load_seconds
        self.cpu_threads = cpu_threads
        self.dtype = loaded.dtype

    def sample(
        self, jobs: Sequence[RowJob], sampling: SamplingConfig, seed: int | None, sink: RowSink
    ) -> SampleStats:
        rows = [job for job in jobs for _ in range(job.rows)]
        size = sampling.max_batch_sequences or self.default_batch
        stats = SampleStats()
        started = time.perf_counter()
        for batch_index, start in enumerate(range(0, len(rows), size)):
            if sink.interrupted():
                break
            batch_seed = None if seed is None else seed + batch_index
            stats.tokens += self._batch(rows[start : start + size], sampling, batch_seed, sink)
            stats.rows += len(rows[start : start + size])
        stats.seconds = time.perf_counter() - started
        return stats

    def throughput(self, prompt_ids: list[int], rows: int, new_tokens: int, seed: int) -> float:
        device = self.device
        ids = torch.tensor([prompt_ids], device=device)
        mask = torch.ones_like(ids)
        index = torch.zeros(rows, dtype=torch.long, device=device)
        torch.manual_seed(seed)
        started = time.perf_counter()
        with cpu_threads(self.cpu_threads, device), torch.inference_mode():
            cache = self._prefill(ids, mask, index)
            self.loaded.model.generate(
                input_ids=ids[index],
                attention_mask=mask[index],
                past_key_values=cache,
                do_sample=True,
                top_k=0,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def _batch(
        self, rows: list[RowJob], sampling: SamplingConfig, seed: int | None, sink: RowSink
    ) -> int:
        model, tokenizer, device = self.loaded.model, self.tokenizer, self.device
        distinct = list({id(job): job for job in rows}.values())
        position = {id(job): i for i, job in enumerate(distinct)}
        pad = tokenizer.pad_token_id
        width = max(len(job.prompt_ids) for job in distinct)
        ids = torch.full((len(distinct), width), pad, dtype=torch.long)
        mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for i, job in enumerate(distinct):  # left padding: new tokens follow every prompt
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        row_index = torch.tensor([position[id(job)] for job in rows], device=device)
        input_ids, attention_mask = ids[row_index], mask[row_index]
        budget = max(self.token_budget(job.shape, sampling.max_new_tokens) for job in rows)
        policy = _RowPolicy(self, rows, width, sink)
        # One list for the whole batch (generate() takes no per-row list): a request's
        # bans then hold for the other requests generated with it, which costs them
        # little (they are other products' headlines and claims).
        bad = [seq for job in distinct for seq in (*job.bad_sequences, *job.banned_phrases)]
        if seed is not None:
            torch.manual_seed(seed)
        kwargs: dict[str, Any] = {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
            "max_new_tokens": budget,
            "eos_token_id": self.stop_ids,
            "pad_token_id": pad,
            "logits_processor": [policy.processor],
            "stopping_criteria": [policy.criterion],
        }
        if bad:
            kwargs["bad_words_ids"] = bad
        with cpu_threads(self.cpu_threads, device), torch.inference_mode():
            if sampling.prefix_cache and len(distinct) < len(rows):
                kwargs["past_key_values"] = self._prefill(ids, mask, row_index)
            model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        policy.finish()
        return policy.tokens

    def _prefill(self, input_ids: Any, attention_mask: Any, row_index: Any) -> Any:
        """KV cache of every distinct prompt but its last token, one copy per row."""
        from transformers import DynamicCache

        model = self.loaded.model
        cache = DynamicCache(config=model.config)
        # Positions as generate() computes them for left-padded rows.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, :-1],
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_select_indices(row_index)
        return cache


class _RowPolicy:
    """The decoding rules inside ``generate``: one object as logits processor and
    stopping criterion, sharing each row's parsed state."""

    def __init__(self, engine: Engine, rows: list[RowJob], prompt_length: int, sink: RowSink):
        self.engine = engine
        self.rules = engine.rules
        self.rows = rows
        self.prompt_length = prompt_length
        self.sink = sink
        self.views: list[RowView] = [inspect("", job.shape) for job in rows]
        self.texts = [""] * len(rows)
        self.done = [False] * len(rows)
        self.reported = [False] * len(rows)
        self.row_tokens = [0] * len(rows)
        self.tokens = 0
        self.stop_ids = set(engine.stop_ids)
        self._masks: dict[int, torch.Tensor] = {}
        # Per job, the digit tokens not banned outright: the only ones the per-row
        # figure check must consider (a handful for SmolLM2, which splits digits).
        self._digits: dict[int, list[int]] = {}
        for job in rows:
            if id(job) not in self._digits:
                banned = set(job.banned_ids)
                self._digits[id(job)] = [i for i in self.rules.digit_runs if i not in banned]
        self.processor = _Processor(self)
        self.criterion = _Criterion(self)

    def _mask(self, job: RowJob, vocab: int, device: Any) -> torch.Tensor:
        mask = self._masks.get(id(job))
        if mask is None:
            mask = torch.zeros(vocab, dtype=torch.bool)
            banned = [i for i in job.banned_ids if i < vocab]
            mask[banned] = True
            mask[len(self.rules.texts) :] = True  # embedding rows without a token
            mask = mask.to(device)
            self._masks[id(job)] = mask
        return mask

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        for r, job in enumerate(self.rows):
            if self.done[r]:
                continue
            row = scores[r]
            row.masked_fill_(self._mask(job, vocab, scores.device), -math.inf)
            digits = self._digits[id(job)]
            allowed = self.rules.digit_ids_allowed_after(self.texts[r], job.allowed_figures, digits)
            if allowed and _unfinished_figure(self.texts[r], job.allowed_figures):
                # "3" of a stated "30": only its next digit may follow, or the claims
                # rule rejects the "3" ("From 3 to").
                keep = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
                keep[sorted(allowed)] = True
                row.masked_fill_(~keep, -math.inf)
                continue
            blocked = [i for i in digits if i not in allowed and i < vocab]
            if blocked:
                row[blocked] = -math.inf
            view = self.views[r]
            if not view.in_description and len(view.headline) < job.shape.min_headline_chars:
                # No headline yet: ending now only writes an empty or two-letter ad.
                row[self.rules.separator_ids] = -math.inf
                row[self.rules.end_ids] = -math.inf
            elif view.end_bias > 0:
                row[self.rules.field_end_ids(view, job.shape)] += view.end_bias
        return scores

    def check(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :]
        stopped = self.sink.interrupted()
        tokenizer = self.engine.tokenizer
        for r, job in enumerate(self.rows):
            if self.done[r]:
                continue
            self.tokens += 1
            self.row_tokens[r] += 1
            if stopped or not self.sink.job_open(job):
                self.done[r] = True  # cancelled: not reported, not counted as sampled
                self.reported[r] = True
                continue
            last = int(new[r, -1])
            text = tokenizer.decode(
                new[r], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            self.texts[r] = text
            view = inspect(text, job.shape, job.allowed_figures)
            self.views[r] = view
            if last in self.stop_ids or view.finished:
                self.done[r] = True
                self._report(r, complete=True)
        return torch.tensor(self.done, device=input_ids.device)

    def _report(self, r: int, complete: bool) -> None:
        self.reported[r] = True
        view = self.views[r]
        result = RowResult(_answer_line(self.texts[r]), complete, view.doomed, self.row_tokens[r])
        self.sink.row_done(self.rows[r], result)

    def finish(self) -> None:
        """Rows that ran out of tokens: reported as cut (the parser drops a cut line)."""
        for r in range(len(self.rows)):
            if not self.reported[r] and not self.sink.interrupted():
                self._report(r, complete=False)


def _unfinished_figure(text: str, figures: frozenset[str]) -> bool:
    """The text ends in digits that begin a stated figure without being one."""
    match = re.search(r"(\d+(?:[.,]\d+)*[.,]?)$", text)
    if not match:
        return False
    run = match.group(1).replace(",", ".")
    return run not in figures and any(f.startswith(run) for f in figures)


class _Processor:
    def __init__(self, policy: _RowPolicy) -> None:
        self.policy = policy

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.policy.process(scores)


class _Criterion:
    def __init__(self, policy: _RowPolicy) -> None:
        self.policy = policy

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.policy.check(input_ids)


# --- CTranslate2 ----------------------------------------------------------------------------


class CTranslate2Engine(Engine):
    def __init__(
        self,
        generator: Any,
        tokenizer: Any,
        stop_ids: list[int],
        version: str,
        device: str,
        source: str,
        load_seconds: float,
        cpu_threads: int | None,
    ) -> None:
        self.generator = generator
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.version = version
        self.device = device
        self.source = source
        self.load_seconds = load_seconds
        self.cpu_threads = cpu_threads
        self.name = "ctranslate2-int8"
        self._label_ids = list(
            tokenizer(f" {DESCRIPTION_LABEL}", add_special_tokens=False)["input_ids"]
        )
        self._separator_ids = list(
            tokenizer(f" {SEPARATOR}", add_special_tokens=False)["input_ids"]
        )

    def throughput(self, prompt_ids: list[int], rows: int, new_tokens: int, seed: int) -> float:
        import ctranslate2

        prompt = self.tokenizer.convert_ids_to_tokens(prompt_ids)
        ctranslate2.set_random_seed(seed)
        started = time.perf_counter()
        with _ct2_lock:
            self.generator.generate_batch(
                [prompt[-1:]] * rows,
                static_prompt=prompt[:-1],
                cache_static_prompt=False,
                max_length=new_tokens,
                min_length=new_tokens,
                sampling_topk=0,
                include_prompt_in_result=False,
                end_token=[],
            )
        return time.perf_counter() - started

    def sample(
        self, jobs: Sequence[RowJob], sampling: SamplingConfig, seed: int | None, sink: RowSink
    ) -> SampleStats:
        import ctranslate2

        stats = SampleStats()
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        size = sampling.max_batch_sequences or self.default_batch
        for call_index, job in enumerate(jobs):
            remaining = job.rows
            while remaining > 0 and not sink.interrupted() and sink.job_open(job):
                rows = min(size, remaining)
                remaining -= rows
                if seed is not None:
                    ctranslate2.set_random_seed(seed + 7919 * call_index + remaining)
                stats.tokens += self._job(job, rows, sampling, rng, sink)
                stats.rows += rows
        stats.seconds = time.perf_counter() - started
        return stats

    def _job(
        self,
        job: RowJob,
        rows: int,
        sampling: SamplingConfig,
        rng: np.random.Generator,
        sink: RowSink,
    ) -> int:
        """Headlines for ``rows`` answers, then descriptions for the surviving ones."""
        shape = job.shape
        headline_shape = AnswerShape(**{**_shape_fields(shape), "with_description": False})
        budget = self.token_budget(headline_shape, sampling.max_new_tokens)
        heads = self._decode(
            job, [[] for _ in range(rows)], "headline", budget, sampling, rng, sink
        )
        tokens = sum(len(h.ids) for h in heads)
        follow_ups: list[_Decoded] = []
        for head in heads:
            if head.cancelled:
                continue
            if head.view.doomed:  # screened as written: the filters name the failure
                self._report(job, head.text, True, head.view.doomed, len(head.ids), sink)
            elif not head.complete or not shape.with_description:
                self._report(job, head.text, head.complete, None, len(head.ids), sink)
            elif head.ended_answer:  # a newline or end of turn: a headline-only answer
                self._report(job, head.text, True, None, len(head.ids), sink)
            else:
                follow_ups.append(head)
        if follow_ups and not sink.interrupted() and sink.job_open(job):
            starts = [h.ids + self._separator_ids + self._label_ids for h in follow_ups]
            desc_budget = max(1, min(sampling.max_new_tokens, shape.max_description_chars + 4))
            tails = self._decode(job, starts, "description", desc_budget, sampling, rng, sink)
            for head, tail in zip(follow_ups, tails, strict=True):
                tokens += len(tail.ids)
                if tail.cancelled:
                    continue
                text = f"{head.text.rstrip()} {SEPARATOR} {DESCRIPTION_LABEL} {tail.text.strip()}"
                view = inspect(text, shape, job.allowed_figures)
                complete = tail.complete or view.doomed is not None
                self._report(job, text, complete, view.doomed, len(head.ids) + len(tail.ids), sink)
        return tokens

    @staticmethod
    def _report(
        job: RowJob, text: str, complete: bool, doomed: str | None, tokens: int, sink: RowSink
    ) -> None:
        sink.row_done(job, RowResult(_answer_line(text), complete, doomed, tokens))

    def _decode(
        self,
        job: RowJob,
        starts: list[list[int]],
        phase: str,
        budget: int,
        sampling: SamplingConfig,
        rng: np.random.Generator,
        sink: RowSink,
    ) -> list[_Decoded]:
        """One generate_batch call: each row continues the prompt + its start ids."""
        tokenizer = self.tokenizer
        prompt = tokenizer.convert_ids_to_tokens(job.prompt_ids)
        field_shape = AnswerShape(
            **{
                **_shape_fields(job.shape),
                "with_description": False,
                # The description is judged alone in its phase: its limit is the field's.
                "max_headline_chars": job.shape.max_headline_chars
                if phase == "headline"
                else job.shape.max_description_chars,
                "min_headline_chars": job.shape.min_headline_chars if phase == "headline" else 3,
            }
        )
        decoded = [_Decoded() for _ in starts]
        end_ids = set(self.stop_ids) | set(self.rules.end_ids)
        headline_ends = end_ids | set(self.rules.separator_ids)

        def on_token(step: Any) -> bool:
            row = decoded[step.batch_id]
            if row.finished:
                return True
            if sink.interrupted() or not sink.job_open(job):
                row.cancelled = row.finished = True
                return True
            token_id = int(step.token_id)
            ends = headline_ends if phase == "headline" else end_ids
            if token_id in ends:
                row.complete = row.finished = True
                row.ended_answer = token_id in end_ids
                return True
            row.ids.append(token_id)
            row.text = tokenizer.decode(
                row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            view = inspect(row.text, field_shape, job.allowed_figures)
            row.view = view
            if view.doomed:
                row.finished = True
                return True
            return False

        banned = list(job.banned_ids)
        if phase == "description":  # a second "|" would fail the format rule
            banned += self.rules.separator_ids
        suppress = [[t] for t in tokenizer.convert_ids_to_tokens(banned)]
        if phase == "headline" and job.bad_sequences:
            suppress += [tokenizer.convert_ids_to_tokens(seq) for seq in job.bad_sequences]
        suppress += [tokenizer.convert_ids_to_tokens(seq) for seq in job.banned_phrases]
        with _ct2_lock:
            results = self.generator.generate_batch(
                [prompt[-1:] + tokenizer.convert_ids_to_tokens(s) for s in starts],
                static_prompt=prompt[:-1],
                cache_static_prompt=False,
                max_length=budget,
                sampling_topk=0,
                sampling_topp=sampling.top_p,
                sampling_temperature=sampling.temperature,
                include_prompt_in_result=False,
                end_token=[tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids],
                return_end_token=True,
                suppress_sequences=suppress or None,
                return_logits_vocab=True,
                callback=on_token,
            )
        ends_field = sorted(headline_ends if phase == "headline" else end_ids)
        for row, result in zip(decoded, results, strict=True):
            if row.cancelled:
                continue
            if not row.finished:
                produced = result.sequences_ids[0] if result.sequences_ids else []
                if produced and produced[-1] in self.stop_ids:  # ended by the engine
                    row.complete = row.finished = row.ended_answer = True
                else:  # the token budget ran out
                    row.complete = False
            cut = self._cut_point(row, result, field_shape, ends_field, sampling, rng, job)
            if cut is not None:
                row.ids = row.ids[:cut]
                row.text = tokenizer.decode(
                    row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                row.view = inspect(row.text, field_shape, job.allowed_figures)
                row.complete, row.ended_answer = True, phase != "headline"
        return decoded

    def _cut_point(
        self,
        row: _Decoded,
        result: Any,
        shape: AnswerShape,
        end_ids: list[int],
        sampling: SamplingConfig,
        rng: np.random.Generator,
        job: RowJob,
    ) -> int | None:
        """Where the ending bonus ends this row: at step t, given the model did not
        end it there itself, end with probability (p′ − p) / (1 − p) — exactly the
        distribution transformers samples with the bonus added to the logits."""
        if not row.ids:
            return None
        logits = result.logits[0] if result.logits else []
        # Rows that continue a longer start than the call's shortest get logits for
        # their forced start tokens first: skip those.
        produced = result.sequences_ids[0] if result.sequences_ids else []
        offset = max(0, len(logits) - len(produced))
        tokenizer = self.tokenizer
        for t in range(min(len(row.ids), len(logits) - offset)):
            prefix = tokenizer.decode(
                row.ids[:t], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            view = inspect(prefix, shape, job.allowed_figures)
            if view.end_bias <= 0 or view.doomed:
                continue
            step = np.asarray(logits[offset + t], dtype=np.float64) / sampling.temperature
            step = step - step.max()
            weights = np.exp(step)
            p_end = float(weights[end_ids].sum() / weights.sum())
            q = extra_end_probability(p_end, view.end_bias / sampling.temperature)
            if q > 0 and rng.random() < q:
                return t
        return None


def _shape_fields(shape: AnswerShape) -> dict[str, Any]:
    return {name: getattr(shape, name) for name in shape.__dataclass_fields__}


@dataclass
class _Decoded:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    view: RowView = field(default_factory=lambda: inspect("", AnswerShape()))
    finished: bool = False
    complete: bool = False
    cancelled: bool = False
    ended_answer: bool = False  # a newline / end of turn, not the separator


# One CTranslate2 call at a time per process: the callback runs on its worker thread.
_ct2_lock = threading.Lock()


# --- choosing and loading -----------------------------------------------------------------


def ctranslate2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(config: LlmConfig) -> tuple[str, str]:
    """(engine, why) for ``config.engine``; ``auto`` resolved for this device and model.

    * Any model but the bundled SmolLM2: transformers (bf16 on CUDA, fp32 on CPU) —
      the path that runs every Hugging Face causal LM without a conversion step.
    * The bundled model on CPU: CTranslate2 int8, the fastest engine that keeps the
      pass rate (``adloop bench generator``; README "The models"). Without the
      ctranslate2 package: transformers bf16 where the CPU has AMX / AVX512-BF16,
      else fp32.
    * On CUDA: transformers bf16. No GPU was available to measure CTranslate2's CUDA
      path (int8_float16); ``adloop bench generator --device cuda`` compares them.
    """
    device = _pick_device(config.device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if config.engine != "auto":
        return config.engine, "set by ADLOOP_LLM_ENGINE"
    if config.model_id != DEFAULT_MODEL_ID or config.gguf_file is not None:
        name = "transformers-bf16" if kind == "cuda" else "transformers-fp32"
        return name, "transformers runs any Hugging Face model id"
    name = AUTO_ENGINE[kind]
    if name == "ctranslate2-int8" and not ctranslate2_available():
        from adloop.generator.ctr import cpu_has_fast_bf16

        name = "transformers-bf16" if cpu_has_fast_bf16() else "transformers-fp32"
        return name, "ctranslate2 is not installed"
    why = (
        "fastest on CPU at the same pass rate (adloop bench generator)"
        if kind == "cpu"
        else "CTranslate2's CUDA path is not measured yet"
    )
    return name, why


@functools.lru_cache(maxsize=4)
def load_engine(config: LlmConfig) -> Engine:
    """The engine ``config`` asks for (``auto`` resolved), loaded once per process."""
    name, why = resolve_engine(config)
    if name.startswith("transformers"):
        dtype = "bfloat16" if name == "transformers-bf16" else "float32"
        engine: Engine = TransformersEngine(load_model(config, dtype), name, config.cpu_threads)
    else:
        engine = _load_ctranslate2(config)
    log.info(
        "llm engine ready",
        extra={"engine": engine.name, "why": why, "device": engine.device, "model": engine.version},
    )
    return engine


def _ct2_source(config: LlmConfig) -> tuple[str, str]:
    """(identity of the weights, version string) for the conversion key."""
    import importlib.metadata

    if config.model_id == DEFAULT_MODEL_ID and config.gguf_file is None:
        gguf = default_gguf_path()
        package = importlib.metadata.version(DEFAULT_GGUF_DISTRIBUTION)
        version = f"{DEFAULT_MODEL_ID}:{DEFAULT_GGUF_FILE}@{DEFAULT_GGUF_DISTRIBUTION}=={package}"
        return _conversion_key(gguf), version
    if config.gguf_file is not None:
        gguf = Path(config.model_id) / config.gguf_file
        return _conversion_key(gguf), f"{config.model_id}:{config.gguf_file}"
    return hashlib.sha256(config.model_id.encode()).hexdigest()[:16], config.model_id


def ctranslate2_dir(config: LlmConfig) -> Path:
    import ctranslate2

    key, _ = _ct2_source(config)
    tag = hashlib.sha256(f"{key}|{ctranslate2.__version__}|int8".encode()).hexdigest()[:16]
    return Path(config.models_dir) / "llm" / "ctranslate2" / f"{tag}-int8"


def _load_ctranslate2(config: LlmConfig) -> CTranslate2Engine:
    try:
        import ctranslate2
    except ImportError as exc:
        raise ModelLoadError(
            "ADLOOP_LLM_ENGINE=ctranslate2-int8 needs the ctranslate2 package "
            "(pip install ctranslate2), or choose a transformers engine"
        ) from exc
    from transformers import AutoTokenizer

    started = time.perf_counter()
    device = _pick_device(config.device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    try:
        _, version = _ct2_source(config)
        target = ctranslate2_dir(config)
        source = "ctranslate2-cache"
        if not (target / "complete").exists():
            convert_to_ctranslate2(config, target)
            source = "converted"
        tokenizer = AutoTokenizer.from_pretrained(target / "tokenizer")
        generator = ctranslate2.Generator(
            str(target),
            device=kind,
            device_index=int(device.split(":")[1]) if ":" in device else 0,
            compute_type=CT2_COMPUTE_TYPE[kind],
            inter_threads=1,
            intra_threads=config.cpu_threads or 0,
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {config.model_id} with CTranslate2: {exc!r}; "
            "set ADLOOP_LLM_ENGINE=transformers-fp32 to run it with transformers"
        ) from exc
    tokenizer.padding_side = "left"
    stop_ids = _tokenizer_stop_ids(tokenizer, target)
    return CTranslate2Engine(
        generator,
        tokenizer,
        stop_ids,
        f"{version}+ctranslate2-int8",
        device,
        source,
        time.perf_counter() - started,
        config.cpu_threads,
    )


def _tokenizer_stop_ids(tokenizer: Any, target: Path) -> list[int]:
    from transformers import GenerationConfig

    class _Model:  # what _stop_token_ids reads from a model
        generation_config = GenerationConfig.from_pretrained(target / "tokenizer")

    return _stop_token_ids(tokenizer, _Model())


def convert_to_ctranslate2(
    config: LlmConfig, target: Path, progress: Callable[[str], None] | None = None
) -> None:
    """Convert the configured model to CTranslate2 int8 at ``target`` (about 15 s for
    SmolLM2-135M on one core), atomically: written beside it, then renamed."""
    from ctranslate2.converters import TransformersConverter
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    console = Console(stderr=True)
    steps = ("dequantized weights", "int8 conversion", "tokenizer")
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(f"CTranslate2 int8 for {config.model_id}", total=len(steps))

            def step(name: str) -> None:
                bar.update(task, description=f"CTranslate2 int8: {name}")
                if progress is not None:
                    progress(name)

            step(steps[0])
            with _weights_dir(config) as (weights, tokenizer):
                bar.advance(task)
                step(steps[1])
                with cpu_threads(config.cpu_threads, "cpu"):
                    TransformersConverter(str(weights), low_cpu_mem_usage=True).convert(
                        str(temporary), quantization="int8", force=True
                    )
                bar.advance(task)
                step(steps[2])
                tokenizer.save_pretrained(temporary / "tokenizer")
                _copy_generation_config(weights, temporary / "tokenizer")
                bar.advance(task)
        (temporary / "complete").write_text("ok\n")
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(temporary, ignore_errors=True)
            return
        temporary.rename(target)
        log.info("ctranslate2 conversion written", extra={"path": str(target)})
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _copy_generation_config(weights: Path, target: Path) -> None:
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(weights).save_pretrained(target)
    except OSError:  # none shipped: stop ids come from the tokenizer alone
        GenerationConfig().save_pretrained(target)


@contextlib.contextmanager
def _weights_dir(config: LlmConfig) -> Iterator[tuple[Path, Any]]:
    """A directory of plain (dequantized) weights the converter can read, and the
    tokenizer: the GGUF conversion cache when it exists, else a temporary one."""
    from transformers import AutoTokenizer

    if config.model_id == DEFAULT_MODEL_ID or config.gguf_file is not None:
        gguf = (
            default_gguf_path()
            if config.gguf_file is None
            else Path(config.model_id) / config.gguf_file
        )
        cache_root = config.conversion_cache
        cached = cache_root / _conversion_key(gguf) if cache_root else None
        if cached is None or not (cached / "complete").exists():
            model, tokenizer, _ = _load_gguf(gguf, cache_root, torch.float32)
            if cached is None or not (cached / "complete").exists():
                scratch = (
                    Path(os.environ.get("TMPDIR", "/tmp")) / f"adloop-dequantized-{os.getpid()}"
                )
                _write_conversion_cache(model, tokenizer, scratch)
                try:
                    yield scratch, tokenizer
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                return
        yield cached, AutoTokenizer.from_pretrained(cached)
        return
    local = Path(config.model_id)
    yield (
        (local if local.is_dir() else Path(config.model_id)),
        AutoTokenizer.from_pretrained(config.model_id),
    )
