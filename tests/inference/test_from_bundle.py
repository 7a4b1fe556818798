"""Reading a bundle's ONNX graphs back into the torch modules (to train the shipped model further)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.bundle import BundleError
from inference.export import export_bundle
from inference.training.from_bundle import load_parts

SHIPPED = Path(__file__).resolve().parents[2] / "inference" / "shipped" / "shapes"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_every_weight_comes_back_exactly(tiny_parts, tiny_bundle: Path):
    parts = load_parts(tiny_bundle)
    _same(parts.encoder, tiny_parts.encoder)
    _same(parts.decoder, tiny_parts.decoder)
    _same(parts.vqgan, tiny_parts.vqgan)


def test_the_shipped_bundle_loads_and_matches_onnxruntime():
    parts = load_parts(SHIPPED)        # check=True: raises unless torch reproduces every graph
    assert parts.config.image_grid == 8 and parts.vqgan.cfg.resolution == 64


def test_a_quantised_bundle_is_refused(tiny_parts, tokenizer_dir: Path, tmp_path: Path):
    out = tmp_path / "int8"
    export_bundle(tiny_parts, tokenizer_dir, out, name="tiny-int8", dtype="int8", progress=False)
    with pytest.raises(BundleError, match="only float32 bundles can be trained further"):
        load_parts(out)


def test_weights_that_do_not_reproduce_the_graph_are_an_error(tiny_parts, tokenizer_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "tiny"
    export_bundle(tiny_parts, tokenizer_dir, out, name="tiny", progress=False)
    from inference.training import from_bundle

    real = from_bundle._matmul_weights
    # pair the linear layers with the weight matrices one place off (a graph laid out differently)
    monkeypatch.setattr(from_bundle, "_matmul_weights", lambda m, i: (lambda w: w[1:] + w[:1])(real(m, i)))
    with pytest.raises(BundleError):
        load_parts(out)
