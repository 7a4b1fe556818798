"""Published checkpoint formats -> bundle -> onnxruntime, compared with the torch modules they came from."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import torch

from bot.cli import main as dallebot
from inference.convert import load_checkpoint, read_flax_msgpack
from inference.errors import CheckpointError
from inference.export import ModelParts, build_parts

from .helpers import (
    TINY, TINY64, TINY_MEGA, TINY_VQ, TINY_VQ16, dallebart_flax_tree, vqgan_hf_config, write_hf_checkpoint,
    write_min_dalle_checkpoint, write_msgpack, write_vqgan_flax,
)
from .test_parity import TOL, run_decoder_onnx


def _check_bundle_matches(bundle: Path, parts: ModelParts) -> None:
    """Encoder K/V, every decoder step's logits and the VQGAN's pixels of the bundle vs the torch parts."""
    cfg = parts.config
    sess = {p: ort.InferenceSession(str(bundle / f"{p}.onnx"), providers=["CPUExecutionProvider"])
            for p in ("encoder", "decoder", "vqgan")}
    rng = np.random.default_rng(0)
    ids = np.full((3, cfg.text_length), cfg.text_pad_id, np.int64)
    ids[:, 0] = cfg.text_bos_id
    ids[1:, 1:6] = rng.integers(5, 300, (2, 5))
    ids[0, 1], ids[1:, 6] = cfg.text_eos_id, cfg.text_eos_id
    mask = (ids != cfg.text_pad_id).astype(np.int64)
    tokens = rng.integers(0, cfg.num_codes, (3, cfg.image_length))
    tokens[:, 0] = cfg.decoder_start_token_id
    codes = rng.integers(0, parts.vqgan_config.n_embed, (2, cfg.image_length))
    (cross_kv,) = sess["encoder"].run(None, {"input_ids": ids, "attention_mask": mask})
    logits = run_decoder_onnx(sess["decoder"], cfg, cross_kv, mask, tokens)
    (pixels,) = sess["vqgan"].run(None, {"codes": codes})
    with torch.no_grad():
        enc = parts.encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        want_kv = parts.decoder.cross_kv(enc).numpy()
        want_logits = parts.decoder(torch.from_numpy(tokens), enc, torch.from_numpy(mask)).numpy()
        want_pixels = parts.vqgan(torch.from_numpy(codes)).numpy()
    assert np.abs(cross_kv - want_kv).max() < TOL
    assert np.abs(logits - want_logits).max() < TOL
    assert np.abs(pixels - want_pixels).max() < TOL


def test_dalle_mini_hf_folders_convert_exactly(tmp_path: Path, tokenizer_dir: Path) -> None:
    parts = build_parts(TINY, TINY_VQ, seed=11, std=0.3)
    model_dir, vq_dir = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir, scan=True)
    dallebot(["export", "--from", str(model_dir), "--vqgan", str(vq_dir), "--out", str(tmp_path / "bundle")])
    _check_bundle_matches(tmp_path / "bundle", parts)
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert m["name"] == "tiny-test" and m["provenance"]["source_format"] == "dalle-mini flax"
    assert m["model"]["decoder_start_token_id"] == TINY.decoder_start_token_id
    assert "Apache-2.0" in m["license"]


def test_dalle_mega_style_unscanned_flax_with_found_vqgan(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Padded image vocabulary (Mega-like), layers saved unstacked; the VQGAN folder is found beside."""
    parts = build_parts(TINY_MEGA, TINY_VQ16, seed=12, std=0.3)
    model_dir, _ = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir, scan=False)
    ckpt = load_checkpoint(model_dir)                       # no --vqgan: ../vqgan_imagenet_f16_16384
    assert ckpt.parts.config.num_codes == 16 and ckpt.parts.config.decoder_vocab_size == 21
    dallebot(["export", "--from", str(model_dir), "--out", str(tmp_path / "bundle")])
    _check_bundle_matches(tmp_path / "bundle", parts)


def test_min_dalle_pt_files_convert(tmp_path: Path, tokenizer_dir: Path) -> None:
    parts = build_parts(TINY, TINY_VQ, seed=13, std=0.3)
    model_dir, vq_dir = write_min_dalle_checkpoint(tmp_path, parts, tokenizer_dir)
    # min-dalle stores the transformer in float16: the reference is the float16-rounded model
    ref = ModelParts(copy.deepcopy(parts.encoder).half().float(), copy.deepcopy(parts.decoder).half().float(), parts.vqgan)
    dallebot(["export", "--from", str(model_dir), "--out", str(tmp_path / "bundle")])
    _check_bundle_matches(tmp_path / "bundle", ref.eval())
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["provenance"]["source_format"] == "min-dalle"


