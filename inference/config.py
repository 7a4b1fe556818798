"""Configurations of the DalleBart transformer and the VQGAN decoder.

One code path serves DALL·E Mini, DALL·E Mega and the project's own small models: every size,
vocabulary and special id lives here, nothing is hard-coded in the modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """The BART-like text encoder + autoregressive image-token decoder (dalle-mini's ``DalleBart``).

    Defaults are DALL·E Mini (``mini-1:v0``). Head size is ``d_model // heads`` (64 in the published
    models). The decoder's embedding table and lm_head have ``image_vocab_size + 1`` rows (the extra
    row is the start token); only codes ``0 .. num_codes-1`` are ever sampled.
    """

    d_model: int = 1024                 # D
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_heads: int = 16
    decoder_heads: int = 16
    encoder_ffn_dim: int = 2730         # GLU hidden size F
    decoder_ffn_dim: int = 2730
    text_vocab_size: int = 50264        # Vt: rows of the text embedding
    image_vocab_size: int = 16384       # decoder rows Vi = image_vocab_size + 1
    text_length: int = 64               # T: text positions (incl. <s> and </s>)
    image_grid: int = 16                # tokens per side; image_length N = image_grid ** 2
    num_codes: int = 16384              # codes the VQGAN knows; sampling is masked to [0, num_codes)
    decoder_start_token_id: int = 16384  # BOS fed at step 0 (16384 for Mini and Mega, not min-dalle's)
    text_bos_id: int = 0                # <s>
    text_pad_id: int = 1                # <pad>; encoder attention mask = (id != pad)
    text_eos_id: int = 2                # </s>
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder"):
            heads = getattr(self, f"{name}_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {name}_heads {heads}")
        if not 0 < self.num_codes <= self.image_vocab_size:
            raise ValueError(f"num_codes {self.num_codes} must be in 1..image_vocab_size {self.image_vocab_size}")
        if not 0 <= self.decoder_start_token_id <= self.image_vocab_size:
            raise ValueError("decoder_start_token_id must be a row of the decoder embedding")

    @property
    def image_length(self) -> int:
        """N: image tokens per image (row-major over the grid)."""
        return self.image_grid * self.image_grid

    @property
    def decoder_vocab_size(self) -> int:
        """Vi: rows of the decoder embedding and outputs of the lm_head."""
        return self.image_vocab_size + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a dalle-mini Hugging Face ``config.json`` (``model_type: dallebart``)."""
        ivs = int(hf["image_vocab_size"])
        return cls(
            d_model=int(hf["d_model"]),
            encoder_layers=int(hf["encoder_layers"]),
            decoder_layers=int(hf["decoder_layers"]),
            encoder_heads=int(hf["encoder_attention_heads"]),
            decoder_heads=int(hf["decoder_attention_heads"]),
            encoder_ffn_dim=int(hf["encoder_ffn_dim"]),
            decoder_ffn_dim=int(hf["decoder_ffn_dim"]),
            text_vocab_size=int(hf["encoder_vocab_size"]),
            image_vocab_size=ivs,
            text_length=int(hf.get("max_text_length", 64)),
            image_grid=int(round(int(hf.get("image_length", 256)) ** 0.5)),
            num_codes=min(ivs, 16384),
            decoder_start_token_id=int(hf.get("decoder_start_token_id", ivs)),
        )


MINI = ModelConfig()
MEGA = ModelConfig(
    d_model=2048, encoder_layers=24, decoder_layers=24, encoder_heads=32, decoder_heads=32,
    encoder_ffn_dim=4096, decoder_ffn_dim=4096, text_vocab_size=50272, image_vocab_size=16415,
)


@dataclass(frozen=True)
class VQGANConfig:
    """taming-transformers VQGAN (decoding path, and the encoder for training small models).

    Defaults are ``dalle-mini/vqgan_imagenet_f16_16384``. The token grid is
    ``resolution / 2 ** (len(ch_mult) - 1)``; the decoder uses ``num_res_blocks + 1`` blocks per level.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"channels {self.ch * m} not divisible by norm_groups {self.norm_groups}")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError("resolution must be divisible by the down-sampling factor")

    @property
    def token_grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "VQGANConfig":
        """Build from ``vqgan_imagenet_f16_16384/config.json`` (vqgan-jax ``VQGANConfig``)."""
        return cls(
            ch=int(hf.get("ch", 128)),
            ch_mult=tuple(hf.get("ch_mult", (1, 1, 2, 2, 4))),
            num_res_blocks=int(hf.get("num_res_blocks", 2)),
            attn_resolutions=tuple(hf.get("attn_resolutions", (16,))),
            z_channels=int(hf.get("z_channels", 256)),
            embed_dim=int(hf.get("embed_dim", 256)),
            n_embed=int(hf.get("n_embed", 16384)),
            resolution=int(hf.get("resolution", 256)),
            in_channels=int(hf.get("in_channels", 3)),
            out_ch=int(hf.get("out_ch", 3)),
        )


VQGAN_F16_16384 = VQGANConfig()
