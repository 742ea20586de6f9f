"""``adloop generate``: one generation request from the command line, scored variants out.

Imports of torch and transformers happen inside the command, so registering it on the
``adloop`` group costs nothing for the other commands.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import click

from adloop.generator.config import GeneratorSettings
from adloop.schemas.records import Brief, ExampleCreative, GenerationRequest


def audience_id(text: str) -> str:
    """The request's audience identifier from free text: "Busy parents" → "busy-parents"."""
    slug = re.sub(r"[^a-z0-9_.:@-]+", "-", text.strip().lower()).strip("-._:@")
    return slug[:128] or "all"


def build_request(
    *,
    brief: str,
    audience: str,
    product: str | None,
    key_message: str | None,
    n: int,
    language: str,
    constraints: tuple[str, ...] = (),
    required_terms: tuple[str, ...] = (),
    forbidden_terms: tuple[str, ...] = (),
    winners: tuple[str, ...] = (),
    underperformer: str | None = None,
) -> GenerationRequest:
    """``--brief`` is the product when no ``--product`` is given, else the key message."""
    key = key_message if key_message is not None else (brief if product else "")
    return GenerationRequest(
        request_id=f"cli-{int(time.time() * 1000)}",
        campaign="cli",
        audience=audience_id(audience),
        audience_description=audience,
        brief=Brief(
            product=product or brief,
            key_message=key,
            constraints=list(constraints),
            language=language,
            required_terms=list(required_terms),
            forbidden_terms=list(forbidden_terms),
        ),
        winners=[
            ExampleCreative(creative_id=f"winner-{i}", headline=h) for i, h in enumerate(winners)
        ],
        underperformer=(
            ExampleCreative(creative_id="underperformer", headline=underperformer)
            if underperformer
            else None
        ),
        n_variants=n,
        requested_at=time.time(),
    )


def _load_scorer(ctr_model: str | None) -> Any:
    """A CtrScorer, or None while generator.ctr is not available."""
    try:
        from adloop.generator.ctr import CtrScorer
    except ImportError:
        return None
    if ctr_model is None:
        return CtrScorer.load(GeneratorSettings().models_path)
    return CtrScorer.load(ctr_model)


