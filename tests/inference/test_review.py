"""Review fixes of the inference engine: argument checks, malformed checkpoints and bundles, NSFW input.

Each test failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from bot.cli import main as dallebot
from inference.convert import _torch_load, read_flax_msgpack
from inference.errors import BundleError, CheckpointError
from inference.pipeline import Pipeline

from .helpers import TINY_VQ, vqgan_hf_config


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()          # a progress note may come first
    assert lines[-1].startswith("dallebot: error:") and message in lines[-1] and err.count("dallebot: error") == 1, err


# ---- dallebot train shapes: numbers are range-checked before anything starts ------------------------

@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=9223372036854775807"),
    (["--seed", str(2**63)], "Invalid value for '--seed': 9223372036854775808 is not in the range"),
    (["--threads", "-1"], "Invalid value for '--threads'"),
    (["--scenes", "0"], "Invalid value for '--scenes': 0 is not in the range x>=1"),
    (["--steps", "-5"], "Invalid value for '--steps'"),
    (["--vq-batch", "0"], "Invalid value for '--vq-batch'"),
    (["--lr", "nan"], "Invalid value for '--lr': 'nan' is not a finite number"),
    (["--vq-lr", "-0.001"], "Invalid value for '--vq-lr': '-0.001' is not above 0"),
    (["--vq-ch-mult", "1,x,4"], "Invalid value for '--vq-ch-mult': '1,x,4' is not a comma-separated list"),
    (["--refine-steps", "0"], "Invalid value for '--refine-steps': 0 is not in the range x>=1"),
    (["--refine-scenes", "-2"], "Invalid value for '--refine-scenes'"),
    (["--refine-from", "nowhere"], "Invalid value for '--refine-from': nowhere: no model bundle there (manifest.json missing)"),
    (["--refine-from", ".", "--no-refine"], "--refine-from and --no-refine contradict each other"),
])
def test_train_shapes_refuses_bad_numbers_before_starting(tmp_path: Path, capsys, args, message) -> None:
    """--seed -1 rendered the scenes and then died in numpy with a traceback; 2**64 rendered 60000
    scenes before torch overflowed; --scenes 0 silently trained on 60000."""
    out = tmp_path / "train"
    with pytest.raises(SystemExit) as exc:
        dallebot(["train", "shapes", "--out", str(out), *args])
    assert exc.value.code == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_training_module_refuses_a_seed_out_of_range(tmp_path: Path, capsys) -> None:
    from inference.training.pipeline import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "t"), "--seed", "-3"])
    assert exc.value.code == 2
    assert "argument --seed: -3 is not in the range 0<=x<=9223372036854775807" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


# ---- malformed checkpoints: a CheckpointError naming the file, never a traceback ---------------------

def _ext(shape, dtype, raw: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([shape, dtype, raw], use_bin_type=True))


@pytest.mark.parametrize("tree", [
    {"a": _ext([2], "no-such-dtype", b"\0" * 8)},                                    # TypeError in numpy
    {"a": msgpack.ExtType(1, msgpack.packb(5))},                                      # payload not a list
    {"a": msgpack.ExtType(2, msgpack.packb(5))},                                      # complex scalar
    {"a": {"__msgpack_chunked_array__": True}},                                       # chunked, no shape
    {"a": {"__msgpack_chunked_array__": True, "shape": {"0": 2}, "chunks": {}}},       # no chunks
    {"a": {"__msgpack_chunked_array__": True, "shape": [2], "chunks": [1]}},          # lists, not maps
    {"a": _ext([1], "U2", b"\0" * 8)},                                                # text, not numbers
], ids=["dtype", "payload", "complex", "chunk-shape", "chunk-empty", "chunk-lists", "text-array"])
def test_malformed_msgpack_is_a_checkpoint_error(tmp_path: Path, tree) -> None:
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    with pytest.raises(CheckpointError, match="is not a readable Flax msgpack checkpoint") as exc:
        read_flax_msgpack(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("content, message", [
    (b"", r"is not a readable PyTorch state dict \(EOFError"),                        # empty file
    ({"embed_tokens.weight": 5}, r"parameter embed_tokens.weight in .* is int, not a tensor"),
    ({"embed_tokens.weight": None}, r"parameter embed_tokens.weight in .* is NoneType, not a tensor"),
    ({"a": {"b": torch.zeros(2)}}, r"parameter a in .* is dict, not a tensor"),
    ({7: torch.zeros(2)}, r"has a key 7 that is not a parameter name"),
], ids=["empty", "int", "none", "nested", "int-key"])
def test_malformed_pt_is_a_checkpoint_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "detoker.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as exc:
        _torch_load(path)
    assert str(path) in str(exc.value)


def test_vqgan_parameter_of_text_names_the_parameter(tmp_path: Path) -> None:
    """A leaf of text at a parameter's place gave a numpy ValueError traceback when it was copied."""
    from inference.convert import vqgan_from_flax

    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(msgpack.packb({"decoder": {}, "quantize": {"embedding": {"embedding": ["x"] * 8}}}))
    with pytest.raises(CheckpointError, match=r"parameter quantize/embedding/embedding in .* is an array of <U1"):
        vqgan_from_flax(read_flax_msgpack(path), TINY_VQ, path)


