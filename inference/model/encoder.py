"""DalleBart text encoder: token + absolute position embeddings, L NormFormer layers, final LN.

Parameter names follow min-dalle's ``DalleBartEncoder`` (``encoder.pt``), so its state dict loads
directly; the conversion from dalle-mini's Flax names lives in ``inference.convert``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import GLU, Attention, BiasLayerNorm, padding_bias


class EncoderLayer(nn.Module):
    """h = x + LN1(SelfAttn(LN0'(x))); x = h + GLU(h)"""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.pre_self_attn_layer_norm = BiasLayerNorm(d, cfg.ln_eps)
        self.self_attn = Attention(d, cfg.encoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.glu = GLU(d, cfg.encoder_ffn_dim, cfg.ln_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        z = self.pre_self_attn_layer_norm(x)
        x = x + self.self_attn_layer_norm(self.self_attn(z, z, bias))
        return x + self.glu(x)


class DalleBartEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.text_vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.text_length, d)
        self.layernorm_embedding = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.final_ln = BiasLayerNorm(d, cfg.ln_eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (R, T) int64 (mask 1 = real token) -> encoder states (R, T, D)"""
        t = ids.shape[1]
        x = self.embed_tokens(ids) + self.embed_positions.weight[:t]       # (R, T, D)
        x = self.layernorm_embedding(x)
        bias = padding_bias(mask, x.dtype)                                  # (R, 1, 1, T)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_ln(x)
