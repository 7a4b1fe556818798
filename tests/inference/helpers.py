"""Tiny models, tokenizer files and checkpoints in the published formats, built in the test run."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

from inference.config import ModelConfig, VQGANConfig

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # BART order: ids 0..4

CORPUS = [
    "a red circle on the left", "a picture of a small blue square", "two green triangles",
    "an avocado armchair", "a yellow star above a purple circle on a black background",
    "the cat in the hat", "a drawing of a big orange star at the top", "three small red squares",
    "sunset over the mountains, oil painting", "koshka na lune", "cafe creme", "hello world",
]

TINY = ModelConfig(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_heads=2, decoder_heads=2,
    encoder_ffn_dim=40, decoder_ffn_dim=40, text_vocab_size=400, image_vocab_size=24,
    text_length=12, image_grid=4, num_codes=24, decoder_start_token_id=24,
)
# DALL·E Mega-style vocabulary: padded image vocabulary, 16 real codes, start token = num_codes.
TINY_MEGA = ModelConfig(
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_heads=2, decoder_heads=2,
    encoder_ffn_dim=48, decoder_ffn_dim=48, text_vocab_size=410, image_vocab_size=20,
    text_length=12, image_grid=4, num_codes=16, decoder_start_token_id=16,
)
# Head size 64, as min-dalle folders without config.json are read (heads = d_model // 64)
TINY64 = ModelConfig(
    d_model=64, encoder_layers=1, decoder_layers=2, encoder_heads=1, decoder_heads=1,
    encoder_ffn_dim=40, decoder_ffn_dim=40, text_vocab_size=400, image_vocab_size=24,
    text_length=12, image_grid=4, num_codes=24, decoder_start_token_id=24,
)
# GroupNorm keeps vqgan-jax's 32 groups (its config.json has no such field)
TINY_VQ = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=16,
                      embed_dim=8, n_embed=24, resolution=16)
TINY_VQ16 = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=16,
                        embed_dim=8, n_embed=16, resolution=16)


def write_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """Train a small byte-level BPE (BART special tokens first) and save vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
                            show_progress=False)
    tok.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    assert [vocab[s] for s in SPECIALS] == list(range(5)) and len(vocab) <= vocab_size
    return folder


# ---------------------------------------------------------------------------------------------
# Published checkpoint formats, written from torch modules (names per the dalle-mini / vqgan-jax /
# min-dalle parameter tables in shared/reference/dalle-mini-model.md §7).

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference.export import ModelParts  # noqa: E402


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().copy()


def _ext(tree):
    """Replace arrays by flax's msgpack ExtType(1, packb([shape, dtype name, raw bytes]))."""
    if isinstance(tree, dict):
        return {k: _ext(v) for k, v in tree.items()}
    a = np.ascontiguousarray(tree)
    return msgpack.ExtType(1, msgpack.packb([list(a.shape), a.dtype.name, a.tobytes("C")], use_bin_type=True))


def write_msgpack(path: Path, tree: dict) -> None:
    path.write_bytes(msgpack.packb(_ext(tree), use_bin_type=True))


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "model_type": "dallebart", "d_model": cfg.d_model, "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers, "encoder_attention_heads": cfg.encoder_heads,
        "decoder_attention_heads": cfg.decoder_heads, "encoder_ffn_dim": cfg.encoder_ffn_dim,
        "decoder_ffn_dim": cfg.decoder_ffn_dim, "encoder_vocab_size": cfg.text_vocab_size,
        "image_vocab_size": cfg.image_vocab_size, "max_text_length": cfg.text_length,
        "image_length": cfg.image_length, "decoder_start_token_id": cfg.decoder_start_token_id,
        "bos_token_id": cfg.image_vocab_size + 1, "eos_token_id": cfg.image_vocab_size + 1,
        "pad_token_id": cfg.image_vocab_size + 1, "use_glu": True, "ln_positions": "normformer",
        "use_bias": False, "activation_function": "gelu", "_name_or_path": "dalle-mini/tiny-test",
    }


