"""Filters for generated variants (pure): every rejection names its rule and says why.

Rules, cheapest first (``VariantFilter`` reports the first one a variant fails):

* ``format``: a headline with letters in it; no markup, template or instruction residue
  (``<``, ``{``, ``[``, ``|``, field labels, "at most 30 characters", chat tokens), no
  invisible characters (zero-width spaces, soft hyphens, bidi controls) and no control
  characters (a backspace, an escape) — whatever a brief smuggled in, the answer must
  still be plain ad copy;
* ``length``: headline ``min_headline_chars``..``max_headline_chars`` (30), description
  at most ``max_description_chars`` (90), as for responsive search ads;
* ``pii``: email addresses and phone numbers, also written out ("name at gmail dot com",
  "hello[at]shop[dot]com");
* ``url``: links and bare domains whose host is not on ``allowed_domains``, link
  shorteners (bit.ly, goo.gl, t.co, ...) and disguised links ("example . com",
  "example[.]com", "shop dot com", "www example com", "h t t p s");
* ``brand_safety``: blocklist entries as whole words, also disguised: leetspeak
  (``sh1t``, ``$hit``, ``a$$``), masks (``f*ck``), spaced or dotted letters ("f u c k"),
  stretched letters ("fuuuck"), invisible characters and look-alike letters from other
  scripts (a Cyrillic 'а'), without the Scunthorpe problem (class, Essex, cocktail);
* ``forbidden_terms`` / ``required_terms``: the brief's terms, whole words, case-insensitive
  (forbidden ones also when disguised); every required term must appear in the headline
  or the description;
* ``unsupported_claim``: see ``ClaimsRule`` — figures, offers, health claims and
  superlatives the brief does not make;
* ``language``: see ``LanguageRule``;
* ``relevance`` (optional, injected): see ``adloop.generator.relevance``.

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
from typing import Any, Protocol, runtime_checkable

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
# Whole words only, so "class", "Essex", "cocktail" and "assessment" pass; minced
# spellings a mask or leetspeak cannot reach ("phuck", "fck") are listed as such.
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "fuck*", "motherfuck*", "mothafuck*", "muthafuck*", "fck*", "fuk", "fukk*", "fuking",
    "phuck*", "phuk*", "fack", "facking", "feck", "fecking",
    "shit*", "bullshit*", "horseshit*", "apeshit", "batshit",
    "bitch*", "bastard*", "ass", "asses", "arse", "asshole*", "arsehole*", "dumbass*",
    "jackass*", "badass*", "cunt*", "twat*", "dickhead*", "douchebag*", "piss*", "slut*",
    "whore*", "wank*", "bollocks", "goddamn*", "dammit", "crap", "damn", "wtf",
    "porn*", "xxx", "nude*", "naked", "escort*", "sex", "blowjob*", "dildo*",
    "kill", "killing", "murder*", "gun", "guns", "shooting", "shooter*", "bomb*",
    "terror*", "suicide", "massacre", "weapon*",
    "nazi*", "racist*", "retard", "retarded", "faggot*",
    "cocaine", "heroin", "meth", "weed", "marijuana",
    # The commonest in the other languages briefs come in.
    "scheiss*", "merde", "putain", "mierda", "cazzo", "kurwa",
    "guaranteed", "guarantee", "miracle*", "risk-free", "no risk", "get rich",
    "free money", "lose weight fast", "click here",
)  # fmt: skip

# Words a blocklist pattern reaches that are not what it is after (the Scunthorpe
# problem): stretched letters turn "shiitake" into a form of "shit".
SAFE_WORDS: frozenset[str] = frozenset({"shiitake", "shitake", "shittah", "shittim"})


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


@runtime_checkable
class BatchRule(Protocol):
    """A rule that is cheaper on many variants at once (a model): ``VariantFilter.apply``
    hands it every variant the earlier rules let through in one call."""

    name: str

    def check(self, variant: Variant) -> str | None: ...

    def check_many(self, variants: Sequence[Variant]) -> list[str | None]: ...


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


# --- Undoing disguises ------------------------------------------------------------------
#
# Rules that look for words (blocklist, links, emails, claims) match on a *view* of the
# text: NFKC, case-folded, without invisible characters or combining marks, with letters
# from other scripts that look Latin turned Latin inside Latin words. A view remembers
# where each of its characters came from, so a reason quotes what the variant wrote.


@dataclass(frozen=True, slots=True)
class _View:
    text: str
    origin: tuple[int, ...]  # for each character of text, its index in raw
    raw: str

    def raw_span(self, start: int, end: int) -> str:
        if start >= end or not self.origin:
            return ""
        return self.raw[self.origin[start] : self.origin[end - 1] + 1]


@functools.cache
def _homoglyphs() -> dict[str, str]:
    """Non-ASCII letters that look like a Latin letter → that letter (Unicode's
    confusables, from the confusable_homoglyphs package's bundled copy: no network)."""
    from confusable_homoglyphs import confusables

    table: dict[str, str] = {}
    for char, entries in confusables.confusables_data.items():
        if len(char) != 1 or char.isascii() or not char.isalpha():
            continue
        for entry in entries:
            latin = _latin_letter(entry["c"], entry["n"])
            if latin is not None:
                table[char] = latin
                break
    return table


_LATIN_NAME = re.compile(r"^LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL )?([A-Z])$")


def _latin_letter(glyph: str, name: str) -> str | None:
    """'a' for 'a', and for a Latin look-alike such as 'ᴛ' (LATIN LETTER SMALL CAPITAL T)."""
    if len(glyph) == 1 and glyph.isascii() and glyph.isalpha():
        return glyph.casefold()
    match = _LATIN_NAME.match(name)
    return match.group(1).casefold() if match else None


_WORD = regex.compile(r"\w+")


def _unmask_word(match: regex.Match[str]) -> str:
    word = match.group(0)
    table = _homoglyphs()
    # Only words that already hold a Latin letter: "fаck" with a Cyrillic 'а' is a
    # disguise, a Russian word written in Cyrillic is not (and must stay Cyrillic).
    if any("a" <= ch <= "z" for ch in word) and any(ch in table for ch in word):
        return "".join(table.get(ch, ch) for ch in word)
    return word


@functools.lru_cache(maxsize=2048)  # each rule of a variant asks for the same views
def _view(raw: str) -> _View:
    chars: list[str] = []
    origin: list[int] = []
    for index, ch in enumerate(raw):
        for composed in unicodedata.normalize("NFKC", ch):
            if unicodedata.category(composed) == "Cf":  # zero-width, soft hyphen, bidi
                continue
            for base in unicodedata.normalize("NFKD", composed):
                if unicodedata.combining(base):  # accents and overlays: f̲u̲c̲k̲
                    continue
                for folded in base.casefold():
                    chars.append(folded)
                    origin.append(index)
    text = _WORD.sub(_unmask_word, "".join(chars)).translate(_DASHES)  # same length
    return _View(text, tuple(origin), raw)


# Dashes of every width read as '-' (a mask in "sh\u2011t", a separator in "f‒u‒c‒k").
_DASHES = str.maketrans(
    dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63", "-")
)


# A letter, digit or leetspeak symbol; runs of three or more single ones, separated by
# spaces, dots, dashes or underscores, are read as one word ("f u c k", "h-t-t-p-s").
_GLYPH = r"[\p{L}\p{N}$@!*|+]"
_SPACED_RUN = regex.compile(rf"(?<!{_GLYPH}){_GLYPH}(?:[\s.\-_·]{{1,3}}{_GLYPH}){{2,}}(?!{_GLYPH})")
# The same with one separator throughout, so "a b.i.t.c.h" reads "a bitch", not "abitch".
_EVENLY_SPACED_RUN = regex.compile(
    rf"(?<!{_GLYPH}){_GLYPH}(?P<gap>[\s.\-_·]{{1,3}}){_GLYPH}(?:(?P=gap){_GLYPH})+(?!{_GLYPH})"
)
_SEPARATORS = regex.compile(r"[\s.\-_·]+")


def _despaced(
    view: _View, keep_dots: bool = False, evenly: bool = False, article: bool = False
) -> _View:
    """The view with spaced-out runs closed up; with ``keep_dots`` a spaced dot stays a
    dot, so "e x a m p l e . c o m" reads "example.com"; with ``evenly`` only runs with
    one separator throughout close up; with ``article`` a run's leading "a" or "i" stays
    a word ("like a b a d a s s" reads "like a badass")."""
    chars: list[str] = []
    origin: list[int] = []
    position = 0
    for run in (_EVENLY_SPACED_RUN if evenly else _SPACED_RUN).finditer(view.text):
        run_start = run.start()
        if article and (leading := regex.match(r"[ai]\s+", view.text[run_start : run.end()])):
            run_start += leading.end()
        chars.extend(view.text[position:run_start])
        origin.extend(view.origin[position:run_start])
        cursor = run_start
        for separator in _SEPARATORS.finditer(view.text, run_start, run.end()):
            chars.extend(view.text[cursor : separator.start()])
            origin.extend(view.origin[cursor : separator.start()])
            gap = separator.group(0)
            if keep_dots and "." in gap and any(ch.isspace() for ch in gap):
                dot = separator.start() + gap.index(".")
                chars.append(".")
                origin.append(view.origin[dot])
            cursor = separator.end()
        chars.extend(view.text[cursor : run.end()])
        origin.extend(view.origin[cursor : run.end()])
        position = run.end()
    chars.extend(view.text[position:])
    origin.extend(view.origin[position:])
    return _View("".join(chars), tuple(origin), view.raw)


# Characters that stand in for a dot in a disguised host name ("shop。com", "shop•com").
_DOT_LOOKALIKES = str.maketrans(dict.fromkeys("。｡․‧•·∙⋅・", "."))


@functools.lru_cache(maxsize=2048)
def _link_views(raw: str) -> tuple[_View, _View]:
    view = _view(raw)
    dotted = _View(view.text.translate(_DOT_LOOKALIKES), view.origin, raw)
    return dotted, _despaced(dotted, keep_dots=True)


# --- Rules ------------------------------------------------------------------------------


_MARKUP = re.compile(r"[<>{}\[\]|\\]|<\|im_")
_RESIDUE = re.compile(
    r"\b(?:headline|description|title)\s*:|\bat most \d+ char|\bcharacters? (?:long|max)"
    r"|\bad_to_move_away_from\b|\bads_that_work\b|\bmust_mention\b|\bdata block\b"
    r"|\bkey_message\b",
    re.IGNORECASE,
)
# Characters nobody sees: ad copy has no use for them, a disguise does ("f\u200buck",
# "bit\u200b.ly"). Zero-width (non-)joiners are kept where scripts and emoji need them.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u115f\u1160\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u2069\u3164\ufeff\uffa0]|(?<=[A-Za-z0-9])[\u200c\u200d](?=[A-Za-z0-9])"
)