def test_int8_export_reports_difference_and_speed(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    parts = build_parts(TINY, TINY_VQ, seed=14, std=0.3)
    model_dir, vq_dir = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir)
    dallebot(["export", "--from", str(model_dir), "--vqgan", str(vq_dir), "--out", str(tmp_path / "b8"), "--dtype", "int8"])
    err = capsys.readouterr().err
    assert "int8 vs fp32 decoder step: max |logit diff|" in err
    report = json.loads((tmp_path / "b8" / "manifest.json").read_text())["provenance"]["int8_report"]
    assert 0 < report["max_abs_logit_diff"] < report["logit_std"]


def test_shape_mismatch_names_parameter_and_file(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    parts = build_parts(TINY, TINY_VQ, seed=15)
    model_dir, vq_dir = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir)
    tree = dallebart_flax_tree(parts)
    glu = tree["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]["GLU_0"]
    glu["Dense_1"]["kernel"] = glu["Dense_1"]["kernel"][:, :, :-1]
    write_msgpack(model_dir / "flax_model.msgpack", tree)
    with pytest.raises(SystemExit):
        dallebot(["export", "--from", str(model_dir), "--vqgan", str(vq_dir), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "model/decoder/layers/FlaxBartDecoderLayers/GLU_0/Dense_1/kernel" in err
    assert str(model_dir / "flax_model.msgpack") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_missing_and_unexpected_parameters(tmp_path: Path, tokenizer_dir: Path) -> None:
    parts = build_parts(TINY, TINY_VQ, seed=16)
    model_dir, vq_dir = write_min_dalle_checkpoint(tmp_path, parts, tokenizer_dir)
    sd = torch.load(model_dir / "decoder.pt", weights_only=True)
    del sd["layers.1.encoder_attn.v_proj.weight"]
    torch.save(sd, model_dir / "decoder.pt")
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.encoder_attn\.v_proj\.weight is missing from .*decoder\.pt"):
        load_checkpoint(model_dir)
    sd["layers.1.encoder_attn.v_proj.weight"] = sd["layers.1.encoder_attn.k_proj.weight"]
    sd["layers.9.glu.fc0.weight"] = sd["layers.1.glu.fc0.weight"]
    torch.save(sd, model_dir / "decoder.pt")
    with pytest.raises(CheckpointError, match=r"unexpected parameter layers\.9\.glu\.fc0\.weight in .*decoder\.pt"):
        load_checkpoint(model_dir)


def test_wrong_folders(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no VQGAN found"):
        load_checkpoint(empty)
    parts = build_parts(TINY, TINY_VQ, seed=17)
    _, vq_dir = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir)
    (empty / "vocab.json").write_text("{}")
    (empty / "merges.txt").write_text("")
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        load_checkpoint(empty, vq_dir)
    (empty / "config.json").write_text("{}")
    (empty / "flax_model.msgpack").write_bytes(b"\xc1garbage")
    with pytest.raises(SystemExit):
        dallebot(["export", "--from", str(empty), "--vqgan", str(vq_dir), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "dallebot: error:" in err and "config.json" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="not a readable Flax msgpack"):
        read_flax_msgpack(empty / "flax_model.msgpack")


def test_msgpack_reader_handles_chunks_bfloat16_and_scalars(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    bf16 = (a.view(np.uint32) >> 16).astype(np.uint16)                # exact: small integers
    ext = lambda shape, name, buf: msgpack.ExtType(1, msgpack.packb([list(shape), name, buf], use_bin_type=True))  # noqa: E731
    tree = {
        "chunked": {"__msgpack_chunked_array__": True, "shape": {"0": 3, "1": 4},
                    "chunks": {"0": ext([5], "float32", a.ravel()[:5].tobytes()),
                               "1": ext([7], "float32", a.ravel()[5:].tobytes())}},
        "bf16": ext([3, 4], "bfloat16", bf16.tobytes()),
        "scalar": msgpack.ExtType(3, msgpack.packb([[], "int32", np.int32(7).tobytes()], use_bin_type=True)),
    }
    (tmp_path / "f.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    got = read_flax_msgpack(tmp_path / "f.msgpack")
    np.testing.assert_array_equal(got["chunked"], a)
    np.testing.assert_array_equal(got["bf16"], a)
    assert int(got["scalar"]) == 7


def test_vqgan_with_fewer_codes_than_the_model_is_refused(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    """A Mini-like model (24 codes) with a 16-code VQGAN: refused, naming both sizes (it silently sampled
    only the first 16 codes)."""
    parts = build_parts(TINY, TINY_VQ, seed=18)
    model_dir, _ = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir)
    small = write_vqgan_flax(tmp_path / "vqgan_small", build_parts(TINY_MEGA, TINY_VQ16, seed=18).vqgan)
    with pytest.raises(SystemExit):
        dallebot(["export", "--from", str(model_dir), "--vqgan", str(small), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert f"the VQGAN in {small} has 16 codes but the model samples 24" in err and "--vqgan" in err
    assert err.strip().splitlines()[-1].startswith("dallebot: error:") and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_several_vqgan_folders_need_an_explicit_choice(tmp_path: Path, tokenizer_dir: Path) -> None:
    """vqgan_imagenet_f16_1024 sorts before vqgan_imagenet_f16_16384: no silent pick by name."""
    parts = build_parts(TINY, TINY_VQ, seed=19)
    model_dir, vq_dir = write_hf_checkpoint(tmp_path / "hf", parts, tokenizer_dir)
    other = write_vqgan_flax(tmp_path / "hf" / "vqgan_imagenet_f16_1024", build_parts(TINY_MEGA, TINY_VQ16).vqgan)
    with pytest.raises(CheckpointError, match=rf"several VQGAN folders next to .*{other.name}.*{vq_dir.name}.*pass --vqgan"):
        load_checkpoint(model_dir)
    ckpt = load_checkpoint(model_dir, vq_dir)                   # chosen explicitly
    assert ckpt.parts.config.num_codes == TINY.num_codes
    assert ckpt.provenance["vqgan_source"] == str(vq_dir.resolve())


def _min_dalle_without_config(root: Path, tokenizer_dir: Path, seed: int = 20) -> tuple[Path, Path]:
    parts = build_parts(TINY64, TINY_VQ, seed=seed)
    model_dir, vq_dir = write_min_dalle_checkpoint(root, parts, tokenizer_dir)
    (model_dir / "config.json").unlink()
    return model_dir, vq_dir


def test_min_dalle_without_config_keeps_the_start_token_and_refuses_a_small_vqgan(tmp_path: Path,
                                                                                   tokenizer_dir: Path) -> None:
    model_dir, vq_dir = _min_dalle_without_config(tmp_path, tokenizer_dir)
    cfg = load_checkpoint(model_dir).parts.config            # dimensions inferred from the tensors
    assert (cfg.d_model, cfg.decoder_layers, cfg.image_vocab_size) == (64, 2, 24)
    assert cfg.decoder_start_token_id == 24 and cfg.num_codes == 24
    # a 16-code VQGAN: the start token used to become 16, a real code of the model
    small = build_parts(TINY_MEGA, TINY_VQ16, seed=20).vqgan
    torch.save(small.state_dict(), vq_dir / "detoker.pt")
    (vq_dir / "config.json").write_text(json.dumps(vqgan_hf_config(TINY_VQ16)))
    with pytest.raises(CheckpointError, match="has 16 codes but the model samples 24"):
        load_checkpoint(model_dir)


@pytest.mark.parametrize("file, edit, message", [
    ("decoder.pt", lambda sd: sd.pop("embed_positions.weight"), r"parameter embed_positions\.weight is missing from .*decoder\.pt"),
    ("encoder.pt", lambda sd: sd.pop("embed_tokens.weight"), r"parameter embed_tokens\.weight is missing from .*encoder\.pt"),
    ("encoder.pt", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("layers.")],
     r"encoder\.pt has no layers\.N\.\* parameters"),
    ("decoder.pt", lambda sd: sd.update({"embed_tokens.weight": sd["embed_tokens.weight"][0]}),
     r"embed_tokens\.weight in .*decoder\.pt has shape \(64,\), expected a matrix"),
])
def test_unexpected_pt_layout_without_config(tmp_path: Path, tokenizer_dir: Path, file: str, edit, message: str) -> None:
    model_dir, _ = _min_dalle_without_config(tmp_path, tokenizer_dir, seed=21)
    sd = torch.load(model_dir / file, weights_only=True)
    edit(sd)
    torch.save(sd, model_dir / file)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model_dir)


def test_min_dalle_tokenizer_copy_is_removed_after_export(tmp_path: Path, tokenizer_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """min-dalle's vocab_mini.json / merges_mini.txt are copied under the standard names into a
    temporary folder for the export, and that folder is removed afterwards."""
    parts = build_parts(TINY, TINY_VQ, seed=22, std=0.3)
    model_dir, _ = write_min_dalle_checkpoint(tmp_path / "ckpt", parts, tokenizer_dir)
    (model_dir / "vocab.json").rename(model_dir / "vocab_mini.json")
    (model_dir / "merges.txt").rename(model_dir / "merges_mini.txt")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    dallebot(["export", "--from", str(model_dir), "--out", str(tmp_path / "bundle")])
    assert (tmp_path / "bundle" / "vocab.json").read_bytes() == (model_dir / "vocab_mini.json").read_bytes()
    assert list(temp.iterdir()) == []
