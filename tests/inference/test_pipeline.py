"""The serving runtime on a tiny exported bundle: determinism, batching, prompts, bad bundles."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.bundle import Bundle
from inference.errors import BundleError, InferenceError, PromptError
from inference.images import make_grid, png_bytes, upscale
from inference.pipeline import Pipeline

from .helpers import TINY, TINY_VQ


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.load(tiny_bundle, threads=1)


def test_runtime_does_not_import_torch(tiny_bundle: Path) -> None:
    code = ("import sys; from inference.pipeline import Pipeline; from inference.images import make_grid; "
            f"p = Pipeline.load({str(tiny_bundle)!r}); p.generate(['a red circle'], 1, [0]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_same_seed_same_png_and_different_seed_different(pipe: Pipeline) -> None:
    a = png_bytes(make_grid(pipe.generate(["a red circle"], 4, [7])[0]))
    b = png_bytes(make_grid(pipe.generate(["a red circle"], 4, [7])[0]))
    c = png_bytes(make_grid(pipe.generate(["a red circle"], 4, [8])[0]))
    assert a == b
    assert a != c


def test_person_prompt_same_seed_same_png_whatever_came_before(pipe: Pipeline) -> None:
    """``<person>`` is replaced by a random word (dalle-mini): the choice must not depend on the
    prompts generated before in the same process."""
    prompt = "a <person> with a red circle"
    want = png_bytes(make_grid(pipe.generate([prompt], 4, [7])[0]))
    for other in ("two <person> and a <person>", "a <person> on a <person>", "hello world", prompt,
                  "<person> next to <person>, a <person>"):
        pipe.generate([other], 1, [0])
        assert png_bytes(make_grid(pipe.generate([prompt], 4, [7])[0])) == want
        pipe.prepare([other, prompt])
        assert png_bytes(make_grid(pipe.generate(["hello world", prompt], 4, [1, 7])[1])) == want


def test_images_do_not_depend_on_batch_company(pipe: Pipeline) -> None:
    alone = pipe.generate_codes(["two green triangles"], 2, [5])[0]
    together = pipe.generate_codes(["a red circle", "two green triangles"], [3, 2], [1, 5])
    assert [c.shape for c in together] == [(3, TINY.image_length), (2, TINY.image_length)]
    np.testing.assert_array_equal(alone, together[1])
    # images within one request differ from each other (own random streams)
    assert not np.array_equal(together[0][0], together[0][1])


def test_generate_shapes_and_sampling(pipe: Pipeline) -> None:
    out = pipe.generate(["a red circle", "hello world"], n_images=[1, 4], seeds=[0, 1])
    assert [len(x) for x in out] == [1, 4]
    assert all(im.size == (TINY_VQ.resolution, TINY_VQ.resolution) and im.mode == "RGB" for x in out for im in x)
    codes = pipe.generate_codes(["a red circle"], 3, [2], top_k=1, condition_scale=3.0)[0]
    assert codes.max() < TINY.num_codes
    assert (codes == codes[0]).all()                            # greedy: one image whatever the seed stream
    with pytest.raises(InferenceError, match="temperature"):
        pipe.generate(["a"], 1, [0], temperature=0)


def test_random_seeds_are_reported(pipe: Pipeline) -> None:
    a = pipe.generate_codes(["a red circle"], 1)[0]
    seed = pipe.last_seeds[0]
    np.testing.assert_array_equal(a, pipe.generate_codes(["a red circle"], 1, [seed])[0])


@pytest.mark.parametrize("prompt", ["", "   ", "!!! ... ???", "一只猫"])
def test_empty_prompts_are_refused(pipe: Pipeline, prompt: str) -> None:
    with pytest.raises(PromptError, match="empty after normalisation"):
        pipe.generate([prompt], 1, [0])


def test_long_prompt_is_truncated_with_a_warning(pipe: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="inference.pipeline"):
        (p,) = pipe.prepare(["a red circle " * 20])
    assert p.truncated > 0
    assert "too long" in caplog.text
    assert p.ids[0] == TINY.text_bos_id and p.ids[-1] == TINY.text_eos_id and p.mask.all()
    assert len(pipe.generate(["a red circle " * 20], 1, [0])[0]) == 1


def test_non_latin_text_is_normalised(pipe: Pipeline) -> None:
    (p,) = pipe.prepare(["Кошка на Луне — Café!"])
    assert p.normalized == " koshka na lune, cafe"
    assert pipe.generate(["Кошка на Луне"], 1, [0])[0][0].size == (TINY_VQ.resolution,) * 2


def test_grid_and_upscale(pipe: Pipeline) -> None:
    ims = pipe.generate(["a red circle"], 9, [3])[0]
    s = TINY_VQ.resolution
    assert make_grid(ims[:4]).size == (2 * s, 2 * s)
    assert make_grid(ims).size == (3 * s, 3 * s)
    assert make_grid(ims[:1]).size == (s, s)
    assert upscale(make_grid(ims[:4]), 512).size == (512, 512)


# ---- bad bundles -------------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="decoder.onnx is missing"):
        Pipeline.load(bundle_copy)


def test_corrupt_file_fails_its_hash(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "vqgan.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "vqgan.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vqgan.onnx does not match its sha256"):
        Pipeline.load(bundle_copy)


def test_truncated_file_and_unverified_corrupt_graph(bundle_copy: Path) -> None:
    (bundle_copy / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(BundleError, match="merges.txt has .* bytes"):
        Bundle.open(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    size = manifest["files"]["encoder.onnx"]["bytes"]
    (bundle_copy / "encoder.onnx").write_bytes(b"\0" * size)      # same size, garbage, hash not checked
    manifest["files"]["merges.txt"]["bytes"] = (bundle_copy / "merges.txt").stat().st_size
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="cannot load .*encoder.onnx"):
        Pipeline.load(bundle_copy, verify=False)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("files"), "malformed"),
    (lambda m: m.update(format="something-else"), "malformed"),
    (lambda m: m["model"].update(image_grid=8), "malformed"),
    (lambda m: m["files"].pop("vocab.json"), "does not list vocab.json"),
])
def test_bad_manifest(bundle_copy: Path, edit, message: str) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    edit(manifest)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        Pipeline.load(bundle_copy)


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].update({"vocab.json": "deadbeef"}), r"files\['vocab.json'\] must be an object"),
    (lambda m: m.pop("name"), "KeyError: 'name'"),
    (lambda m: m.update(name=7), "name must be a non-empty string"),
    (lambda m: m.update(model=[1, 2]), "model must be an object"),
    (lambda m: m["model"].update(image_grid=4.0), r"model\.image_grid must be a whole number"),
    (lambda m: m["vqgan"].update(ch_mult="112"), r"vqgan\.ch_mult must be a list"),
    (lambda m: m["sampling"].update(condition_scale="2"), r"sampling\.condition_scale must be a finite number"),
    (lambda m: m["sampling"].update(top_k=8.5), r"sampling\.top_k must be a whole number"),
    (lambda m: m["sampling"].update(top_k=True), r"sampling\.top_k must be a whole number"),
    (lambda m: m["sampling"].update(temperature=float("nan")), r"sampling\.temperature must be a finite number"),
    (lambda m: m["sampling"].update(top_p=0), r"sampling: top_p must be in \(0, 1\]"),
    (lambda m: m["sampling"].update(top_k=-1), r"sampling: top_k must be >= 0"),
    (lambda m: m["sampling"].update(greedy=True), "unknown sampling settings"),
    (lambda m: m.update(sampling=None), "sampling must be an object"),
    (lambda m: m.update(random_weights="no"), "random_weights must be true or false"),
])
def test_edited_manifest_is_a_bundle_error_naming_the_field(bundle_copy: Path, edit, message: str) -> None:
    """Hand-edited manifests: one BundleError naming the field, at load (not a crash, not a failure of
    every generation later)."""
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message) as exc:
        Pipeline.load(bundle_copy)
    assert "malformed" in str(exc.value) and "\n" not in str(exc.value)


def test_manifest_that_is_not_an_object(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(json.dumps([manifest]))
    with pytest.raises(BundleError, match="malformed .*must be a JSON object, not list"):
        Pipeline.load(bundle_copy)


def test_good_sampling_values_still_load(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda m: m["sampling"].update(condition_scale=2, top_k=0, top_p=0.9, temperature=0.5))
    pipe = Pipeline.load(bundle_copy, threads=1)
    assert pipe.sampling_params().condition_scale == 2 and len(pipe.generate(["a red circle"], 1, [0])[0]) == 1


@pytest.mark.parametrize("graph", ["encoder", "decoder", "vqgan"])
def test_external_data_must_be_listed_in_the_manifest(bundle_copy: Path, graph: str) -> None:
    """A graph's weights (GRAPH.onnx.data) are size- and hash-checked only when the manifest lists them."""
    data = f"{graph}.onnx.data"
    assert (bundle_copy / data).is_file()
    _edit_manifest(bundle_copy, lambda m: m["files"].pop(data))
    with pytest.raises(BundleError, match=f"{graph}.onnx keeps its weights in {data}, which .* does not list"):
        Pipeline.load(bundle_copy)
    # also when the data file is gone: the graph itself names it
    (bundle_copy / data).rename(bundle_copy / "elsewhere.bin")
    with pytest.raises(BundleError, match=f"{graph}.onnx keeps its weights in {data}"):
        Bundle.open(bundle_copy, verify=False)


