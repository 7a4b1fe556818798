"""Torch reference vs onnxruntime, every graph, float32: max abs difference under 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from inference.bundle import DECODER_FIXED_INPUTS, GRAPHS, decoder_kv_inputs
from inference.export import build_parts, export_graphs

from .helpers import TINY, TINY_VQ

TOL = 1e-4


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _text(cfg, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((rows, cfg.text_length), cfg.text_pad_id, dtype=np.int64)
    for r in range(rows):
        n = rng.integers(0, cfg.text_length - 1)                 # row 0: the empty prompt
        n = 0 if r == 0 else n
        ids[r, 0] = cfg.text_bos_id
        ids[r, 1:1 + n] = rng.integers(5, cfg.text_vocab_size, n)
        ids[r, 1 + n] = cfg.text_eos_id
    return ids, (ids != cfg.text_pad_id).astype(np.int64)


def run_decoder_onnx(sess: ort.InferenceSession, cfg, cross_kv: np.ndarray, mask: np.ndarray,
                     tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced step-by-step decoding with the in-place cache, as the runtime does it."""
    layers, _, r, h, _, dh = cross_kv.shape
    cache = np.zeros((layers, 2, r, h, cfg.image_length, dh), np.float32)
    names = [*DECODER_FIXED_INPUTS, *decoder_kv_inputs(layers)]
    out = []
    for t in range(tokens.shape[1]):
        kv = [cache[i, j] for i in range(layers) for j in range(2)] + [cross_kv[i, j] for i in range(layers) for j in range(2)]
        logits, new_kv = sess.run(None, dict(zip(names, [tokens[:, t], np.array([t]), mask, *kv])))
        cache[:, :, :, :, t] = new_kv
        out.append(logits)
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def graphs(tiny_bundle: Path):
    return {part: _session(tiny_bundle / f) for part, f in GRAPHS.items()}


def test_encoder_cross_kv_matches_torch(tiny_parts, graphs) -> None:
    rng = np.random.default_rng(0)
    ids, mask = _text(TINY, 5, rng)
    (got,) = graphs["encoder"].run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = tiny_parts.decoder.cross_kv(tiny_parts.encoder(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    assert got.shape == (TINY.decoder_layers, 2, 5, TINY.decoder_heads, TINY.text_length, TINY.head_dim)
    assert np.abs(got - want).max() < TOL


def test_decoder_steps_match_teacher_forced_torch(tiny_parts, graphs) -> None:
    """Every step's logits, with the KV cache, equal the full causal forward pass of the torch model."""
    rng = np.random.default_rng(1)
    rows = 6
    ids, mask = _text(TINY, rows, rng)
    tokens = rng.integers(0, TINY.num_codes, (rows, TINY.image_length))
    tokens[:, 0] = TINY.decoder_start_token_id
    (cross_kv,) = graphs["encoder"].run(None, {"input_ids": ids, "attention_mask": mask})
    got = run_decoder_onnx(graphs["decoder"], TINY, cross_kv, mask, tokens)
    with torch.no_grad():
        enc = tiny_parts.encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        want = tiny_parts.decoder(torch.from_numpy(tokens), enc, torch.from_numpy(mask)).numpy()
    assert got.shape == want.shape == (rows, TINY.image_length, TINY.decoder_vocab_size)
    assert want.std() > 0.1                          # not a degenerate comparison
    assert np.abs(got - want).max() < TOL


def test_vqgan_pixels_match_torch(tiny_parts, graphs) -> None:
    codes = np.random.default_rng(2).integers(0, TINY_VQ.n_embed, (3, TINY.image_length))
    (got,) = graphs["vqgan"].run(None, {"codes": codes})
    with torch.no_grad():
        want = tiny_parts.vqgan(torch.from_numpy(codes)).numpy()
    assert got.shape == (3, TINY_VQ.resolution, TINY_VQ.resolution, 3)
    assert 0 <= got.min() and got.max() <= 1 and got.std() > 0.01
    assert np.abs(got - want).max() < TOL


def test_present_cache_graph_matches_inplace(tiny_parts, tmp_path: Path) -> None:
    """The GPU-style decoder graph (returns updated caches) gives the same logits."""
    export_graphs(tiny_parts, tmp_path, "float32", cache="present", progress=False, only=("encoder", "decoder"))
    sess = _session(tmp_path / "decoder.onnx")
    rng = np.random.default_rng(3)
    ids, mask = _text(TINY, 4, rng)
    tokens = rng.integers(0, TINY.num_codes, (4, 8))
    tokens[:, 0] = TINY.decoder_start_token_id
    (cross_kv,) = _session(tmp_path / "encoder.onnx").run(None, {"input_ids": ids, "attention_mask": mask})
    layers = TINY.decoder_layers
    past = [np.zeros((4, TINY.decoder_heads, TINY.image_length, TINY.head_dim), np.float32) for _ in range(2 * layers)]
    names = [*DECODER_FIXED_INPUTS, *decoder_kv_inputs(layers)]
    got = []
    for t in range(tokens.shape[1]):
        cross = [cross_kv[i, j] for i in range(layers) for j in range(2)]
        logits, *past = sess.run(None, dict(zip(names, [tokens[:, t], np.array([t]), mask, *past, *cross])))
        got.append(logits)
    with torch.no_grad():
        enc = tiny_parts.encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        want = tiny_parts.decoder(torch.from_numpy(tokens), enc, torch.from_numpy(mask)).numpy()
    assert np.abs(np.stack(got, 1) - want).max() < TOL


def test_half_and_int8_bundles_stay_close(tiny_parts, tmp_path: Path) -> None:
    """fp16 (GPU) and int8 (CPU) graphs run and stay near the fp32 logits; the VQGAN stays float32."""
    rng = np.random.default_rng(4)
    ids, mask = _text(TINY, 2, rng)
    with torch.no_grad():
        enc = tiny_parts.encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        ref_kv = tiny_parts.decoder.cross_kv(enc).numpy()
    for dtype, tol in (("float16", 0.05), ("int8", 0.5)):
        d = tmp_path / dtype
        d.mkdir()
        export_graphs(tiny_parts, d, dtype, progress=False, only=("encoder", "decoder"))
        enc_sess = _session(d / "encoder.onnx")
        (kv,) = enc_sess.run(None, {"input_ids": ids, "attention_mask": mask})
        assert kv.dtype == (np.float16 if dtype == "float16" else np.float32)
        assert np.abs(kv.astype(np.float32) - ref_kv).max() < tol * np.abs(ref_kv).max()
        dec = _session(d / "decoder.onnx")
        assert dec.get_outputs()[0].type == "tensor(float)"              # lm_head and logits stay float32


def test_mega_style_vocabulary_exports(tokenizer_dir, tmp_path: Path) -> None:
    """A padded image vocabulary (Mega: 16415 + 1 rows, 16384 codes) goes through the same code path."""
    from .helpers import TINY_MEGA, TINY_VQ16

    parts = build_parts(TINY_MEGA, TINY_VQ16, seed=3, std=0.3)
    export_graphs(parts, tmp_path, progress=False, only=("decoder",))
    sess = _session(tmp_path / "decoder.onnx")
    assert sess.get_outputs()[0].shape[-1] == TINY_MEGA.image_vocab_size + 1