@pytest.mark.parametrize("vq_file, data, message", [
    ("flax_model.msgpack", msgpack.packb({"a": _ext([2], "no-such-dtype", b"\0" * 8)}),
     "is not a readable Flax msgpack checkpoint (TypeError: data type 'no-such-dtype' not understood)"),
    ("detoker.pt", b"", "detoker.pt is not a readable PyTorch state dict (EOFError: )"),
], ids=["msgpack", "pt"])
def test_export_of_malformed_vqgan_is_one_line(tmp_path: Path, tokenizer_dir: Path, capsys, vq_file, data,
                                               message) -> None:
    model, vq = tmp_path / "model", tmp_path / "vqgan"
    model.mkdir()
    vq.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / f, model / f)
    (vq / "config.json").write_text(json.dumps(vqgan_hf_config(TINY_VQ)))
    (vq / vq_file).write_bytes(data)
    with pytest.raises(SystemExit) as exc:
        dallebot(["export", "--from", str(model), "--vqgan", str(vq), "--out", str(tmp_path / "b")])
    assert exc.value.code == 1
    _one_line_error(capsys, message)
    assert not (tmp_path / "b").exists()


# ---- a manifest that disagrees with its graphs is refused at load ------------------------------------

@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _text_length(m: dict) -> None:
    m["model"]["text_length"] = 16


def _resolution(m: dict) -> None:
    m["vqgan"].update(resolution=32, ch_mult=[1, 1, 1, 2])
    m["image"]["size"] = 32


def _vocab(m: dict) -> None:
    m["model"]["image_vocab_size"] = 30


@pytest.mark.parametrize("edit, message", [
    (_text_length, r"encoder.onnx .* was exported for input_ids dimension 12, but .* model.text_length = 16"),
    (_resolution, r"vqgan.onnx .* was exported for pixels dimension 16, but .* vqgan.resolution = 32"),
    (_vocab, r"decoder.onnx .* was exported for logits dimension 25, but .* model.image_vocab_size \(\+ 1\) = 31"),
])
def test_manifest_that_disagrees_with_the_graphs_is_refused_at_load(bundle_copy: Path, edit, message) -> None:
    """It loaded, and then every generation failed inside onnxruntime (text_length) or the images
    came out at another size than the manifest says (resolution)."""
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        Pipeline.load(bundle_copy, threads=1)


