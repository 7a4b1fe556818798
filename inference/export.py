"""Export torch modules to a model bundle (ONNX graphs + tokenizer files + manifest).

Used by ``dallebot export`` (after ``inference.convert`` has loaded a published checkpoint) and by
the training code of the project's own models::

    parts = ModelParts(encoder, decoder, vqgan)          # trained or converted torch modules
    export_bundle(parts, tokenizer_dir, "bundles/shapes", name="shapes-v1",
                  sampling=SamplingDefaults(condition_scale=3.0, top_k=8),
                  provenance={"trained_by": "..."}, license="Apache-2.0")

The exported graphs (names and shapes in ``inference.bundle``):

* encoder: text ids -> encoder states -> every decoder layer's cross-attention K/V, computed once
  per request instead of once per step (min-dalle recomputes them at every step);
* decoder: one step for all rows: token + position + cached K/V -> logits and this step's K/V;
* vqgan: codes -> pixels, always float32 (half precision breaks the VQGAN's images).

Export uses torch's dynamo-based ``torch.onnx.export`` (the default since torch 2.9) with a dynamic
row dimension; its progress chatter and warnings are silenced here. Weights always go to
``NAME.onnx.data`` (external data): protobuf caps a file at 2 GiB (DALL·E Mega), and onnxruntime
memory-maps external data, which lowers peak memory at load by ~300 MB for DALL·E Mini's decoder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from .bundle import (
    DECODER_FIXED_INPUTS, DECODER_OUTPUTS, DTYPES, ENCODER_INPUTS, ENCODER_OUTPUTS, GRAPHS,
    SAMPLER_INPUTS, SAMPLER_OUTPUTS, TOKENIZER_FILES, VQGAN_INPUTS, VQGAN_OUTPUTS, WORD_FREQUENCY_FILE, Bundle, SamplingDefaults,
    decoder_kv_inputs, write_manifest,
)
from .config import ModelConfig, VQGANConfig
from .errors import InferenceError
from .model import DalleBartDecoder, DalleBartEncoder, VQGANDecoder
from .model.sampler import DEFAULT_KMAX, DeviceSampler

_log = logging.getLogger(__name__)

OPSET = 18


@dataclass
class ModelParts:
    """The three torch modules a bundle is made of."""

    encoder: DalleBartEncoder
    decoder: DalleBartDecoder
    vqgan: VQGANDecoder

    @property
    def config(self) -> ModelConfig:
        return self.decoder.cfg

    @property
    def vqgan_config(self) -> VQGANConfig:
        return self.vqgan.cfg

    def eval(self) -> "ModelParts":
        for m in (self.encoder, self.decoder, self.vqgan):
            m.eval()
        return self


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """dalle-mini style init: normal(0, std) for Linear/Embedding weights, zero biases, unit LN gains."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def build_parts(model: ModelConfig, vqgan: VQGANConfig, *, seed: int = 0, std: float = 0.02) -> ModelParts:
    """Fresh modules with random weights (tests, benchmarks, the start of training)."""
    if model.image_grid != vqgan.token_grid:
        raise ValueError(f"decoder image_grid {model.image_grid} != VQGAN token grid {vqgan.token_grid}")
    torch.manual_seed(seed)
    with torch.no_grad():
        parts = ModelParts(DalleBartEncoder(model), DalleBartDecoder(model), VQGANDecoder(vqgan))
        init_weights(parts.encoder, std)
        init_weights(parts.decoder, std)
    return parts.eval()


# --------------------------------------------------------------------------------------------------
# Export wrappers: the exact functions the graphs compute.

