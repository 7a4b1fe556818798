"""Stage 3 (refine): sampling the base bundle, the code encoder, the fine-tune from the base weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.config import VQGANConfig
from inference.export import ModelParts, build_parts, export_bundle
from inference.model import VQGANDecoder
from inference.shapes.grammar import parse
from inference.training import pipeline
from inference.training.from_bundle import load_parts
from inference.training.refine import CodeEncoder, RefineConfig, refine, train_code_encoder
from inference.training.transformer import TransformerTrainConfig, shapes_model_config

TINY_VQ = VQGANConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=0, attn_resolutions=(), z_channels=16,
                      embed_dim=8, n_embed=32, resolution=32, norm_groups=4)
TINY_TF = replace(shapes_model_config(pipeline.TEXT_VOCAB_ROWS, 32, 4), d_model=64, encoder_heads=2,
                  decoder_heads=2, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64)
TINY_TRAIN = TransformerTrainConfig(steps=3, batch=8, lr=1e-3, warmup=1, eval_every=3, eval_prompts=2,
                                    checkpoint_every=2, eval_sampling=(1.5, 8, 0.6))
TINY_REFINE = RefineConfig(samples=40, encoder_steps=3, encoder_batch=8, scenes=24, recon_scenes=4,
                           checkpoint_every=2, transformer=TINY_TRAIN, best_of_prompts=0,
                           best_of=replace(TINY_TRAIN, steps=2))


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory) -> Path:
    parts = build_parts(TINY_TF, TINY_VQ, seed=2, std=0.3)
    out = tmp_path_factory.mktemp("base") / "bundle"
    export_bundle(parts, pipeline.TOKENIZER_DIR, out, name="tiny-shapes", progress=False)
    return out


def test_refine_samples_the_base_model_and_fine_tunes_its_weights(tmp_path, base_bundle):
    parts = load_parts(base_bundle)
    base = {k: v.clone() for k, v in parts.decoder.state_dict().items()}
    summary = refine(tmp_path, parts, base_bundle, TINY_REFINE, device="cpu", progress=False)
    work = tmp_path / "refine"
    with np.load(work / "samples-40-seed0.npz") as z:
        prompts, codes = [str(p) for p in z["prompts"]], z["codes"]
    assert codes.shape == (40, 16) and codes.min() >= 0 and codes.max() < 32
    assert not any(parse(p).has_unseen_pair for p in prompts)      # held-out pairs never drawn
    with np.load(work / "scene-codes-24-seed0.npz") as z:
        assert z["codes"].shape == (24, 16)
        assert not any(parse(str(p)).has_unseen_pair for p in z["prompts"])
    assert (work / "encoder.pt").is_file() and (work / "transformer" / "final.pt").is_file()
    assert summary["transformer_steps"] == 3 and 0.0 <= summary["recon"]["fully_correct"] <= 1.0
    assert summary["base"]["name"] == "tiny-shapes"
    assert json.loads((work / "refine.json").read_text())["transformer_steps"] == 3
    tuned = torch.load(work / "transformer" / "final.pt", weights_only=False)["decoder"]
    assert any(not torch.equal(tuned[k], base[k]) for k in base)    # trained ...
    # ... starting from the base weights: a run with learning rate 0 ends exactly where it began
    frozen = replace(TINY_REFINE, transformer=replace(TINY_REFINE.transformer, lr=0.0, weight_decay=0.0))
    refine(tmp_path / "frozen", parts, base_bundle, frozen, device="cpu", progress=False)
    same = torch.load(tmp_path / "frozen" / "refine" / "transformer" / "final.pt", weights_only=False)["decoder"]
    assert all(torch.equal(same[k], base[k]) for k in base)
    # a finished run is loaded, not redone
    again = refine(tmp_path, parts, base_bundle, TINY_REFINE, device="cpu", progress=False)
    assert again["transformer_steps"] == 3
    # stage 5 (best-of) runs after the fine-tune and trains from its weights
    best = replace(TINY_REFINE, best_of_prompts=4, best_of_k=2)
    summary = refine(tmp_path, parts, base_bundle, best, device="cpu", progress=False)
    assert summary["best_of"]["candidates"] == 8 and summary["transformer_dir"].endswith("best-of")
    assert summary["transformer_steps"] == 2 and (work / "round1-bundle" / "manifest.json").is_file()


def test_code_encoder_learns_the_codes_of_a_decoder(tmp_path):
    """A decoder whose codes paint flat colours: the encoder must read each cell's code back."""
    torch.manual_seed(0)
    vq = VQGANDecoder(TINY_VQ)
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (32, 3)).astype(np.uint8)
    codes = rng.integers(0, 32, (400, 16))
    # each 8x8 cell of a 32x32 image is its code's colour
    images = palette[codes].reshape(400, 4, 4, 3).repeat(8, 1).repeat(8, 2)
    cfg = replace(TINY_REFINE, encoder_steps=150, encoder_batch=32, encoder_lr=3e-3)
    enc = train_code_encoder(tmp_path, images, codes, vq, cfg, torch.device("cpu"), progress=False)
    assert isinstance(enc, CodeEncoder)
    accuracy = (enc.codes(images[:100], torch.device("cpu")) == codes[:100]).mean()
    assert accuracy > 0.9, accuracy


