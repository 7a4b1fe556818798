"""dalle-mini's prompt normaliser (``dalle_mini.model.text.TextNormalizer``), standard library only.

Steps, in dalle-mini's order: HTML unescape (twice); emoji -> ``:name:``; transliterate to ASCII;
lowercase; ``<person>`` tags; wiki references; HTML tags; URLs; thousands commas; protect ``x.y``,
``'s``-style apostrophes and ``d/d``; ``w-w`` -> ``w w`` and spaces around ``% & / $ *``; hashtags
split into words; ``_ # \\`` -> space; quotes -> `` " ``; punctuation -> commas; restore the protected
characters; collapse 4+ repeated characters; merge quotes and commas; collapse spaces; strip
leading/trailing commas; prepend one space.

Differences from dalle-mini (which needs ftfy, emoji, unidecode and a 34 MB word list): no ftfy
mojibake repair; emoji names come from ``unicodedata`` (``:cat_face:``, as the emoji package gives
for most); transliteration covers accented Latin, Greek and Cyrillic, other scripts are dropped;
hashtags are split only when the bundle ships ``enwiki-words-frequency.txt``; ``<person>`` is replaced
by a draw seeded from the prompt itself (dalle-mini draws from the process's global random state,
so the same prompt and seed could give another image depending on what came before).
"""

from __future__ import annotations

import hashlib
import html
import math
import random
import re
import unicodedata
from pathlib import Path

_TMP = "xtokx"   # placeholder marker, as in dalle-mini (avoids repeated characters)

_PERSON_WEIGHTS = (("a person", 282265), ("someone", 121194), ("somebody", 12219))

# Characters NFKD does not decompose into ASCII.
_LATIN = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i", "ħ": "h", "ŋ": "ng",
    "‘": "'", "’": "'", "‚": ",", "“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "–": "-", "—": "-",
    "…": "...", "•": "*", "€": "EUR", "£": "PS", "¥": "Y", "©": "(c)", "®": "(r)", "°": "deg", "×": "x",
}
_GREEK = dict(zip("αβγδεζηθικλμνξοπρσςτυφχψω", "a b g d e z e th i k l m n x o p r s s t y ph ch ps o".split()))
_CYRILLIC = dict(zip(
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяієїґў",
    "a b v g d e io zh z i i k l m n o p r s t u f kh ts ch sh shch ' y ' e iu ia i ie i g u".split(),
))


def _from_tables(ch: str) -> str | None:
    low = ch.lower()
    for table in (_GREEK, _CYRILLIC):
        if low in table:
            return table[low].capitalize() if ch != low else table[low]
    return None


def _translit_char(ch: str) -> str:
    if ch.isascii():
        return ch
    if ch in _LATIN:
        return _LATIN[ch]
    if (out := _from_tables(ch)) is not None:                  # ё -> io before accents are dropped
        return out
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if base and base.isascii():
        return base                                            # é -> e, ﬁ -> fi
    if len(base) == 1 and (out := _from_tables(base)) is not None:
        return out                                             # ά -> a
    if unicodedata.category(ch).startswith("Z"):
        return " "
    return ""


def transliterate(text: str) -> str:
    """Approximation of ``unidecode``: accented Latin, Greek and Cyrillic to ASCII; others dropped."""
    return "".join(_translit_char(ch) for ch in text)


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return (0x1F000 <= cp <= 0x1FAFF) or (0x2600 <= cp <= 0x27BF) or (0x2B00 <= cp <= 0x2BFF)


def demojize(text: str) -> str:
    """Replace emoji by ``:their_name:`` (like ``emoji.demojize``); variation selectors/ZWJ removed."""
    out = []
    for ch in text:
        if ch in "\ufe0f\u200d":
            continue
        if _is_emoji(ch):
            name = unicodedata.name(ch, "")
            out.append(f":{name.lower().replace(' ', '_')}:" if name else "")
        else:
            out.append(ch)
    return "".join(out)