def _flax_layer(layer, decoder: bool) -> dict:
    att = lambda a: {p: {"kernel": _np(getattr(a, f"{p}").weight).T} for p in ("q_proj", "k_proj", "v_proj", "out_proj")}  # noqa: E731
    g = layer.glu
    d = {
        "LayerNorm_0": {"bias": _np(layer.pre_self_attn_layer_norm.bias)},
        "FlaxBartAttention_0": att(layer.self_attn),
        "LayerNorm_1": {"scale": _np(layer.self_attn_layer_norm.weight), "bias": _np(layer.self_attn_layer_norm.bias)},
        "GLU_0": {"LayerNorm_0": {"bias": _np(g.ln0.bias)}, "Dense_0": {"kernel": _np(g.fc0.weight).T},
                  "Dense_1": {"kernel": _np(g.fc1.weight).T}, "LayerNorm_1": {"bias": _np(g.ln1.bias)},
                  "Dense_2": {"kernel": _np(g.fc2.weight).T}},
    }
    if decoder:
        d["LayerNorm_2"] = {"bias": _np(layer.pre_encoder_attn_layer_norm.bias)}
        d["FlaxBartAttention_1"] = att(layer.encoder_attn)
        d["LayerNorm_3"] = {"scale": _np(layer.encoder_attn_layer_norm.weight), "bias": _np(layer.encoder_attn_layer_norm.bias)}
    return d


def _stack(trees: list[dict]) -> dict:
    return {k: _stack([t[k] for t in trees]) if isinstance(trees[0][k], dict) else np.stack([t[k] for t in trees])
            for k in trees[0]}


def _flax_stack(module, decoder: bool, scan: bool) -> dict:
    kind = "Decoder" if decoder else "Encoder"
    layers = [_flax_layer(layer, decoder) for layer in module.layers]
    out = {
        "embed_tokens": {"embedding": _np(module.embed_tokens.weight)},
        "embed_positions": {"embedding": _np(module.embed_positions.weight)},
        "layernorm_embedding": {"scale": _np(module.layernorm_embedding.weight), "bias": _np(module.layernorm_embedding.bias)},
        "layers": {f"FlaxBart{kind}Layers": _stack(layers)} if scan else
                  {f"FlaxBart{kind}Layer_{i}": t for i, t in enumerate(layers)},
        "final_ln": {"bias": _np(module.final_ln.bias)},
    }
    return out


def dallebart_flax_tree(parts: ModelParts, scan: bool = True) -> dict:
    return {"model": {"encoder": _flax_stack(parts.encoder, False, scan), "decoder": _flax_stack(parts.decoder, True, scan)},
            "lm_head": {"kernel": _np(parts.decoder.lm_head.weight).T}}


def _conv(c) -> dict:
    return {"kernel": _np(c.weight).transpose(2, 3, 1, 0), "bias": _np(c.bias)}   # (out,in,kh,kw) -> (kh,kw,in,out)


def _gn(n) -> dict:
    return {"scale": _np(n.weight), "bias": _np(n.bias)}


def _res(b) -> dict:
    d = {"norm1": _gn(b.norm1), "conv1": _conv(b.conv1), "norm2": _gn(b.norm2), "conv2": _conv(b.conv2)}
    if b.nin_shortcut is not None:
        d["nin_shortcut"] = _conv(b.nin_shortcut)
    return d


def _attn(a) -> dict:
    return {"norm": _gn(a.norm), "q": _conv(a.q), "k": _conv(a.k), "v": _conv(a.v), "proj_out": _conv(a.proj_out)}


