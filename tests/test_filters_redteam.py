"""The output filters measured on hand-written lists (``tests/data/``): a red-team list of
variants they must reject (disguised links and emails, offers, health claims and
superlatives the brief does not make, disguised profanity) and a clean list of realistic
ad copy they must let through, each judged against its own brief.

The rates are printed (``-s`` not needed) so they can be quoted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from adloop.generator.filters import (
    ClaimsRule,
    FilterConfig,
    PiiRule,
    UrlRule,
    VariantFilter,
    brand_safety_rule,
    forbidden_terms_rule,
    stated_claims,
)
from adloop.generator.parsing import Variant
from adloop.schemas.records import Brief

DATA = Path(__file__).parent / "data"
MIN_CATCH_RATE = 0.98
MAX_FALSE_POSITIVE_RATE = 0.03
# Each hold-out list was written after a round of rules and measured before any fix:
#   _holdout  (135/110): 66.7 % caught, 6.4 % false positives; then general fixes
#             (vocabulary, negation scope, keys per condition and per free thing);
#   _holdout2 (77/76):   85.7 % caught, 1.3 % false positives; then a few more words.
# Those first numbers are the honest estimate for copy the rules have not seen; the bar
# below guards what the fixes reached.
HOLDOUT_MIN_CATCH_RATE = 0.95
LISTS = ["", "_holdout", "_holdout2"]


def _decode(text: str) -> str:
    """``\\uXXXX`` → the character: invisible and look-alike ones stay readable in the file."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def _rows(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [[_decode(c) for c in line.split("\t")] for line in lines if line and line[0] != "#"]


@dataclass(frozen=True)
class Case:
    brief: str
    variant: Variant
    rule: str = ""  # red team: the rule expected among the failures


def load_briefs() -> dict[str, Brief]:
    raw = json.loads((DATA / "filter_briefs.json").read_text(encoding="utf-8"))
    return {key: Brief(**fields) for key, fields in raw.items()}


def load_cases(name: str) -> list[Case]:
    if name.startswith("filter_redteam"):
        return [Case(b, Variant(h, d), rule) for b, rule, h, d in _rows(name)]
    return [Case(b, Variant(h, d)) for b, h, d in _rows(name)]


@dataclass(frozen=True)
class Rates:
    red_team: int
    caught: int
    by_expected_rule: int
    clean: int
    false_positives: int
    missed: list[Case]
    wrongly_rejected: list[tuple[Case, str]]

    @property
    def catch_rate(self) -> float:
        return self.caught / self.red_team

    @property
    def expected_rule_rate(self) -> float:
        return self.by_expected_rule / self.red_team

    @property
    def false_positive_rate(self) -> float:
        return self.false_positives / self.clean


def measure(red_team: Sequence[Case], clean: Sequence[Case], briefs: dict[str, Brief]) -> Rates:
    filters = {key: VariantFilter(brief) for key, brief in briefs.items()}
    caught = by_rule = 0
    missed: list[Case] = []
    for case in red_team:
        failures = filters[case.brief].failures(case.variant)
        caught += bool(failures)
        if case.rule in {f.rule for f in failures}:
            by_rule += 1
        else:
            missed.append(case)
    wrongly: list[tuple[Case, str]] = []
    for case in clean:
        if (failure := filters[case.brief].first_failure(case.variant)) is not None:
            wrongly.append((case, f"{failure.rule}: {failure.reason}"))
    return Rates(len(red_team), caught, by_rule, len(clean), len(wrongly), missed, wrongly)


@pytest.fixture(scope="module")
def briefs() -> dict[str, Brief]:
    return load_briefs()


@pytest.mark.parametrize("suffix", LISTS)
def test_red_team_catch_rate_and_clean_false_positive_rate(
    suffix: str, briefs: dict[str, Brief], capsys: pytest.CaptureFixture[str]
) -> None:
    """``""``: the lists the rules were written against; ``"_holdout*"``: lists written
    after them (see ``HOLDOUT_MIN_CATCH_RATE``)."""
    red_team = load_cases(f"filter_redteam{suffix}.tsv")
    clean = load_cases(f"filter_clean{suffix}.tsv")
    rates = measure(red_team, clean, briefs)
    with capsys.disabled():
        print(
            f"\nfilters{suffix or ' (dev)'}: red team {rates.red_team}, caught {rates.caught}"
            f" ({rates.catch_rate:.1%}), by the expected rule {rates.expected_rule_rate:.1%};"
            f" clean {rates.clean}, false positives {rates.false_positives}"
            f" ({rates.false_positive_rate:.1%})"
        )
        for case in rates.missed:
            print(f"  not caught by {case.rule}: {case.variant}")
        for case, why in rates.wrongly_rejected:
            print(f"  wrongly rejected: {case.variant} ({why})")
    min_catch_rate = HOLDOUT_MIN_CATCH_RATE if suffix else MIN_CATCH_RATE
    assert rates.catch_rate >= min_catch_rate
    assert rates.expected_rule_rate >= min_catch_rate
    assert rates.false_positive_rate <= MAX_FALSE_POSITIVE_RATE


@pytest.mark.parametrize("suffix", LISTS)
def test_the_lists_are_large_varied_and_judged_on_content(
    suffix: str, briefs: dict[str, Brief]
) -> None:
    red_team = load_cases(f"filter_redteam{suffix}.tsv")
    clean = load_cases(f"filter_clean{suffix}.tsv")
    minimum = 200 if not suffix else 70
    assert len(red_team) >= minimum and len(clean) >= minimum
    assert {c.brief for c in red_team + clean} <= set(briefs)
    assert set(Counter(c.rule for c in red_team)) == {
        "url",
        "pii",
        "unsupported_claim",
        "brand_safety",
    }
    # Within the length limits, so that no red-team variant is caught for its length.
    limits = FilterConfig()
    for case in red_team + clean:
        assert len(case.variant.headline) <= limits.max_headline_chars, case
        assert len(case.variant.description) <= limits.max_description_chars, case
    texts = [c.variant.text.casefold() for c in red_team]
    assert len(set(texts)) == len(texts), "no duplicates"


