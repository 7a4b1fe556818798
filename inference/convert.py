"""Read published DALL·E Mini / Mega checkpoints into our torch modules.

Supported layouts:

* dalle-mini Hugging Face folders: ``config.json`` + ``flax_model.msgpack`` + ``vocab.json`` +
  ``merges.txt`` (``dalle-mini/dalle-mini``, ``dalle-mini/dalle-mega``), with the VQGAN in its own
  folder (``config.json`` + ``flax_model.msgpack``, ``dalle-mini/vqgan_imagenet_f16_16384``);
* min-dalle folders: ``encoder.pt`` + ``decoder.pt`` (or ``*_mini.pt``), ``vocab.json`` +
  ``merges.txt`` (or ``*_mini``), optional ``config.json``, and ``detoker.pt`` in its own folder
  (optionally with a VQGAN ``config.json`` for non-standard sizes).

Flax msgpack files are read with ``msgpack`` + ``numpy`` (no flax): leaves are ExtType 1 (ndarray:
[shape, dtype name, bytes]) or 3 (numpy scalar), large arrays may be chunked. Stacked (``use_scan``)
and unstacked layer trees are both accepted. Every parameter is checked against the config: a
missing, unexpected or wrongly shaped parameter is a ``CheckpointError`` naming it and its file.

The VQGAN is ``--vqgan`` or the one ``vqgan*`` folder inside or beside the model folder (several are
an error: the choice must be explicit). Its codebook must hold every code the model samples (the
rows below the start token, 16384 for DALL·E Mini and Mega); a smaller one is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import torch
from torch import nn

from .config import ModelConfig, VQGANConfig
from .errors import CheckpointError
from .export import ModelParts
from .model import DalleBartDecoder, DalleBartEncoder, VQGANDecoder

# --------------------------------------------------------------------------------------------------
# Flax msgpack


_NUMERIC_KINDS = "biuf"     # bool, signed, unsigned, float: what a parameter can be converted from
# what a malformed msgpack tree raises while it is read and its chunked arrays joined
_MSGPACK_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
                   msgpack.UnpackException)


def _bfloat16_to_float32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _ext_hook(code: int, payload: bytes) -> Any:
    if code in (1, 3):                      # ndarray, numpy scalar
        shape, dtype_name, buf = msgpack.unpackb(payload, raw=True)
        name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
        if name == "bfloat16":
            arr = _bfloat16_to_float32(np.frombuffer(buf, dtype=np.uint16))
        else:
            dtype = np.dtype(name)
            if dtype.kind not in _NUMERIC_KINDS:
                raise ValueError(f"an array of {dtype} is not a parameter")
            arr = np.frombuffer(buf, dtype=dtype)
        return arr.reshape(shape)
    if code == 2:                           # complex
        re_, im = msgpack.unpackb(payload)
        return complex(re_, im)
    return msgpack.ExtType(code, payload)


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get("__msgpack_chunked_array__"):
            shape = [tree["shape"][k] for k in sorted(tree["shape"], key=int)]
            chunks = [tree["chunks"][k] for k in sorted(tree["chunks"], key=int)]
            return np.concatenate([np.asarray(c).ravel() for c in chunks]).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str | Path) -> dict[str, Any]:
    """flax.serialization.to_bytes(params) file -> nested dict of numpy arrays."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path} does not hold a parameter tree")
        return _unchunk(tree)
    except _MSGPACK_ERRORS as e:
        raise CheckpointError(f"{path} is not a readable Flax msgpack checkpoint "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 150) -> str:
    """The first line of an exception's message (empty messages included), for one-line errors."""
    lines = str(e).splitlines()
    return lines[0][:limit] if lines else ""


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from flatten(v, key)
        else:
            try:
                yield key, np.asarray(v)
            except ValueError:       # ragged lists: not a parameter (load_checked names it)
                yield key, np.asarray(v, dtype=object)


# --------------------------------------------------------------------------------------------------
# Loading a state dict with per-parameter checks

