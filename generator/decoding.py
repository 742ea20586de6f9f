"""How an answer may grow while it is sampled: the rules every engine decodes with.

A 135M model told "at most 30 characters" writes 40-character headlines and figures
nobody stated; most of its answers used to fail the filters after being written in
full (9-33 % passed). These rules act *during* sampling instead, identically for every
engine (``generator.engines``), from text alone:

* **Banned tokens** (``TokenRules``): markup and template characters the format rule
  rejects (``< > { } [ ] \\ | @ # * _ ~```), except the ``|`` that separates headline
  and description, and digit tokens that cannot spell a figure the brief states (the
  claims rule rejects invented figures). Fixed per tokenizer and brief: a vocabulary
  mask for transformers, ``suppress_sequences`` for CTranslate2.
* **Banned sequences**: the prompt's example headlines and the key's earlier creatives'
  headlines token by token, and their frames (the headline less its first or last
  word, ``headline_frames``), so the model can neither copy them nor change one word
  of them (both are rejected as duplicates).
* **Ending a field** (``end_bias``): past 40 % of a field's limit, the logits of the
  tokens that end it (the ``|`` before the description, a newline, end of turn) get a
  bonus that grows with its length — at *clean* points only (after a whole word that
  is not a function word, never after a comma or "for"), so the model ends where
  ending reads naturally, with odds it already gave that ending, and is never cut
  mid-phrase. Transformers adds the bonus to the logits; CTranslate2, which has no
  logits hook in Python, samples the same distribution exactly: at each step it ends
  the row with probability (p′ − p) / (1 − p), p the model's own probability of
  ending there and p′ that probability with the bonus (see ``extra_end_probability``).
* **Stopping** (``inspect``): a row is complete at the end of its last field (newline
  or end of turn), and *doomed* — stopped at once, its tokens no longer paid for —
  when a field is past its limit or a figure is not the brief's. A doomed answer is
  still screened, so its rejection is counted with the filters' reason.

Adding a filter rule costs nothing here: rules that only the finished text can judge
stay in ``generator.filters``; this module only avoids the failures that are visible
while the answer is written.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Characters the format rule rejects in a field ("|" handled apart: it is the separator).
MARKUP_CHARS = frozenset("<>{}[]\\@#*_~`")
SEPARATOR = "|"
DESCRIPTION_LABEL = "Description:"
# A field ending on one of these reads as cut off ("Run Light With", "Fast Shoes,").
_FUNCTION_WORDS = """a an the and or but nor for to of in on at by with from into onto over
under your our my their his her its this that these those is are was be as so than then if
no not every all any some more most very"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
_DIGITS = re.compile(r"\d+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True, slots=True)
class AnswerShape:
    """The answer's fields and limits (the filters' limits), and the ending bonus."""

    max_headline_chars: int = 30
    max_description_chars: int = 90
    min_headline_chars: int = 3
    with_description: bool = True
    # The bonus for ending a field starts at this share of its limit ...
    ramp_start: float = 0.35
    # ... and grows by this many logits per fifth of the limit beyond it: a 30-character
    # headline gets +3.5 at 16.5 characters, +7 at 22.5, +10.5 at 28.5. Measured with
    # SmolLM2 on five briefs (headlines only, 0.4 / 2.0): 9 % of answers passed the
    # filters without the bonus, 69 % with it; most failures left were still length.
    # With every filter, relevance included (CTranslate2, 5 briefs x 4 seeds): 2.5
    # passed 60 % (26 of 301 answers too long), 3.5 67 % (11 of 255).
    ramp_per_fifth: float = 3.5

    def bias(self, chars: int, limit: int) -> float:
        start = self.ramp_start * limit
        if chars <= start:
            return 0.0
        return self.ramp_per_fifth * (chars - start) / (0.2 * limit)


@dataclass(frozen=True, slots=True)
class RowView:
    """What a partial answer (the text after ``Headline:``) is, right now."""

    headline: str
    description: str | None  # None until the description label has been written
    in_description: bool  # past the separator
    complete: bool
    doomed: str | None  # why the answer cannot pass, if it cannot
    # The field being written ends cleanly here (a bonus for ending it may apply).
    clean_end: bool
    # Bonus (logits) for the tokens that end the field being written.
    end_bias: float

    @property
    def finished(self) -> bool:
        return self.complete or self.doomed is not None


def _clean_point(text: str, min_chars: int) -> bool:
    text = text.rstrip()
    if len(text) < min_chars or not text:
        return False
    last = text[-1]
    if not (last.isalnum() or last in "!?.%)'\"”’"):
        return False
    words = text.split()
    word = words[-1].strip("!?.%)'\"”’").casefold() if words else ""
    return word not in FUNCTION_WORDS


def invented_figures(text: str, allowed: frozenset[str]) -> list[str]:
    """Complete figures in ``text`` the brief does not state (as the claims rule reads
    them: a trailing run of digits may still grow, so it is not judged yet)."""
    found = []
    for match in _NUMBER.finditer(text):
        if match.end() == len(text):  # "3" may become "30": not finished
            continue
        number = match.group(0).replace(",", ".")
        if number not in allowed:
            found.append(number)
    return found


def inspect(
    text: str, shape: AnswerShape, allowed_figures: frozenset[str] = frozenset()
) -> RowView:
    """Parse a partial answer (newline or end of turn not yet stripped)."""
    line, newline, _ = text.partition("\n")
    complete = bool(newline)
    head, separator, rest = line.partition(SEPARATOR)
    headline = head.strip()
    in_description = bool(separator)
    description: str | None = None
    if in_description:
        label_at = rest.find(DESCRIPTION_LABEL)
        description = rest[label_at + len(DESCRIPTION_LABEL) :].strip() if label_at >= 0 else None
    doomed = None
    if len(headline) > shape.max_headline_chars:
        doomed = f"headline past {shape.max_headline_chars} characters"
    elif in_description and not shape.with_description:
        doomed = "a second field where only a headline was asked for"
    elif description is not None and len(description) > shape.max_description_chars:
        doomed = f"description past {shape.max_description_chars} characters"
    elif invented := invented_figures(line, allowed_figures):
        doomed = f"states {', '.join(invented)}, a figure not in the brief"
    if in_description:
        field_text = description or ""
        clean = description is not None and _clean_point(field_text, 3)
        bias = shape.bias(len(field_text), shape.max_description_chars) if clean else 0.0
    else:
        clean = _clean_point(headline, shape.min_headline_chars)
        bias = shape.bias(len(headline), shape.max_headline_chars) if clean else 0.0
    return RowView(headline, description, in_description, complete, doomed, clean, bias)


def extra_end_probability(p_end: float, bias: float) -> float:
    """Probability of ending *now*, given the model did not sample an ending token
    itself, that makes the whole step end with p′ = p·e^b / (p·e^b + 1 − p): the
    distribution a +b logit bonus on the ending tokens gives (CTranslate2's path)."""
    if bias <= 0.0 or p_end >= 1.0:
        return 0.0
    boosted = p_end * math.exp(bias)
    p_biased = boosted / (boosted + 1.0 - p_end)
    return max(0.0, (p_biased - p_end) / (1.0 - p_end))


# --- Per-tokenizer and per-brief token tables --------------------------------------------


def token_texts(tokenizer: Any) -> list[str]:
    """Text of every token id on its own (byte-level pieces of a character decode to
    U+FFFD; they count as one character)."""
    size = len(tokenizer)
    return [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(size)]


@dataclass
class TokenRules:
    """Token ids per role, for one tokenizer; ``banned_for`` adds a brief's figures."""

    texts: list[str]
    # Tokens that end the answer: newline pieces and the end-of-turn / EOS ids.
    end_ids: list[int]
    # Tokens made of spaces and one "|": the headline → description separator.
    separator_ids: list[int]
    markup_ids: list[int]
    # Token id → the digit runs in it ("3", "30", "2024").
    digit_runs: dict[int, list[str]] = field(default_factory=dict)
    special_ids: list[int] = field(default_factory=list)
    # Byte-level pieces of a character (they decode to U+FFFD alone): needed to spell
    # CJK and emoji, noise in English ads ("In ��� worth of time").
    fragment_ids: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer: Any, stop_ids: Sequence[int]) -> TokenRules:
        texts = token_texts(tokenizer)
        specials = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        end_ids = sorted({*map(int, stop_ids)} | {i for i, t in enumerate(texts) if "\n" in t})
        separators, markup, digits, fragments = [], [], {}, []
        for i, text in enumerate(texts):
            if i in specials:
                continue
            if "\ufffd" in text:
                fragments.append(i)
            if text.strip() == SEPARATOR:
                separators.append(i)
            elif SEPARATOR in text or any(ch in MARKUP_CHARS for ch in text):
                markup.append(i)
            if runs := _DIGITS.findall(unicodedata.normalize("NFKC", text)):
                digits[i] = runs
        banned_specials = sorted(specials - set(end_ids))
        return cls(texts, end_ids, separators, markup, digits, banned_specials, fragments)

    def banned_for(
        self, allowed_figures: Iterable[str], with_description: bool, latin: bool = True
    ) -> list[int]:
        """Token ids never sampled for this brief: markup, specials other than the end
        of turn, digits that spell no stated figure, the separator when only a headline
        is asked for, and (``latin``: a language written in Latin script) byte pieces."""
        allowed = [a for a in allowed_figures if a]
        banned = set(self.markup_ids) | set(self.special_ids)
        if latin:
            banned.update(self.fragment_ids)
        for token_id, runs in self.digit_runs.items():
            if not all(any(run in figure for figure in allowed) for run in runs):
                banned.add(token_id)
        if not with_description:
            banned.update(self.separator_ids)
        return sorted(banned - set(self.end_ids))

    def field_end_ids(self, view: RowView, shape: AnswerShape) -> list[int]:
        """The tokens that end the field being written."""
        if shape.with_description and not view.in_description:
            return self.separator_ids
        return self.end_ids

    def digit_ids_allowed_after(
        self, text: str, allowed_figures: Iterable[str], candidates: Iterable[int] | None = None
    ) -> set[int]:
        """Digit tokens that keep every number a prefix of a stated figure: after "3"
        in a 30 %-off brief only "0" (then no digit); a token that starts a new number
        must start a stated one."""
        match = re.search(r"(\d+(?:[.,]\d+)*[.,]?)$", text)
        run = match.group(1).replace(",", ".") if match else ""
        figures = [f for f in allowed_figures if f]
        out = set()
        ids = self.digit_runs if candidates is None else candidates
        for token_id in ids:
            runs = self.digit_runs[token_id]
            if len(runs) != 1:
                continue  # "3-4", "1x2": two numbers in one token, never a stated figure
            piece = self.texts[token_id]
            continues = bool(run) and piece[:1].isdigit()
            candidate = (run if continues else "") + runs[0]
            if any(figure.startswith(candidate) for figure in figures):
                out.add(token_id)
        return out