# --- What the lists rely on, one by one -------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Class is out",
        "Essex and Sussex cottages",
        "Cocktail hour",
        "Quick classroom assessment",
        "Therapist-designed",
        "Grow shiitake at home",
        "Bass lessons",
        "Scunthorpe farmers market",
        "Killer deals",
        "A55 phone case",
        "Hit the trail",
    ],
)
def test_blocklist_has_no_scunthorpe_problem(text: str) -> None:
    assert brand_safety_rule().check(Variant(text)) is None


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("F u c k the noise", "'fuck' disguised as 'F u c k'"),
        ("Quiet as sh!t", "'shit' disguised as 'sh!t'"),
        ("light as f\u200buck", "'fuck' disguised as 'f\\u200buck'"),
        ("Takeaway is sh\u0456t", "'shit' disguised as 'shіt'"),  # Cyrillic і
        ("Calm the f*** down", "'fuck' disguised as 'f***'"),
        ("Fuuuuck yes", "'fuuuuck'"),
    ],
)
def test_disguised_profanity_is_named_with_what_was_written(text: str, shown: str) -> None:
    assert brand_safety_rule().check(Variant(text)) == f"contains a blocked term {shown}"


def test_forbidden_terms_are_matched_in_disguise_too() -> None:
    rule = forbidden_terms_rule(Brief(product="p", forbidden_terms=["cheap"]))
    assert "'cheap' disguised as 'Ch3ap'" in (rule.check(Variant("Ch3ap shoes")) or "")
    assert rule.check(Variant("Cheapest shoes")) is None  # whole words, as before


def test_look_alike_letters_are_only_undone_inside_latin_words() -> None:
    """A Russian brief's Cyrillic words are words, not disguises."""
    rule = brand_safety_rule(("cop",))
    assert rule.check(Variant("Свежий сор")) is None  # all Cyrillic: "litter"
    assert rule.check(Variant("A c\u043ep show")) is not None  # Latin c, p around Cyrillic о


def test_links_and_emails_in_disguise_respect_the_allow_list() -> None:
    rule = UrlRule(allowed_domains=("trailrun.com",))
    assert rule.check(Variant("Run", "Shop at trailrun dot com")) is None
    assert rule.check(Variant("Run", "Go to https://www.trailrun.com/sale")) is None
    assert "disguised link" in (rule.check(Variant("Run", "Shop at evil dot com")) or "")
    assert "shortener" in (rule.check(Variant("Run", "bit.ly/run")) or "")
    assert rule.check(Variant("Polka dot dresses", "Dress . In linen, all summer.")) is None
    assert PiiRule().check(Variant("Shop at trailrun.com")) is None
    assert "email" in (PiiRule().check(Variant("Ask", "anna at gmail dot com")) or "")


def test_a_brief_allows_the_claims_it_makes_and_not_those_it_rules_out() -> None:
    brief = Brief(
        product="FreshPlate meal kits",
        key_message="Free delivery on your first box, 30% off",
        constraints=["Do not promise a free trial", "Never claim it cures, treats or prevents"],
    )
    assert stated_claims(brief) == {"free shipping", "discount"}
    rule = ClaimsRule.for_brief(brief)
    assert rule.check(Variant("Delivered free", "Thirty percent off your first box.")) is None
    assert rule.check(Variant("Student deal on FreshPlate")) is None
    assert rule.check(Variant("FreshPlate, free trial")) == (
        "offers 'free trial' (free trial), which the brief does not make"
    )
    assert rule.check(Variant("Free meal kits")) == (
        "offers 'Free meal' (free: meal), which the brief does not make"
    )
    assert "health claim" in (rule.check(Variant("Prevents colds")) or "")


def test_figures_in_words_count_only_where_they_make_an_offer() -> None:
    rule = ClaimsRule.for_brief(Brief(product="Gym", key_message="Half price first month"))
    assert rule.check(Variant("50% off your first month")) is None  # "half" is 50
    assert "90 ('ninety" in (rule.check(Variant("Ninety percent off")) or "")
    assert rule.check(Variant("One gym, all in one place", "Ten minutes from you.")) is None


class _Batched:
    """A stand-in for a model rule: rejects headlines without "shoe", counts its calls."""

    name = "relevance"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def check(self, variant: Variant) -> str | None:
        return self.check_many([variant])[0]

    def check_many(self, variants: Sequence[Variant]) -> list[str | None]:
        self.batches.append(len(variants))
        return [None if "shoe" in v.headline.lower() else "off topic" for v in variants]


def test_an_injected_batch_rule_runs_last_once_per_batch() -> None:
    relevance = _Batched()
    variant_filter = VariantFilter(Brief(product="TrailRun shoes"), relevance=relevance)
    assert variant_filter.rule_names[-1] == "relevance"
    outcome = variant_filter.apply(
        [Variant("Trail shoes"), Variant("Cool Idea"), Variant("Shoes, f*ck yes"), Variant("Go")]
    )
    assert outcome.accepted == [Variant("Trail shoes")]
    assert [r.rule for r in outcome.rejections] == ["relevance", "brand_safety", "length"]
    assert relevance.batches == [2], "one call, for the two that passed every other rule"
    assert "relevance" not in VariantFilter(Brief(product="p")).rule_names
