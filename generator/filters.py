"""Filters for generated variants (pure): every rejection names its rule and says why.

Rules, cheapest first (``VariantFilter`` reports the first one a variant fails):

* ``format``: a headline with letters in it; no markup, template or instruction residue
  (``<``, ``{``, ``[``, ``|``, field labels, "at most 30 characters", chat tokens) —
  whatever a brief smuggled in, the answer must still be plain ad copy;
* ``length``: headline ``min_headline_chars``..``max_headline_chars`` (30), description
  at most ``max_description_chars`` (90), as for responsive search ads;
* ``pii``: email addresses and phone numbers;
* ``url``: links and bare domains whose host is not on ``allowed_domains``;
* ``brand_safety``: blocklist entries as whole words, case-insensitive;
* ``forbidden_terms`` / ``required_terms``: the brief's terms, whole words, case-insensitive;
  every required term must appear in the headline or the description;
* ``language``: see ``LanguageRule``.

Every match is on NFKC-normalised, case-folded text, so full-width or ligature
spellings (``ｆｒｅｅ``, ``ﬁ``) do not slip past.

``screen_answers`` is the whole output side: raw answers → parse → filter → dedupe.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import regex
from rapidfuzz import fuzz

from adloop.generator.parsing import (
    DEFAULT_SIMILARITY_THRESHOLD,
    Variant,
    dedupe,
    normalize,
    parse_variants,
    rejection,
)
from adloop.generator.prompts import ANSWER_PREFIX, EXAMPLE_ADS, LANGUAGE_NAMES
from adloop.schemas.records import Brief, ExampleCreative, GenerationRequest, Rejection

# A small default: profanity, sexual content, violence, drugs and the claims ad
# platforms refuse. "word*" matches the word and its longer forms (fuck, fucking).
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "fuck*", "shit*", "bitch*", "bastard*", "asshole*", "crap", "damn", "wtf",
    "porn*", "xxx", "nude*", "naked", "escort*", "sex",
    "kill", "killing", "murder*", "gun", "guns", "shooting", "shooter*", "bomb*",
    "terror*", "suicide", "massacre", "weapon*",
    "nazi*", "racist*",
    "cocaine", "heroin", "meth", "weed", "marijuana",
    "guaranteed", "guarantee", "miracle*", "risk-free", "no risk", "get rich",
    "free money", "lose weight fast", "click here",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """What the filters enforce beyond the brief's own terms and language."""

    max_headline_chars: int = 30
    max_description_chars: int = 90
    min_headline_chars: int = 3
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    # Hosts a variant may name (subdomains included), e.g. ("example.com",).
    allowed_domains: tuple[str, ...] = ()
    check_language: bool = True


class Rule(Protocol):
    name: str

    def check(self, variant: Variant) -> str | None:
        """The reason ``variant`` fails this rule, or None when it passes."""
        ...