# Words of the task text that small models echo into the ad ("At most 30 characters",
# "at most 30% off"), which the format rule rejects as template residue or which read
# as nonsense: never written.
ECHOED_WORDS = (
    "characters",
    "character",
    "Characters",
    "Character",
    "at most",
    "At most",
    "At Most",
    "at the most",
    "At the most",
)


def phrase_sequences(
    tokenizer: Any, phrases: Iterable[str], min_tokens: int = 2
) -> list[list[int]]:
    """Token sequences of each phrase as the model would write it mid-answer (with and
    without a leading space), to ban writing it verbatim. Phrases of fewer than
    ``min_tokens`` tokens are left out (banning one token bans it everywhere)."""
    sequences: list[list[int]] = []
    for phrase in phrases:
        for text in (f" {phrase}", phrase):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) >= min_tokens and ids not in sequences:
                sequences.append(ids)
    return sequences


# Headlines of this many words or more have frames; a frame that is the product's own
# words ("Cold Brew" of "Cold Brew Daily") is never banned (see below).
MIN_FRAME_HEADLINE_WORDS = 3


def headline_frames(headlines: Iterable[str], brief_text: str = "") -> list[str]:
    """The headlines with their last word, or their first, left out: ``Run Light, Pay``
    and ``Light, Pay Less`` for ``Run Light, Pay Less``.

    Banned with the headlines themselves: told not to copy "Quiet Flights, Every Time",
    a 135M model writes "Quiet Flights, Every Day", "... Every Second", or misspells the
    last word ("Cold Brew at Your Desack"), and the dedupe rejects every one of them
    (``generator.parsing.same_frame``). Headlines of fewer than
    ``MIN_FRAME_HEADLINE_WORDS`` words have none, and frames found in ``brief_text``
    (the product and key message: "noise-cancelling headphones" must stay writable) are
    left out. Pure: text in, text out."""
    brief = " ".join(brief_text.lower().split())
    frames: list[str] = []
    for headline in headlines:
        words = headline.split()
        if len(words) < MIN_FRAME_HEADLINE_WORDS:
            continue
        for frame in (words[:-1], words[1:]):
            text = " ".join(frame)
            if text.lower() not in brief and text not in frames:
                frames.append(text)
    return frames