def test_best_of_keeps_only_images_the_scorer_finds_fully_correct():
    from inference.shapes.score import score_scene
    from inference.training.refine import best_of_samples, decode

    shipped = Path(__file__).resolve().parents[2] / "inference" / "shipped" / "shapes"
    vqgan = load_parts(shipped).vqgan
    cfg = replace(TINY_REFINE, best_of_prompts=12, best_of_k=3, best_of_keep=2)
    prompts, codes, stats = best_of_samples(shipped, vqgan, cfg, torch.device("cpu"), progress=False)
    assert stats["prompts"] == 12 and stats["candidates"] == 36
    assert 0 < len(prompts) == len(codes) == stats["kept"] <= 24        # the shipped model gets some right
    assert max(prompts.count(p) for p in prompts) <= 2
    assert not any(parse(p).has_unseen_pair for p in prompts)
    for p, image in zip(prompts, decode(vqgan, codes, torch.device("cpu"))):
        assert score_scene(p, parse(p), image).correct
    by_prompt: dict[str, list[bytes]] = {}
    for p, c in zip(prompts, codes):
        by_prompt.setdefault(p, []).append(c.tobytes())
    assert all(len(set(v)) == len(v) for v in by_prompt.values())       # distinct grids only


def test_a_fine_tuned_vqgan_decoder_ships_in_the_refined_bundle(tmp_path, base_bundle):
    parts = load_parts(base_bundle)
    cfg = replace(TINY_REFINE, decoder_steps=2, decoder_batch=4)
    summary = refine(tmp_path, parts, base_bundle, cfg, device="cpu", progress=False)
    tuned = torch.load(summary["vqgan"], weights_only=False)["model"]
    base = parts.vqgan.state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    assert summary["recon_tuned_decoder"] is not None
    pipeline.export_refined(tmp_path, tmp_path / "bundle", base_bundle, summary, progress=False)
    shipped = load_parts(tmp_path / "bundle")          # parity-checked against onnxruntime
    assert all(torch.equal(shipped.vqgan.state_dict()[k], tuned[k]) for k in tuned)
    final = torch.load(tmp_path / "refine" / "transformer" / "final.pt", weights_only=False)["decoder"]
    assert all(torch.equal(shipped.decoder.state_dict()[k], final[k]) for k in final)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["name"] == "shapes-v2" and manifest["provenance"]["refine"]["base"]["name"] == "tiny-shapes"


def test_train_shapes_seed_reaches_every_refine_training():
    import argparse

    from inference.training.pipeline import _recipe_from_args

    args = argparse.Namespace(seed=5, scenes=1000, vq_steps=None, vq_batch=None, vq_lr=None, steps=None,
                              batch=None, lr=None, refine=True, refine_steps=None, refine_scenes=None)
    refine_cfg = _recipe_from_args(args).refine
    assert (refine_cfg.seed, refine_cfg.transformer.seed, refine_cfg.best_of.seed) == (5, 5, 5)
    assert refine_cfg.transformer.steps == RefineConfig().transformer.steps