# Control characters (C0 but tab, DEL, C1): a model sampling from its whole vocabulary
# wrote "Run\x08" (a backspace), which rendered as "Run" and passed every other rule.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


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
            if match := _INVISIBLE.search(text):
                return f"{label} contains an invisible character U+{ord(match.group(0)):04X}"
            if match := _CONTROL.search(text):
                return f"{label} contains a control character U+{ord(match.group(0)):04X}"
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

# Common generic and country TLDs: a bare "shop.io" is a link, "Node.js" is not.
_TLDS = (
    "com", "net", "org", "info", "biz", "io", "co", "app", "dev", "ai", "me", "shop", "store",
    "online", "site", "xyz", "tech", "club", "blog", "link", "live", "page", "eu", "us", "uk",
    "de", "fr", "es", "it", "nl", "be", "ch", "at", "se", "no", "dk", "fi", "pl", "cz", "pt",
    "ie", "ca", "au", "nz", "in", "jp", "cn", "ru", "br", "mx", "ar", "za", "tv",
    # Those link shorteners and throwaway sites use.
    "ly", "gl", "gd", "cc", "gy", "to", "ee", "ws", "gg", "fm", "im", "sh", "st", "su", "tk",
    "ml", "ga", "cf", "gq", "mobi", "pro", "top", "vip", "icu", "cloud", "click", "gr", "ro",
    "hu", "sk", "hr", "kr", "sg", "hk", "tw", "ink",
    # Newer generic ones a brand picks for its name.
    "energy", "city", "wine", "solar", "london", "life", "world", "today", "email", "studio",
    "bike", "fitness", "coffee", "garden", "holiday", "travel", "tours", "money", "finance",
    "health", "care", "clinic", "dental", "beauty", "fashion", "shoes", "clothing", "pet",
    "pets", "dog", "vet", "green", "eco", "earth", "photo", "art", "design", "agency", "media",
    "news", "social", "network", "digital", "systems", "software", "books", "kitchen", "shopping",
    "deals", "sale", "codes", "bargains", "direct", "zone", "space", "website", "host", "press",
)  # fmt: skip
# TLDs that are not also short English words ("in", "it", "me", "at", "to", ...): only
# these count behind a disguised dot, so "dress . In linen" is not a link.
_PLAIN_TLDS = (
    "com", "net", "org", "io", "co", "uk", "info", "biz", "app", "dev", "shop", "store",
    "online", "site", "xyz", "tech", "ly", "gl", "gd", "cc", "gy", "ru", "de", "fr", "nl",
    "eu", "ca", "au", "mobi", "gr", "ch", "se", "dk", "pl", "cz", "pt", "ie", "nz", "br",
    "mx", "za", "cn", "jp",
)  # fmt: skip
_URL = re.compile(
    r"(?:\bhttps?://|\bwww\.)[^\s|]+"
    r"|\b(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)+(?:" + "|".join(_TLDS) + r")\b(?:/\S*)?",
    re.IGNORECASE,
)
_HOST = re.compile(r"^(?:https?://)?([^/:?#\s]+)", re.IGNORECASE)

# Dots written so that a plain link pattern misses them: "shop . com", "shop .com",
# "shop[.]com", "shop(dot)com", "shop dot com", "shop -dot- com", "shop d0t com".
_BRACKET_DOT = r"\s*[(\[{<]\s*(?:\.|dot)\s*[)\]}>]\s*"
_WORD_DOT = r"(?:\s+|\s*[_-]+\s*)d[o0]t(?:\s+|\s*[_-]+\s*)"
_DISGUISED_DOT = rf"(?:\s+\.\s*|{_BRACKET_DOT}|{_WORD_DOT})"
_ANY_DOT = rf"(?:\s*\.\s*|{_BRACKET_DOT}|{_WORD_DOT})"
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_DISGUISED_HOST = regex.compile(
    rf"(?<![\w.-]){_LABEL}(?:{_DISGUISED_DOT}{_LABEL})*"
    rf"(?:{_DISGUISED_DOT}(?:{'|'.join(_PLAIN_TLDS)})|\.\s+(?:com|net|org)|\s*,\s*(?:com|net|org)"
    # A bracketed dot is a disguise whatever follows: "stride(.)city", "vino[dot]wine".
    rf"|{_BRACKET_DOT}[a-z]{{2,12}})(?![\w-])"
)
_DOT_FORMS = regex.compile(rf"{_BRACKET_DOT}|{_WORD_DOT}|\s*[.,]\s*")
# Pieces of a link that ad copy has no other use for: "www", "http", "hxxps".
_LINK_FRAGMENT = regex.compile(r"\bwww\b|\bh(?:tt|xx)ps?\b")

# Link shorteners hide where a link leads; the usual ones, plain or with a disguised dot.
URL_SHORTENERS: tuple[str, ...] = (
    "bit.ly", "bitly.com", "bit.do", "goo.gl", "t.co", "tinyurl.com", "tiny.cc", "tiny.one",
    "ow.ly", "is.gd", "v.gd", "buff.ly", "rebrand.ly", "cutt.ly", "shorturl.at", "rb.gy",
    "bl.ink", "lnkd.in", "t.ly", "s.id", "amzn.to", "amzn.eu", "youtu.be", "fb.me", "wp.me",
    "db.tt", "ift.tt", "dlvr.it", "trib.al", "shorte.st", "adf.ly", "linktr.ee", "lnk.to",
    "soo.gd", "clck.ru", "qr.net", "x.co", "po.st", "tr.im", "snip.ly", "short.io", "t2m.io",
    "mcaf.ee", "su.pr", "spoti.fi", "apple.co", "git.io", "urlz.fr", "shorturl.com",
)  # fmt: skip
_SHORTENER = regex.compile(
    r"(?<![\w.-])(?:"
    + "|".join(
        _ANY_DOT.join(re.escape(part) for part in host.split("."))
        for host in sorted(URL_SHORTENERS, key=len, reverse=True)
    )
    + r")(?![\w-])(?:\s*(?:/|\s+slash\s+)[^\s,;!?]*)?"
)

