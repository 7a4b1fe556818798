from __future__ import annotations

from pathlib import Path

import pytest

from inference.export import build_parts, export_bundle

from .helpers import TINY, TINY_VQ, write_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_parts():
    # std 0.3: large enough that logits differ clearly between prompts and steps
    return build_parts(TINY, TINY_VQ, seed=1, std=0.3)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_parts, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_parts, tokenizer_dir, out, name="tiny-test", progress=False, license="Apache-2.0")
    return out
