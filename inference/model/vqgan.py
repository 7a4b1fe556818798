"""VQGAN (taming-transformers layout, as in dalle-mini's vqgan_imagenet_f16_16384).

``VQGANDecoder`` is the decoding path the runtime exports: codebook lookup -> post_quant_conv ->
conv_in -> mid (res, attn, res) -> up levels (coarsest first) -> norm, swish, conv_out. Parameter
names follow min-dalle's ``VQGanDetokenizer`` (``detoker.pt``). ``VQGANEncoder`` is the mirror
image (image -> codes), for training small models; it is never exported.

Pixels are RGB in [0, 1] (dalle-mini encoded [0, 1] images; no (x + 1) / 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQGANConfig


def _norm(cfg: VQGANConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """x' + conv2(swish(norm2(conv1(swish(norm1(x)))))), x' = x or nin_shortcut(x) when channels change."""

    def __init__(self, cfg: VQGANConfig, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 conv projections."""

    def __init__(self, cfg: VQGANConfig, c: int) -> None:
        super().__init__()
        self.norm = _norm(cfg, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = self.norm(x)
        q = self.q(z).reshape(b, c, h * w).transpose(1, 2)          # (B, HW, C)
        k = self.k(z).reshape(b, c, h * w)                          # (B, C, HW)
        v = self.v(z).reshape(b, c, h * w)                          # (B, C, HW)
        w_ = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)      # (B, HW query, HW key)
        out = torch.bmm(v, w_.transpose(1, 2)).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Mid(nn.Module):
    def __init__(self, cfg: VQGANConfig, c: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(cfg, c, c)
        self.attn_1 = AttnBlock(cfg, c)
        self.block_2 = ResnetBlock(cfg, c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: res blocks (each followed by attention at attn_resolutions), then resample."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None,
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Decoder(nn.Module):
    """z (B, z_channels, g, g) -> RGB (B, out_ch, resolution, resolution), unclipped."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.token_grid
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(cfg, c)
        up: list[_Level] = []
        for level in reversed(range(levels)):
            c_out = cfg.ch * cfg.ch_mult[level]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, c, c_out))
                c = c_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(cfg, c))
            up.insert(0, _Level(blocks, attn, Upsample(c) if level else None, "upsample"))
            if level:
                res *= 2
        self.up = nn.ModuleList(up)                # up[0] is full resolution, processed last
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Encoder(nn.Module):
    """RGB (B, in_channels, resolution, resolution) -> z (B, z_channels, g, g)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        res = cfg.resolution
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        c = cfg.ch
        down: list[_Level] = []
        for level in range(levels):
            c_out = cfg.ch * cfg.ch_mult[level]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c, c_out))
                c = c_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(cfg, c))
            last = level == levels - 1
            down.append(_Level(blocks, attn, None if last else Downsample(c), "downsample"))
            if not last:
                res //= 2
        self.down = nn.ModuleList(down)
        self.mid = _Mid(cfg, c)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class VQGANDecoder(nn.Module):
    """codes (B, N) int64, row-major over the g x g grid -> pixels (B, H, W, 3) float32 in [0, 1]."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, embed_dim, g, g) -> pixels (B, H, W, 3) clipped to [0, 1]."""
        x = self.decoder(self.post_quant_conv(z_q))               # (B, 3, H, W)
        return x.clamp(0.0, 1.0).permute(0, 2, 3, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.cfg.token_grid
        z = self.embedding(codes)                                 # (B, N, E)
        z = z.view(-1, g, g, self.cfg.embed_dim).permute(0, 3, 1, 2)
        return self.decode_latents(z)


class VQGANEncoder(nn.Module):
    """pixels (B, 3, H, W) in [0, 1] -> latents before quantisation (B, embed_dim, g, g).

    ``codes(z)`` picks the nearest codebook row (given the decoder's ``embedding``). Used only to
    train small models; dalle-mini's converter drops these weights.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(pixels))

    @staticmethod
    def codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """z (B, E, g, g), codebook (K, E) -> codes (B, g*g) int64, row-major."""
        flat = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])          # (B, N, E)
        d = (flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.t()
             + codebook.pow(2).sum(-1)[None, None])                                # (B, N, K)
        return d.argmin(-1)
