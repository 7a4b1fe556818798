"""PyTorch definitions of the DALL·E Mini architecture (export and training time only).

The runtime never imports this package: it runs the exported ONNX graphs (``inference.pipeline``).

API (stable; the project's own small models use the same classes)::

    from inference.config import ModelConfig, VQGANConfig, MINI, MEGA, VQGAN_F16_16384
    from inference.model import DalleBartEncoder, DalleBartDecoder, VQGANDecoder, VQGANEncoder
    from inference.export import ModelParts, build_parts, export_bundle

    cfg = ModelConfig(d_model=256, encoder_layers=2, decoder_layers=4, encoder_heads=4,
                      decoder_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512,
                      text_vocab_size=1000, image_vocab_size=512, num_codes=512,
                      decoder_start_token_id=512, text_length=32, image_grid=8)
    vq = VQGANConfig(ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(),
                     z_channels=64, embed_dim=64, n_embed=512, resolution=64)   # 64 px, f8 -> 8x8

    enc = DalleBartEncoder(cfg)      # enc(ids (R,T) int64, mask (R,T) int64) -> (R, T, D)
    dec = DalleBartDecoder(cfg)      # dec(tokens (R,t), enc (R,T,D), mask (R,T)) -> logits (R, t, Vi)
                                     #   tokens[:, 0] = cfg.decoder_start_token_id, logits[:, i]
                                     #   predicts code i; train on logits[..., :cfg.num_codes]
    vqd = VQGANDecoder(vq)           # vqd(codes (B, N) int64) -> pixels (B, S, S, 3) in [0, 1]
                                     #   vqd.embedding is the codebook (n_embed, embed_dim)
    vqe = VQGANEncoder(vq)           # vqe(pixels (B, 3, S, S)) -> z (B, embed_dim, g, g);
                                     #   VQGANEncoder.codes(z, vqd.embedding.weight) -> (B, N)

    export_bundle(ModelParts(enc, dec, vqd), tokenizer_dir, out_dir, name="shapes-v1", ...)

Conventions (dalle-mini): text ids ``<s>``=0 ``<pad>``=1 ``</s>``=2 (configurable), padded to
``text_length``; the unconditional ("") prompt is ``<s></s>`` + pads; image codes row-major over the
grid; pixels RGB in [0, 1]. Parameter names are min-dalle's, so its ``.pt`` files load directly.
"""

from ..config import MEGA, MINI, VQGAN_F16_16384, ModelConfig, VQGANConfig
from .decoder import DalleBartDecoder
from .encoder import DalleBartEncoder
from .vqgan import VQGANDecoder, VQGANEncoder

__all__ = [
    "MEGA", "MINI", "VQGAN_F16_16384", "ModelConfig", "VQGANConfig",
    "DalleBartDecoder", "DalleBartEncoder", "VQGANDecoder", "VQGANEncoder",
]
