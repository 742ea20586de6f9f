"""Raw LLM output → structured variants, and exact / near-duplicate removal (pure).

The prompt asks for ``Headline: ... | Description: ...`` lines, but models answer in
many shapes: the two labels on separate lines, numbered or bulleted lists, JSON
objects (one per line or an array), quoted text, markdown bold. The parser accepts
those and nothing else: a line under a label it does not know (``Note:``, ``Ad Type:``)
ends the current variant, and chatter ("Here are three ads:") is dropped, so instruction
echoes and commentary do not turn into ads.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rapidfuzz import fuzz

from adloop.schemas.records import ExampleCreative, Rejection


@dataclass(frozen=True, slots=True)
class Variant:
    """One generated ad: a headline and an optional description."""

    headline: str
    description: str = ""

    @property
    def text(self) -> str:
        return f"{self.headline} {self.description}".strip()


def rejection(variant: Variant, rule: str, reason: str) -> Rejection:
    return Rejection(
        headline=variant.headline, description=variant.description, rule=rule, reason=reason
    )


# --- Parsing ----------------------------------------------------------------------------

_HEADLINE_LABELS = ("headline", "title", "heading")
_DESCRIPTION_LABELS = ("description", "desc", "body", "body text", "text", "copy")
_HEADLINE_KEYS = ("headline", "title", "heading")
_DESCRIPTION_KEYS = ("description", "desc", "body", "text")

# "1. ", "2) ", "(3) ", "- ", "* ", "• ", "> ", "#"s, "Ad 2:" / "Variant 3 -"
_LIST_MARKER = re.compile(
    r"^\s*(?:(?:\(?\d{1,2}[.):]|[-*•·–—>#]+|(?:ad|variant|option)\s*\d{1,2}\s*[:.)\-–—])\s*)+",
    re.IGNORECASE,
)
# A leading "Label:" (letters, spaces, underscores; short), e.g. "Headline:", "Ad Type:".
_LABEL = re.compile(r"^\s*([A-Za-z][A-Za-z _]{0,20}?)\s*:\s*")
# A description label inside a headline line: "X | Description: Y", "X - Desc: Y".
_DESCRIPTION_LABEL_INLINE = re.compile(
    r"\s*(?:\||[-–—]{1,2}(?=\s)|[,;/])?\s*\b(?:description|desc)\s*:\s*", re.IGNORECASE
)
# Where a field runs into another labelled field: "Y | Audio: ...", "Y | Headline: ...".
_NEXT_LABEL = re.compile(r"\s*\|\s*[A-Za-z][A-Za-z _]{0,20}:")
_FIELD_SEPARATOR = re.compile(r"\s+\|\s+")
_MARKDOWN = re.compile(r"\*\*|__|`")
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "„": "“", "‘": "’", "«": "»", "‹": "›", "「": "」"}
# Commentary lines that introduce a list rather than being an ad.
_CHATTER = re.compile(
    r"^(?:here(?:'s| is| are)|sure\b|certainly\b|okay\b|ok\b|of course\b|note\b|i hope\b)",
    re.IGNORECASE,
)


def _unquote(text: str) -> str:
    text = text.strip()
    for _ in range(2):  # '"“Nested”"' happens
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
    # A quote that opens and never closes (the answer was cut or the model forgot).
    if len(text) >= 2 and text[0] in _QUOTE_PAIRS and _QUOTE_PAIRS[text[0]] not in text[1:]:
        text = text[1:].strip()
    if len(text) >= 2 and text[-1] in _QUOTE_PAIRS.values() and text.count(text[-1]) == 1:
        text = text[:-1].strip()
    return text


def clean_field(text: str) -> str:
    """Whitespace collapsed, markdown and enclosing quotes removed, stray separators cut."""
    text = _MARKDOWN.sub("", unicodedata.normalize("NFC", text))
    text = " ".join(text.split())
    text = text.strip(" |")
    return _unquote(text)


def _from_json_value(value: Any) -> list[Variant]:
    items = value if isinstance(value, list) else [value]
    variants = []
    for item in items:
        if isinstance(item, str):
            headline, description = clean_field(item), ""
        elif isinstance(item, dict):
            lowered = {str(k).lower(): v for k, v in item.items()}
            headline = next((lowered[k] for k in _HEADLINE_KEYS if k in lowered), "")
            description = next((lowered[k] for k in _DESCRIPTION_KEYS if k in lowered), "")
            if not isinstance(headline, str) or not isinstance(description, str):
                continue
            headline, description = clean_field(headline), clean_field(description)
        else:
            continue
        if headline:
            variants.append(Variant(headline, description))
    return variants


def _parse_json(text: str) -> list[Variant] | None:
    """Variants if ``text`` is a JSON array/object or JSON lines; None if it is not JSON."""
    stripped = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
    stripped = stripped.strip()
    if not stripped.startswith(("[", "{")):
        return None
    try:
        return _from_json_value(json.loads(stripped))
    except json.JSONDecodeError:
        pass
    variants: list[Variant] = []
    seen_json = False
    for line in stripped.splitlines():
        line = line.strip().rstrip(",")
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        seen_json = True
        variants.extend(_from_json_value(value))
    return variants if seen_json else None


def _split_headline_description(text: str) -> tuple[str, str]:
    """'X | Description: Y', 'X Description: Y', 'X | Y' → (X, Y); else (X, '')."""
    match = _DESCRIPTION_LABEL_INLINE.search(text)
    if match and match.start() > 0:
        headline, description = text[: match.start()], text[match.end() :]
    else:
        parts = _FIELD_SEPARATOR.split(text, maxsplit=1)
        headline, description = parts if len(parts) == 2 else (text, "")
    return clean_field(headline), _cut_at_next_label(description)


def _cut_at_next_label(text: str) -> str:
    match = _NEXT_LABEL.search(text)
    return clean_field(text[: match.start()] if match else text)


def _label_of(line: str) -> tuple[str | None, str]:
    """('headline' | 'description' | 'other' | None, rest of the line)."""
    match = _LABEL.match(line)
    if not match:
        return None, line
    label = " ".join(match.group(1).lower().replace("_", " ").split())
    rest = line[match.end() :]
    if label in _HEADLINE_LABELS:
        return "headline", rest
    if label in _DESCRIPTION_LABELS:
        return "description", rest
    return "other", rest


def parse_variants(text: str, complete: bool = True) -> list[Variant]:
    """Variants in a raw model answer, in order; empty when it contains none.

    ``complete=False`` says the answer was cut by the token limit: its last line may end
    mid-sentence, so it is dropped.
    """
    if (as_json := _parse_json(text)) is not None:
        return as_json
    lines = text.splitlines()
    if not complete and lines:
        lines = lines[:-1]
    cleaned = [_strip_marker(_MARKDOWN.sub("", line)).strip() for line in lines]
    cleaned = [line for line in cleaned if line]
    if any(_label_of(line)[0] == "headline" for line in cleaned):
        return _parse_labelled(cleaned)
    return _parse_plain(cleaned)


def _parse_labelled(lines: list[str]) -> list[Variant]:
    """Answers that use "Headline:" labels: only labelled lines count."""
    variants: list[Variant] = []
    # A headline whose description may follow on the next line.
    open_headline: str | None = None
    for line in lines:
        label, rest = _label_of(line)
        description = ""
        if label == "headline":
            if open_headline:
                variants.append(Variant(open_headline))
            open_headline, description = _split_headline_description(rest)
            if not description:
                continue
        elif label == "description" and open_headline:
            description = _cut_at_next_label(rest)
        elif label is None and _DESCRIPTION_LABEL_INLINE.search(line):
            # '1. "X" - Description: Y' among labelled lines.
            if open_headline:
                variants.append(Variant(open_headline))
            open_headline, description = _split_headline_description(line)
        # Anything else ("Note: ...", "Ad Type: ...", chatter) ends the current ad.
        if open_headline:
            variants.append(Variant(open_headline, description))
        open_headline = None
    if open_headline:
        variants.append(Variant(open_headline))
    return variants


def _parse_plain(lines: list[str]) -> list[Variant]:
    """Answers without labels: one ad per line ("X | Y" splits into both fields)."""
    variants: list[Variant] = []
    for line in lines:
        label, rest = _label_of(line)
        if label == "description":
            if variants and not variants[-1].description:
                variants[-1] = Variant(variants[-1].headline, _cut_at_next_label(rest))
            continue
        if _is_chatter(line):
            continue
        headline, description = _split_headline_description(line)
        if headline:
            variants.append(Variant(headline, description))
    return variants


def _strip_marker(line: str) -> str:
    return _LIST_MARKER.sub("", line, count=1)


def _is_chatter(line: str) -> bool:
    return line.endswith(":") or bool(_CHATTER.match(line))


# --- Duplicates -------------------------------------------------------------------------

DEFAULT_SIMILARITY_THRESHOLD = 90.0


def normalize(text: str) -> str:
    """Comparison key: NFKC, case-folded, punctuation and symbols gone, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text)
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class _Seen:
    headline: str
    description: str
    label: str  # how a rejection names it


