"""Model bundles: a folder with the ONNX graphs, the tokenizer files and a manifest.

Layout::

    BUNDLE/
      manifest.json        what the model is, its dimensions, defaults, provenance, sha256 of each file
      encoder.onnx         input_ids, attention_mask (R, T) -> cross_kv (L, 2, R, H, T, Dh)
      decoder.onnx         one decoding step with self-attention KV cache (see DECODER_* below)
      vqgan.onnx           codes (B, N) -> pixels (B, S, S, 3) float32 in [0, 1]
      vocab.json, merges.txt
      *.onnx.data          ONNX external data, when a graph has any (large models)
      enwiki-words-frequency.txt   optional: dalle-mini's hashtag splitter word list

The runtime refuses a bundle whose manifest is missing, malformed or inconsistent, or whose files
are missing or differ from the manifest's sha256. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import ModelConfig, VQGANConfig
from .errors import BundleError

MANIFEST = "manifest.json"
FORMAT = "dallebot-bundle"
FORMAT_VERSION = 1
GRAPHS = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vqgan": "vqgan.onnx"}
TOKENIZER_FILES = {"vocab": "vocab.json", "merges": "merges.txt"}
WORD_FREQUENCY_FILE = "enwiki-words-frequency.txt"
DTYPES = ("float32", "float16", "int8")

# Graph interfaces (shared by the exporter and the runtime). R rows = 2 per image (unconditional
# first half, conditional second half), L decoder layers.
ENCODER_INPUTS = ("input_ids", "attention_mask")            # (R, T) int64 each
ENCODER_OUTPUTS = ("cross_kv",)                             # (L, 2, R, H, T, Dh)
DECODER_FIXED_INPUTS = ("token", "position", "text_mask")   # (R,) int64, (1,) int64, (R, T) int64
DECODER_OUTPUTS = ("logits", "new_kv")                      # (R, Vi) float32, (L, 2, R, H, Dh)
# Decoders exported with cache="sample" also sample on the device (inference.model.sampler): the
# sampled codes feed the next step directly. Extra inputs, after DECODER_FIXED_INPUTS:
SAMPLER_INPUTS = ("uniforms", "codes", "condition_scale", "temperature", "top_k", "top_p")
#   (B, N) float64, (B, N) int64, (1,) float32, (1,) float32, (1,) int64 in 1..kmax, (1,) float64
# and outputs, before the updated caches present_* (as cache="present"):
SAMPLER_OUTPUTS = ("next_token", "next_position", "codes_out")   # (R,) int64, (1,) int64, (B, N) int64
VQGAN_INPUTS = ("codes",)                                   # (B, N) int64
VQGAN_OUTPUTS = ("pixels",)                                 # (B, S, S, 3) float32


def decoder_kv_inputs(layers: int) -> list[str]:
    """Per-layer cache inputs of the decoder step: past keys/values (R, H, N, Dh), then cross (R, H, T, Dh)."""
    past = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    cross = [f"cross_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    return past + cross


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SamplingDefaults:
    condition_scale: float = 10.0   # super-conditioning: l = l_u + s (l_c - l_u)
    top_k: int = 50                 # 0 = off
    top_p: float = 1.0              # 1.0 = off
    temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"condition_scale": self.condition_scale, "top_k": self.top_k, "top_p": self.top_p,
                "temperature": self.temperature}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: dict[str, Any]
    model: ModelConfig
    vqgan: VQGANConfig
    sampling: SamplingDefaults

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("random_weights", False))

    @property
    def sampler_kmax(self) -> int | None:
        """For a decoder that samples on the device: the most codes it can keep (top_k <= kmax)."""
        ds = self.manifest.get("device_sampler")
        return int(ds["kmax"]) if ds else None

    def path(self, file: str) -> Path:
        return self.root / file

    def graph(self, part: str) -> Path:
        return self.root / GRAPHS[part]

    def has(self, file: str) -> bool:
        return file in self.manifest["files"]

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = True) -> "Bundle":
        """Read and check a bundle. ``verify`` re-hashes every file (seconds for DALL·E Mini)."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"model bundle {root} does not exist or is not a folder; "
                              "build one with `dallebot export --from CHECKPOINT_DIR --out BUNDLE`")
        mpath = root / MANIFEST
        if not mpath.is_file():
            hint = (" (it looks like a checkpoint folder: convert it with `dallebot export --from "
                    f"{root} --out BUNDLE`)") if _looks_like_checkpoint(root) else ""
            raise BundleError(f"{root} is not a model bundle: {MANIFEST} is missing{hint}")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
        try:
            model, vqgan, sampling = _check_manifest(manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mpath} is malformed ({type(e).__name__}: {e}); re-export the bundle") from None
        for name, info in manifest["files"].items():
            p = root / name
            if not p.is_file():
                raise BundleError(f"bundle file {p} is missing; re-export or re-copy the bundle")
            if p.stat().st_size != info["bytes"]:
                raise BundleError(f"bundle file {p} has {p.stat().st_size} bytes, manifest says "
                                  f"{info['bytes']}: the file is truncated or corrupt; re-copy the bundle")
            if verify and sha256_file(p) != info["sha256"]:
                raise BundleError(f"bundle file {p} does not match its sha256 in {MANIFEST}: "
                                  "the file is corrupt or was replaced; re-copy or re-export the bundle")
        return cls(root, manifest, model, vqgan, sampling)