def vqgan_flax_tree(vqgan, rng: np.random.Generator) -> dict:
    dec = vqgan.decoder
    up = {}
    for j, level in enumerate(dec.up):
        d = {f"block_{k}": _res(b) for k, b in enumerate(level.block)}
        d.update({f"attn_{k}": _attn(a) for k, a in enumerate(level.attn)})
        if hasattr(level, "upsample"):
            d["upsample"] = {"conv": _conv(level.upsample.conv)}
        up[f"up_{j}"] = d
    cfg = vqgan.cfg
    return {
        "quantize": {"embedding": {"embedding": _np(vqgan.embedding.weight)}},
        "post_quant_conv": _conv(vqgan.post_quant_conv),
        "decoder": {"conv_in": _conv(dec.conv_in),
                    "mid": {"block_1": _res(dec.mid.block_1), "attn_1": _attn(dec.mid.attn_1), "block_2": _res(dec.mid.block_2)},
                    **up, "norm_out": _gn(dec.norm_out), "conv_out": _conv(dec.conv_out)},
        # the encoding path is in the published file too; the converter must drop it
        "encoder": {"conv_in": {"kernel": rng.standard_normal((3, 3, 3, cfg.ch)).astype(np.float32),
                                "bias": np.zeros(cfg.ch, np.float32)}},
        "quant_conv": {"kernel": rng.standard_normal((1, 1, cfg.z_channels, cfg.embed_dim)).astype(np.float32),
                       "bias": np.zeros(cfg.embed_dim, np.float32)},
    }


def vqgan_hf_config(cfg: VQGANConfig) -> dict:
    return {"model_type": "vqgan", "ch": cfg.ch, "out_ch": cfg.out_ch, "in_channels": cfg.in_channels,
            "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
            "attn_resolutions": list(cfg.attn_resolutions), "resolution": cfg.resolution,
            "z_channels": cfg.z_channels, "n_embed": cfg.n_embed, "embed_dim": cfg.embed_dim,
            "dropout": 0.0, "double_z": False, "resamp_with_conv": True}


def write_vqgan_flax(folder: Path, vqgan) -> Path:
    """A vqgan-jax folder (config.json + flax_model.msgpack) for a torch VQGAN decoder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(vqgan_hf_config(vqgan.cfg)))
    write_msgpack(folder / "flax_model.msgpack", vqgan_flax_tree(vqgan, np.random.default_rng(0)))
    return folder


def write_hf_checkpoint(root: Path, parts: ModelParts, tokenizer: Path, scan: bool = True) -> tuple[Path, Path]:
    """dalle-mini HF folder (config.json, flax_model.msgpack, vocab.json, merges.txt) + VQGAN folder."""
    model_dir, vq_dir = root / "dalle-mini", root / "vqgan_imagenet_f16_16384"
    model_dir.mkdir(parents=True)
    vq_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(hf_config(parts.config)))
    write_msgpack(model_dir / "flax_model.msgpack", dallebart_flax_tree(parts, scan))
    for f in ("vocab.json", "merges.txt"):
        (model_dir / f).write_bytes((tokenizer / f).read_bytes())
    # VQGAN folder: the vqgan-jax config.json (the VQGAN config for the tiny test model) + weights
    (vq_dir / "config.json").write_text(json.dumps(vqgan_hf_config(parts.vqgan_config)))
    write_msgpack(vq_dir / "flax_model.msgpack", vqgan_flax_tree(parts.vqgan, np.random.default_rng(0)))
    return model_dir, vq_dir


def write_min_dalle_checkpoint(root: Path, parts: ModelParts, tokenizer: Path) -> tuple[Path, Path]:
    """min-dalle's pretrained/ layout: dalle_bart_mini/{config.json, encoder.pt, decoder.pt, vocab.json,
    merges.txt} (encoder/decoder in float16, bias-only LayerNorm gains absent) and vqgan/detoker.pt
    (float32); a tiny VQGAN also needs its config.json beside detoker.pt."""
    model_dir, vq_dir = root / "pretrained" / "dalle_bart_mini", root / "pretrained" / "vqgan"
    model_dir.mkdir(parents=True)
    vq_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(hf_config(parts.config)))
    torch.save({k: v.half() for k, v in parts.encoder.state_dict().items()}, model_dir / "encoder.pt")
    torch.save({k: v.half() for k, v in parts.decoder.state_dict().items()}, model_dir / "decoder.pt")
    torch.save(parts.vqgan.state_dict(), vq_dir / "detoker.pt")
    (vq_dir / "config.json").write_text(json.dumps(vqgan_hf_config(parts.vqgan_config)))
    for f in ("vocab.json", "merges.txt"):
        (model_dir / f).write_bytes((tokenizer / f).read_bytes())
    return model_dir, vq_dir