class HashtagSplitter:
    """Split a run of letters into words by dynamic programming over word costs log(rank + 1)
    (the wordninja heuristic dalle-mini uses), given ``enwiki-words-frequency.txt`` (one word per
    line, most frequent first)."""

    _SEP = re.compile(r"[^a-zA-Z0-9']+")

    def __init__(self, words: list[str]) -> None:
        self.cost = {w: math.log(i + 1.0) for i, w in enumerate(words)}
        self.max_len = max((len(w) for w in words), default=1)

    @classmethod
    def from_file(cls, path: str | Path) -> "HashtagSplitter":
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([ln.split()[0] for ln in lines if ln.strip()])

    def __call__(self, s: str) -> str:
        return " ".join(w for part in self._SEP.split(s) for w in self._split(part))

    def _best(self, s: str, costs: list[float], i: int) -> tuple[float, int]:
        """Cheapest (cost, length) of a last word ending at i."""
        return min((costs[i - k] + self.cost.get(s[i - k:i].lower(), 9e999), k)
                   for k in range(1, min(i, self.max_len) + 1))

    def _split(self, s: str) -> list[str]:
        costs = [0.0]
        for i in range(1, len(s) + 1):
            costs.append(self._best(s, costs, i)[0])
        words: list[str] = []
        i = len(s)
        while i > 0:
            _, k = self._best(s, costs, i)
            piece = s[i - k:i]
            if piece != "'" and words and (words[-1] == "'s" or (piece[-1].isdigit() and words[-1][0].isdigit())):
                words[-1] = piece + words[-1]          # re-attach 's and split digit runs
            elif piece != "'":
                words.append(piece)
            i -= k
        return words[::-1]


class TextNormalizer:
    """dalle-mini's normaliser. ``<person>`` tags (CC12M captions) are replaced by "a person",
    "someone" or "somebody" drawn with dalle-mini's weights; the draw is seeded from ``seed`` and the
    text itself, so a prompt always normalises the same way (same prompt and seed, same image),
    whatever was normalised before it."""

    def __init__(self, hashtags: HashtagSplitter | None = None, seed: int = 0) -> None:
        self.hashtags = hashtags
        self.seed = seed

    def _rng(self, t: str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}\0{t}".encode("utf-8")).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _person(self, t: str) -> str:
        t = re.sub(r"<person>([,\s]*(and)*[,\s]*<person>)+", " people ", t)
        if "<person>" not in t:
            return t
        rng = self._rng(t)                     # a function of the text: no state between prompts
        words, weights = zip(*_PERSON_WEIGHTS)
        while "<person>" in t:
            t = t.replace("<person>", f" {rng.choices(words, weights)[0]} ", 1)
        return t

    def __call__(self, text: str) -> str:
        t = html.unescape(html.unescape(text))
        t = transliterate(demojize(t)).lower()
        t = self._person(t)
        t = re.sub(r"\[\d+\]\s*\Z", "", re.sub(r"\A\s*\[\d+\]", "", t))          # wiki refs
        t = re.sub(r"<[^<]+?>", "", t)                                           # html tags
        t = re.sub(r"http\S+", "", t)                                            # urls
        for _ in range(2):
            t = re.sub(r"(\d),(\d{3})", r"\1\2", t)                              # 1,000 -> 1000
        t = re.sub(r"(\w)\.(\w)", rf"\1{_TMP}dot{_TMP}\2", t)
        t = re.sub(r"'(?=([stdm]|(ll)|(re)|(ve))\b)", f"{_TMP}quote{_TMP}", t)
        t = re.sub(r"(\d)/(\d)", rf"\1{_TMP}slash{_TMP}\2", t)
        t = re.sub(r"(\w)-(\w)", r"\1 \2", t)
        t = re.sub(r"([%&/$*])", r" \1 ", t)
        split = self.hashtags or (lambda w: w)
        t = re.sub(r"#(\w+)", lambda m: split(m.group(1)), t)
        t = re.sub(r"[_#\\]", " ", t)
        t = re.sub(r"['\"`]", ' " ', t)
        t = re.sub(r"[()\[\].,|:;?!=+~\-/{}]", ",", t)
        t = t.replace(f"{_TMP}dot{_TMP}", ".").replace(f"{_TMP}quote{_TMP}", "'").replace(f"{_TMP}slash{_TMP}", "/")
        t = re.sub(r"(\D)(\1{3,})", r"\1", t)
        t = re.sub(r'(\s*"+\s*)+', ' " ', t)
        t = re.sub(r"(\s*,+\s*)+", ", ", t)
        t = re.sub(r"\s+", " ", t).strip()
        if t.endswith(","):
            t = t[:-1]
        if t.startswith(","):
            t = t[1:]
        return " " + t.strip()
