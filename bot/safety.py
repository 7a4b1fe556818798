"""The prompt filter: refuse prompts asking for sexual content or slurs, before anything is queued.

Pure functions and immutable data, no I/O after construction: the intake asks
:func:`check_prompt` and persists the decision (a ``rejected`` request whose reason is the polite
refusal, never the offending word).

How a prompt is read (every step also applies to the list entries, so both meet in the same form):

1. **fold**: Unicode NFKC (full-width, mathematical and circled letters), case folding, accents
   removed, zero-width / bidi / other invisible characters dropped, look-alike letters mapped to
   Latin (Cyrillic ``о``, Greek ``ο``, small capitals ``ᴏ``, enclosed letters ``🅾``);
2. **chunks**: split on whitespace; punctuation at the edges of a chunk is dropped;
3. **leetspeak** inside chunks that contain a letter (``s3x``, ``pr0n``, ``$lut``, ``@ss``);
   ``1 ! |`` may stand for ``i`` or ``l``, so both readings are tried;
4. **words**: a chunk's letters and digits split on the punctuation left inside it (``nu-de`` gives
   ``nu``, ``de`` and also the squeezed ``nude``); letters repeated to stretch a word are collapsed
   (``nuuude``, ``boooobs``);
5. **spaced letters**: three or more one-character words in a row (``n u d e``, ``n.u.d.e``,
   ``s 3 x``) are joined and searched for any term.

Matching is by whole words (so "Scunthorpe", "Sussex", "cocktail", "assassin" and "therapist" pass),
multi-word entries match words in a row, and an entry ending in ``*`` matches words starting with
it. An allow-list match wins over every deny match inside the words it covers ("magna cum laude").
"""

from __future__ import annotations

import math

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

_log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).with_name("data")
DEFAULT_DENY_FILE = DATA_DIR / "prompt_denylist.txt"
DEFAULT_ALLOW_FILE = DATA_DIR / "prompt_allowlist.txt"

#: What the requester is told. Polite, and it never repeats the word that matched.
REFUSAL = ("Sorry, I can't draw that: this bot doesn't make sexual or hateful images. "
           "Please try a different prompt.")

# ---- step 1: fold ----------------------------------------------------------------------------------

_CONFUSABLES: dict[str, str] = {
    # Cyrillic
    "а": "a", "в": "b", "г": "r", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "п": "n", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ь": "b", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ӏ": "l", "ү": "y", "һ": "h", "ɡ": "g",
    # Greek (after case folding)
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o",
    "π": "n", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h", "ո": "n",
    # Latin look-alikes NFKC leaves alone: dotless i, small capitals, stroked letters
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ɪ": "i", "ʟ": "l", "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d",
    "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ᴊ": "j", "ᴋ": "k", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p",
    "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ø": "o", "đ": "d",
    "ħ": "h", "ł": "l", "ƒ": "f",
}
# Enclosed letters without a compatibility decomposition: negative circled, negative squared,
# regional indicators (the flag letters).
for _base in (0x1F150, 0x1F170, 0x1F1E6):
    for _k in range(26):
        _CONFUSABLES[chr(_base + _k)] = chr(ord("a") + _k)
_FOLD = str.maketrans(_CONFUSABLES)
# Capitals that look like a different Latin letter than their lower case does (Greek Ν is N, ν is v),
# mapped before case folding.
_UPPER = str.maketrans({
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o",
    "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x",
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c", "Т": "t",
    "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j", "Ү": "y", "Һ": "h",
})
# Letters that render as nothing (Hangul fillers), used like zero-width spaces.
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")
_DROP_CATEGORIES = frozenset({"Mn", "Me", "Cf", "Cc"})


