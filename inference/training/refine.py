"""Stage 3: refine a trained shapes model (a bundle) with more training on its own image codes.

The base model's VQ encoder is a training-time part and is not kept in a bundle, so a bundle alone
cannot turn new scenes into its codes. This stage makes a new one, then trains the transformer
further on rendered scenes in those codes:

1. ``samples``: draw (prompt, codes) from the base model's transformer (onnxruntime, several
   sampling settings, training prompts only: the held-out pairs are never drawn) and decode them
   with its VQGAN: images paired with the codes that make them.
2. ``code encoder``: a classifier from an image to the code of each 8x8 cell
   (:class:`CodeEncoder`), trained on those pairs. Applied to *rendered* scenes it gives codes in
   the base model's code space (its VQGAN decodes them as well as the original VQ encoder's:
   reconstructions of fresh scenes score about the same, reported as ``recon``).
3. ``codes``: render fresh training scenes (held-out pairs excluded) and encode them.
4. ``transformer``: fine-tune the base transformer on (caption, codes) with
   :func:`inference.transformer.train_transformer` (``init=``), bfloat16 autocast on CPU.
5. ``best-of`` (when ``best_of_prompts`` > 0): the fine-tuned model draws ``best_of_k`` images for
   each of many training prompts (held-out pairs never drawn); the project's own scorer (the
   spec's rules, :mod:`inference.shapes.score`) keeps those it finds fully correct, at most
   ``best_of_keep`` per prompt. A second fine-tune trains on them mixed half and half with the
   scene codes: rejection-sampling fine-tuning, with the evaluator's rules as the verifier.

The VQGAN is kept as it is. ``dallebot train shapes --out DIR --refine-from BUNDLE`` runs this on
an existing bundle; every stage resumes (``DIR/refine/*``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQGANConfig
from ..export import ModelParts
from ..model import VQGANDecoder
from ..shapes.evaluate import Report
from ..shapes.grammar import parse, sample_prompt
from ..shapes.score import score_scene
from .common import (append_jsonl, load_checkpoint, lr_at, pick_device, progress_bar, save_checkpoint)
from .data import build_dataset, render_batch, step_rng
from .text import load_tokenizer
from .transformer import TransformerTrainConfig, make_token_data, train_transformer
from .vq import ShapesEncoder, pixels_to_tensor, reconstruction_loss

_log = logging.getLogger(__name__)

# Rotated over the sample batches: the base defaults and two looser settings, so the encoder sees
# the codes of cleaner and of messier images alike.
SAMPLE_SETTINGS = (dict(condition_scale=1.5, top_k=8, temperature=0.6),
                   dict(condition_scale=1.5, top_k=32, temperature=1.0),
                   dict(condition_scale=2.5, top_k=16, temperature=0.8))


@dataclass(frozen=True)
class RefineConfig:
    seed: int = 0
    samples: int = 30000          # (prompt, codes) drawn from the base model
    encoder_steps: int = 3000
    encoder_batch: int = 64
    encoder_lr: float = 2e-3
    encoder_width: int = 128
    scenes: int = 120000          # rendered scenes encoded for the fine-tune
    transformer: TransformerTrainConfig = field(default_factory=lambda: TransformerTrainConfig(
        steps=3000, batch=64, lr=3e-4, warmup=100, bf16=True, eval_every=1000, eval_prompts=64,
        eval_sampling=(1.5, 8, 0.6)))
    best_of_prompts: int = 8000   # stage 5 (0: off)
    best_of_k: int = 4
    best_of_keep: int = 2
    best_of: TransformerTrainConfig = field(default_factory=lambda: TransformerTrainConfig(
        steps=1500, batch=64, lr=2e-4, warmup=50, bf16=True, eval_every=750, eval_prompts=64,
        eval_sampling=(1.5, 8, 0.6)))
    decoder_steps: int = 0        # stage 4b: fine-tune the VQGAN decoder on encoded scenes (0: off)
    decoder_batch: int = 32
    decoder_lr: float = 3e-4
    decoder_small: float = 0.5    # share of each batch drawn from prompts with small objects
    recon_scenes: int = 200
    checkpoint_every: int = 250

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CodeEncoder(nn.Module):
    """pixels (B, 3, S, S) in [0, 1] -> logits over the codes of each cell (B, K, S/f, S/f)."""

    def __init__(self, vq: VQGANConfig, width: int = 128) -> None:
        super().__init__()
        self.vq_config = vq
        groups = vq.norm_groups if all(vq.ch * m % vq.norm_groups == 0 for m in vq.ch_mult) else 1
        cfg = VQGANConfig(**{**vq.to_dict(), "embed_dim": vq.n_embed, "norm_groups": groups})
        self.net = ShapesEncoder(cfg, width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def codes(self, images: np.ndarray, device: torch.device, batch: int = 250) -> np.ndarray:
        """uint8 (B, S, S, 3) -> codes (B, g*g) int64, row-major."""
        was = self.training
        self.eval()
        out = [self(pixels_to_tensor(images[i:i + batch], device)).argmax(1).flatten(1).cpu().numpy()
               for i in range(0, len(images), batch)]
        self.train(was)
        return np.concatenate(out).astype(np.int64)


@torch.no_grad()
def decode(vqgan: VQGANDecoder, codes: np.ndarray, device: torch.device, batch: int = 250) -> np.ndarray:
    """codes (B, N) -> uint8 images (B, S, S, 3)."""
    vqgan = vqgan.to(device).eval()
    out = [(vqgan(torch.from_numpy(codes[i:i + batch]).long().to(device)) * 255.0).round().clamp(0, 255)
           .byte().cpu().numpy() for i in range(0, len(codes), batch)]
    return np.concatenate(out)


def _seeds(seed: int, start: int, n: int) -> list[int]:
    """Generation seeds ``start`` .. ``start + n - 1`` of run ``seed`` (kept below 2**63 for any seed)."""
    return [(seed * 1_000_003 + start + k) % 2**63 for k in range(n)]


def _cached_npz(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays saved in ``path``, or ``compute()``'s, saved there first (each stage resumes)."""
    if not path.is_file():
        np.savez(path, **compute())
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def draw_samples(bundle_dir: Path, n: int, seed: int, progress: bool = True, threads: int = 0
                 ) -> tuple[list[str], np.ndarray]:
    """``n`` training prompts and one code grid each from the bundle's transformer (onnxruntime)."""
    from ..pipeline import Pipeline

    pipe = Pipeline.load(bundle_dir, threads=threads, provider="cpu")
    rng = np.random.default_rng([seed, 31])
    prompts = [sample_prompt(rng, "exclude") for _ in range(n)]
    codes: list[np.ndarray] = []
    batch = 32
    batches = range(0, n, batch)
    for j, i in enumerate(progress_bar(batches, desc="samples", unit="batch", total=len(batches),
                                       disable=not progress)):
        chunk = prompts[i:i + batch]
        out = pipe.generate_codes(chunk, n_images=1, seeds=_seeds(seed, i, len(chunk)),
                                  **SAMPLE_SETTINGS[j % len(SAMPLE_SETTINGS)])
        codes.extend(c[0] for c in out)
    return prompts, np.stack(codes)


