"""DalleBart image-token decoder: causal self-attention, cross-attention to the text, GLU.

Two ways to run it, same weights:

* ``forward(tokens, enc, text_mask)``: teacher forcing over a whole sequence (training, reference);
* ``step(...)``: one token per row with a self-attention KV cache and precomputed cross-attention
  keys/values (``cross_kv``): what the exported ONNX decoder graph does, 256 times per image.

Parameter names follow min-dalle's ``DalleBartDecoder`` (``decoder.pt``), ``lm_head`` included.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import GLU, MASK_VALUE, Attention, BiasLayerNorm, padding_bias


class DecoderLayer(nn.Module):
    """h1 = y + LN1(SelfAttn(LN0'(y))); h2 = h1 + LN3(CrossAttn(LN2'(h1), enc)); y = h2 + GLU(h2)"""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.pre_self_attn_layer_norm = BiasLayerNorm(d, cfg.ln_eps)
        self.self_attn = Attention(d, cfg.decoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.pre_encoder_attn_layer_norm = BiasLayerNorm(d, cfg.ln_eps)
        self.encoder_attn = Attention(d, cfg.decoder_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.glu = GLU(d, cfg.decoder_ffn_dim, cfg.ln_eps)

    def cross_and_glu(self, y: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                      text_bias: torch.Tensor) -> torch.Tensor:
        q = self.encoder_attn.split_heads(self.encoder_attn.q_proj(self.pre_encoder_attn_layer_norm(y)))
        y = y + self.encoder_attn_layer_norm(self.encoder_attn.attend(q, cross_k, cross_v, text_bias))
        return y + self.glu(y)

    def forward(self, y: torch.Tensor, enc: torch.Tensor, causal_bias: torch.Tensor,
                text_bias: torch.Tensor) -> torch.Tensor:
        z = self.pre_self_attn_layer_norm(y)
        y = y + self.self_attn_layer_norm(self.self_attn(z, z, causal_bias))
        cross_k, cross_v = self.encoder_attn.keys_values(enc)
        return self.cross_and_glu(y, cross_k, cross_v, text_bias)

    def step(self, y: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_bias: torch.Tensor,
             cross_k: torch.Tensor, cross_v: torch.Tensor, text_bias: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position. y (R, 1, D); past_k/v (R, H, N, Dh), columns >= t hidden by past_bias (1, 1, 1, N).

        Returns y (R, 1, D) and this position's key and value (R, H, 1, Dh), for the caller to store.
        """
        sa = self.self_attn
        z = self.pre_self_attn_layer_norm(y)
        q, k, v = sa.split_heads(sa.q_proj(z)), sa.split_heads(sa.k_proj(z)), sa.split_heads(sa.v_proj(z))
        # Attend over [past columns ; this token] without concatenating the cache.
        scale = sa.head_dim ** -0.5
        s_past = torch.matmul(q, past_k.transpose(-1, -2)) * scale + past_bias   # (R, H, 1, N)
        s_new = (q * k).sum(-1, keepdim=True) * scale                            # (R, H, 1, 1)
        p = torch.cat([s_past, s_new], dim=-1).softmax(dim=-1)                    # (R, H, 1, N + 1)
        n = past_k.shape[2]
        a = torch.matmul(p[..., :n], past_v) + p[..., n:] * v                     # (R, H, 1, Dh)
        y = y + self.self_attn_layer_norm(sa.out_proj(sa.merge_heads(a)))
        return self.cross_and_glu(y, cross_k, cross_v, text_bias), k, v


class DalleBartDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.decoder_vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.image_length, d)
        self.layernorm_embedding = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.final_ln = BiasLayerNorm(d, cfg.ln_eps)
        self.lm_head = nn.Linear(d, cfg.decoder_vocab_size, bias=False)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """(R, t, D) -> (R, t, Vi), always float32 (guidance amplifies lm_head rounding errors)."""
        y = self.final_ln(y)
        return torch.nn.functional.linear(y.float(), self.lm_head.weight.float())

    def forward(self, tokens: torch.Tensor, enc: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. tokens (R, t) int64 starting with the start token; enc (R, T, D);
        text_mask (R, T) -> logits (R, t, Vi); logits[:, i] predicts the code at position i."""
        t = tokens.shape[1]
        y = self.layernorm_embedding(self.embed_tokens(tokens) + self.embed_positions.weight[:t])
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        causal_bias = torch.zeros(t, t, dtype=y.dtype, device=y.device).masked_fill(~causal, MASK_VALUE)
        text_bias = padding_bias(text_mask, y.dtype)
        for layer in self.layers:
            y = layer(y, enc, causal_bias, text_bias)
        return self.logits(y)

    def cross_kv(self, enc: torch.Tensor) -> torch.Tensor:
        """Encoder states (R, T, D) -> every layer's cross-attention keys and values (L, 2, R, H, T, Dh)."""
        return torch.stack([torch.stack(layer.encoder_attn.keys_values(enc)) for layer in self.layers])

    def step(self, token: torch.Tensor, position: torch.Tensor, past_kv: list[torch.Tensor],
             cross_kv: list[torch.Tensor], text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step for every row.

        token (R,) int64; position (1,) int64 = t; past_kv: 2L tensors (R, H, N, Dh) (key, value per
        layer; columns < t filled); cross_kv: 2L tensors (R, H, T, Dh); text_mask (R, T).
        Returns logits (R, Vi) float32 and new_kv (L, 2, R, H, Dh), this step's keys/values.
        """
        n = self.cfg.image_length
        y = self.embed_tokens(token)[:, None] + self.embed_positions(position)[None]   # (R, 1, D)
        y = self.layernorm_embedding(y)
        cols = torch.arange(n, device=token.device)
        past_bias = ((cols >= position).float() * MASK_VALUE).to(y.dtype).view(1, 1, 1, n)
        text_bias = padding_bias(text_mask, y.dtype)
        new_kv = []
        for i, layer in enumerate(self.layers):
            y, k, v = layer.step(y, past_kv[2 * i], past_kv[2 * i + 1], past_bias,
                                 cross_kv[2 * i], cross_kv[2 * i + 1], text_bias)
            new_kv.append(torch.stack([k[:, :, 0], v[:, :, 0]]))                      # (2, R, H, Dh)
        return self.logits(y)[:, 0], torch.stack(new_kv)