def fold(text: str) -> str:
    """NFKC, case fold, strip accents and invisible characters, map look-alikes to Latin."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text).translate(_UPPER).casefold())
    out = []
    for ch in text:
        if ch.isspace():
            out.append(" ")
        elif ch in _FILLERS or unicodedata.category(ch) in _DROP_CATEGORIES:
            continue
        else:
            out.append(ch)
    return "".join(out).translate(_FOLD)


# ---- steps 2-5: chunks, leetspeak, words -----------------------------------------------------------

_AMBIGUOUS = "\x00"  # placeholder for 1 ! | ¡ (i or l)
_LEET = str.maketrans({"0": "o", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s", "7": "t", "+": "t",
                       "8": "b", "9": "g", "2": "z", "€": "e", "1": _AMBIGUOUS, "!": _AMBIGUOUS,
                       "|": _AMBIGUOUS, "¡": _AMBIGUOUS})
_LEET_LEAD = "@$"  # may start a word: "@ss", "$lut"
_LEET_TAIL = "$"  # may end one: "a$$"
_ALNUM = re.compile(r"[^\W_]+")
_RUN_MIN = 3  # one-character words in a row that count as a spelled-out word


def _strip_edges(chunk: str) -> str:
    i, j = 0, len(chunk)
    while i < j and not (chunk[i].isalnum() or chunk[i] in _LEET_LEAD):
        i += 1
    while j > i and not (chunk[j - 1].isalnum() or chunk[j - 1] in _LEET_TAIL):
        j -= 1
    return chunk[i:j]


def _leet(chunk: str) -> tuple[str, ...]:
    """Readings of a chunk with leetspeak undone; chunks without letters (``2024``) stay as they are."""
    if not any(ch.isalpha() for ch in chunk):
        return (chunk,)
    mapped = chunk.translate(_LEET)
    if _AMBIGUOUS not in mapped:
        return (mapped,)
    return (mapped.replace(_AMBIGUOUS, "i"), mapped.replace(_AMBIGUOUS, "l"))


_RUN_2 = re.compile(r"(.)\1{2,}")
_RUN_1 = re.compile(r"(.)\1+")


def _forms(word: str) -> set[str]:
    """A word and its de-stretched forms: ``nuuude`` -> nude; ``boooobs`` -> boobs."""
    return {word, _RUN_1.sub(r"\1", word), _RUN_2.sub(r"\1\1", word)}


@dataclass(frozen=True, slots=True)
class Token:
    """A word of the prompt: its possible readings and the base words ``[start, end)`` it spans."""

    forms: frozenset[str]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Reading:
    """A prompt as the filter reads it."""

    words: tuple[Token, ...]  # one per word, in order (phrases match here)
    squeezed: tuple[Token, ...]  # chunks with punctuation inside, punctuation removed ("nu-de" -> nude)
    spelled: tuple[Token, ...]  # runs of one-character words joined ("n u d e"); searched for terms


def read(text: str) -> Reading:
    """Turn ``text`` into the words the filter matches against (see the module docstring)."""
    words: list[Token] = []
    raw: list[tuple[str, ...]] = []  # per word, its text in each leet reading (runs are re-read)
    squeezed: list[Token] = []
    for chunk in fold(text).split():
        chunk = _strip_edges(chunk)
        if not chunk:
            continue
        readings = _leet(chunk)
        parts = [_ALNUM.findall(r) for r in readings]  # same split for every reading
        start = len(words)
        for k in range(len(parts[0])):
            texts = tuple(p[k] for p in parts)
            words.append(Token(frozenset().union(*(_forms(t) for t in texts)), start + k, start + k + 1))
            raw.append(texts)
        if len(parts[0]) > 1:
            squeezed.append(Token(frozenset().union(*(_forms("".join(p)) for p in parts)), start, len(words)))
    spelled: list[Token] = []
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and len(raw[j][0]) == 1:
            j += 1
        if j - i >= _RUN_MIN:
            joined = "".join(raw[k][0] for k in range(i, j))
            forms: set[str] = set()
            for reading in _leet(joined):
                forms |= _forms(reading)
            spelled.append(Token(frozenset(forms), i, j))
        i = max(j, i + 1)
    return Reading(tuple(words), tuple(squeezed), tuple(spelled))


# ---- the lists -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Term:
    """A list entry as the filter matches it."""

    source: str  # as written in the list
    words: tuple[str, ...]
    prefix: bool  # the last word matches any word starting with it


def parse_term(entry: str) -> Term | None:
    """A list entry (``porn*``, ``blow job``) read like a prompt; None when nothing is left of it."""
    text = entry.strip()
    prefix = text.endswith("*")
    reading = read(text.rstrip("*"))
    if not reading.words:
        return None
    words = tuple(sorted(t.forms, key=lambda f: (len(f), f))[-1] for t in reading.words)  # the unstretched form
    return Term(entry.strip(), words, prefix)


def load_word_list(path: str | Path) -> list[str]:
    """Entries of a word-list file: one per line; ``#`` starts a comment."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            out.append(entry)
    return out


