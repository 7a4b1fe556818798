"""Random-weight bundles rebuilt from a weightless skeleton (for GPU boxes without torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from inference import skeleton
from inference.pipeline import Pipeline


def test_skeleton_round_trip(tiny_bundle: Path, tmp_path: Path) -> None:
    sk = skeleton.write(tiny_bundle, tmp_path / "sk")
    assert not list(sk.glob("*.onnx.data"))
    bundle = skeleton.materialize(sk, tmp_path / "b", seed=1)
    assert bundle.random_weights and bundle.manifest["provenance"]["materialized_from_skeleton"]
    for f, info in bundle.manifest["files"].items():
        assert (tiny_bundle / f).stat().st_size == info["bytes"]
        if not f.endswith(".data"):
            assert (tiny_bundle / f).read_bytes() == (bundle.root / f).read_bytes()
    # runs, torch-free
    code = (f"import sys; from inference.skeleton import materialize; from inference.pipeline import Pipeline; "
            f"b = materialize({str(sk)!r}, {str(tmp_path / 'c')!r}); "
            f"Pipeline.load(b.root).generate(['a red circle'], 2, [0]); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(Pipeline.load(bundle.root).generate(["a red circle"], 2, [0])[0]) == 2
