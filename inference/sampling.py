"""Super-conditioning and top-k / top-p / temperature sampling, in numpy, with explicit randomness.

Every image owns a stream of uniforms drawn from ``numpy.random.default_rng([seed, image_index])``,
so an image depends only on its prompt, seed and index: not on the batch it was generated in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    condition_scale: float = 10.0   # s in l = l_u + s (l_c - l_u); 1.0 = no guidance
    top_k: int = 50                 # keep the k most likely codes; 0 = all
    top_p: float = 1.0              # nucleus: smallest set with mass >= p; 1.0 = off
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use top_k=1 for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


def image_uniforms(seeds: list[int], n_images: int, steps: int) -> np.ndarray:
    """Uniform draws in [0, 1) for each image and step: (len(seeds) * n_images, steps) float64."""
    return np.stack([np.random.default_rng([seed, j]).random(steps) for seed in seeds for j in range(n_images)])


def guide(logits: np.ndarray, num_codes: int, scale: float) -> np.ndarray:
    """Rows (2B, Vi) = [unconditional B; conditional B] -> guided logits over real codes (B, num_codes)."""
    b = logits.shape[0] // 2
    u, c = logits[:b, :num_codes], logits[b:, :num_codes]
    return u + scale * (c - u) if scale != 1.0 else c.copy()


def sample(logits: np.ndarray, uniforms: np.ndarray, p: SamplingParams) -> np.ndarray:
    """logits (B, K), uniforms (B,) -> codes (B,) int64, by inverse-CDF sampling over the kept codes."""
    b, n = logits.shape
    l = logits / p.temperature if p.temperature != 1.0 else logits
    k = n if p.top_k == 0 else min(p.top_k, n)
    if k < n:
        idx = np.argpartition(l, n - k, axis=1)[:, n - k:]                  # (B, k), unordered
        vals = np.take_along_axis(l, idx, axis=1)
    else:
        idx, vals = np.broadcast_to(np.arange(n), (b, n)), l
    order = np.argsort(-vals, axis=1, kind="stable")                       # most likely first
    idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
    prob = np.exp((vals - vals[:, :1]).astype(np.float64))                 # (B, k), unnormalised
    if p.top_p < 1.0:
        prob /= prob.sum(axis=1, keepdims=True)
        before = np.cumsum(prob, axis=1) - prob                            # mass of more likely codes
        prob = np.where(before < p.top_p, prob, 0.0)
    cdf = np.cumsum(prob, axis=1)
    choice = (cdf < uniforms[:, None] * cdf[:, -1:]).sum(axis=1)
    return idx[np.arange(b), np.minimum(choice, k - 1)].astype(np.int64)