def _case_variants(text: str) -> list[str]:
    """As written; in Title Case; and with every word from the k-th on in lower case
    (k = 0 .. n-1): token sequences are case-sensitive, and the model gets round a ban
    by writing "Quiet Flights, every day" for "Quiet Flights, Every Time"."""
    words = text.split(" ")
    forms = [text, text.title()]
    forms += [" ".join([*words[:k], *(w.lower() for w in words[k:])]) for k in range(len(words))]
    return list(dict.fromkeys(forms))


def copy_sequences(
    tokenizer: Any, headlines: Iterable[str], brief_text: str = ""
) -> list[list[int]]:
    """Banned sequences for headlines the model must not copy or change by one end word:
    each headline as written, and its frames (``headline_frames``) in every case form."""
    headlines = list(dict.fromkeys(headlines))
    frames = [form for f in headline_frames(headlines, brief_text) for form in _case_variants(f)]
    return phrase_sequences(tokenizer, dict.fromkeys([*headlines, *frames]), min_tokens=2)


def claim_sequences(tokenizer: Any, phrases: Iterable[str]) -> list[list[int]]:
    """Banned sequences for claims the brief does not make (``ClaimsRule.banned_phrases``),
    in lower, Title and Sentence case, single tokens included ("Unbeatable")."""
    forms = (f for p in phrases for f in (p, p.title(), p[:1].upper() + p[1:]))
    return phrase_sequences(tokenizer, dict.fromkeys(forms), min_tokens=1)


def echo_ids(tokenizer: Any) -> list[int]:
    """Single tokens of ``ECHOED_WORDS`` (added to the banned tokens)."""
    sequences = phrase_sequences(tokenizer, ECHOED_WORDS, 1)
    return sorted({seq[0] for seq in sequences if len(seq) == 1})


def echo_sequences(tokenizer: Any) -> list[list[int]]:
    """Multi-token spellings of ``ECHOED_WORDS`` (added to the banned sequences)."""
    return phrase_sequences(tokenizer, ECHOED_WORDS, 2)