def test_manifest_not_json_and_not_a_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Pipeline.load(bundle_copy)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "flax_model.msgpack").write_bytes(b"")
    with pytest.raises(BundleError, match="convert it with `dallebot export"):
        Pipeline.load(ckpt)
    with pytest.raises(BundleError, match="does not exist"):
        Pipeline.load(tmp_path / "nowhere")


def test_manifest_records_what_the_issue_asks(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["name"] == "tiny-test" and m["license"] == "Apache-2.0" and m["random_weights"] is False
    assert m["image"] == {"size": 16, "token_grid": 4, "tokens": 16}
    assert m["special_tokens"]["image_start"] == TINY.decoder_start_token_id
    assert set(m["sampling"]) == {"condition_scale", "top_k", "top_p", "temperature"}
    assert {"encoder.onnx", "decoder.onnx", "vqgan.onnx", "vocab.json", "merges.txt"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert "exported_with" in m["provenance"]


def test_present_cache_bundle_runs_the_device_loop(tiny_parts, tokenizer_dir: Path, tmp_path: Path, pipe: Pipeline) -> None:
    """A GPU-style bundle (decoder returns updated caches, ping-pong buffers) gives the same images."""
    from inference.export import export_bundle

    export_bundle(tiny_parts, tokenizer_dir, tmp_path / "present", name="tiny-present", cache="present", progress=False)
    other = Pipeline.load(tmp_path / "present", threads=1)
    assert other._present and not pipe._present
    a = pipe.generate_codes(["a red circle", "hello world"], 2, [4, 5])
    b = other.generate_codes(["a red circle", "hello world"], 2, [4, 5])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_device_sampling_bundle_gives_the_host_samplers_codes(tiny_parts, tokenizer_dir: Path, tmp_path: Path,
                                                              pipe: Pipeline) -> None:
    """A decoder that samples on the device (``--cache sample``: the step's code feeds the next step
    without a host round trip) draws exactly the codes the numpy sampler draws, for every setting;
    the buffers kept for CUDA graphs (refilled in place per request) give the same results."""
    from inference.export import export_bundle

    export_bundle(tiny_parts, tokenizer_dir, tmp_path / "sample", name="tiny-sample", cache="sample", progress=False)
    dev = Pipeline.load(tmp_path / "sample", threads=1)
    assert dev._sampler and not pipe._sampler and dev.bundle.sampler_kmax == TINY.num_codes
    prompts, counts, seeds = ["a red circle", "hello world"], [2, 3], [4, 5]
    settings = [{}, {"top_k": 3}, {"top_k": 0, "temperature": 0.7}, {"top_p": 0.8, "top_k": 10, "condition_scale": 1.0},
                {"condition_scale": 3.0, "top_k": 1}]
    for kw in settings:
        want = pipe.generate_codes(prompts, counts, seeds, **kw)
        got = dev.generate_codes(prompts, counts, seeds, **kw)
        for x, y in zip(want, got):
            np.testing.assert_array_equal(x, y, err_msg=str(kw))
    assert len({pipe.generate_codes(prompts, counts, seeds, **kw)[1].tobytes() for kw in settings}) > 3

    dev.cuda_graph = True        # onnxruntime's CPU provider ignores graph ids: exercises the kept buffers
    first = dev.generate_codes(prompts, counts, seeds)
    other = dev.generate_codes(["a blue star", "x y z"], [3, 2], [7, 8], top_k=2)
    again = dev.generate_codes(prompts, counts, seeds)
    assert len(dev._graph_states) == 1
    for x, y, z in zip(first, again, pipe.generate_codes(prompts, counts, seeds)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    for x, y in zip(other, pipe.generate_codes(["a blue star", "x y z"], [3, 2], [7, 8], top_k=2)):
        np.testing.assert_array_equal(x, y)

    # two generations of the same size, interleaved step by step: the second gets its own buffers
    g1 = dev.start(prompts, counts, seeds)
    g2 = dev.start(["a blue star", "x y z"], [3, 2], [7, 8], top_k=2)
    for _ in zip(g1.steps, g2.steps):
        pass
    for x, y in zip(np.split(g1.codes, [2]), first):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(np.split(g2.codes, [3]), other):
        np.testing.assert_array_equal(x, y)
    assert len(dev._graph_states) == 1 and not dev._graph_states[10].busy

    # batch sizes whose buffers are kept are capped (least recently used goes): memory stays bounded
    from inference.pipeline import MAX_GRAPH_SIZES

    for n in range(1, MAX_GRAPH_SIZES + 3):
        got = dev.generate_codes(["a red circle"], n, [3])
        np.testing.assert_array_equal(got[0], pipe.generate_codes(["a red circle"], n, [3])[0])
    assert sorted(dev._graph_states) == [2 * n for n in range(3, MAX_GRAPH_SIZES + 3)]

    dev.bundle.manifest["device_sampler"]["kmax"] = 5
    with pytest.raises(InferenceError, match=r"top_k must be 1\.\.5 \(got 6\)"):
        dev.generate_codes(["a red circle"], 1, [1], top_k=6)


def test_only_the_encoder_skips_weight_prepacking(pipe: Pipeline) -> None:
    """The encoder runs once per request, so it keeps no pre-packed copy of its weights; the decoder
    (every step) and the VQGAN do."""
    def prepack_disabled(part: str) -> bool:
        try:
            return pipe.sessions[part].get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        except Exception:  # noqa: BLE001 - onnxruntime raises when the entry was never set
            return False

    assert [prepack_disabled(p) for p in ("encoder", "decoder", "vqgan")] == [True, False, False]


def test_seeds_out_of_range_are_refused(pipe: Pipeline) -> None:
    for bad in (-1, 2**63):
        with pytest.raises(InferenceError, match=r"seeds must be between 0 and 2\*\*63 - 1"):
            pipe.generate(["a red circle"], 1, [bad])