def recon_report(encoder: CodeEncoder, vqgan: VQGANDecoder, device: torch.device, scenes: int = 200,
                 seed: int = 12345) -> Report:
    """Fresh scenes (held-out pairs included) -> encoder -> the VQGAN, scored by the spec."""
    prompts, images = render_batch(np.random.default_rng(seed), scenes, vqgan.cfg.resolution, held_out="include")
    recon = list(decode(vqgan, encoder.codes(images, device), device))
    return Report([score_scene(p, parse(p), im) for p, im in zip(prompts, recon)], recon)


def _resumable_training(work: Path, stem: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                        steps: int, lr: float, loss_at: Callable[[int], torch.Tensor], cfg: RefineConfig, device: torch.device,
                        desc: str, progress: bool, clip: float | None = None) -> None:
    """The loop both small refine trainings share: resume from ``work/<stem>-ckpt.pt``, cosine
    learning rate, a checkpoint and a history line every ``checkpoint_every`` steps, and
    ``work/<stem>.pt`` at the end. ``loss_at(step)`` returns the step's loss."""
    ckpt = work / f"{stem}-ckpt.pt"
    start = 0
    state = load_checkpoint(ckpt, str(device))
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    t0 = time.perf_counter()
    bar = progress_bar(range(start, steps), desc=desc, unit="step", initial=start, total=steps,
                       disable=not progress)
    model.train()
    for step in bar:
        loss = loss_at(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            append_jsonl(work / f"{stem}-history.jsonl", {"step": step + 1, "loss": loss.item(),
                                                         "secs": time.perf_counter() - t0})
            save_checkpoint(ckpt, {"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict()})
    bar.close()
    save_checkpoint(work / f"{stem}.pt", {"model": model.state_dict(), "config": cfg.to_dict()})


def train_code_encoder(work: Path, images: np.ndarray, codes: np.ndarray, vqgan: VQGANDecoder,
                       cfg: RefineConfig, device: torch.device, progress: bool = True) -> CodeEncoder:
    """Train (or resume) the image -> codes classifier; ``work/encoder.pt`` when done."""
    work.mkdir(parents=True, exist_ok=True)
    final = work / "encoder.pt"
    enc = CodeEncoder(vqgan.cfg, cfg.encoder_width).to(device)
    if final.is_file():
        enc.load_state_dict(load_checkpoint(final, str(device))["model"])
        return enc.eval()
    torch.manual_seed(cfg.seed)
    enc = CodeEncoder(vqgan.cfg, cfg.encoder_width).to(device)
    opt = torch.optim.AdamW(enc.parameters(), cfg.encoder_lr, weight_decay=0.01)
    g = vqgan.cfg.token_grid
    targets = torch.from_numpy(codes.astype(np.int64)).view(-1, g, g)

    def loss_at(step: int) -> torch.Tensor:
        pick = step_rng(cfg.seed, step, stream=5).integers(0, len(images), cfg.encoder_batch)
        return F.cross_entropy(enc(pixels_to_tensor(images[pick], device)), targets[pick].to(device))

    _resumable_training(work, "encoder", enc, opt, cfg.encoder_steps, cfg.encoder_lr, loss_at, cfg, device,
                        "code encoder", progress)
    return enc.eval()


def _decoder_batch(rng: np.random.Generator, cfg: RefineConfig, n: int) -> np.ndarray:
    """Rendered training scenes (held-out pairs excluded), ``decoder_small`` of them with small objects."""
    from ..shapes.render import render

    small = int(round(cfg.decoder_batch * cfg.decoder_small))
    prompts = []
    while len(prompts) < cfg.decoder_batch:
        p = sample_prompt(rng, "exclude")
        if len(prompts) >= small or "small" in p.split():
            prompts.append(p)
    return np.stack([render(parse(p), n, rng) for p in prompts])


def train_decoder(work: Path, encoder: CodeEncoder, vqgan: VQGANDecoder, cfg: RefineConfig, device: torch.device,
                  progress: bool = True) -> VQGANDecoder:
    """Fine-tune a copy of the VQGAN decoder on fresh scenes through the code encoder (the codes
    stay the base model's: the transformer's samples keep their meaning). ``work/vqgan.pt`` when done."""
    import copy

    work.mkdir(parents=True, exist_ok=True)
    final = work / "vqgan.pt"
    dec = copy.deepcopy(vqgan).to(device)
    if final.is_file():
        dec.load_state_dict(load_checkpoint(final, str(device))["model"])
        return dec.eval()
    for p in dec.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(dec.parameters(), cfg.decoder_lr)
    g = vqgan.cfg.token_grid

    def loss_at(step: int) -> torch.Tensor:
        images = _decoder_batch(step_rng(cfg.seed, step, stream=6), cfg, vqgan.cfg.resolution)
        codes = torch.from_numpy(encoder.codes(images, device)).to(device)
        z = dec.embedding(codes).view(len(codes), g, g, -1).permute(0, 3, 1, 2)
        return reconstruction_loss(dec.decoder(dec.post_quant_conv(z)), pixels_to_tensor(images, device), 0.5, 3.0)

    _resumable_training(work, "vqgan", dec, opt, cfg.decoder_steps, cfg.decoder_lr, loss_at, cfg, device,
                        "VQGAN decoder", progress, clip=1.0)
    return dec.eval()


def refine(out: Path, parts: ModelParts, base_bundle: Path, cfg: RefineConfig = RefineConfig(), *,
           device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Stages 1-4 above in ``out/refine``; returns a summary (also ``out/refine/refine.json``) and
    leaves the fine-tuned transformer in ``out/refine/transformer/final.pt``."""
    dev = pick_device(device)
    work = out / "refine"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vqgan = parts.vqgan.to(dev).eval()
    def samples() -> dict[str, np.ndarray]:
        prompts, codes = draw_samples(base_bundle, cfg.samples, cfg.seed, progress)
        return {"prompts": np.array(prompts), "codes": codes.astype(np.int16)}

    codes = _cached_npz(work / f"samples-{cfg.samples}-seed{cfg.seed}.npz", samples)["codes"].astype(np.int64)
    t_samples = time.perf_counter() - t0
    encoder = train_code_encoder(work, decode(vqgan, codes, dev), codes, vqgan, cfg, dev, progress)
    recon = recon_report(encoder, vqgan, dev, cfg.recon_scenes)
    _log.info("code encoder: reconstructions of fresh scenes %.1f%% fully correct", 100 * recon.fully_correct)
    recon_tuned = None
    if cfg.decoder_steps:
        vqgan = train_decoder(work, encoder, vqgan, cfg, dev, progress)
        recon_tuned = recon_report(encoder, vqgan, dev, cfg.recon_scenes)
        _log.info("fine-tuned VQGAN decoder: reconstructions %.1f%% fully correct", 100 * recon_tuned.fully_correct)
    def scene_codes() -> dict[str, np.ndarray]:
        ds = build_dataset(cfg.scenes, vqgan.cfg.resolution, seed=cfg.seed + 7)
        return {"prompts": np.array(ds.prompts), "codes": encoder.codes(ds.images, dev).astype(np.int16)}

    z = _cached_npz(work / f"scene-codes-{cfg.scenes}-seed{cfg.seed}.npz", scene_codes)
    scene_prompts, codes = [str(p) for p in z["prompts"]], z["codes"].astype(np.int64)
    from .pipeline import TOKENIZER_DIR

    tok = load_tokenizer(TOKENIZER_DIR, parts.config.text_length)
    data = make_token_data(tok, scene_prompts, codes)
    t1 = time.perf_counter()
    encoder_t, decoder_t = train_transformer(work / "transformer", data, tok, vqgan, cfg.transformer, device=dev,
                                             progress=progress, init=(parts.encoder, parts.decoder))
    final_dir = work / "transformer"
    best_of: dict[str, Any] | None = None
    if cfg.best_of_prompts:
        def kept() -> dict[str, np.ndarray]:
            round1 = work / "round1-bundle"
            _export_round(ModelParts(encoder_t, decoder_t, vqgan), round1, base_bundle, progress)
            prompts, codes, stats = best_of_samples(round1, vqgan, cfg, dev, progress)
            return {"prompts": np.array(prompts), "codes": codes.astype(np.int16), "stats": np.array(json.dumps(stats))}

        z = _cached_npz(work / f"best-of-{cfg.best_of_prompts}x{cfg.best_of_k}-seed{cfg.seed}.npz", kept)
        kept_prompts, kept_codes = [str(p) for p in z["prompts"]], z["codes"].astype(np.int64)
        best_of = json.loads(str(z["stats"]))
        repeat = max(1, len(scene_prompts) // max(1, len(kept_prompts)))     # half the batches' rows each
        mixed = make_token_data(tok, scene_prompts + kept_prompts * repeat,
                                np.concatenate([codes] + [kept_codes] * repeat))
        train_transformer(work / "best-of", mixed, tok, vqgan, cfg.best_of, device=dev, progress=progress,
                          init=(encoder_t, decoder_t))
        final_dir = work / "best-of"
    final = torch.load(final_dir / "final.pt", map_location="cpu", weights_only=False)
    summary = {
        "base": _base_provenance(base_bundle), "config": cfg.to_dict(), "device": str(dev),
        "samples_seconds": t_samples, "recon": recon.as_dict(), "best_of": best_of,
        "recon_tuned_decoder": recon_tuned.as_dict() if recon_tuned else None,
        "vqgan": str(work / "vqgan.pt") if cfg.decoder_steps else None,
        "transformer_dir": str(final_dir),
        "transformer_steps": final["steps"], "transformer_seconds": final["train_seconds"],
        "transformer_final_loss": final["final_loss"], "wall_seconds": time.perf_counter() - t0,
        "encode_and_finetune_seconds": time.perf_counter() - t1,
    }
    (work / "refine.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _export_round(parts: ModelParts, out: Path, base_bundle: Path, progress: bool) -> None:
    from ..bundle import Bundle
    from .pipeline import export_parts

    export_parts(parts, out, name="shapes-refine-round", sampling=Bundle.open(base_bundle, verify=False).sampling,
                 progress=progress)


def best_of_samples(bundle_dir: Path, vqgan: VQGANDecoder, cfg: RefineConfig, device: torch.device,
                    progress: bool = True) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """``best_of_k`` images for each of ``best_of_prompts`` training prompts (the bundle's sampling
    defaults); the fully correct ones by the spec's scoring, at most ``best_of_keep`` distinct per prompt."""
    from ..pipeline import Pipeline

    pipe = Pipeline.load(bundle_dir, threads=0, provider="cpu")
    rng = np.random.default_rng([cfg.seed, 47])
    prompts = [sample_prompt(rng, "exclude") for _ in range(cfg.best_of_prompts)]
    kept_prompts: list[str] = []
    kept: list[np.ndarray] = []
    correct = any_correct = 0
    batch = 16
    batches = range(0, len(prompts), batch)
    for i in progress_bar(batches, desc="best-of", unit="batch", total=len(batches), disable=not progress):
        chunk = prompts[i:i + batch]
        grids = pipe.generate_codes(chunk, n_images=cfg.best_of_k, seeds=_seeds(cfg.seed, 500_000_000 + i, len(chunk)))
        images = decode(vqgan, np.concatenate(grids), device)
        for j, (prompt, grid) in enumerate(zip(chunk, grids)):
            scene = parse(prompt)
            good = [c for c, im in zip(grid, images[j * cfg.best_of_k:(j + 1) * cfg.best_of_k])
                    if score_scene(prompt, scene, im).correct]
            correct += len(good)
            any_correct += bool(good)
            distinct = list({c.tobytes(): c for c in good}.values())[:cfg.best_of_keep]
            kept_prompts += [prompt] * len(distinct)
            kept += distinct
    n = len(prompts)
    stats = {"prompts": n, "candidates": n * cfg.best_of_k, "correct": correct / (n * cfg.best_of_k),
             "prompts_with_a_correct_image": any_correct / n, "kept": len(kept)}
    _log.info("best-of: %d of %d candidates fully correct, %d kept", correct, n * cfg.best_of_k, len(kept))
    width = vqgan.cfg.token_grid ** 2
    return kept_prompts, (np.stack(kept) if kept else np.zeros((0, width), np.int64)), stats


def _base_provenance(bundle_dir: Path) -> dict[str, Any]:
    from ..bundle import Bundle

    manifest = Bundle.open(bundle_dir, verify=False).manifest
    return {"name": manifest.get("name"), "files": manifest.get("files"),
            "training": manifest.get("provenance", {}).get("training")}
