"""Guidance and top-k / top-p / temperature sampling as torch ops, for decoder graphs that sample
on the device (export time only; the runtime runs the exported graph).

It computes exactly what the runtime's numpy sampler (``inference.sampling.guide`` and ``sample``)
computes from the same logits and uniforms, in the same precisions: guidance and temperature in
float32, the kept codes' probabilities and their cumulative sum in float64, inverse-CDF choice.
The one difference is the candidate set: the graph keeps the ``kmax`` most likely codes (one TopK
of fixed size, which a GPU runs cheaply), so ``top_k`` must lie in 1..kmax (or ``top_k`` = 0 / a
value >= the number of codes, when there are no more than kmax codes).

A step's sampled codes go straight into the next step's token input and into a codes buffer on the
device, so a decoder step needs no host round trip at all: the precondition for replaying the
whole step as one CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_KMAX = 256   # min-dalle's default top_k; dalle-mini's playground samples from the top 50


class DeviceSampler(nn.Module):
    def __init__(self, num_codes: int, kmax: int = DEFAULT_KMAX) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.kmax = min(kmax, num_codes)

    def forward(self, logits: torch.Tensor, uniforms: torch.Tensor, condition_scale: torch.Tensor,
                temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """logits (2B, Vi) float32 = [unconditional B; conditional B]; uniforms (B,) float64;
        condition_scale, temperature (1,) float32; top_k (1,) int64 in 1..kmax; top_p (1,) float64
        in (0, 1]. Returns codes (B,) int64."""
        b = logits.shape[0] // 2
        u, c = logits[:b, :self.num_codes], logits[b:, :self.num_codes]
        guided = torch.where(condition_scale == 1.0, c, u + condition_scale * (c - u))
        scaled = guided / temperature
        vals, idx = torch.topk(scaled, self.kmax, dim=1, largest=True, sorted=True)      # (B, kmax)
        prob = torch.exp((vals - vals[:, :1]).double())
        rank = torch.arange(self.kmax, device=logits.device).view(1, -1)
        prob = torch.where(rank < top_k, prob, torch.zeros_like(prob))                   # top-k
        normed = prob / prob.sum(dim=1, keepdim=True)
        before = torch.cumsum(normed, dim=1) - normed                                    # top-p
        prob = torch.where(top_p < 1.0, torch.where(before < top_p, normed, torch.zeros_like(normed)), prob)
        cdf = torch.cumsum(prob, dim=1)
        choice = (cdf < uniforms[:, None] * cdf[:, -1:]).sum(dim=1)
        choice = torch.minimum(choice, top_k - 1)
        return torch.gather(idx, 1, choice[:, None])[:, 0]
