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

The runtime refuses a bundle whose manifest is missing, malformed (a wrong type or value is named
by its field) or inconsistent, whose files are missing or differ from the manifest's sha256, or
whose graphs use external data files the manifest does not list. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import ModelConfig, VQGANConfig
from .errors import BundleError
from .sampling import SamplingParams

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
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
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
        for graph in GRAPHS.values():
            # weights in external data files are only size- and hash-checked when the manifest lists them
            for data in sorted(external_data_files(root / graph)):
                if data not in manifest["files"]:
                    raise BundleError(f"{graph} keeps its weights in {data}, which {mpath} does not list under "
                                      "files (so they would go unchecked); re-export the bundle")
        return cls(root, manifest, model, vqgan, sampling)


_LOCATION = re.compile(rb"\x0a\x08location\x12")   # StringStringEntryProto {key: "location", value: ...}


def _varint(buf: "mmap.mmap | bytes", at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(buf) and shift < 64:
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    raise ValueError("truncated varint")


def external_data_files(graph: Path) -> set[str]:
    """Files holding an ONNX graph's external data: ``GRAPH.data`` when it lies beside the graph, and
    every ``location`` the graph's tensors name (read from the protobuf bytes; onnx is not needed)."""
    found = {graph.name + ".data"} if graph.with_name(graph.name + ".data").exists() else set()
    try:
        with open(graph, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for m in _LOCATION.finditer(buf):
                try:
                    n, start = _varint(buf, m.end())
                except ValueError:
                    continue
                name = bytes(buf[start:start + n]).decode("utf-8", "replace")
                if name:
                    found.add(name)
    except (OSError, ValueError):      # an empty or unreadable graph: onnxruntime reports it on load
        pass
    return found


def _looks_like_checkpoint(root: Path) -> bool:
    return any((root / f).exists() for f in ("flax_model.msgpack", "config.json", "encoder.pt", "detoker.pt"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _section(m: dict[str, Any], key: str) -> dict[str, Any]:
    value = m[key]
    if not isinstance(value, dict):
        raise TypeError(f"{key} must be an object, not {type(value).__name__}")
    return value


def _check_config_types(section: str, d: dict[str, Any], cls: type) -> None:
    """Every field of a config section has its default's type: whole numbers >= 0 for ints, finite
    numbers for floats, lists of whole numbers for tuples."""
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, default = d[f.name], f.default
        if isinstance(default, int) and not (_is_int(v) and v >= 0):
            raise ValueError(f"{section}.{f.name} must be a whole number >= 0 (got {v!r})")
        if isinstance(default, float) and not _is_number(v):
            raise ValueError(f"{section}.{f.name} must be a finite number (got {v!r})")
        if isinstance(default, tuple) and not (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)):
            raise ValueError(f"{section}.{f.name} must be a list of whole numbers (got {v!r})")


def _check_sampling(d: dict[str, Any]) -> SamplingDefaults:
    names = [f.name for f in dataclasses.fields(SamplingDefaults)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown}")
    for name in names:
        if name not in d:
            continue
        v = d[name]
        if name == "top_k" and not _is_int(v):
            raise ValueError(f"sampling.top_k must be a whole number (got {v!r})")
        if not _is_number(v):
            raise ValueError(f"sampling.{name} must be a finite number (got {v!r})")
    sampling = SamplingDefaults(**d)
    try:
        SamplingParams(**sampling.to_dict())
    except ValueError as e:
        raise ValueError(f"sampling: {e}") from None
    return sampling


def _check_manifest(m: dict[str, Any]) -> tuple[ModelConfig, VQGANConfig, SamplingDefaults]:
    if not isinstance(m, dict):
        raise TypeError(f"the manifest must be a JSON object, not {type(m).__name__}")
    if m.get("format") != FORMAT:
        raise ValueError(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version {m.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    if not (isinstance(m["name"], str) and m["name"].strip()):
        raise ValueError(f"name must be a non-empty string (got {m['name']!r})")
    if not (isinstance(m["dtype"], str) and m["dtype"] in DTYPES):
        raise ValueError(f"dtype {m['dtype']!r} not in {DTYPES}")
    if not isinstance(m.get("random_weights", False), bool):
        raise ValueError(f"random_weights must be true or false (got {m['random_weights']!r})")
    _check_config_types("model", _section(m, "model"), ModelConfig)
    _check_config_types("vqgan", _section(m, "vqgan"), VQGANConfig)
    model = ModelConfig.from_dict(m["model"])
    vqgan = VQGANConfig.from_dict(m["vqgan"])
    sampling = _check_sampling(_section(m, "sampling"))
    if vqgan.token_grid != model.image_grid:
        raise ValueError(f"VQGAN token grid {vqgan.token_grid} != decoder image grid {model.image_grid}")
    if model.num_codes > vqgan.n_embed:
        raise ValueError(f"num_codes {model.num_codes} exceeds the VQGAN codebook ({vqgan.n_embed})")
    for token in ("text_bos_id", "text_pad_id", "text_eos_id"):
        if getattr(model, token) >= model.text_vocab_size:
            raise ValueError(f"model.{token} {getattr(model, token)} is not a row of the text embedding "
                             f"(text_vocab_size {model.text_vocab_size})")
    ds = m.get("device_sampler")
    if ds is not None and not (isinstance(ds, dict) and _is_int(ds.get("kmax")) and ds["kmax"] >= 1):
        raise ValueError("device_sampler must be {\"kmax\": a positive integer}")
    if m["image"] != image_fields(model, vqgan) or m["special_tokens"] != special_token_fields(model):
        raise ValueError("image/special_tokens sections disagree with the model config")
    files = _section(m, "files")
    for required in [*GRAPHS.values(), *TOKENIZER_FILES.values()]:
        if required not in files:
            raise ValueError(f"files does not list {required}")
    for name, info in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"file name {name!r} is not a plain file name")
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and _is_int(info.get("bytes"))
                and info["bytes"] >= 0):
            raise ValueError(f"files[{name!r}] must be an object with sha256 (text) and bytes (a whole number)")
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