def _as_seen(item: Variant | ExampleCreative, label: str) -> _Seen:
    return _Seen(normalize(item.headline), normalize(item.description), label)


def dedupe(
    variants: Iterable[Variant],
    existing: Sequence[Variant | ExampleCreative] = (),
    threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
) -> tuple[list[Variant], list[Rejection]]:
    """Drop exact and near-duplicates, of each other and of ``existing`` creatives.

    Two ads are duplicates when their normalised headlines match with a similarity ratio
    (rapidfuzz ``fuzz.ratio``, 0-100) of at least ``threshold``, and their descriptions
    do too — or either has none (a bare headline repeating an ad's headline adds
    nothing). Two headlines of four or more words that differ in one word only ("Shoes
    for every day" / "Shoes for every run") are one ad frame, whatever the descriptions:
    as two arms they would split traffic without the bandit learning anything. The first
    occurrence is kept.
    """
    seen = [
        _as_seen(item, f"existing creative {getattr(item, 'creative_id', '')!s}".strip())
        for item in existing
    ]
    kept: list[Variant] = []
    rejections: list[Rejection] = []
    for variant in variants:
        candidate = _as_seen(variant, "")
        found = next(
            ((s, kind) for s in seen if (kind := _duplicate_kind(candidate, s, threshold))),
            None,
        )
        if found is None:
            kept.append(variant)
            seen.append(_Seen(candidate.headline, candidate.description, repr(variant.headline)))
            continue
        match, kind = found
        rejections.append(rejection(variant, "duplicate", f"{kind} {match.label}"))
    return kept, rejections


MIN_FRAME_WORDS = 4


def same_frame(a: str, b: str) -> bool:
    """Normalised headlines of ``MIN_FRAME_WORDS``+ words that differ in one word only."""
    words_a, words_b = a.split(), b.split()
    if len(words_a) != len(words_b) or len(words_a) < MIN_FRAME_WORDS:
        return False
    return sum(x != y for x, y in zip(words_a, words_b, strict=True)) == 1


def _duplicate_kind(a: _Seen, b: _Seen, threshold: float) -> str | None:
    """How ``a`` repeats ``b`` (the start of a rejection's reason), or None if it does not."""
    near_headline = fuzz.ratio(a.headline, b.headline) >= threshold
    near = near_headline and (
        not a.description
        or not b.description
        or fuzz.ratio(a.description, b.description) >= threshold
    )
    if not near and not same_frame(a.headline, b.headline):
        return None
    if (a.headline, a.description) == (b.headline, b.description):
        return "exact duplicate of"
    return "near-duplicate of" if near_headline else "one headline word away from"
