"""BART byte-level BPE tokenizer (the checkpoint's own vocab.json + merges.txt), via ``tokenizers``.

A row is ``<s> pieces… </s>`` padded with ``<pad>`` to the model's text length; at most
``text_length - 2`` pieces are kept (as Hugging Face truncation does), and the caller is told when a
prompt was cut. Text is expected to be normalised already (it then starts with a space, so the first
word gets the ``Ġ`` marker like every other word).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

from .errors import BundleError


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray        # (T,) int64
    mask: np.ndarray       # (T,) int64, 1 = real token
    truncated: int         # number of BPE pieces dropped (0 = none)


class BartTokenizer:
    def __init__(self, vocab: str | Path, merges: str | Path, *, text_length: int, bos_id: int = 0,
                 pad_id: int = 1, eos_id: int = 2) -> None:
        try:
            vocab_map = json.loads(Path(vocab).read_text(encoding="utf-8"))
            unk = "<unk>" if "<unk>" in vocab_map else None
            self._tok = Tokenizer(BPE.from_file(str(vocab), str(merges), unk_token=unk))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise BundleError(f"cannot read tokenizer files {vocab} / {merges} ({e}); re-export the bundle") from None
        self._tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
        # rows an embedding needs for every id (ids need not be dense)
        self.vocab_size = 1 + max((v for v in vocab_map.values() if isinstance(v, int)), default=-1)
        self.text_length, self.bos_id, self.pad_id, self.eos_id = text_length, bos_id, pad_id, eos_id

    def pieces(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> Encoded:
        ids = self.pieces(text)
        keep = self.text_length - 2
        dropped = max(0, len(ids) - keep)
        row = [self.bos_id, *ids[:keep], self.eos_id]
        out = np.full(self.text_length, self.pad_id, dtype=np.int64)
        out[: len(row)] = row
        mask = np.zeros(self.text_length, dtype=np.int64)
        mask[: len(row)] = 1
        return Encoded(out, mask, dropped)

    def unconditional(self) -> Encoded:
        """The empty prompt used for super-conditioning: ``<s></s>`` then pads, not normalised."""
        return self.encode("")