def fold(text: str) -> str:
    """Matching form: NFKC, case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def _term_pattern(terms: Iterable[str]) -> re.Pattern[str] | None:
    """Whole-word alternation; spaces match any whitespace; a trailing '*' any word tail."""
    alternatives = []
    for term in terms:
        folded = fold(term).strip()
        prefix = folded.endswith("*")
        words = folded.rstrip("*").split()
        if not words:
            continue
        body = r"\s+".join(re.escape(w) for w in words)
        alternatives.append(body + (r"\w*" if prefix else ""))
    if not alternatives:
        return None
    # Longest first so "no risk" wins over a shorter overlapping entry in the reason.
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


def _fields(variant: Variant) -> str:
    return fold(f"{variant.headline}\n{variant.description}")


# --- Rules ------------------------------------------------------------------------------


_MARKUP = re.compile(r"[<>{}\[\]|\\]|<\|im_")
_RESIDUE = re.compile(
    r"\b(?:headline|description|title)\s*:|\bat most \d+ char|\bcharacters? (?:long|max)"
    r"|\bad_to_move_away_from\b|\bads_that_work\b|\bmust_mention\b|\bdata block\b"
    r"|\bkey_message\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class FormatRule:
    name: str = "format"

    def check(self, variant: Variant) -> str | None:
        for label, text in (("headline", variant.headline), ("description", variant.description)):
            if "\n" in text or "\r" in text:
                return f"{label} spans several lines"
            if match := _MARKUP.search(text):
                return f"{label} contains markup or template characters {match.group(0)!r}"
            if match := _RESIDUE.search(text):
                return f"{label} contains prompt or template residue {match.group(0)!r}"
        if not any(ch.isalpha() for ch in variant.headline):
            return "headline has no letters"
        if variant.description and not any(ch.isalpha() for ch in variant.description):
            return "description has no letters"
        return None


@dataclass(frozen=True, slots=True)
class LengthRule:
    min_headline_chars: int = 3
    max_headline_chars: int = 30
    max_description_chars: int = 90
    name: str = "length"

    def check(self, variant: Variant) -> str | None:
        headline = len(variant.headline)
        if headline < self.min_headline_chars:
            return f"headline has {headline} characters, fewer than {self.min_headline_chars}"
        if headline > self.max_headline_chars:
            return f"headline has {headline} characters, more than {self.max_headline_chars}"
        description = len(variant.description)
        if description > self.max_description_chars:
            return (
                f"description has {description} characters, more than {self.max_description_chars}"
            )
        return None


_EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
# 7 to 15 digits, optionally led by '+', grouped by at most two of: space . - / ( ).
# Prices ("$1,299.99"), percentages and years do not reach 7 digits; "1 000 000"
# does, and is rejected — rare in ad copy, and a false alarm costs one variant.
_PHONE = re.compile(r"(?<![\w.,])\+?\(?\d(?:[\s.\-/()]{0,2}\d){6,14}(?![\w])")
_YEAR_RANGE = re.compile(r"(?:19|20)\d\d\s?[-/–]\s?(?:19|20)\d\d")


@dataclass(frozen=True, slots=True)
class PiiRule:
    name: str = "pii"

    def check(self, variant: Variant) -> str | None:
        text = f"{variant.headline}\n{variant.description}"
        if match := _EMAIL.search(text):
            return f"contains an email address {match.group(0)!r}"
        for match in _PHONE.finditer(text):
            if not _YEAR_RANGE.fullmatch(match.group(0).strip()):  # "2024-2025"
                return f"contains a phone number {match.group(0).strip()!r}"
        return None


# Common generic and country TLDs: a bare "shop.io" is a link, "Node.js" is not.
_TLDS = (
    "com", "net", "org", "info", "biz", "io", "co", "app", "dev", "ai", "me", "shop", "store",
    "online", "site", "xyz", "tech", "club", "blog", "link", "live", "page", "eu", "us", "uk",
    "de", "fr", "es", "it", "nl", "be", "ch", "at", "se", "no", "dk", "fi", "pl", "cz", "pt",
    "ie", "ca", "au", "nz", "in", "jp", "cn", "ru", "br", "mx", "ar", "za", "tv",
)  # fmt: skip
_URL = re.compile(
    r"(?:\bhttps?://|\bwww\.)[^\s|]+"
    r"|\b(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)+(?:" + "|".join(_TLDS) + r")\b(?:/\S*)?",
    re.IGNORECASE,
)
_HOST = re.compile(r"^(?:https?://)?([^/:?#\s]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class UrlRule:
    allowed_domains: tuple[str, ...] = ()
    name: str = "url"

    def check(self, variant: Variant) -> str | None:
        for match in _URL.finditer(f"{variant.headline}\n{variant.description}"):
            link = match.group(0).rstrip(".,;:!?)")
            host_match = _HOST.match(link)
            host = host_match.group(1).lower() if host_match else link.lower()
            host = host.removeprefix("www.")
            allowed = (d.lower().removeprefix("www.") for d in self.allowed_domains)
            if not any(host == d or host.endswith("." + d) for d in allowed):
                return f"contains a link {link!r} to a domain not on the allow list"
        return None


@dataclass(frozen=True)
class TermsRule:
    """Whole-word matches of ``terms``: ``forbid`` rejects any, otherwise all are required."""

    name: str
    terms: tuple[str, ...]
    forbid: bool
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _required: tuple[tuple[str, re.Pattern[str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pattern", _term_pattern(self.terms))
        required = tuple(
            (term, pattern) for term in self.terms if (pattern := _term_pattern([term])) is not None
        )
        object.__setattr__(self, "_required", required)

    def check(self, variant: Variant) -> str | None:
        text = _fields(variant)
        if self.forbid:
            if self._pattern is not None and (match := self._pattern.search(text)):
                kind = "a blocked term" if self.name == "brand_safety" else "a forbidden term"
                return f"contains {kind} {match.group(0)!r}"
            return None
        missing = [term for term, pattern in self._required if not pattern.search(text)]
        if missing:
            return f"does not mention the required term(s) {', '.join(map(repr, missing))}"
        return None


def brand_safety_rule(blocklist: Sequence[str] = DEFAULT_BLOCKLIST) -> TermsRule:
    return TermsRule("brand_safety", tuple(blocklist), forbid=True)


def forbidden_terms_rule(brief: Brief) -> TermsRule:
    return TermsRule("forbidden_terms", tuple(brief.forbidden_terms), forbid=True)


def required_terms_rule(brief: Brief) -> TermsRule:
    return TermsRule("required_terms", tuple(brief.required_terms), forbid=False)


# --- Claims -----------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _numbers(text: str) -> set[str]:
    return {n.replace(",", ".") for n in _NUMBER.findall(text)}


@dataclass(frozen=True, slots=True)
class ClaimsRule:
    """Every number in a variant (a discount, a price, a rating) must come from the brief.

    A small model invents figures: SmolLM2 wrote "90% Off" for a brief that says 30 %
    off. A number the advertiser did not state is a claim nobody can stand behind.
    """

    allowed: frozenset[str]
    name: str = "unsupported_claim"

    @classmethod
    def for_brief(cls, brief: Brief) -> ClaimsRule:
        text = " ".join([brief.product, brief.key_message, *brief.constraints])
        return cls(frozenset(_numbers(text)))

    def check(self, variant: Variant) -> str | None:
        invented = sorted(_numbers(f"{variant.headline} {variant.description}") - self.allowed)
        if invented:
            stated = ", ".join(sorted(self.allowed)) or "none"
            return f"states {', '.join(invented)}, a figure not in the brief (it states: {stated})"
        return None


# --- Language ---------------------------------------------------------------------------

# Scripts each language is written in; Latin is tolerated everywhere (brand names,
# "iPhone"), any other script is not. Languages not listed are treated as Latin-script.
_SCRIPTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("ru", "uk", "bg", "sr", "mk", "be", "kk", "ky", "mn", "tg"), ("Cyrillic",)),
    "el": ("Greek",),
    **dict.fromkeys(("ar", "fa", "ur", "ps"), ("Arabic",)),
    "he": ("Hebrew",),
    **dict.fromkeys(("hi", "mr", "ne", "sa"), ("Devanagari",)),
    "bn": ("Bengali",),
    "ta": ("Tamil",),
    "te": ("Telugu",),
    "th": ("Thai",),
    "ka": ("Georgian",),
    "hy": ("Armenian",),
    "ja": ("Hiragana", "Katakana", "Han"),
    "zh": ("Han",),
    "ko": ("Hangul", "Han"),
}
_SCRIPT_NAMES = sorted({s for scripts in _SCRIPTS.values() for s in scripts} | {"Latin"})
_SCRIPT_PATTERNS = {name: regex.compile(rf"\p{{Script={name}}}") for name in _SCRIPT_NAMES}
# Letters shared by several scripts (the Japanese long-vowel mark ー, combining marks).
_SHARED_SCRIPT = regex.compile(r"[\p{Script=Common}\p{Script=Inherited}]")
# Languages the statistical detector chooses among (plus the target): the common
# languages of ad copy. Restricting the set is what makes short text workable —
# with all 97 of the model's languages, "Run faster. Go further." comes out as
# Nigerian Pidgin.
_DETECTOR_LANGUAGES = (
    "en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "ro", "hu",
    "tr", "id", "ru", "uk", "el", "ar", "he", "hi", "ja", "zh", "ko", "vi", "th",
)  # fmt: skip


def _script_of(ch: str) -> str | None:
    """The script of a letter; None for letters shared between scripts."""
    if _SHARED_SCRIPT.match(ch):
        return None
    for name, pattern in _SCRIPT_PATTERNS.items():
        if pattern.match(ch):
            return name
    return "another"


@functools.lru_cache(maxsize=32)
def _ranker(language: str) -> Any:
    """py3langid restricted to the ad languages plus ``language``; None if it lacks it.

    ~0.5 s and ~100 MB per target language, on first use: set_languages mutates the
    identifier, so each target language gets its own.
    """
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ranker = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    known = set(ranker.nb_classes)
    if language not in known:
        return None
    ranker.set_languages(sorted((set(_DETECTOR_LANGUAGES) | {language}) & known))
    return ranker


@dataclass(frozen=True, slots=True)
class LanguageRule:
    """Is the variant written in the brief's language?

    Short ad text defeats statistical detectors, so the rule has two stages:

    1. Script, always: letters in a script the language does not use (Latin aside)
       reject; for a non-Latin-script language, fewer than half of the letters in its
       script reject ("Summer sale" is not Russian).
    2. Statistics, only with at least ``min_words`` words (headline and description
       together): py3langid ranks the common ad languages; the variant is rejected when
       another language is ranked first with at least ``min_margin`` times the target's
       probability. Two-word headlines ("Hydrate smarter") are judged on script alone.
    """

    language: str
    min_words: int = 3
    min_margin: float = 4.0
    name: str = "language"

    def check(self, variant: Variant) -> str | None:
        text = f"{variant.headline} {variant.description}".strip()
        scripts = _SCRIPTS.get(self.language, ())
        letters = [ch for ch in text if ch.isalpha()]
        in_language = 0
        for ch in letters:
            script = _script_of(ch)
            if script in scripts:
                in_language += 1
            elif script not in (None, "Latin"):
                return f"contains {script}-script letters ({ch!r}), not {self._name}"
        if scripts and letters and in_language * 2 < len(letters):
            return f"mostly Latin letters, not {self._name} ({'/'.join(scripts)} script)"
        if len(text.split()) < self.min_words or (ranker := _ranker(self.language)) is None:
            return None
        ranked = ranker.rank(text)
        top, top_p = ranked[0]
        target_p = next((float(p) for lang, p in ranked if lang == self.language), 0.0)
        if top != self.language and float(top_p) >= self.min_margin * target_p:
            return f"reads as {top} (p={float(top_p):.2f}), not {self.language} (p={target_p:.2f})"
        return None

    @property
    def _name(self) -> str:
        return LANGUAGE_NAMES.get(self.language, self.language)


# --- Composition ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    accepted: list[Variant]
    rejections: list[Rejection]


class VariantFilter:
    """The rules for one brief, in order; a variant is accepted when it passes all."""

    def __init__(self, brief: Brief, config: FilterConfig | None = None) -> None:
        config = config or FilterConfig()
        rules: list[Rule] = [
            FormatRule(),
            LengthRule(
                min_headline_chars=config.min_headline_chars,
                max_headline_chars=config.max_headline_chars,
                max_description_chars=config.max_description_chars,
            ),
            PiiRule(),
            UrlRule(allowed_domains=config.allowed_domains),
            brand_safety_rule(config.blocklist),
            forbidden_terms_rule(brief),
            required_terms_rule(brief),
            ClaimsRule.for_brief(brief),
        ]
        if config.check_language:
            rules.append(LanguageRule(brief.language))
        self.rules: tuple[Rule, ...] = tuple(rules)

    @property
    def rule_names(self) -> list[str]:
        return [rule.name for rule in self.rules]

    def first_failure(self, variant: Variant) -> Rejection | None:
        for rule in self.rules:
            if (reason := rule.check(variant)) is not None:
                return rejection(variant, rule.name, reason)
        return None

    def failures(self, variant: Variant) -> list[Rejection]:
        """Every rule the variant fails (diagnostics; ``apply`` stops at the first)."""
        return [
            rejection(variant, rule.name, reason)
            for rule in self.rules
            if (reason := rule.check(variant)) is not None
        ]

    def apply(self, variants: Iterable[Variant]) -> FilterOutcome:
        accepted: list[Variant] = []
        rejections: list[Rejection] = []
        for variant in variants:
            if (failure := self.first_failure(variant)) is None:
                accepted.append(variant)
            else:
                rejections.append(failure)
        return FilterOutcome(accepted, rejections)


# --- Screening: raw answers → accepted variants ---------------------------------------------

# The prompt's worked examples: a copy of one is not a new ad.
_EXAMPLE_VARIANTS = [Variant(headline, description) for headline, description in EXAMPLE_ADS]


@dataclass
class Answer:
    """One sampled answer, without the answer prefix the prompt ended with."""

    text: str
    complete: bool = True  # ended by the model or the stop rule, not by max_new_tokens


@dataclass
class Screened:
    accepted: list[Variant]
    rejections: list[Rejection]
    parsed: int


def screen_answers(
    request: GenerationRequest,
    answers: Sequence[Answer],
    variant_filter: VariantFilter,
    kept: Sequence[Variant] = (),
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
) -> Screened:
    """Raw answers → variants that pass every filter and are new (pure).

    Filter first, then dedupe against the request's creatives, the prompt's examples and
    ``kept`` (variants accepted earlier): a rejected variant must not block a later copy
    that passes.
    """
    parsed = [v for a in answers for v in parse_variants(ANSWER_PREFIX + a.text, a.complete)]
    filtered = variant_filter.apply(parsed)
    fresh, copies = drop_example_copies(filtered.accepted)
    existing: list[Variant | ExampleCreative] = [*request.winners, *_EXAMPLE_VARIANTS]
    if request.underperformer is not None:
        existing.append(request.underperformer)
    unique, duplicates = dedupe(fresh, [*existing, *kept], similarity_threshold)
    return Screened(unique, filtered.rejections + copies + duplicates, len(parsed))


def drop_example_copies(
    variants: Iterable[Variant], threshold: float = DEFAULT_SIMILARITY_THRESHOLD
) -> tuple[list[Variant], list[Rejection]]:
    """Drop variants whose headline contains (or nearly) a worked example's headline.

    Whole-ad dedupe misses "Light That Works" (a fragment of the example "Light That
    Works Late", similarity 86); the examples are about unrelated products, so any
    headline built on one is a copy, not an ad for this brief.
    """
    examples = [(normalize(h), h) for h, _ in EXAMPLE_ADS]
    kept: list[Variant] = []
    rejections: list[Rejection] = []
    for variant in variants:
        headline = normalize(variant.headline)
        copied = next(
            (
                original
                for example, original in examples
                if len(headline.split()) >= 3 and fuzz.partial_ratio(headline, example) >= threshold
            ),
            None,
        )
        if copied is None:
            kept.append(variant)
        else:
            reason = f"copies the prompt's worked example {copied!r}"
            rejections.append(rejection(variant, "duplicate", reason))
    return kept, rejections