# Mail providers: "anna at gmail" is an address, "shop at trailrun" is not.
_MAIL_PROVIDERS = (
    "gmail|googlemail|yahoo|hotmail|outlook|msn|aol|icloud|protonmail|proton|gmx|yandex|zoho"
    "|fastmail|tutanota|mail"
)
# Words that put a site after "at": "shop at", "book at", "available at".
_AT_A_SITE = (
    "shop|visit|find|order|book|buy|available|online|now|more|us|join|sign|get|try|it|them"
    "|out|up|today|here|apply|register|download|see|learn|read|watch|listen|stay|sold|live"
)
_BRACKET_AT = r"\s*[(\[{<]\s*(?:at|@)\s*[)\]}>]\s*"
_DISGUISED_EMAIL = regex.compile(
    rf"[\w.+\-]+{_BRACKET_AT}[\w\-]+"  # name(at)host, name [at] host
    rf"|[\w.+\-]+\s*@\s*[\w\-]+(?:{_ANY_DOT}[\w\-]+)*{_ANY_DOT}(?:{'|'.join(_PLAIN_TLDS)})\b"
    rf"|[\w.+\-]+\s*@\s*(?:{_MAIL_PROVIDERS})\b"  # name@gmail
    rf"|[\w.+\-]+\s+at\s+(?:{_MAIL_PROVIDERS.removesuffix('|mail')})\b"  # anna at gmail dot com
    # "quotes at sunroof dot com"; "shop at sunroof dot com" is a link, not an address.
    rf"|(?<![\w.+\-])(?!(?:{_AT_A_SITE})\s)[\w.+\-]+\s+at\s+[\w\-]+"
    rf"(?:{_DISGUISED_DOT}[\w\-]+)*{_DISGUISED_DOT}(?:{'|'.join(_PLAIN_TLDS)})\b"
)


@dataclass(frozen=True, slots=True)
class PiiRule:
    name: str = "pii"

    def check(self, variant: Variant) -> str | None:
        raw = f"{variant.headline}\n{variant.description}"
        views = _link_views(raw)
        for view in views:
            if match := _EMAIL.search(view.text):
                return f"contains an email address {view.raw_span(*match.span())!r}"
        for view in views:
            if match := _DISGUISED_EMAIL.search(view.text):
                return f"contains a disguised email address {view.raw_span(*match.span())!r}"
        for match in _PHONE.finditer(views[0].text):
            if not _YEAR_RANGE.fullmatch(match.group(0).strip()):  # "2024-2025"
                return f"contains a phone number {views[0].raw_span(*match.span()).strip()!r}"
        return None


def _on_allow_list(host: str, allowed_domains: Sequence[str]) -> bool:
    host = host.lower().removeprefix("www.")
    allowed = (d.lower().removeprefix("www.") for d in allowed_domains)
    return any(host == d or host.endswith("." + d) for d in allowed)


@dataclass(frozen=True, slots=True)
class UrlRule:
    allowed_domains: tuple[str, ...] = ()
    name: str = "url"

    def check(self, variant: Variant) -> str | None:
        views = _link_views(f"{variant.headline}\n{variant.description}")
        for view in views:
            if match := _SHORTENER.search(view.text):
                host = _DOT_FORMS.sub(".", match.group(0)).split("/")[0].split(" ")[0]
                if not _on_allow_list(host, self.allowed_domains):
                    link = view.raw_span(*match.span()).strip()
                    return f"contains a link shortener {link!r}, which hides where it leads"
        for view in views:
            text = view.text
            for match in _URL.finditer(view.text):
                link = view.raw_span(*match.span()).rstrip(".,;:!?)")
                host_match = _HOST.match(match.group(0).rstrip(".,;:!?)"))
                host = host_match.group(1) if host_match else match.group(0)
                if not _on_allow_list(host, self.allowed_domains):
                    return f"contains a link {link!r} to a domain not on the allow list"
                # An allowed link's "www" and "https" are not pieces of another one.
                start, end = match.span()
                text = text[:start] + " " * (end - start) + text[end:]
            for match in _DISGUISED_HOST.finditer(text):
                host = _DOT_FORMS.sub(".", match.group(0))
                if not _on_allow_list(host, self.allowed_domains):
                    link = view.raw_span(*match.span())
                    return f"contains a disguised link {link!r} (reads {host!r})"
            if match := _LINK_FRAGMENT.search(text):
                return f"contains part of a link {view.raw_span(*match.span())!r}"
        return None


# Leetspeak: what stands in for each letter ("sh1t", "$hit", "a$$", "fvck"), and the
# masks that may replace any letter but the first ("f*ck", "f**k", "sh*t").
_LEET: dict[str, str] = {
    "a": "4@", "b": "8", "c": "(<¢", "e": "3€", "g": "9", "i": "1!|", "l": "1|", "o": "0",
    "s": "5$", "t": "7+", "u": "v",
}  # fmt: skip
_MASKS = "*#%-"  # '-' too: "f-ck", "sh-t"


@functools.lru_cache(maxsize=4096)
def _disguised_term_pattern(term: str) -> regex.Pattern[str] | None:
    """A term as a whole word, also in leetspeak, masked or with letters repeated
    ("fuuuck"); a trailing '*' allows any word tail, as in ``_term_pattern``."""
    folded = _view(term.strip()).text
    prefix = folded.endswith("*")
    words = folded.rstrip("*").split()
    if not words:
        return None
    parts = []
    for word in words:
        pieces = []
        for index, ch in enumerate(word):
            if ch.isalpha():
                variants = ch + _LEET.get(ch, "") + (_MASKS if index else "")
                pieces.append("[" + "".join(regex.escape(v) for v in variants) + "]+")
            else:
                pieces.append(regex.escape(ch))
        parts.append("".join(pieces))
    body = r"[\s_-]+".join(parts)
    tail = r"[\p{L}\p{N}$@!*#%]*" if prefix else ""
    return regex.compile(rf"(?<![\p{{L}}\p{{N}}$@]){body}{tail}(?![\p{{L}}\p{{N}}])")


def _plausible(span: str, term: str) -> bool:
    """Is a disguised match a word at all? "a55" (a model number) and "a**" are not."""
    letters = sum(ch.isalpha() for ch in span)
    term_letters = sum(ch.isalpha() for ch in term)
    if any(ch.isdigit() for ch in span) and letters < 2:
        return False
    if any(ch in _MASKS for ch in span) and letters < 2:
        return letters == 1 and term_letters >= 4  # "f***"
    return span not in SAFE_WORDS


@functools.lru_cache(maxsize=64)
def _any_term_pattern(terms: tuple[str, ...]) -> regex.Pattern[str] | None:
    """All of ``terms`` in one pattern: most text matches none, and one search says so."""
    patterns = [p.pattern for t in terms if (p := _disguised_term_pattern(t)) is not None]
    return regex.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _find_term(terms: tuple[str, ...], raw: str) -> tuple[str, str, bool] | None:
    """(term, what the text says, disguised?) for the first of ``terms`` found."""
    view = _view(raw)
    views = (
        view,
        _despaced(view, evenly=True),
        _despaced(view, evenly=True, article=True),
        _despaced(view),
    )
    screen = _any_term_pattern(terms)
    if screen is None or not any(screen.search(v.text) for v in views):
        return None
    for term in terms:
        pattern = _disguised_term_pattern(term)
        if pattern is None:
            continue
        for candidate in views:
            for match in pattern.finditer(candidate.text):
                if not _plausible(match.group(0), term):
                    continue
                written = candidate.raw_span(*match.span())
                plain = fold(written) == match.group(0) and regex.fullmatch(r"[\p{L}\s-]+", written)
                return term, written, not plain
    return None


