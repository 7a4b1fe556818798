"""Building blocks shared by the DalleBart encoder and decoder (dalle-mini, NormFormer placement).

No bias on any Linear; LayerNorms that feed a Linear have no learned gain (bias only); exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Added to attention scores of masked keys. Finite so a half-precision graph stays finite after the
# cast (-1e9 becomes -inf in fp16, which softmax handles while at least one key is visible).
MASK_VALUE = -1e9


class BiasLayerNorm(nn.Module):
    """LayerNorm with the gain fixed to 1 and a learned bias (dalle-mini's ``use_scale=False``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under CPU bf16 autocast x arrives in bf16 (layer_norm is not autocast there) and a float32
        # bias breaks the backward pass; exported graphs never take this branch
        bias = self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.layer_norm(x, self.bias.shape, None, bias, self.eps)


class Attention(nn.Module):
    """Multi-head attention, no biases; scores scaled by 1/sqrt(head_dim)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T, D) -> (R, H, T, Dh)"""
        r, t, _ = x.shape
        return x.view(r, t, self.heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(R, H, T, Dh) -> (R, T, D)"""
        r, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(r, t, h * dh)

    def keys_values(self, kv_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, Tk, D) -> keys, values (R, H, Tk, Dh)"""
        return self.split_heads(self.k_proj(kv_in)), self.split_heads(self.v_proj(kv_in))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q (R, H, Tq, Dh), k/v (R, H, Tk, Dh), bias broadcastable to (R, H, Tq, Tk) -> (R, Tq, D)"""
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim ** -0.5) + bias
        return self.out_proj(self.merge_heads(torch.matmul(scores.softmax(dim=-1), v)))

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k, v = self.keys_values(kv_in)
        return self.attend(self.split_heads(self.q_proj(q_in)), k, v, bias)


class GLU(nn.Module):
    """GEGLU feed-forward with NormFormer's mid norm: fc2(ln1(gelu(fc0(ln0 x)) * fc1(ln0 x)))."""

    def __init__(self, d_model: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.ln0 = BiasLayerNorm(d_model, eps)
        self.ln1 = BiasLayerNorm(ffn_dim, eps)
        self.fc0 = nn.Linear(d_model, ffn_dim, bias=False)
        self.fc1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.ln0(x)                                   # (..., D)
        h = F.gelu(self.fc0(z)) * self.fc1(z)             # (..., F)
        return self.fc2(self.ln1(h))                      # (..., D)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key-padding mask (R, Tk), 1 = visible -> additive bias (R, 1, 1, Tk)."""
    return ((1.0 - mask.float()) * MASK_VALUE).to(dtype)[:, None, None, :]
