"""The shapes model's text side: a small byte-level BPE trained on the grammar, and batch encoding
through exactly the runtime's normaliser and tokenizer (``inference.text``, ``inference.tokenizer``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import json
from dataclasses import dataclass
from typing import Any

from ..shapes.grammar import all_words, sample_prompt
from ..text import TextNormalizer

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]   # ids 0, 1, 2, 3 (dalle-mini's layout)


def train_tokenizer(out_dir: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Train byte-level BPE on normalised grammar prompts; writes vocab.json and merges.txt.

    Every grammar word ends up as one piece (with the ``Ġ`` space marker); other text still
    tokenises, byte by byte at worst.
    """
    from tokenizers import ByteLevelBPETokenizer

    norm = TextNormalizer()
    rng = np.random.default_rng(seed)
    corpus = [norm(sample_prompt(rng, "include")) for _ in range(20000)]
    corpus += [" " + w for w in all_words()] * 50
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out_dir))
    return out_dir


@dataclass(frozen=True)
class _Encoded:
    ids: np.ndarray
    mask: np.ndarray
    truncated: int


class GrammarTokenizer:
    """Where the ``tokenizers`` library is missing (a bare GPU machine): every grammar word is one
    piece of the trained BPE, so a normalised grammar prompt is ``<s>`` + one id per word + ``</s>``.
    Same ids as :class:`inference.tokenizer.BartTokenizer` for grammar prompts (tested)."""

    def __init__(self, vocab: Path, text_length: int, bos_id: int = 0, pad_id: int = 1, eos_id: int = 2) -> None:
        self.vocab = json.loads(Path(vocab).read_text(encoding="utf-8"))
        self.vocab_size = len(self.vocab)
        self.text_length, self.bos_id, self.pad_id, self.eos_id = text_length, bos_id, pad_id, eos_id

    def encode(self, text: str) -> _Encoded:
        words = text.split()
        try:
            pieces = [self.vocab["\u0120" + w] for w in words]
        except KeyError as e:
            raise ValueError(f"{text!r} is not a grammar prompt: no single piece for {e}") from None
        row = [self.bos_id, *pieces, self.eos_id]
        ids = np.full(self.text_length, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.text_length, dtype=np.int64)
        ids[:len(row)], mask[:len(row)] = row, 1
        return _Encoded(ids, mask, max(0, len(row) - self.text_length))

    def unconditional(self) -> _Encoded:
        ids = np.full(self.text_length, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.text_length, dtype=np.int64)
        ids[:2], mask[:2] = (self.bos_id, self.eos_id), 1
        return _Encoded(ids, mask, 0)


def load_tokenizer(tok_dir: Path, text_length: int) -> Any:
    """The runtime's BartTokenizer, or :class:`GrammarTokenizer` without the tokenizers library."""
    try:
        from ..tokenizer import BartTokenizer
    except ImportError:
        return GrammarTokenizer(tok_dir / "vocab.json", text_length)
    return BartTokenizer(tok_dir / "vocab.json", tok_dir / "merges.txt", text_length=text_length)


def encode_prompts(tok: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ids, mask (M, T) int64, as the runtime prepares them."""
    norm = TextNormalizer()
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ids = np.empty((len(prompts), tok.text_length), dtype=np.int64)
    mask = np.empty_like(ids)
    for i, p in enumerate(prompts):
        if p not in cache:
            e = tok.encode(norm(p))
            if e.truncated:
                raise ValueError(f"prompt {p!r} does not fit {tok.text_length} text tokens")
            cache[p] = (e.ids, e.mask)
        ids[i], mask[i] = cache[p]
    return ids, mask