@click.command()
@click.option("--brief", required=True, help="what to advertise (the product, if no --product)")
@click.option("--audience", required=True, help="the audience, an id or a description")
@click.option("--product", help="product name (then --brief is the key message)")
@click.option("--key-message", help="the one thing the ad must say")
@click.option("--n", "n", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--language", default="en", show_default=True, help="ISO 639-1 code")
@click.option("--constraint", "constraints", multiple=True, help="a constraint (repeatable)")
@click.option("--required-term", "required_terms", multiple=True, help="must appear (repeatable)")
@click.option("--forbidden-term", "forbidden_terms", multiple=True, help="must not appear")
@click.option("--winner", "winners", multiple=True, help="headline of a current winner")
@click.option("--underperformer", help="headline of the creative to move away from")
@click.option("--placement", default="feed", show_default=True, help="placement for scoring")
@click.option("--seed", type=int, help="sampling seed (same seed, same variants)")
# Unset: the generator's own defaults (SamplingConfig, what the worker uses), read
# inside the command so that registering it imports no torch.
@click.option("--temperature", type=float, help="sampling temperature [default: 0.8]")
@click.option("--top-p", type=float, help="nucleus sampling mass [default: 0.9]")
@click.option(
    "--max-new-tokens",
    type=int,
    help="cap per answer; the character limits stop answers long before it [default: 128]",
)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads (default 1)")
@click.option("--model", "model_id", help="Hugging Face causal LM id (default: SmolLM2 GGUF)")
@click.option("--ctr-model", help="CTR model version or models dir (default: settings)")
@click.option("--no-score", is_flag=True, help="skip CTR scoring")
@click.option(
    "--no-relevance",
    is_flag=True,
    help="skip the relevance filter (similarity to product + key message)",
)
@click.option("--show-rejections", is_flag=True, help="also list rejected variants")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--log-level", default="WARNING", show_default=True)
def generate(
    brief: str,
    audience: str,
    product: str | None,
    key_message: str | None,
    n: int,
    language: str,
    constraints: tuple[str, ...],
    required_terms: tuple[str, ...],
    forbidden_terms: tuple[str, ...],
    winners: tuple[str, ...],
    underperformer: str | None,
    placement: str,
    seed: int | None,
    temperature: float | None,
    top_p: float | None,
    max_new_tokens: int | None,
    threads: int | None,
    model_id: str | None,
    ctr_model: str | None,
    no_score: bool,
    no_relevance: bool,
    show_rejections: bool,
    as_json: bool,
    log_level: str,
) -> None:
    """Generate ad variants for one brief and audience, filtered and scored."""
    import msgspec

    from adloop.log_setup import configure_logging

    configure_logging(log_level)
    try:
        request = build_request(
            brief=brief,
            audience=audience,
            product=product,
            key_message=key_message,
            n=n,
            language=language,
            constraints=constraints,
            required_terms=required_terms,
            forbidden_terms=forbidden_terms,
            winners=winners,
            underperformer=underperformer,
        )
        # Structs are not validated on construction: round-trip to apply the schema.
        request = msgspec.json.decode(msgspec.json.encode(request), type=GenerationRequest)
    except msgspec.ValidationError as exc:
        raise click.UsageError(f"invalid request: {exc}") from None

    from adloop.generator.llm import (
        LlmConfig,
        ModelLoadError,
        SamplingConfig,
        UnsupportedLanguageError,
        VariantGenerator,
    )

    try:
        given = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
        sampling = SamplingConfig(seed=seed, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    llm = LlmConfig()
    if model_id:
        llm = dataclasses.replace(llm, model_id=model_id)
    if threads:
        llm = dataclasses.replace(llm, cpu_threads=threads)
    generator = VariantGenerator(llm=llm, sampling=sampling)
    # Refused before any model loads: a brief in a language the model does not write.
    if (refusal := generator.refusal(request)) is not None:
        raise click.ClickException(str(refusal))
    if not no_relevance:
        from adloop.generator.relevance import SentenceEncoder

        settings = GeneratorSettings()
        generator.relevance = SentenceEncoder.load(threads=llm.cpu_threads)
        generator.relevance_threshold = settings.relevance_threshold
    try:
        [outcome] = generator.generate([request])
    except (ModelLoadError, UnsupportedLanguageError) as exc:
        raise click.ClickException(str(exc)) from None

    scorer = None if no_score else _load_scorer(ctr_model)
    scores: list[Any] = []
    if scorer is not None and outcome.variants:
        from adloop.generator.ctr import CtrInput

        scores = scorer.score(
            [
                CtrInput(
                    audience=request.audience,
                    placement=placement,
                    headline=v.headline,
                    description=v.description,
                )
                for v in outcome.variants
            ]
        )
    rows = [
        {
            "headline": v.headline,
            "description": v.description,
            **({"pctr": s.mean, "pctr_std": s.std} if scores else {}),
        }
        for v, s in zip(outcome.variants, scores or [None] * len(outcome.variants), strict=True)
    ]
    if scores:
        rows.sort(key=lambda row: -row["pctr"])
    summary = {
        "request_id": request.request_id,
        "audience": request.audience,
        "llm_model": generator.model_version,
        "prompt_version": generator.prompt_version,
        "ctr_model_version": scorer.version if scorer is not None else None,
        "seconds": round(outcome.seconds, 2),
        "sequences": outcome.sequences,
        "parsed": outcome.parsed,
        "rejected_by_rule": outcome.rejections_by_rule,
    }
    if as_json:
        rejections = [msgspec.to_builtins(r) for r in outcome.rejections]
        click.echo(json.dumps({**summary, "variants": rows, "rejections": rejections}, indent=2))
        return
    _print_table(rows, summary, outcome.rejections if show_rejections else [], bool(scores))


def _print_table(
    rows: list[dict[str, Any]], summary: dict[str, Any], rejections: list[Any], scored: bool
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{len(rows)} variants for audience {summary['audience']!r}")
    table.add_column("#", justify="right")
    table.add_column("headline")
    table.add_column("description")
    if scored:
        table.add_column("pCTR", justify="right")
        table.add_column("± std", justify="right")
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["headline"], row["description"]]
        if scored:
            cells += [f"{row['pctr']:.2%}", f"{row['pctr_std']:.2%}"]
        table.add_row(*cells)
    console.print(table)
    if rejections:
        rejected = Table(title="rejected")
        for column in ("rule", "headline", "description", "reason"):
            rejected.add_column(column)
        for r in rejections:
            rejected.add_row(r.rule, r.headline, r.description, r.reason)
        console.print(rejected)
    console.print(
        f"llm {summary['llm_model']} · prompt {summary['prompt_version']} · "
        f"ctr {summary['ctr_model_version'] or 'none'} · {summary['seconds']} s · "
        f"{summary['sequences']} answers, {summary['parsed']} parsed · "
        f"rejected {summary['rejected_by_rule'] or 'none'}"
    )