def _looks_like_checkpoint(root: Path) -> bool:
    return any((root / f).exists() for f in ("flax_model.msgpack", "config.json", "encoder.pt", "detoker.pt"))


def _check_manifest(m: dict[str, Any]) -> tuple[ModelConfig, VQGANConfig, SamplingDefaults]:
    if m.get("format") != FORMAT:
        raise ValueError(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version {m.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"dtype {m['dtype']!r} not in {DTYPES}")
    model = ModelConfig.from_dict(m["model"])
    vqgan = VQGANConfig.from_dict(m["vqgan"])
    sampling = SamplingDefaults(**m["sampling"])
    if vqgan.token_grid != model.image_grid:
        raise ValueError(f"VQGAN token grid {vqgan.token_grid} != decoder image grid {model.image_grid}")
    if model.num_codes > vqgan.n_embed:
        raise ValueError(f"num_codes {model.num_codes} exceeds the VQGAN codebook ({vqgan.n_embed})")
    ds = m.get("device_sampler")
    if ds is not None and not (isinstance(ds, dict) and isinstance(ds.get("kmax"), int) and ds["kmax"] >= 1):
        raise ValueError("device_sampler must be {\"kmax\": a positive integer}")
    if m["image"] != image_fields(model, vqgan) or m["special_tokens"] != special_token_fields(model):
        raise ValueError("image/special_tokens sections disagree with the model config")
    files = m["files"]
    for required in [*GRAPHS.values(), *TOKENIZER_FILES.values()]:
        if required not in files:
            raise ValueError(f"files does not list {required}")
    for name, info in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"file name {name!r} is not a plain file name")
        if not (isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
            raise ValueError(f"files[{name!r}] needs sha256 and bytes")
    return model, vqgan, sampling


def image_fields(model: ModelConfig, vqgan: VQGANConfig) -> dict[str, Any]:
    return {"size": vqgan.resolution, "token_grid": model.image_grid, "tokens": model.image_length}


def special_token_fields(model: ModelConfig) -> dict[str, int]:
    return {"text_bos": model.text_bos_id, "text_pad": model.text_pad_id, "text_eos": model.text_eos_id,
            "image_start": model.decoder_start_token_id, "num_codes": model.num_codes}


def write_manifest(root: Path, *, name: str, model: ModelConfig, vqgan: VQGANConfig, dtype: str,
                   sampling: SamplingDefaults, provenance: dict[str, Any], license: str,
                   random_weights: bool, files: Iterable[str], description: str = "",
                   device_sampler: dict[str, int] | None = None) -> dict[str, Any]:
    """Hash ``files`` (names inside ``root``) and write ``manifest.json`` last, so a half-written
    bundle is never taken for a complete one. ``device_sampler`` ({"kmax": K}) marks a decoder
    exported with cache="sample"."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "dtype": dtype,
        "random_weights": random_weights,
        "model": model.to_dict(),
        "vqgan": vqgan.to_dict(),
        "image": image_fields(model, vqgan),
        "special_tokens": special_token_fields(model),
        "sampling": sampling.to_dict(),
        **({"device_sampler": device_sampler} if device_sampler else {}),
        "graphs": dict(GRAPHS),
        "tokenizer": dict(TOKENIZER_FILES),
        "provenance": provenance,
        "license": license,
        "files": {f: {"sha256": sha256_file(root / f), "bytes": (root / f).stat().st_size}
                  for f in sorted(set(files))},
    }
    _check_manifest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