@dataclass(frozen=True)
class TermsRule:
    """Whole-word matches of ``terms``: ``forbid`` rejects any (also disguised: leetspeak,
    masks, spaced letters, look-alike letters), otherwise all are required."""

    name: str
    terms: tuple[str, ...]
    forbid: bool
    _ordered: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _required: tuple[tuple[str, re.Pattern[str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Longest first so "no risk" wins over a shorter overlapping entry in the reason.
        ordered = tuple(sorted(self.terms, key=lambda t: len(t.rstrip("*")), reverse=True))
        object.__setattr__(self, "_ordered", ordered)
        required = tuple(
            (term, pattern) for term in self.terms if (pattern := _term_pattern([term])) is not None
        )
        object.__setattr__(self, "_required", required)

    def check(self, variant: Variant) -> str | None:
        if self.forbid:
            found = _find_term(self._ordered, f"{variant.headline}\n{variant.description}")
            if found is None:
                return None
            term, written, disguised = found
            kind = "a blocked term" if self.name == "brand_safety" else "a forbidden term"
            if disguised:
                return f"contains {kind} {term.rstrip('*')!r} disguised as {written!r}"
            return f"contains {kind} {fold(written)!r}"
        text = _fields(variant)
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


# Figures written in words count as figures where they make an offer or a rating:
# "ninety percent off", "two for one", "nine out of ten", "half price". Elsewhere
# ("one tap", "all in one", "dinner for two") a number word is just a word.
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_WORD_VALUES = {w: i for i, w in enumerate(_ONES)} | {w: 10 * (i + 2) for i, w in enumerate(_TENS)}
_NUMBER_WORD = (
    rf"(?:(?:a|one)\s+hundred|(?:{'|'.join(_TENS)})(?:[\s-]+(?:{'|'.join(_ONES[1:10])}))?"
    rf"|{'|'.join(sorted(_ONES, key=len, reverse=True))})"
)
_FIGURE_UNIT = (
    r"(?:\s*-?\s*(?:percent|per\s*cent|pct|%)|\s+off\b|\s+(?:dollars?|bucks|pounds|quid|euros?"
    r"|cents?|pence)\b|\s+times\b|\s*x\b|[\s-]+stars?\b|[\s-]+years?[\s-]+warranty"
    r"|\s+(?:days?|weeks?|months?|years?)\s+free\b)"
)
_SPELLED_FIGURE = regex.compile(
    rf"\b(?P<a>{_NUMBER_WORD})\s+(?:for|out\s+of)\s+(?P<b>{_NUMBER_WORD})\b"
    rf"|\b(?P<c>{_NUMBER_WORD})(?={_FIGURE_UNIT})"
    r"|\b(?P<half>half)(?:[\s-]+(?:price|off)|\s+the\s+(?:price|cost))\b|\bby\s+(?P<by>half)\b"
)


def _word_value(words: str) -> str:
    parts = regex.split(r"[\s-]+", words)
    if parts[-1] == "hundred":
        return "100"
    return str(sum(_WORD_VALUES[p] for p in parts))


def _figures(text: str) -> dict[str, str]:
    """Every figure in ``text`` → how it is written (digits, or the words)."""
    figures = {n: n for n in _numbers(text)}
    for match in _SPELLED_FIGURE.finditer(fold(text)):
        if match.group("half") or match.group("by"):
            figures.setdefault("50", match.group(0))
            continue
        for group in ("a", "b", "c"):
            if words := match.group(group):
                figures.setdefault(_word_value(words), match.group(0))
    return figures


@dataclass(frozen=True, slots=True)
class _Claim:
    kind: str  # "offer", "health claim", "superlative claim"
    key: str  # a brief that makes a claim with this key allows every claim with it
    pattern: regex.Pattern[str]


def _claim(kind: str, key: str, *alternatives: str) -> _Claim:
    return _Claim(kind, key, regex.compile("|".join(f"(?:{a})" for a in alternatives)))


_WEEKDAY = r"(?:mon|tues|wednes|thurs|fri|satur|sun)day"
# "free" that is not a price: sugar free, hands free, feel free, free up your evenings,
# free weights, free of parabens; hyphenated compounds (sugar-free, free-flowing) never.
_FREE_BEFORE_NOT_PRICE = (
    "sugar|gluten|dairy|lactose|nut|peanut|soy|egg|grain|wheat|fat|caffeine|alcohol|fragrance"
    "|scent|perfume|paraben|parabens|sulfate|sulphate|silicone|bpa|pfas|phthalate|latex"
    "|plastic|cruelty|hands|wire|wireless|cord|cable|tangle|hassle|stress|worry|care|fuss"
    "|mess|clutter|drip|spill|smudge|streak|lint|wrinkle|odor|odour|smoke|chemical|toxin"
    "|pesticide|gmo|oil|salt|carb|meat|cage|guilt|carbon|emission|ad|ads|distraction"
    "|scratch|rust|maintenance|tool|paper|waste|allergen|additive|preservative|dye|glare"
    "|feel|set|break|breaking|run|running|roam|roaming|breathe|walk|wander|ride|be|stay"
    "|born|live|living|you're|you are|we're|break it"
)
_FREE_AFTER_NOT_PRICE = (
    "up|yourself|yourselves|your|you|them|time|spirit|spirits|will|weights?|range|flow"
    "|flowing|kick|kicks|throw|throws|fall|hand|speech|world|style|form|standing|agent"
    "|market|rein|radicals?|thinker|roaming|movement|motion|float|floating"
)
_FREE_NOT_AN_ITEM = (
    "and|for|with|from|today|now|forever|tonight|this|every|when|the|your|you|all|first"
    "|our|any|its|their|until|while|through|just|only|too|ever"
)
_FREE_TO_PRICE = (
    "join|download|use|try|install|play|sign|enter|register|start|access|watch|stream|read"
    "|listen|call|cancel|attend|apply|keep|get"
)

_OFFERS: tuple[_Claim, ...] = (
    _claim(
        "offer",
        "multibuy",
        r"\bbogof?\b|\bmulti[\s-]?buy\b|\bbundle\s+(?:and|&)\s+save\b|\bbuy\s+more,?\s+save\s+more",
        r"\bbuy\s+(?:one|1|two|2|a)\s*,?\s+get\s+(?:one|1|two|2|a|another|(?:a|the)\s+second)"
        r"(?:\s+(?:free|for\s+free|half[\s-]price|half\s+off|at\s+half\s+price))?",
        r"\b(?:two|2|three|3|four|4)\s*(?:for|4)\s*(?:one|1|two|2|three|3)\b",
        r"\bsecond\s+(?:one\s+|pair\s+|item\s+|box\s+|bag\s+)?(?:free|half[\s-]price|half\s+off)",
    ),
    _claim(
        "offer",
        "free shipping",
        r"\bfree[\s-]+(?:standard\s+|express\s+|next[\s-]day\s+|same[\s-]day\s+|uk\s+|us\s+"
        r"|worldwide\s+|home\s+)?(?:shipping|delivery|deliveries|postage|p\s*&\s*p)\b",
        r"\b(?:ships?|shipped|shipping|deliver(?:s|ed|y)?|posted)\s+(?:[\w']+\s+){0,4}?"
        r"(?:for\s+)?free\b",
        r"\b(?:shipping|delivery|postage)\s+(?:is\s+|'s\s+|is\s+always\s+)?(?:free|on\s+us)\b",
        r"\b(?:shipping|delivery|postage)[\s-]free\b",
    ),
    _claim(
        "offer",
        "free returns",
        r"\bfree[\s-]+(?:returns?|exchanges?|collection)\b",
        r"\b(?:returns?|exchanges?)\s+(?:are\s+|is\s+)?(?:free|on\s+us)\b",
    ),
    _claim(
        "offer",
        "free trial",
        r"\bfree[\s-]+(?:(?:\d+|\w+)[\s-]+(?:day|week|month)s?[\s-]+)?trials?\b"
        r"|\btrials?\s+(?:is\s+)?free\b",
    ),
    _claim(
        "offer",
        "financing",
        r"\binterest[\s-]free\b|\b(?:no|zero|0\s*%)\s+(?:interest|apr)\b"
        r"|\b0\s*%\s*(?:apr|interest|financ\w*)\b|\bpay\s+later\b"
        r"|\bpay\s+in\s+(?:\d+|three|four|six|twelve|instal\w*)\b"
        r"|\bfinanc(?:e|ing)\s+(?:available|options?|from)\b|\bno\s+credit\s+check"
        r"|\bno\s+down\s+payment|\blow\s+monthly\s+payments?\b|\bspread\s+the\s+cost\b"
        r"|\b(?:zero|no|nothing)\s+(?:to\s+pay\s+)?up[\s-]?front\b",
    ),
    _claim(
        "offer",
        "low price",
        r"\bcheap(?:er|est|ly)?\b|\bnever\s+pay\s+more\b|\bbeat\s+any\s+price\b"
        r"|\b(?:lowest|low|best|unbeatable|rock[\s-]bottom|bargain)\s+prices?\b"
        r"|\bprice\s+match\w*|\bfor\s+less\s+than\b",
        r"\blowest\s+(?:rates?|fares?|fees?|premiums?|costs?)\b|\b(?:a|at\s+a)\s+steal\b"
        r"|\bfor\s+pennies\b|\bat\s+cost(?:\s+price)?\b|\bbest\s+value\b"
        r"|\b(?:a|just\s+a|only\s+a)\s+(?:fiver|tenner)\b"
        r"|\bpriced\s+to\s+(?:go|sell|clear|move)\b|\bhalf\s+the\s+(?:price|cost)\b",
    ),
    _claim(
        "offer",
        "discount",
        r"\bdiscount\w*|\bclearance\b|\bmark(?:ed)?[\s-]?downs?\b|\breduced\s+(?:prices?|to)\b"
        r"|\bprice\s+(?:drops?|cuts?|slash\w*)|\bslashed\b|\bbargains?\b|\bcoupons?\b"
        r"|\bvouchers?\b|\bcash\s?back\b|\brebates?\b|\bpromo(?:tion(?:al)?)?\s+(?:codes?"
        r"|prices?|offers?)\b|\bpromo\b|\bsitewide\b|\bdoorbusters?\b|\bblowout\b"
        r"|\beverything\s+must\s+go\b|\bflash\s+sale\b|\bblack\s+friday\b|\bcyber\s+monday\b"
        r"|\bclear[\s-]?outs?\b|\bon\s+promotion\b|\bpromotional\b|\bsubscribe\s+(?:and|&)\s+save\b",
        r"\bhalf[\s-]+(?:price|off)\b|(?:\d|%|percent|per\s?cent)\s*off\b"
        r"|\boff\s+(?:everything|all\s+\w+|sitewide|your\s+(?:first|next|order))\b",
        r"\bsave\s+(?:big|more|money|cash|up\s+to|on|now|today|extra|hundreds|thousands"
        r"|a\s+bundle|a\s+lot|[$£€]|\d)",
        r"\b(?:big|huge|massive|great|extra|instant|exclusive|seasonal)\s+savings\b"
        r"|\bspecial\s+(?:offers?|prices?|pricing|deals?)\b|\bintroductory\s+(?:prices?|offers?)\b",
        # "for sale" lists a thing, "point of sale" is a till.
        r"(?<!\bpoint[\s-]of[\s-])(?<!\bfor\s)\bsale\b",
        # Deals a CRM closes and tracks, "no big deal", "deal with it" are not offers.
        r"(?<!\b(?:close|closes|closing|closed|win|wins|winning|won|track|tracks|tracking"
        r"|manage|managing|log|logging|contacts,?|real|big|done)\s+(?:more\s+|new\s+|your\s+"
        r"|the\s+|every\s+|all\s+)?)\bdeals?\b(?!\s+(?:with|flow|breakers?|pipeline|stages?))",
    ),
    _claim(
        "offer",
        "guarantee",
        r"\bguarantee[ds]?\b|\bguaranteeing\b|\brisk[\s-]free\b|\b(?:no|zero)[\s-]risk\b",
    ),
    _claim(
        "offer",
        "money back",
        r"\bmoney[\s-]?back\b|\bfull\s+refunds?\b|\brefund(?:s|ed|able)?\b"
        r"|\bno\s+questions\s+asked\b",
    ),
    _claim(
        "offer",
        "free",
        r"\bfree[\s-]to[\s-](?:play|use|download|join|enter|try|install)\b",
        rf"(?<![\w-])(?<!\b(?:{_FREE_BEFORE_NOT_PRICE})\s+)free(?![\w-])"
        rf"(?!\s+(?:{_FREE_AFTER_NOT_PRICE})\b)(?!\s+(?:of|from)\s+(?!charge|cost))"
        rf"(?!\s+to\s+(?!(?:{_FREE_TO_PRICE})\b))"
        # What is free is part of the key: a brief's "free cancellation" is not "free
        # upgrades"; a bare "free" passes for any free thing the brief offers.
        rf"(?:[^\S\n]+(?!(?:{_FREE_NOT_AN_ITEM})\b)(?P<item>[a-z]{{3,}}))?",
        r"\bfreebies?\b|\bcomplimentary\b|\bon\s+the\s+house\b|\bfree\s+of\s+charge\b"
        r"|\bat\s+no\s+(?:extra\s+|additional\s+)?(?:cost|charge)\b|\bno\s+charge\b"
        r"|\bcosts?\s+nothing\b|\bzero\s+cost\b|\bgratis\b|\bgifts?\s+with\s+(?:purchase|every)\b"
        r"|\b(?:fee|fees|cost|charge|commission|tax|vat|duty|rent)[\s-]free\b",
        r"\b(?:is|are|'s|class|drinks?|coffee|dinner|lunch|breakfast|dessert|round|first\s+\w+)"
        r"\s+on\s+us\b",
    ),
    _claim("offer", "warranty", r"\bwarrant(?:y|ies|ied)\b|\blifetime\s+(?:cover|replacement)\b"),
    _claim(
        "offer",
        "urgency",
        r"\blimited[\s-]time\b|\b(?:today|tonight|this\s+week(?:end)?|one\s+day|24\s+hours"
        r"|48\s+hours)\s+only\b|\blast\s+chance\b|\bwhile\s+(?:stocks?|supplies)\s+last\b"
        r"|\bonly\s+\d+\s+left\b|\bselling\s+(?:out\s+)?fast\b|\balmost\s+(?:gone|sold\s+out)\b"
        r"|\bfinal\s+hours\b|\bhours\s+left\b|\bact\s+now\b|\bdon'?t\s+miss\s+out\b"
        r"|\boffer\s+ends\b",
        rf"\b(?:ends?|ending)\s+(?:today|tonight|soon|midnight|this\s+week(?:end)?|(?:on\s+)?"
        rf"{_WEEKDAY})\b|\buntil\s+(?:midnight|tonight|{_WEEKDAY})\b",
    ),
    _claim(
        "offer",
        "giveaway",
        r"\bgiveaways?\b|\bsweepstakes?\b|\bwin\s+(?:a|an|one|free|big|cash|prizes?|[$£€]|\d)\b"
        r"|\bchance\s+to\s+win\b|\bprize\s+draw\b|\benter\s+to\s+win\b|\binstant\s+win\b",
    ),
    _claim(
        "offer",
        "earnings",
        r"\bmake\s+(?:easy\s+|extra\s+|real\s+)?money\b|\bpassive\s+income\b"
        r"|\bearn\s+(?:money|cash|extra\s+cash|[$£€]|up\s+to|passive|a\s+living)"
        r"|\bdouble\s+your\s+money\b|\bget\s+paid\s+to\b",
    ),
)

# What a health claim is about. With a verb in front ("relieves knee pain", "prevents
# colds", "no more headaches") it is a claim; alone ("Back pain? Try Relivo") it is not.
_CONDITION = (
    r"(?:(?:knee|back|joint|neck|muscle|nerve|chronic|period|menstrual|arthritis|shoulder|hip"
    r"|foot|heel|leg|lower\s+back|teething)\s+)?(?:pains?|aches?)|arthritis|acne|eczema"
    r"|psoriasis|rosacea|dermatitis|insomnia|sleeplessness|anxiety|depression|adhd"
    r"|migraines?|headaches?|infections?|colds|common\s+cold|flu|covid|viruses|virus|germs"
    r"|bacteria|allerg(?:y|ies)|hay\s+fever|asthma|diabetes|cancers?|tumou?rs?|inflammation"
    r"|hair\s+loss|baldness|alopecia|dandruff|scars?|wounds?|burns|blisters?|warts?|fungus"
    r"|athlete'?s\s+foot|nausea|heartburn|acid\s+reflux|reflux|ibs|bloating|constipation"
    r"|indigestion|hangovers?|cellulite|varicose\s+veins|(?:high\s+)?blood\s+pressure"
    r"|hypertension|cholesterol|blood\s+sugar|obesity|dementia|alzheimer'?s|memory\s+loss"
    r"|fatigue|snoring|sleep\s+apno?ea|tinnitus|osteoporosis|gout|sciatica|plantar\s+fasciitis"
    r"|shin\s+splints|tendonitis|stiffness|soreness|sore\s+muscles|swelling|symptoms?"
    r"|diseases?|illness(?:es)?|ulcers?|ha?emorrhoids|cavities|cavity|plaque|gingivitis"
    r"|tooth\s+decay|eye\s+strain|injur(?:y|ies)|cramps?|itch(?:ing|y\s+skin)?|wrinkles"
    r"|fine\s+lines|jet\s+lag|colic|tiredness|balding|flat\s+feet|sore\s+throats?"
    r"|panic\s+attacks?|asthma\s+attacks?|heart\s+attacks?|strokes?|bad\s+knees"
    r"|stiff\s+joints|hearing\s+loss|sids|cot\s+death|sudden\s+infant\s+death|cartilage"
)
_GAP = r"(?:\s+[\w'-]+){0,3}?\s+"


def _treats(verbs: str) -> str:
    """Verb, a few words, condition; the condition is part of the claim's key, so a brief
    that relieves headaches does not allow "stops migraines"."""
    return rf"\b(?:{verbs}){_GAP}(?P<condition>{_CONDITION})\b"


# Where a condition is named before its verb: "wrinkles gone", "fewer asthma attacks".
_CONDITION_GONE = (
    rf"\b(?:fewer|less|zero)\s+(?P<condition>{_CONDITION})\b"
    rf"|\b(?P<condition>{_CONDITION})\s+(?:gone|begone|be\s+gone|vanish\w*|disappear\w*"
    r"|fighters?|busters?|killers?|relief|remed(?:y|ies)|cures?|treatments?)\b"
)


_HEALTH: tuple[_Claim, ...] = (
    _claim(
        "health claim",
        "cure",
        # "cures knee pain", not "the cure for bare shelves".
        r"\bcure[\s-]all\b|\bmiracle\s+cure\b",
        _treats(
            r"cur(?:e|es|ed|ing)(?:\s+for)?|eliminat\w+|eradicat\w+|revers(?:e|es|ed|ing)"
            r"|eras(?:e|es|ed|ing)|remov(?:e|es|ed|ing)|get\s+rid\s+of|kills?|killing"
            r"|destroys?|fix(?:es|ed)?|rebuild(?:s|ing)?|repair(?:s|ing)?|regenerat\w+"
            r"|restor(?:e|es|ing)"
        ),
    ),
    _claim(
        "health claim",
        "heal",
        # "heals your knees", "aromatherapy that heals"; not "help heal the planet".
        rf"\bheal(?:s|ed|ing)?{_GAP}(?:{_CONDITION}|skin|knees?|joints?|body|gut|muscles?"
        r"|scalp|gums?|teeth|bones?|back|feet|wounds?)\b|\bheal(?:s|ed|ing)?(?=\s*(?:[.,!?\n]|$))"
        r"|\b\w+-heal(?:ing|s)\b",  # "gut-healing"
    ),
    _claim("health claim", "treat", _treats(r"treat(?:s|ed|ing|ment)?(?:\s+for|\s+of)?")),
    _claim(
        "health claim",
        "prevent",
        _treats(r"prevent(?:s|ed|ing|ion\s+of)?|protects?\s+against|wards?\s+off"),
    ),
    _claim(
        "health claim",
        "relieve",
        _treats(
            r"reliev(?:e|es|ed|ing)|relief\s+(?:from|for|of)|eas(?:e|es|ed|ing)"
            r"|sooth(?:e|es|ed|ing)|reduc(?:e|es|ed|ing)|fights?|fighting|combat\w*|beats?"
            r"|banish\w*|stops?|ends?|lowers?|clears?|calms?|(?:say\s+)?goodbye(?:\s+to)?"
            r"|no\s+more|free\s+from|freedom\s+from|without|helps?(?:\s+with)?|fighters?"
        ),
        _CONDITION_GONE,
        r"\bpain[\s-]?(?:relief|relieving|killers?|free)\b|\bhangover[\s-]free\b"
        r"|\banti[\s-]?inflammatory\b|\borthop(?:a)?edic\b"
        r"|\bgood\s+for\s+(?:your\s+)?(?:heart|health|joints|gut|brain|liver|immune\s+system"
        r"|bones|blood|digestion|skin)\b",
    ),
    _claim(
        "health claim",
        "clinical",
        r"\bclinically[\s-](?:proven|tested|shown|studied|validated)\b"
        r"|\bclinical\s+(?:studies|trials?|strength|results)\b"
        r"|\b(?:scientifically|medically)\s+proven\b"
        r"|\bproven\s+to\s+(?:relieve|reduce|cure|heal|treat|prevent|boost|improve|lower|burn"
        r"|help)\b",
    ),
    _claim(
        "health claim",
        "endorsement",
        r"\b(?:doctors?|dermatologists?|dentists?|physicians?|pharmacists?|vets?|veterinarians?"
        r"|nutritionists?|physios?|physiotherapists?|experts?)['’]?[\s-]+(?:recommended|approved"
        r"|trusted|formulated|tested|endorsed|developed|backed)\b",
        r"\brecommended\s+by\s+(?:doctors|dermatologists|dentists|physicians|pharmacists|vets"
        r"|experts)\b",
        r"\b(?:\d+|nine|eight|seven|four)\s+(?:out\s+of|in)\s+(?:\d+|ten|five)\s+(?:doctors"
        r"|dentists|vets|dermatologists|experts)\b",
    ),
    _claim(
        "health claim",
        "regulator",
        r"\bfda[\s-](?:approved|cleared|registered|certified)\b|\bapproved\s+by\s+the\s+fda\b"
        r"|\bmhra[\s-]approved\b",
    ),
    _claim(
        "health claim",
        "immunity",
        r"\b(?:boost|boosts|boosting|strengthens?|supports?)\s+(?:your\s+|the\s+)?immun\w*"
        r"|\bimmunity\b"
        r"|\bimmun\w*\s+(?:boost\w*|support|defen[cs]es?|health|system)\b",
    ),
    _claim(
        "health claim",
        "weight loss",
        r"\bweight[\s-]loss\b|\blos(?:e|es|ing)\s+(?:\d+\s+|up\s+to\s+\d+\s+)?(?:weight|pounds"
        r"|lbs|kilos|kg|belly\s+fat|inches)\b|\bburns?\s+(?:belly\s+|body\s+)?fat\b"
        r"|\bfat[\s-]burn\w*|\b(?:melts?|shreds?|torch(?:es)?|blasts?)\s+(?:away\s+)?"
        r"(?:belly\s+|body\s+)?(?:fat|pounds)\b|\bslimming\b"
        r"|\bslim\s+down\b|\bshed\s+(?:pounds|weight|kilos|fat)\b|\bappetite\s+suppress\w*"
        r"|\b(?:boosts?|speeds?\s+up|revs?\s+up)\s+(?:your\s+)?metabolism\b|\bflat\s+belly\b"
        r"|\bdiet\s+pills?\b",
    ),
    _claim(
        "health claim",
        "anti-aging",
        r"\banti[\s-]?ag(?:e)?ing\b|\banti[\s-]?wrinkle\b|\byounger[\s-]looking\b"
        r"|\blook\s+years\s+younger\b|\bturn\s+back\s+the\s+clock\b"
        r"|\b(?:reduces?|fights?|smooths?|softens?)\s+(?:fine\s+lines|wrinkles)\b"
        r"|\b(?:revers(?:e|es|ing)|fights?|slows?|stops?)\s+(?:the\s+)?(?:signs\s+of\s+)?ag(?:e)?ing\b",
    ),
    _claim(
        "health claim",
        "detox",
        r"(?<!\bdigital\s)\bdetox\w*"
        r"|\bcleanses?\s+(?:your\s+)?(?:body|system|liver|colon|gut|blood)\b"
        r"|\bflush(?:es)?\s+(?:out\s+)?toxins\b|\b(?:removes?|eliminates?)\s+toxins\b",
    ),
)

_EST = (
    "fastest|lightest|strongest|smartest|safest|finest|greatest|cheapest|quietest|softest"
    "|warmest|brightest|smoothest|toughest|thinnest|smallest|biggest|largest|healthiest"
    "|freshest|tastiest|comfiest|coolest|sharpest|loudest|clearest|whitest|longest|highest"
    "|purest|richest|sturdiest|quickest|best"
)
_PLACES = (
    "world|america|britain|england|scotland|wales|ireland|europe|the\\s+uk|uk|us|usa|nation"
    "|country|planet|earth|city|town|london|paris|lisbon|berlin|greece|essex"
)
_SUPERLATIVES: tuple[_Claim, ...] = (
    _claim(
        "superlative claim",
        "number one",
        r"(?:#\s*|\bno\.\s*|\bnr\.?\s*|\bno\s+)1\b|(?:#|\bno\.)\s*one\b"
        # "our number one priority" ranks a concern, not the product.
        r"|\bnumber[\s-]+one\b(?!\s+(?:priority|fan|goal|focus|concern|rule|job))",
    ),
    _claim(
        "superlative claim",
        "best-selling",
        r"\bbest[\s-]?sell(?:ing|ers?)\b|\btop[\s-]sell(?:ing|ers?)\b|\bmost\s+popular\b",
    ),
    _claim(
        "superlative claim",
        "top-rated",
        r"\btop[\s-](?:rated|ranked|reviewed)\b|\bhighest[\s-]rated\b|\bmost[\s-]reviewed\b",
    ),
    _claim(
        "superlative claim",
        "award-winning",
        r"\baward[\s-]winning\b|\bprize[\s-]winning\b|\bmulti[\s-]award\b|\bwinner\s+of\b",
    ),
    _claim(
        "superlative claim",
        "leading",
        r"\b(?:industry|market|world|category|sector)[\s-]leading\b|\bmarket\s+leaders?\b"
        r"|\b(?:the|a)\s+leading\s+(?:brand|provider|maker|supplier|choice|name|company)\b"
        r"|\bleader\s+in\b",
    ),
    _claim(
        "superlative claim",
        "unbeatable",
        r"\bunbeat(?:able|en)\b|\bunmatched\b|\bunrivall?ed\b|\bunparall?eled\b|\bunsurpassed\b"
        r"|\bsecond\s+to\s+none\b|\bnothing\s+(?:beats|compares|comes\s+close)\b"
        r"|\bno\s+one\s+(?:beats|comes\s+close|does\s+it\s+better)\b"
        r"|\bbetter\s+than\s+(?:any|all|the\s+rest|the\s+competition|anything|ever)\b"
        r"|\bcan'?t\s+be\s+beat(?:en)?\b|\blike\s+no\s+other\b|\bin\s+a\s+league\s+of\s+its\s+own\b"
        r"|\bbeats?\s+(?:every|all|any)\b|\bbar\s+none\b",
    ),
    _claim(
        "superlative claim",
        "the only",
        r"\bthe\s+only\s+(?!way\b|one\s+(?:you|i)\b)[\w-]+(?:\s+[\w-]+)?\s+(?:that|which"
        r"|you(?:'ll|\s+will)?\s+(?:ever\s+)?need|with)\b",
    ),
    _claim(
        "superlative claim",
        "best",
        rf"\b(?:{_PLACES})(?:'s|s'|’s)\s+(?:{_EST}|top|favou?rite|leading|first|only"
        r"|most\s+\w+)\b",
        # "the best X"; not "the best of", "the best in you", "the best part", "the
        # best-selling" (a claim of its own).
        r"\b(?:the|simply\s+the|quite\s+simply\s+the)\s+(?:very\s+)?best\b(?![\s-]+(?:sell\w*"
        r"|of\b|part\b|way\b|ways\b|thing|bit\b|in\s+(?:you|yourself|us|them|everyone)\b|yet\b"
        r"|seats?\b|times?\b|for\s+(?:you|your)\b|friend|days\b|moments\b|version\b))",
        rf"\bthe\s+(?:{_EST.removesuffix('|best')})\b(?!\s+(?:yet|of)\b)",
        r"\bthe\s+most\s+(?!of\b|out\b|important\b|part\b|likely\b|people\b)[\w-]+",
        r"\bmost\s+(?:trusted|loved|recommended|reliable|advanced|powerful|comfortable|downloaded"
        r"|used|installed|bought|sold"
        r"|accurate|effective|awarded)\b",
        # "best X in Y"; not "your best in linen", "works best in summer".
        r"(?<!\b(?:your|my|our|his|her|their|its|look|looking|feel|feeling|at|be|being|is|are"
        r"|works?|do|does|doing)\s+)\bbest\s+(?:[\w'-]+\s+){0,2}?in\s+(?:the\s+)?[a-z]+\b",
        r"\bbest[\s-]in[\s-](?:class|show|market|town)\b|\bbest\s+(?:[\w'-]+\s+){0,2}?ever\b",
        r"\bbest\s+(?:[\w'-]+\s+){0,2}?on\s+the\s+(?:market|planet|shelf|shelves|high\s+street)\b"
        r"|\bvoted\s+(?:the\s+)?(?:best|#\s*1|number\s+one|top)\b|\bworld[\s-]class\b"
        r"|\btop\s+(?:[\w-]+\s+)?(?:brand|choice|pick|provider|seller|maker)\b"
        r"|\b\w+s'\s+(?:favou?rite|top\s+choice|first\s+choice)\b",
        rf"\b(?:{_EST})[\s-](?:acting|lasting|growing|loved|charging|drying|working)\b",
        rf"\b(?:{_EST})\s+(?:[\w'-]+\s+){{0,2}}?(?:ever\b|in\s+the\s+(?:world|country|universe"
        r"|land|galaxy)\b)",
    ),
)

_CLAIMS: tuple[_Claim, ...] = (*_OFFERS, *_HEALTH, *_SUPERLATIVES)


@dataclass(frozen=True, slots=True)
class _Found:
    claim: _Claim
    key: str
    start: int
    end: int


def _condition_key(condition: str) -> str:
    """ "Knee pains" and "knee pain", "cavities" and "cavity" are one condition."""
    words = condition.casefold().split()
    last = words[-1]
    if last.endswith("ies"):
        last = last[:-3] + "y"
    elif last.endswith("s") and not last.endswith("ss"):
        last = last[:-1]
    return " ".join([*words[:-1], last])


def _find_claims(view: _View) -> list[_Found]:
    """Claims in the text, in catalogue order; a match inside an earlier one is the same
    claim ("free" in "free shipping", "best" in "best price") and is skipped."""
    found: list[_Found] = []
    for claim in _CLAIMS:
        for match in claim.pattern.finditer(view.text):
            start, end = match.span()
            if any(start < f.end and f.start < end for f in found):
                continue
            key = claim.key
            groups = match.groupdict()
            if condition := groups.get("condition") or groups.get("item"):
                key = f"{key}: {_condition_key(condition)}"
            found.append(_Found(claim, key, start, end))
    return found


# Negations that rule out the rest of their clause ("do not promise", "never claim"), and
# those that rule out only the words right after them ("no weight loss claims" — but in
# "no hidden fees and free cancellation" the cancellation is still free).
_CLAUSE_NEGATION = regex.compile(
    r"\b(?:not|never|don't|do\s+not|doesn't|does\s+not|avoid|nor|cannot|can't|mustn't"
    r"|must\s+not|shouldn't|should\s+not|neither|exclud\w*|forbid\w*|prohibit\w*)\b"
)
_WORD_NEGATION = regex.compile(r"\b(?:no|without|zero)\s+(?:(?!and\b)[\w'-]+\s+){0,2}$")
_LIST_WORD = regex.compile(r"\b(?:or|nor|and)\b")


def _negated(text: str, start: int, end: int) -> bool:
    """Does the brief rule the claim out ("do not promise a free trial", "never claim it
    cures, treats or prevents any disease", "no weight loss claims")? A clause negation
    reaches to the end of its sentence, and across a comma only into a list ("cures,
    treats or prevents"); "no" and "without" reach two words."""
    sentence = max(text.rfind(ch, 0, start) for ch in ".;!?\n") + 1
    before = text[sentence:start]
    if _WORD_NEGATION.search(before):
        return True
    comma = before.rfind(",")
    if comma >= 0:
        clause_end = min((i for ch in ",.;!?\n" if (i := text.find(ch, end)) >= 0), default=None)
        clause = text[sentence + comma + 1 : clause_end]
        if not _LIST_WORD.search(clause):
            before = before[comma + 1 :]
    return bool(_CLAUSE_NEGATION.search(before))


# Phrases that are this rule's claim wherever they stand (by key): decoding bans them when
# the brief does not make that claim (``ClaimsRule.banned_phrases``), so the model does
# not spend an answer on "The Best Running Shoes" only to have it rejected here. Lower
# case; decoding adds the other case forms. Phrases the rule lets through in some
# contexts ("the best of", "make the most of") cost little to lose.
_DECODING_BANS: dict[str, tuple[str, ...]] = {
    "best": (
        "the best", "the very best", "the most", "world's best", "world's most",
        *(f"the {word}" for word in _EST.split("|") if word != "best"),
    ),
    "best-selling": ("best-selling", "best selling", "bestseller", "best-seller", "most popular"),
    "top-rated": ("top-rated", "top rated", "highest-rated"),
    "unbeatable": ("unbeatable", "unmatched", "unrivalled", "unrivaled", "unparalleled"),
    "award-winning": ("award-winning", "award winning"),
}  # fmt: skip


def stated_claims(brief: Brief) -> frozenset[str]:
    """Keys of the offers, health claims and superlatives the brief makes (not those it
    rules out): product, key message, constraints and required terms."""
    texts = [brief.product, brief.key_message, *brief.constraints, *brief.required_terms]
    view = _view("\n".join(texts))
    return frozenset(f.key for f in _find_claims(view) if not _negated(view.text, f.start, f.end))


@dataclass(frozen=True, slots=True)
class ClaimsRule:
    """A variant may only claim what the brief claims.

    * Figures: every number (a discount, a price, a rating), in digits or in words where
      words make an offer ("ninety percent off", "half price", "two for one", "nine out of
      ten"), must come from the brief. A small model invents figures: SmolLM2 wrote
      "90% Off" for a brief that says 30 % off.
    * Offers: free (shipping, returns, trial, or just "free"), discounts, sales and deals,
      multi-buys, low or lowest prices, guarantees and refunds, warranties, financing,
      urgency ("today only"), giveaways and earnings. "Good, Easy, and Free" went live for
      headphones whose brief offered nothing free.
    * Health claims: cures, heals, treats, prevents or relieves a condition, clinically
      proven, doctor recommended, FDA approved, immunity, weight loss, anti-aging, detox.
    * Superlatives: number one, best(-selling), top-rated, award-winning, leading,
      unbeatable, "the only", "world's best".

    A claim passes when the brief makes a claim with the same key (``stated_claims``, not
    counting what the brief rules out: "do not promise a free trial"). Keys name the kind
    of claim and, where it matters, its object: "free shipping", "free: cancellation",
    "relieve: back pain", "best-selling". So "Free delivery" passes for a brief offering
    free delivery, "free returns" or "free upgrades" do not, and a bare "free" passes for
    any free thing the brief offers; "stops migraines" does not pass for a brief that
    relieves headaches. Figures in a brief's constraints count as stated even when ruled
    out ("never say 50 % off"), as before.
    """

    allowed: frozenset[str]
    stated: frozenset[str] = frozenset()
    name: str = "unsupported_claim"

    @classmethod
    def for_brief(cls, brief: Brief) -> ClaimsRule:
        text = " ".join([brief.product, brief.key_message, *brief.constraints])
        text = " ".join([text, *brief.required_terms])
        return cls(frozenset(_figures(text)), stated_claims(brief))

    def banned_phrases(self) -> tuple[str, ...]:
        """Phrases that always make a claim the brief does not (for decoding to ban)."""
        return tuple(
            phrase
            for key, phrases in _DECODING_BANS.items()
            if key not in self.stated
            for phrase in phrases
        )

    def check(self, variant: Variant) -> str | None:
        raw = f"{variant.headline}\n{variant.description}"
        figures = _figures(raw)
        invented = sorted(set(figures) - self.allowed)
        if invented:
            shown = [n if figures[n] == n else f"{n} ({figures[n]!r})" for n in invented]
            stated = ", ".join(sorted(self.allowed)) or "none"
            return f"states {', '.join(shown)}, a figure not in the brief (it states: {stated})"
        view = _view(raw)
        for found in sorted(_find_claims(view), key=lambda f: f.start):  # first in the text
            # A bare "free" ("try it free") refers to whatever the brief offers free.
            if found.key not in self.stated and not (
                found.key == "free" and any(k.startswith("free") for k in self.stated)
            ):
                written = view.raw_span(found.start, found.end)
                verb = "offers" if found.claim.kind == "offer" else f"makes a {found.claim.kind}"
                return f"{verb} {written!r} ({found.key}), which the brief does not make"
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
    """The rules for one brief, in order; a variant is accepted when it passes all.

    ``relevance`` is an optional, already loaded rule that runs last (e.g.
    ``adloop.generator.relevance.RelevanceRule``, which needs a model): without it no
    model is loaded and every rule is pure and fast.
    """

    def __init__(
        self, brief: Brief, config: FilterConfig | None = None, *, relevance: Rule | None = None
    ) -> None:
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
        if relevance is not None:
            rules.append(relevance)  # last: the costliest, and only on what the rest let by
        self.rules: tuple[Rule, ...] = tuple(rules)
        # Checked once here: isinstance against a runtime Protocol is slow per call.
        self._batched = tuple(isinstance(rule, BatchRule) for rule in self.rules)

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
        """Rule by rule over the batch, so a ``BatchRule`` sees every survivor at once;
        the outcome is the same as ``first_failure`` on each variant, in input order."""
        batch = list(variants)
        failed: list[Rejection | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        for rule, batched in zip(self.rules, self._batched, strict=True):
            if not pending:
                break
            candidates = [batch[i] for i in pending]
            if batched:
                reasons = rule.check_many(candidates)  # type: ignore[attr-defined]
            else:
                reasons = [rule.check(v) for v in candidates]
            survivors = []
            for index, reason in zip(pending, reasons, strict=True):
                if reason is None:
                    survivors.append(index)
                else:
                    failed[index] = rejection(batch[index], rule.name, reason)
            pending = survivors
        accepted = [v for v, f in zip(batch, failed, strict=True) if f is None]
        return FilterOutcome(accepted, [f for f in failed if f is not None])


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

    Filter first, then dedupe against the request's creatives (winners, underperformer and
    the campaign's earlier creatives for the audience), the prompt's examples and
    ``kept`` (variants accepted earlier): a rejected variant must not block a later copy
    that passes.
    """
    parsed = [v for a in answers for v in parse_variants(ANSWER_PREFIX + a.text, a.complete)]
    filtered = variant_filter.apply(parsed)
    fresh, copies = drop_example_copies(filtered.accepted)
    existing: list[Variant | ExampleCreative] = [
        *request.winners,
        *request.earlier_creatives,
        *_EXAMPLE_VARIANTS,
    ]
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