@dataclass
class _Source:
    name: str          # the parameter's name in the checkpoint
    file: Path


def load_checked(module: nn.Module, tensors: dict[str, tuple[np.ndarray | torch.Tensor, _Source]],
                 what: str) -> None:
    """Copy tensors into module, refusing anything missing, unexpected or of the wrong shape."""
    expected = module.state_dict()
    for key, (value, src) in tensors.items():
        if not _is_numeric_array(value):
            what_is = type(value).__name__ if not hasattr(value, "dtype") else f"an array of {value.dtype}"
            raise CheckpointError(f"parameter {src.name} in {src.file} is {what_is}, not an array of numbers: "
                                  "the file is corrupt or not a checkpoint")
        if key not in expected:
            raise CheckpointError(f"unexpected parameter {src.name} in {src.file} (no {what} parameter {key}); "
                                  "is this the right checkpoint for the config?")
        shape = tuple(value.shape)
        if shape != tuple(expected[key].shape):
            raise CheckpointError(f"parameter {src.name} in {src.file} has shape {shape}, expected "
                                  f"{tuple(expected[key].shape)} for {what}.{key}: the checkpoint does not match its config")
    missing = [k for k in expected if k not in tensors]
    if missing:
        file = next(iter(tensors.values()))[1].file if tensors else "the checkpoint"
        raise CheckpointError(f"parameter {what}.{missing[0]} is missing from {file} "
                              f"({len(missing)} missing in all); the checkpoint is incomplete")
    with torch.no_grad():
        for key, (value, _) in tensors.items():
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, dtype=np.float32))
            expected[key].copy_(t.to(torch.float32))   # state_dict tensors share the parameters' storage