class EncoderGraph(nn.Module):
    """(input_ids, attention_mask) (R, T) -> cross_kv (L, 2, R, H, T, Dh)."""

    def __init__(self, encoder: DalleBartEncoder, decoder: DalleBartDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder.cross_kv(self.encoder(input_ids, attention_mask))


class DecoderStepGraph(nn.Module):
    """(token, position, text_mask, past K/V x 2L, cross K/V x 2L) -> (logits, new_kv).

    With ``present=True`` it returns (logits, present K/V x 2L) instead: the past caches with
    column t replaced. That costs a copy of the cache per step, cheap on a GPU, and lets the runtime
    keep the caches on the device (it swaps two buffer sets); CPU bundles use new_kv and in-place
    numpy writes.
    """

    def __init__(self, decoder: DalleBartDecoder, present: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.layers = decoder.cfg.decoder_layers
        self.present = present

    def forward(self, token: torch.Tensor, position: torch.Tensor, text_mask: torch.Tensor,
                *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = 2 * self.layers
        past = list(kv[:n])
        logits, new_kv = self.decoder.step(token, position, past, list(kv[n:]), text_mask)
        if not self.present:
            return logits, new_kv
        cols = torch.arange(self.decoder.cfg.image_length, device=token.device)
        at_t = (cols == position).view(1, 1, -1, 1)                                   # (1, 1, N, 1)
        present = [torch.where(at_t, new_kv[i // 2, i % 2][:, :, None, :], p) for i, p in enumerate(past)]
        return (logits, *present)


class DecoderSampleGraph(nn.Module):
    """(token, position, text_mask, uniforms, codes, condition_scale, temperature, top_k, top_p,
    past K/V x 2L, cross K/V x 2L) -> (next_token, next_position, codes_out, present K/V x 2L).

    One step that also samples (``DeviceSampler``): the step's code goes into column ``position`` of
    the codes buffer and, for both the unconditional and the conditional row of each image, into the
    next token; the position advances by one. Fed its own outputs (two buffer sets, swapped), the
    decoder runs all steps with no host work and no copy back until the codes are read at the end.
    """

    def __init__(self, decoder: DalleBartDecoder, kmax: int = DEFAULT_KMAX) -> None:
        super().__init__()
        self.step = DecoderStepGraph(decoder, present=True)
        self.sampler = DeviceSampler(decoder.cfg.num_codes, kmax)
        self.image_length = decoder.cfg.image_length

    def forward(self, token: torch.Tensor, position: torch.Tensor, text_mask: torch.Tensor, uniforms: torch.Tensor,
                codes: torch.Tensor, condition_scale: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, *present = self.step(token, position, text_mask, *kv)
        u = torch.index_select(uniforms, 1, position)[:, 0]                                 # (B,)
        code = self.sampler(logits.float(), u, condition_scale, temperature, top_k, top_p)   # (B,)
        cols = torch.arange(self.image_length, device=token.device).view(1, -1)
        codes_out = torch.where(cols == position, code[:, None], codes)
        return (torch.cat([code, code]), position + 1, codes_out, *present)


class VQGANGraph(nn.Module):
    def __init__(self, vqgan: VQGANDecoder) -> None:
        super().__init__()
        self.vqgan = vqgan

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqgan(codes)


def example_inputs(cfg: ModelConfig, rows: int, dtype: torch.dtype = torch.float32
                   ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Dummy inputs for each graph (rows = R). Masks have one padded column so no branch folds away."""
    t, n, h, dh, layers = cfg.text_length, cfg.image_length, cfg.decoder_heads, cfg.head_dim, cfg.decoder_layers
    ids = torch.full((rows, t), cfg.text_pad_id, dtype=torch.long)
    ids[:, 0], ids[:, 1] = cfg.text_bos_id, cfg.text_eos_id
    mask = (ids != cfg.text_pad_id).long()
    past = tuple(torch.zeros(rows, h, n, dh, dtype=dtype) for _ in range(2 * layers))
    cross = tuple(torch.zeros(rows, h, t, dh, dtype=dtype) for _ in range(2 * layers))
    token = torch.full((rows,), cfg.decoder_start_token_id, dtype=torch.long)
    position = torch.zeros(1, dtype=torch.long)
    codes = torch.zeros(max(1, rows // 2), n, dtype=torch.long)
    return {"encoder": (ids, mask), "decoder": (token, position, mask, *past, *cross), "vqgan": (codes,)}


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.onnx prints progress lines and emits warnings meant for its own developers."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)   # torchvision-missing notes, quantiser hints
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
    _log.debug("torch.onnx output: %s", out.getvalue())


ROWS = torch.export.Dim("rows", min=1, max=4096)
IMAGES = torch.export.Dim("images", min=1, max=2048)


def export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                 output_names: list[str], dynamic_shapes: tuple[Any, ...]) -> list[Path]:
    """Export one graph (dynamic_shapes mirrors forward's signature); returns the files written."""
    with _quiet_export(), torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, dynamo=True, optimize=True, opset_version=OPSET,
                          external_data=True, verbose=False)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


CACHE_MODES = ("inplace", "present", "sample")


def export_graphs(parts: ModelParts, out_dir: Path, dtype: str = "float32", cache: str = "auto",
                  progress: bool = True, report: dict[str, Any] | None = None,
                  only: tuple[str, ...] = tuple(GRAPHS)) -> list[str]:
    """Write the encoder/decoder/vqgan ONNX graphs (or ``only`` some) into out_dir; returns the file
    names written.

    cache: "inplace" (decoder returns new_kv; best on CPU), "present" (returns updated caches; for
    GPUs), "sample" (present, and samples the next code on the device: ``DecoderSampleGraph``; for
    GPUs, where it lets the runtime replay each step as a CUDA graph) or "auto" (present for
    float16, else inplace).
    """
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype must be one of {', '.join(DTYPES)}")
    if cache == "auto":
        cache = "present" if dtype == "float16" else "inplace"
    if cache not in CACHE_MODES:
        raise InferenceError(f"cache mode must be one of auto, {', '.join(CACHE_MODES)}")
    if cache == "sample" and dtype == "int8":
        raise InferenceError("--cache sample is for GPUs (float16 or float32); int8 bundles sample on the host")
    cfg = parts.config
    parts.eval()
    encoder, decoder = parts.encoder, parts.decoder
    kv_dtype = torch.float32
    if dtype == "float16":
        encoder, decoder = _half_copy(encoder), _half_copy(decoder)
        kv_dtype = torch.float16
    ex = example_inputs(cfg, rows=4, dtype=kv_dtype)
    kv_names = decoder_kv_inputs(cfg.decoder_layers)
    rows = {0: ROWS}   # the row (batch) axis is dynamic everywhere
    present_names = [n.replace("past_", "present_") for n in kv_names[:2 * cfg.decoder_layers]]
    if cache == "sample":
        # rows = 2 x images: the sampler pairs row i (unconditional) with row B + i (conditional)
        img = {0: IMAGES}
        r2 = {0: 2 * IMAGES}
        b = ex["decoder"][0].shape[0] // 2
        sampler_args = (torch.zeros(b, cfg.image_length, dtype=torch.float64),
                        torch.zeros(b, cfg.image_length, dtype=torch.long), torch.ones(1), torch.ones(1),
                        torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.float64))
        token, position, mask, *kv = ex["decoder"]
        ex["decoder"] = (token, position, mask, *sampler_args, *kv)
        decoder_spec = ("decoder", DecoderSampleGraph(decoder), [*DECODER_FIXED_INPUTS, *SAMPLER_INPUTS, *kv_names],
                        [*SAMPLER_OUTPUTS, *present_names],
                        (r2, None, r2, img, img, None, None, None, None, tuple(r2 for _ in kv_names)))
    else:
        decoder_spec = ("decoder", DecoderStepGraph(decoder, present=cache == "present"),
                        [*DECODER_FIXED_INPUTS, *kv_names],
                        ["logits", *present_names] if cache == "present" else list(DECODER_OUTPUTS),
                        (rows, None, rows, tuple(rows for _ in kv_names)))
    specs = [
        ("encoder", EncoderGraph(encoder, decoder), list(ENCODER_INPUTS), list(ENCODER_OUTPUTS),
         (rows, rows)),
        decoder_spec,
        ("vqgan", VQGANGraph(parts.vqgan), list(VQGAN_INPUTS), list(VQGAN_OUTPUTS), (rows,)),
    ]
    written: list[str] = []
    specs = [spec for spec in specs if spec[0] in only]
    for part, module, ins, outs, dyn in tqdm(specs, desc="export ONNX", unit="graph", disable=not progress):
        t0 = time.perf_counter()
        files = export_graph(module.eval(), ex[part], out_dir / GRAPHS[part], ins, outs, dyn)
        _log.info("exported %s in %.1f s", part, time.perf_counter() - t0)
        written += [f.name for f in files]
    if dtype == "int8":
        if not {"encoder", "decoder"} <= set(only):
            raise InferenceError("int8 export needs both the encoder and the decoder graph")
        written = _quantize_dynamic(out_dir, progress, cfg, report if report is not None else {})
    return written


def _half_copy(module: nn.Module) -> nn.Module:
    """A float16 copy of a DalleBart part; the decoder's lm_head stays float32 (guidance amplifies
    its rounding error, min-dalle issue 95)."""
    m = copy.deepcopy(module).half()
    if isinstance(m, DalleBartDecoder):
        m.lm_head.float()
    return m


def _quantize_dynamic(out_dir: Path, progress: bool, cfg: ModelConfig,
                      report: dict[str, Any]) -> list[str]:
    """int8 weights for every MatMul of the encoder and decoder (the VQGAN stays float32).
    Fills ``report`` with the decoder step's logit difference and time, int8 vs float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for part in tqdm(("encoder", "decoder"), desc="quantise int8", disable=not progress):
        graph = out_dir / GRAPHS[part]
        data = graph.with_name(graph.name + ".data")
        int8 = graph.with_name(f"{part}.int8.onnx")
        with _quiet_export():
            # weights go to encoder.int8.onnx.data (the graph keeps that name after the rename below)
            quantize_dynamic(graph, int8, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=False, use_external_data_format=True)
        if part == "decoder":
            report.update(compare_decoder_graphs(graph, int8, cfg))
        graph.unlink()
        data.unlink(missing_ok=True)
        int8.rename(graph)
        for f in (graph, int8.with_name(int8.name + ".data")):
            f.chmod(0o644)                 # the quantiser writes through a private temporary file
    return sorted(f.name for f in out_dir.iterdir() if f.name.endswith((".onnx", ".onnx.data")))


def compare_decoder_graphs(reference: Path, candidate: Path, cfg: ModelConfig, rows: int = 2,
                           repeats: int = 3) -> dict[str, float]:
    """Run two decoder-step graphs on the same random state: max |logit difference| and ms per step."""
    rng = np.random.default_rng(0)
    ex = example_inputs(cfg, rows)["decoder"]
    names = [*DECODER_FIXED_INPUTS, *decoder_kv_inputs(cfg.decoder_layers)]
    feed = {n: t.numpy() for n, t in zip(names, ex)}
    feed["position"] = np.array([cfg.image_length // 2], dtype=np.int64)
    for n in names[3:]:
        feed[n] = rng.standard_normal(feed[n].shape).astype(np.float32)
    out, ms = {}, {}
    for label, path in (("fp32", reference), ("int8", candidate)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sess.run(["logits"], feed)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out[label] = sess.run(["logits"], feed)[0]
        ms[label] = (time.perf_counter() - t0) / repeats * 1000
    return {"max_abs_logit_diff": float(np.abs(out["fp32"] - out["int8"]).max()),
            "logit_std": float(out["fp32"].std()), "fp32_step_ms": ms["fp32"], "int8_step_ms": ms["int8"],
            "rows": rows}


PLACEHOLDER_CORPUS = ("a painting of a cat sitting on a chair in the sun, oil on canvas; an astronaut riding a "
                      "horse on the moon. the quick brown fox jumps over the lazy dog 0123456789")


def placeholder_tokenizer(folder: str | Path) -> Path:
    """A small byte-level BPE (BART special tokens first) for random-weight bundles, trained locally."""
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([PLACEHOLDER_CORPUS] * 8, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save_model(str(folder))
    return folder


def export_bundle(parts: ModelParts, tokenizer_dir: str | Path, out_dir: str | Path, *, name: str,
                  dtype: str = "float32", sampling: SamplingDefaults | None = None,
                  provenance: dict[str, Any] | None = None, license: str = "unknown",
                  description: str = "", random_weights: bool = False, overwrite: bool = False,
                  cache: str = "auto", progress: bool = True, keep: tuple[Path, ...] | list[Path] = ()) -> Bundle:
    """Write a complete bundle (graphs, vocab.json + merges.txt from ``tokenizer_dir``, manifest).

    ``tokenizer_dir`` may also hold ``enwiki-words-frequency.txt`` (dalle-mini's hashtag splitter),
    which is then copied too. The manifest is written last, then the bundle is re-read and checked.
    With ``overwrite`` an existing bundle is replaced only once the new one is complete; ``out`` may
    not be or hold the tokenizer folder or any of ``keep`` (the checkpoint being converted).
    """
    final = Path(out_dir)
    tok = Path(tokenizer_dir)
    if not (isinstance(name, str) and name.strip()):
        raise InferenceError(f"the model name must be a non-empty text (got {name!r}); pass --name NAME")
    for f in TOKENIZER_FILES.values():
        if not (tok / f).is_file():
            raise InferenceError(f"tokenizer file {tok / f} is missing: a bundle needs vocab.json and merges.txt")
    check_out_dir(final, [tok, *keep], overwrite)
    replace = final.exists() and any(final.iterdir())
    out = final.with_name(f".{final.name}.exporting-{os.getpid()}") if replace else final
    if replace:
        shutil.rmtree(out, ignore_errors=True)
    try:
        bundle = _export_into(out, parts, tok, name=name, dtype=dtype, sampling=sampling, provenance=provenance,
                              license=license, description=description, random_weights=random_weights,
                              cache=cache, progress=progress)
    except BaseException:
        if replace:                    # the old bundle stays as it was
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not replace:
        return bundle
    old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    os.rename(final, old)
    os.rename(out, final)
    if old.is_symlink():               # --out was a link: the folder it pointed to is left alone
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
    return Bundle.open(final, verify=False)


def check_out_dir(out: Path, keep: list[Path], overwrite: bool) -> None:
    """--out: a folder (new, empty, or with --overwrite replaced) that is not and does not hold any
    of ``keep``: replacing it must never delete the files being converted."""
    if out.exists() and not out.is_dir():
        raise InferenceError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InferenceError(f"{out} exists and is not empty; choose a new --out folder or remove it")
    target = out.resolve()
    for path in keep:
        src = Path(path).resolve()
        if src == target or target in src.parents:
            raise InferenceError(f"--out {out} would replace {path}, which the export reads; "
                                 "choose a folder outside the checkpoint")


def _export_into(out: Path, parts: ModelParts, tok: Path, *, name: str, dtype: str,
                 sampling: SamplingDefaults | None, provenance: dict[str, Any] | None, license: str,
                 description: str, random_weights: bool, cache: str, progress: bool) -> Bundle:
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    files = export_graphs(parts, out, dtype, cache, progress, report)
    for f in [*TOKENIZER_FILES.values(), WORD_FREQUENCY_FILE]:
        if (tok / f).is_file():
            shutil.copyfile(tok / f, out / f)
            files.append(f)
    prov = {"exported_with": f"torch {torch.__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(provenance or {}), **({"int8_report": report} if report else {})}
    write_manifest(out, name=name, model=parts.config, vqgan=parts.vqgan_config, dtype=dtype,
                   sampling=sampling or SamplingDefaults(), provenance=prov, license=license,
                   random_weights=random_weights, files=files, description=description,
                   device_sampler={"kmax": min(DEFAULT_KMAX, parts.config.num_codes)} if cache == "sample" else None)
    return Bundle.open(out, verify=False)