def test_special_text_ids_must_be_rows_of_the_text_embedding(bundle_copy: Path, tmp_path: Path, capsys) -> None:
    def edit(m: dict) -> None:
        m["model"]["text_pad_id"] = 100000
        m["special_tokens"]["text_pad"] = 100000

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(SystemExit):
        dallebot(["generate", "a red circle", "--model", str(bundle_copy), "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, "model.text_pad_id 100000 is not a row of the text embedding (text_vocab_size 400)")
    assert not (tmp_path / "x.png").exists()


# ---- dallebot eval shapes: where the results go is checked before the evaluation runs ---------------

@pytest.mark.parametrize("args, message", [
    (["--sheet", "{tmp}/afile/sheet.png"], "cannot write --sheet {tmp}/afile/sheet.png: {tmp}/afile is not a folder"),
    (["--sheet", "{tmp}/sheet"], "--sheet {tmp}/sheet: give an image file name, e.g. ending in .png"),
    (["--json", "{tmp}/afile/x.json"], "cannot write --json {tmp}/afile/x.json: {tmp}/afile is not a folder"),
    (["--json", "/dev/full"], "cannot write --json /dev/full (No space left on device)"),
])
def test_eval_output_errors_are_one_line(tmp_path: Path, capsys, args, message) -> None:
    """These were tracebacks after the whole evaluation had run (300 prompts by default)."""
    (tmp_path / "afile").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--sheet" not in args:
        args += ["--sheet", str(tmp_path / "sheet.png")]
    with pytest.raises(SystemExit) as exc:
        dallebot(["eval", "shapes", "--renderer", "--n", "3", *args])
    assert exc.value.code == 1
    _one_line_error(capsys, message.format(tmp=tmp_path))


def test_eval_json_folder_is_created_like_the_sheets(tmp_path: Path, capsys) -> None:
    sheet, out = tmp_path / "a" / "sheet.png", tmp_path / "b" / "c" / "eval.json"
    dallebot(["eval", "shapes", "--renderer", "--n", "3", "--sheet", str(sheet), "--json", str(out)])
    assert json.loads(out.read_text())["prompts"] == 3 and sheet.is_file()


# ---- dallebot export --overwrite never deletes what it reads, and replaces a bundle only when done ---

@pytest.fixture(scope="module")
def hf_checkpoint(tiny_parts, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .helpers import write_hf_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(root, tiny_parts, tokenizer_dir)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out", ["dalle-mini", ".", "vqgan_imagenet_f16_16384"])
def test_export_overwrite_refuses_to_replace_the_checkpoint(hf_checkpoint: Path, capsys, out: str) -> None:
    """--out equal to (or holding) --from deleted the checkpoint, then failed with a traceback."""
    before = _tree(hf_checkpoint)
    with pytest.raises(SystemExit) as exc:
        dallebot(["export", "--from", str(hf_checkpoint / "dalle-mini"), "--out", str(hf_checkpoint / out),
                  "--overwrite"])
    assert exc.value.code == 1
    _one_line_error(capsys, "which the export reads; choose a folder outside the checkpoint")
    assert _tree(hf_checkpoint) == before


def test_export_out_that_is_a_file(tmp_path: Path, hf_checkpoint: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        dallebot(["export", "--from", str(hf_checkpoint / "dalle-mini"), "--out", str(tmp_path / "afile")])
    _one_line_error(capsys, f"--out {tmp_path / 'afile'} is a file, not a folder")


def test_failed_overwrite_keeps_the_old_bundle(tiny_bundle: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """--overwrite deleted the old bundle first: an export failing half-way left none at all."""
    from inference.export import build_parts, export_bundle

    from .helpers import TINY, TINY_VQ16

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    before = _tree(bundle)
    bad = build_parts(TINY, TINY_VQ16, seed=2)      # 24 codes for a 16-code VQGAN: refused at the manifest
    with pytest.raises(ValueError, match="exceeds the VQGAN codebook"):
        export_bundle(bad, tokenizer_dir, bundle, name="bad", overwrite=True, progress=False)
    assert _tree(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]          # no half-written folder left
    Pipeline.load(bundle, threads=1)



def test_overwrite_replaces_a_bundle(hf_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    for name in ("first", "second"):
        dallebot(["export", "--from", str(hf_checkpoint / "dalle-mini"), "--out", str(out), "--name", name,
                  "--overwrite"])
    assert json.loads((out / "manifest.json").read_text())["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert Pipeline.load(out, threads=1).bundle.name == "second"


# ---- NSFW classifier: a graph with a fixed batch size -------------------------------------------------

@pytest.mark.parametrize("batch", [1, 4])
def test_nsfw_classifier_with_a_fixed_batch_size_scores_any_number_of_images(tmp_path: Path, batch: int) -> None:
    """Exports often fix the batch at 1: every request of more than one image failed its check
    inside onnxruntime (and was held as 'NSFW check failed')."""
    from PIL import Image

    from inference.nsfw import NsfwClassifier

    from .tiny_nsfw import build_tiny_nsfw_model

    fixed = NsfwClassifier.load(build_tiny_nsfw_model(tmp_path / "fixed.onnx", batch=batch))
    free = NsfwClassifier.load(build_tiny_nsfw_model(tmp_path / "free.onnx"))
    colours = [(255, 0, 0), (0, 0, 255), (250, 10, 10), (255, 255, 255), (200, 0, 30), (0, 255, 0), (90, 90, 90)]
    images = [Image.new("RGB", (64, 64), c) for c in colours]
    for n in (1, 2, 5, 7):
        got = fixed.scores(images[:n])
        assert len(got) == n
        np.testing.assert_allclose(got, free.scores(images[:n]), rtol=1e-5)
    assert got[0] > 0.9 and got[1] < 0.1


@pytest.mark.parametrize("value", ["x", "1,8x"])
def test_bench_inference_batch_list_is_checked(capsys, value: str) -> None:
    """A ValueError traceback before (and '0' or '' started the benchmark with no or empty batches)."""
    with pytest.raises(SystemExit) as exc:
        dallebot(["bench", "inference", "--batch", value, "--no-min-dalle"])
    assert exc.value.code == 2
    _one_line_error(capsys, f"Invalid value for '--batch': '{value}' is not a comma-separated list of whole numbers")


# ---- the bot's generator: one job's bad seed does not fail the others in its batch --------------------

def test_a_job_with_a_seed_out_of_range_fails_alone(tiny_bundle: Path) -> None:
    """The pipeline refuses the whole batch for one seed out of range: every request of the batch
    failed (and retried, and failed again in the same company) where only that one can never work."""
    from bot.generation import GenerationJob
    from bot.model import PipelineGenerator
    from inference.images import png_bytes

    gen = PipelineGenerator(Pipeline.load(tiny_bundle, threads=1))
    jobs = [GenerationJob("a red circle", 2, 5), GenerationJob("two green triangles", 1, 2**63),
            GenerationJob("hello world", 0, 3), GenerationJob("a blue star", 3, 7)]
    out = gen.generate(jobs)
    assert isinstance(out[1], Exception) and "seed 9223372036854775808 cannot be used" in str(out[1])
    assert isinstance(out[2], Exception) and "the number of images must be 1 or more" in str(out[2])
    for i in (0, 3):
        alone = gen.generate([jobs[i]])[0]
        assert [png_bytes(im) for im in out[i]] == [png_bytes(im) for im in alone] and len(alone) == jobs[i].n_images


def test_export_blank_name_is_refused_before_converting(hf_checkpoint: Path, tmp_path: Path, capsys,
                                                        tiny_parts, tokenizer_dir: Path) -> None:
    """A ValueError traceback after every graph had been written (leaving a bundle without manifest)."""
    from inference.errors import InferenceError
    from inference.export import export_bundle

    with pytest.raises(SystemExit) as exc:
        dallebot(["export", "--from", str(hf_checkpoint / "dalle-mini"), "--out", str(tmp_path / "b"), "--name", "  "])
    assert exc.value.code == 2
    _one_line_error(capsys, "Invalid value for '--name': the model name must not be empty")
    with pytest.raises(InferenceError, match="the model name must be a non-empty text"):
        export_bundle(tiny_parts, tokenizer_dir, tmp_path / "c", name=" ", progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_generate_onnxruntime_failure_is_one_line(bundle_copy: Path, tmp_path: Path, capsys) -> None:
    """A manifest edited consistently (a start-of-text id inside its stated, larger text vocabulary)
    loads, then the encoder fails inside onnxruntime: that was a traceback."""
    def edit(m: dict) -> None:
        m["model"].update(text_vocab_size=5000, text_bos_id=4000)
        m["special_tokens"]["text_bos"] = 4000

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(SystemExit) as exc:
        dallebot(["generate", "a red circle", "--model", str(bundle_copy), "--out", str(tmp_path / "x.png"),
                  "--threads", "1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dallebot: error: onnxruntime failed while generating (") and "idx=4000" in last
    assert f"re-export or re-copy the bundle {bundle_copy}" in last
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("a, b, message", [
    ("decoder.onnx", "vqgan.onnx", "decoder.onnx of .* has no text_mask: it is not the decoder graph"),
    ("encoder.onnx", "vqgan.onnx", "encoder.onnx of .* has no input_ids: it is not the encoder graph"),
])
def test_swapped_graphs_are_a_bundle_error(bundle_copy: Path, a: str, b: str, message: str) -> None:
    """Graphs swapped and the manifest re-hashed: a StopIteration traceback (decoder) or a failure of
    every request inside onnxruntime (encoder)."""
    from inference.bundle import sha256_file

    (bundle_copy / a).rename(bundle_copy / "tmp")
    (bundle_copy / b).rename(bundle_copy / a)
    (bundle_copy / "tmp").rename(bundle_copy / b)

    def rehash(m: dict) -> None:
        for f in m["files"]:
            m["files"][f] = {"sha256": sha256_file(bundle_copy / f), "bytes": (bundle_copy / f).stat().st_size}

    _edit_manifest(bundle_copy, rehash)
    with pytest.raises(BundleError, match=message):
        Pipeline.load(bundle_copy, threads=1)


@pytest.mark.parametrize("device, message", [
    ("gpu", "Invalid value for '--device': 'gpu' is not a torch device: use auto, cpu, cuda or cuda:N"),
    pytest.param("cuda:64", "Invalid value for '--device': 'cuda:64': torch sees", marks=pytest.mark.skipif(
        torch.cuda.device_count() > 64, reason="a machine with that GPU")),
])
def test_train_shapes_checks_the_device_first(tmp_path: Path, capsys, device: str, message: str) -> None:
    """'gpu' was a torch traceback; a CUDA device the machine lacks failed only after the scenes
    were rendered."""
    with pytest.raises(SystemExit) as exc:
        dallebot(["train", "shapes", "--out", str(tmp_path / "t"), "--device", device])
    assert exc.value.code == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "t").exists()


def test_tokenizer_id_beyond_the_text_embedding_is_refused_at_load(bundle_copy: Path) -> None:
    """The check counted vocab.json's entries, not its largest id: a sparse vocabulary loaded and then
    failed inside onnxruntime for every prompt that used the token."""
    from inference.bundle import sha256_file

    vocab = json.loads((bundle_copy / "vocab.json").read_text())
    token = max(vocab, key=vocab.get)
    vocab[token] = 450                                      # the encoder has 400 rows
    (bundle_copy / "vocab.json").write_text(json.dumps(vocab))

    def rehash(m: dict) -> None:
        m["files"]["vocab.json"] = {"sha256": sha256_file(bundle_copy / "vocab.json"),
                                    "bytes": (bundle_copy / "vocab.json").stat().st_size}

    _edit_manifest(bundle_copy, rehash)
    with pytest.raises(BundleError, match="vocab.json has token ids up to 450 but the encoder only 400 rows"):
        Pipeline.load(bundle_copy, threads=1)