def _is_numeric_array(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not (value.is_complex() or value.dtype in (torch.quint8, torch.qint8, torch.qint32))
    return isinstance(value, np.ndarray) and value.dtype.kind in _NUMERIC_KINDS


# --------------------------------------------------------------------------------------------------
# dalle-mini (Flax) DalleBart

_LAYER_RENAMES = {
    "LayerNorm_0": "pre_self_attn_layer_norm", "LayerNorm_1": "self_attn_layer_norm",
    "FlaxBartAttention_0": "self_attn", "LayerNorm_2": "pre_encoder_attn_layer_norm",
    "LayerNorm_3": "encoder_attn_layer_norm", "FlaxBartAttention_1": "encoder_attn",
}
_GLU_RENAMES = {"LayerNorm_0": "ln0", "LayerNorm_1": "ln1", "Dense_0": "fc0", "Dense_1": "fc1", "Dense_2": "fc2"}


def _leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Flax leaf -> torch leaf: kernel -> weight with the last two axes swapped, scale -> weight."""
    if name == "kernel":
        return "weight", np.swapaxes(value, -1, -2)
    if name in ("scale", "embedding"):
        return "weight", value
    return name, value


def _layer_path(parts: list[str]) -> str:
    """[LayerNorm_0, bias] or [GLU_0, Dense_0, kernel] ... -> torch path inside one layer (no leaf)."""
    if parts[0] == "GLU_0":
        return "glu." + _GLU_RENAMES[parts[1]] + "".join("." + p for p in parts[2:-1])
    return _LAYER_RENAMES[parts[0]] + "".join("." + p for p in parts[1:-1])


def dallebart_from_flax(tree: dict[str, Any], cfg: ModelConfig, file: Path) -> tuple[DalleBartEncoder, DalleBartDecoder]:
    """dalle-mini parameter tree (root keys ``model``, ``lm_head``) -> torch encoder and decoder."""
    if "params" in tree and "model" not in tree:
        tree = tree["params"]
    if "model" not in tree or "lm_head" not in tree:
        raise CheckpointError(f"{file} is not a DalleBart checkpoint: expected root keys 'model' and 'lm_head', "
                              f"found {sorted(map(str, tree))[:5]}")
    out: dict[str, dict[str, tuple[np.ndarray, _Source]]] = {"encoder": {}, "decoder": {}}
    for path, value in flatten(tree):
        src = _Source(path, file)
        parts = path.split("/")
        try:
            if parts[0] == "lm_head":
                leaf, v = _leaf(parts[-1], value)
                out["decoder"][f"lm_head.{leaf}"] = (v, src)
                continue
            if parts[0] != "model" or parts[1] not in out:
                raise KeyError(path)
            stack, rest = parts[1], parts[2:]
            if rest[0] == "layers":
                m = re.fullmatch(r"FlaxBart(?:Encoder|Decoder)Layers?(?:_(\d+))?", rest[1])
                if not m:
                    raise KeyError(path)
                inner = _layer_path(rest[2:])
                leaf, v = _leaf(rest[-1], value)
                if m.group(1) is not None:                       # unscanned: one layer per module
                    out[stack][f"layers.{m.group(1)}.{inner}.{leaf}"] = (v, src)
                else:                                            # use_scan: stacked on axis 0
                    for i in range(v.shape[0]):
                        out[stack][f"layers.{i}.{inner}.{leaf}"] = (v[i], _Source(f"{path}[{i}]", file))
            else:
                leaf, v = _leaf(rest[-1], value)
                out[stack][".".join(rest[:-1]) + "." + leaf] = (v, src)
        except (KeyError, IndexError):
            raise CheckpointError(f"unexpected parameter {path} in {file}: not part of a DalleBart model") from None
    encoder, decoder = DalleBartEncoder(cfg), DalleBartDecoder(cfg)
    load_checked(encoder, out["encoder"], "encoder")
    load_checked(decoder, out["decoder"], "decoder")
    return encoder.eval(), decoder.eval()


# --------------------------------------------------------------------------------------------------
# VQGAN (vqgan-jax Flax)

def vqgan_from_flax(tree: dict[str, Any], cfg: VQGANConfig, file: Path) -> VQGANDecoder:
    if "params" in tree and "decoder" not in tree:
        tree = tree["params"]
    if "decoder" not in tree or "quantize" not in tree:
        raise CheckpointError(f"{file} is not a VQGAN checkpoint: expected root keys 'decoder' and 'quantize'")
    out: dict[str, tuple[np.ndarray, _Source]] = {}
    for path, value in flatten(tree):
        if path.startswith(("encoder/", "quant_conv/")):
            continue                                             # encoding path: not needed to decode
        src = _Source(path, file)
        if path == "quantize/embedding/embedding":
            out["embedding.weight"] = (value, src)
            continue
        # decoder/up_4/block_0/... -> decoder/up/4/block/0/... (mid/block_1 keeps its name)
        key = re.sub(r"^decoder/up_(\d+)/(?:(block|attn)_(\d+)/)?",
                     lambda m: f"decoder/up/{m[1]}/" + (f"{m[2]}/{m[3]}/" if m[2] else ""), path)
        *mods, leaf = key.split("/")
        if leaf == "kernel":
            if value.ndim != 4:
                raise CheckpointError(f"parameter {path} in {file} has shape {value.shape}, expected a 4-d conv kernel")
            value = value.transpose(3, 2, 0, 1)                  # (kh, kw, in, out) -> (out, in, kh, kw)
            leaf = "weight"
        elif leaf == "scale":
            leaf = "weight"
        out[".".join([*mods, leaf])] = (value, src)
    model = VQGANDecoder(cfg)
    load_checked(model, out, "vqgan")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# min-dalle .pt files

def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted errors for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path} is not a state dict: it has a key {key!r} that is not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"parameter {key} in {path} is {type(value).__name__}, not a tensor: "
                                  "the file is corrupt or not a state dict")
    return sd


def _from_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], file: Path, what: str) -> nn.Module:
    """min-dalle dicts lack the gains of bias-only LayerNorms (fixed to 1): tolerate them if present and 1."""
    own = module.state_dict()
    tensors = {}
    for k, v in sd.items():
        if k not in own and k.endswith(".weight") and k[:-7] + ".bias" in own and torch.all(v == 1):
            continue                                             # a unit gain our bias-only LN does not have
        tensors[k] = (v, _Source(k, file))
    load_checked(module, tensors, what)
    return module.eval()


PUBLISHED_CODES = 16384   # codes of vqgan_imagenet_f16_16384, and the start token of DALL·E Mini and Mega


def _matrix(sd: dict[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    value = sd.get(key)
    if value is None:
        raise CheckpointError(f"parameter {key} is missing from {file}: cannot infer the model's dimensions "
                              "(is it a min-dalle encoder/decoder .pt file? add its config.json beside it otherwise)")
    if not (isinstance(value, torch.Tensor) and value.ndim == 2):
        raise CheckpointError(f"parameter {key} in {file} has shape {tuple(getattr(value, 'shape', ()))}, expected a matrix")
    return value


def _layer_count(sd: dict[str, torch.Tensor], file: Path) -> int:
    ids = [int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))]
    if not ids:
        raise CheckpointError(f"{file} has no layers.N.* parameters: cannot infer the number of layers "
                              "(is it a min-dalle encoder/decoder .pt file?)")
    return 1 + max(ids)


def infer_model_config(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor],
                       enc_file: Path = Path("encoder.pt"), dec_file: Path = Path("decoder.pt"),
                       head_dim: int = 64) -> ModelConfig:
    """Dimensions from tensor shapes (min-dalle folders without config.json). The start token is the
    published one: ``min(image_vocab_size, 16384)`` (DALL·E Mini: 16384 = image_vocab_size; Mega:
    16384, below its padded vocabulary), and the codes are the rows below it."""
    d = _matrix(enc, "embed_tokens.weight", enc_file).shape[1]
    rows = _matrix(dec, "embed_tokens.weight", dec_file).shape[0]
    n = _matrix(dec, "embed_positions.weight", dec_file).shape[0]
    ivs = rows - 1
    start = min(ivs, PUBLISHED_CODES)
    try:
        return ModelConfig(
            d_model=d, encoder_layers=_layer_count(enc, enc_file), decoder_layers=_layer_count(dec, dec_file),
            encoder_heads=d // head_dim, decoder_heads=d // head_dim,
            encoder_ffn_dim=_matrix(enc, "layers.0.glu.fc0.weight", enc_file).shape[0],
            decoder_ffn_dim=_matrix(dec, "layers.0.glu.fc0.weight", dec_file).shape[0],
            text_vocab_size=_matrix(enc, "embed_tokens.weight", enc_file).shape[0], image_vocab_size=ivs,
            text_length=_matrix(enc, "embed_positions.weight", enc_file).shape[0], image_grid=int(round(n ** 0.5)),
            num_codes=start, decoder_start_token_id=start,
        )
    except (ValueError, ArithmeticError) as e:
        raise CheckpointError(f"the shapes in {enc_file} and {dec_file} make no DalleBart model ({e}); "
                              "add the model's config.json beside them") from None


# --------------------------------------------------------------------------------------------------
# Folder detection

@dataclass
class Checkpoint:
    """A converted checkpoint, ready for ``export_bundle``. Use it as a context manager (or call
    ``cleanup``): min-dalle's tokenizer files are copied under the standard names into a temporary
    folder that must be removed afterwards."""

    parts: ModelParts
    tokenizer_dir: Path
    name: str
    source_format: str
    provenance: dict[str, Any]
    license: str
    temp_dirs: list[Path] = dataclasses.field(default_factory=list)

    def cleanup(self) -> None:
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.temp_dirs.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _first(folder: Path, *names: str) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _is_vqgan_folder(p: Path) -> bool:
    if (p / "detoker.pt").is_file():
        return True
    cfg = p / "config.json"
    if (p / "flax_model.msgpack").is_file() and cfg.is_file():
        try:
            c = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return "n_embed" in c or c.get("model_type") == "vqgan"
    return False


def find_vqgan(folder: Path) -> Path | None:
    """The VQGAN folder next to or inside a model folder (vqgan*, ../vqgan*, min-dalle's ../vqgan).
    Several candidates (say vqgan_imagenet_f16_1024 and vqgan_imagenet_f16_16384) are an error
    naming them: the choice must be explicit (--vqgan)."""
    if _is_vqgan_folder(folder):
        return folder
    found: list[Path] = []
    for c in [*sorted(folder.glob("vqgan*")), *sorted(folder.parent.glob("vqgan*"))]:
        if c.is_dir() and _is_vqgan_folder(c) and c.resolve() not in {f.resolve() for f in found}:
            found.append(c)
    if len(found) > 1:
        raise CheckpointError(f"several VQGAN folders next to {folder}: {', '.join(str(f) for f in found)}; "
                              "pass --vqgan DIR to choose the one the model was trained with")
    return found[0] if found else None


def _vqgan_config(path: Path) -> VQGANConfig:
    try:
        return VQGANConfig.from_hf(_read_json(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a usable VQGAN config ({type(e).__name__}: {e})") from None


def load_vqgan(folder: Path) -> tuple[VQGANDecoder, dict[str, Any]]:
    cfg_path = folder / "config.json"
    if (folder / "detoker.pt").is_file():
        cfg = _vqgan_config(cfg_path) if cfg_path.is_file() else VQGANConfig()
        sd = _torch_load(folder / "detoker.pt")
        return _from_state_dict(VQGANDecoder(cfg), sd, folder / "detoker.pt", "vqgan"), {"vqgan": "min-dalle detoker.pt"}
    if (folder / "flax_model.msgpack").is_file() and cfg_path.is_file():
        cfg = _vqgan_config(cfg_path)
        file = folder / "flax_model.msgpack"
        return vqgan_from_flax(read_flax_msgpack(file), cfg, file), {"vqgan": "vqgan-jax flax_model.msgpack"}
    raise CheckpointError(f"{folder} holds no VQGAN (expected detoker.pt, or config.json + flax_model.msgpack)")


def load_checkpoint(folder: str | Path, vqgan_folder: str | Path | None = None,
                    progress: Callable[[str], None] | None = None) -> Checkpoint:
    """Detect the layout of ``folder`` and load encoder, decoder and VQGAN into torch modules."""
    folder = Path(folder)
    say = progress or (lambda _msg: None)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    vq_dir = Path(vqgan_folder) if vqgan_folder else find_vqgan(folder)
    if vq_dir is None:
        raise CheckpointError(f"no VQGAN found next to {folder}: pass --vqgan DIR (a folder with detoker.pt, "
                              "or the config.json + flax_model.msgpack of vqgan_imagenet_f16_16384)")
    flax_file = folder / "flax_model.msgpack"
    enc_pt = _first(folder, "encoder.pt", "encoder_mini.pt")
    dec_pt = _first(folder, "decoder.pt", "decoder_mini.pt")
    vocab = _first(folder, "vocab.json", "vocab_mini.json")
    merges = _first(folder, "merges.txt", "merges_mini.txt")
    if vocab is None or merges is None:
        raise CheckpointError(f"{folder} has no tokenizer files (vocab.json and merges.txt)")
    say(f"reading VQGAN from {vq_dir}")
    vqgan, vq_prov = load_vqgan(vq_dir)
    if flax_file.is_file():
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has flax_model.msgpack but no config.json")
        hf = _read_json(folder / "config.json")
        if hf.get("model_type") not in (None, "dallebart"):
            raise CheckpointError(f"{folder}/config.json describes a {hf.get('model_type')!r} model, not dallebart")
        try:
            cfg = ModelConfig.from_hf(hf)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{folder}/config.json is not a DalleBart config ({type(e).__name__}: {e})") from None
        cfg = _with_codes(cfg, vqgan.cfg.n_embed, vq_dir)
        say(f"reading {flax_file} ({flax_file.stat().st_size / 1e6:.0f} MB)")
        encoder, decoder = dallebart_from_flax(read_flax_msgpack(flax_file), cfg, flax_file)
        fmt, name = "dalle-mini flax", hf.get("_name_or_path") or folder.name
    elif enc_pt and dec_pt:
        say(f"reading {enc_pt.name} and {dec_pt.name}")
        enc_sd, dec_sd = _torch_load(enc_pt), _torch_load(dec_pt)
        cfg_json = _first(folder, "config.json", "config_mini.json")
        if cfg_json:
            try:
                cfg = ModelConfig.from_hf(_read_json(cfg_json))
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"{cfg_json} is not a DalleBart config ({type(e).__name__}: {e})") from None
        else:
            cfg = infer_model_config(enc_sd, dec_sd, enc_pt, dec_pt)
        cfg = _with_codes(cfg, vqgan.cfg.n_embed, vq_dir)
        encoder = _from_state_dict(DalleBartEncoder(cfg), enc_sd, enc_pt, "encoder")
        decoder = _from_state_dict(DalleBartDecoder(cfg), dec_sd, dec_pt, "decoder")
        fmt, name = "min-dalle", "dalle-mega" if cfg.d_model >= 2048 else "dalle-mini"
    else:
        raise CheckpointError(f"{folder} is not a checkpoint folder: expected config.json + flax_model.msgpack "
                              "(dalle-mini) or encoder.pt + decoder.pt (min-dalle)")
    if cfg.image_grid != vqgan.cfg.token_grid:
        raise CheckpointError(f"the decoder makes {cfg.image_grid}x{cfg.image_grid} tokens but the VQGAN in {vq_dir} "
                              f"decodes {vqgan.cfg.token_grid}x{vqgan.cfg.token_grid}")
    prov = {"source": str(folder.resolve()), "source_format": fmt, "vqgan_source": str(vq_dir.resolve()), **vq_prov}
    licence = "Apache-2.0 (DALL·E Mini/Mega weights); VQGAN: MIT (taming-transformers)"
    parts = ModelParts(encoder, decoder, vqgan)
    if vocab.name == "vocab.json" and merges.name == "merges.txt" and vocab.parent == merges.parent:
        return Checkpoint(parts, vocab.parent, str(name).split("/")[-1], fmt, prov, licence)
    tok_dir = _tokenizer_copy(vocab, merges)
    return Checkpoint(parts, tok_dir, str(name).split("/")[-1], fmt, prov, licence, temp_dirs=[tok_dir])


def _with_codes(cfg: ModelConfig, n_embed: int, vq_dir: Path) -> ModelConfig:
    """The codes the model samples are the rows below its start token (DALL·E Mini: 16384 = its image
    vocabulary; Mega: 16384, below a padded vocabulary of 16415), at most the config's num_codes; the
    start token stays the config's. A VQGAN with fewer codes did not train this model: refused."""
    codes = cfg.num_codes
    if 0 < cfg.decoder_start_token_id < codes:
        codes = cfg.decoder_start_token_id
    if n_embed < codes:
        raise CheckpointError(f"the VQGAN in {vq_dir} has {n_embed} codes but the model samples {codes} "
                              f"(codes 0..{codes - 1}): it is not the VQGAN this model was trained with; pass "
                              "--vqgan with the right one (vqgan_imagenet_f16_16384 for DALL·E Mini and Mega)")
    return dataclasses.replace(cfg, num_codes=codes)


def _tokenizer_copy(vocab: Path, merges: Path) -> Path:
    """min-dalle's vocab_mini.json/merges_mini.txt under the standard names, in a temporary folder
    (removed by ``Checkpoint.cleanup``)."""
    tmp = Path(tempfile.mkdtemp(prefix="dallebot-tok-"))
    try:
        shutil.copyfile(vocab, tmp / "vocab.json")
        shutil.copyfile(merges, tmp / "merges.txt")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot copy the tokenizer files {vocab} and {merges} ({e})") from None
    return tmp
