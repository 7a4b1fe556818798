"""Random-weight bundles without torch: a small "skeleton" (graphs + weight layout) that numpy fills.

A GPU benchmark box may have only the serving dependencies (onnxruntime-gpu, numpy, tokenizers,
Pillow). Exporting DALL·E Mini there would need torch; copying a 0.9-1.9 GB bundle there may not be
possible. So: export the random-weight bundle here, strip its weights (``write``: graphs, tokenizer,
manifest template and a JSON layout of every external tensor, a few MB), copy that, and let
``materialize`` write fresh random weights at the same offsets (normal(0, 0.02) for float tensors;
integer tensors, which are graph constants, are kept byte for byte) and a new manifest with hashes.
The result is, for timing purposes, the same bundle: same graphs, shapes, dtypes and file layout.

    python -m inference.skeleton write BUNDLE SKELETON_DIR        # needs onnx (export machine)
    python -m inference.skeleton materialize SKELETON_DIR BUNDLE  # numpy only
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, Bundle, SamplingDefaults, write_manifest
from .config import ModelConfig, VQGANConfig

LAYOUT = "weights-layout.json"
TEMPLATE = "manifest.template.json"
_DTYPES = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 9: np.bool_, 3: np.int8, 2: np.uint8}


def write(bundle_dir: str | Path, out_dir: str | Path) -> Path:
    import onnx

    bundle = Bundle.open(bundle_dir, verify=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout: dict[str, dict] = {}
    for f in bundle.manifest["files"]:
        src = bundle.root / f
        if f.endswith(".onnx.data"):
            continue
        shutil.copyfile(src, out / f)
        if f.endswith(".onnx"):
            model = onnx.load(str(src), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                entry = layout.setdefault(info["location"], {"size": 0, "tensors": []})
                offset, length = int(info.get("offset", 0)), int(info["length"])
                dtype = _DTYPES[t.data_type]
                item = {"offset": offset, "length": length, "dtype": np.dtype(dtype).name}
                if not np.issubdtype(dtype, np.floating):
                    with open(bundle.root / info["location"], "rb") as fh:
                        fh.seek(offset)
                        item["bytes"] = base64.b64encode(fh.read(length)).decode()
                entry["tensors"].append(item)
                entry["size"] = max(entry["size"], offset + length)
    for name, entry in layout.items():
        entry["size"] = (bundle.root / name).stat().st_size     # keep any padding between tensors
    (out / LAYOUT).write_text(json.dumps(layout))
    shutil.copyfile(bundle.root / MANIFEST, out / TEMPLATE)
    return out


def materialize(skeleton_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Bundle:
    sk, out = Path(skeleton_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = json.loads((sk / TEMPLATE).read_text())
    layout = json.loads((sk / LAYOUT).read_text())
    rng = np.random.default_rng(seed)
    for name, entry in layout.items():
        with open(out / name, "wb") as fh:
            fh.truncate(entry["size"])
            for t in entry["tensors"]:
                fh.seek(t["offset"])
                if "bytes" in t:
                    fh.write(base64.b64decode(t["bytes"]))
                else:
                    n = t["length"] // np.dtype(t["dtype"]).itemsize
                    fh.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype(t["dtype"]).tobytes())
    for f in template["files"]:
        if not f.endswith(".onnx.data"):
            shutil.copyfile(sk / f, out / f)
    write_manifest(out, name=template["name"], model=ModelConfig.from_dict(template["model"]),
                   vqgan=VQGANConfig.from_dict(template["vqgan"]), dtype=template["dtype"],
                   sampling=SamplingDefaults(**template["sampling"]),
                   provenance={**template["provenance"], "materialized_from_skeleton": True},
                   license=template["license"], random_weights=True, files=list(template["files"]),
                   description=template["description"], device_sampler=template.get("device_sampler"))
    return Bundle.open(out)


if __name__ == "__main__":
    cmd, src, dst = sys.argv[1:4]
    if cmd == "write":
        print(write(src, dst))
    elif cmd == "materialize":
        print(materialize(src, dst).root)
    else:
        sys.exit("usage: python -m inference.skeleton write|materialize SRC DST")