@lru_cache(maxsize=1)
def default_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shipped deny and allow lists (``bot/data/``)."""
    return tuple(load_word_list(DEFAULT_DENY_FILE)), tuple(load_word_list(DEFAULT_ALLOW_FILE))


class _Lexicon:
    """Terms indexed for matching: by first word, and single-word prefixes by prefix."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.terms: list[Term] = []
        self.by_first: dict[str, list[Term]] = {}
        self.by_prefix: dict[str, list[Term]] = {}
        for entry in entries:
            term = parse_term(entry)
            if term is None:
                continue
            self.terms.append(term)
            if term.prefix and len(term.words) == 1:
                self.by_prefix.setdefault(term.words[0], []).append(term)
            else:
                self.by_first.setdefault(term.words[0], []).append(term)

    @staticmethod
    def _word_ok(word: str, prefix: bool, forms: frozenset[str]) -> bool:
        return word in forms or (prefix and any(f.startswith(word) for f in forms))

    def _single(self, tok: Token) -> Iterable[Term]:
        for f in tok.forms:
            for t in self.by_first.get(f, ()):
                if len(t.words) == 1:
                    yield t
            for n in range(1, len(f) + 1):
                yield from self.by_prefix.get(f[:n], ())

    def matches(self, reading: Reading, *, spelled: str) -> list[tuple[Term, int, int]]:
        """Every ``(term, start, end)`` found. ``spelled``: "search" looks for terms inside
        spelled-out runs (deny), "whole" only for a run that is exactly a term (allow)."""
        out: list[tuple[Term, int, int]] = []
        words = reading.words
        for i, tok in enumerate(words):
            for f in tok.forms:
                for t in self.by_first.get(f, ()):
                    k = len(t.words)
                    if k > 1 and i + k <= len(words) and all(
                        self._word_ok(t.words[j], t.prefix and j == k - 1, words[i + j].forms) for j in range(1, k)
                    ):
                        out.append((t, i, i + k))
            out += [(t, tok.start, tok.end) for t in self._single(tok)]
        for tok in reading.squeezed:
            out += [(t, tok.start, tok.end) for t in self._single(tok)]
        for tok in reading.spelled:
            if spelled == "whole":
                out += [(t, tok.start, tok.end) for t in self._single(tok)]
                continue
            for t in self.terms:
                needle = "".join(t.words)
                if len(needle) >= _RUN_MIN and any(needle in f for f in tok.forms):
                    out.append((t, tok.start, tok.end))
        return out


@dataclass(frozen=True, slots=True)
class FilterResult:
    allowed: bool
    reason: str | None = None  # for the requester (polite; never echoes the term)
    matched: str | None = None  # the deny-list entry that matched (for logs and moderators)


class PromptFilter:
    """Deny and allow lists compiled for matching; :meth:`check` is a pure function of the text.

    ``deny``/``allow`` are added to the shipped lists (``bot/data/prompt_*list.txt``) unless
    ``use_default_list`` is False. An allow match wins over deny matches inside the words it covers.
    """

    def __init__(self, deny: Iterable[str] = (), allow: Iterable[str] = (), use_default_list: bool = True) -> None:
        deny, allow = list(deny), list(allow)
        if use_default_list:
            default_deny, default_allow = default_lists()
            deny, allow = [*default_deny, *deny], [*default_allow, *allow]
        self.deny = _Lexicon(deny)
        self.allow = _Lexicon(allow)

    def check(self, text: str) -> FilterResult:
        reading = read(text)
        denied = self.deny.matches(reading, spelled="search")
        if not denied:
            return FilterResult(True)
        allowed = [(s, e) for _, s, e in self.allow.matches(reading, spelled="whole")]
        for term, start, end in sorted(denied, key=lambda m: (m[1], m[2])):
            if not any(s <= start and end <= e for s, e in allowed):
                return FilterResult(False, REFUSAL, term.source)
        return FilterResult(True)


def check_prompt(prompt_filter: PromptFilter | None, text: str) -> str | None:
    """For intake code: the refusal to store and show (``rejected`` with this reason), or None to
    accept. ``prompt_filter`` None (filtering switched off) accepts everything."""
    if prompt_filter is None:
        return None
    result = prompt_filter.check(text)
    if result.allowed:
        return None
    _log.info("prompt refused by the filter (matched %r)", result.matched, extra={"action": "filtered"})
    return result.reason


def build_prompt_filter(cfg: Any) -> PromptFilter | None:
    """The filter described by a ``[safety]`` config section, or None when ``prompt_filter`` is off."""
    if not cfg.prompt_filter:
        return None
    return PromptFilter(cfg.deny, cfg.allow, use_default_list=cfg.use_default_list)




# ---- images ----------------------------------------------------------------------------------------

class ImageClassifier(Protocol):
    """What the worker needs from an NSFW classifier (:class:`inference.nsfw.NsfwClassifier`)."""

    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        """P(NSFW) of each image, in order."""
        ...


def nsfw_hold_reason(scores: Sequence[float], threshold: float) -> str | None:
    """Why a generated result must wait for a moderator (any image at or above ``threshold``), or
    None when it may be posted."""
    if not scores:
        return None
    if not all(math.isfinite(s) for s in scores):  # nan compares false: never read as "safe"
        return "NSFW check gave no valid score (not a number)"
    top = max(scores)
    if top >= threshold:
        return f"NSFW score {top:.2f} >= threshold {threshold:.2f}"
    return None
