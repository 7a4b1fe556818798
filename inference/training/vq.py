"""Stage 1: the shapes-world VQGAN (encoder for training, the engine's VQGANDecoder for inference).

Measured lessons (shared/notes/cpu-training.md): a codebook trained by gradient stalls, so the
codebook here is updated by exponential moving averages, initialised from encoder outputs and
re-seeded where codes die; pixel losses alone round corners, so an L1 loss on horizontal/vertical
pixel differences sharpens edges, and object pixels weigh more than the background that dominates
every scene. The decoder is :class:`inference.model.VQGANDecoder`, so the trained weights export
with the engine's exporter and run in its runtime unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQGANConfig
from ..model import VQGANDecoder
from ..shapes.evaluate import Report, contact_sheet
from ..shapes.grammar import parse
from ..shapes.score import score_scene
from .common import (StepBudget, append_jsonl, load_checkpoint, loss_curve_png, lr_at, progress_bar,
                     save_checkpoint, try_artefact)
from .data import SceneDataset, render_batch, step_rng

_log = logging.getLogger(__name__)

# 64x64 pixels, f8 -> 8x8 = 64 tokens; 16, 16, 32, 96 channels at 64, 32, 16, 8 px (attention in
# the middle block), GroupNorm in 8 groups. Measured on CPU (batch 32, lr 2e-3): started as a plain
# autoencoder for 100 steps (``ae_warmup``) and then quantised, reconstructions reached pixel MSE
# 0.009 by step 200 and scored 14% fully correct by the spec at step 300 (colour 35%, shape 32%,
# still rising); without the warm-up this decoder, and every wider one tried, collapsed to one
# constant image (commitment loss -> 0), and the thinner 8-16-32-96 decoder that did not collapse
# scored 10% only after 800 steps, painting every warm colour orange and every cool one blue.
SHAPES_VQGAN = VQGANConfig(ch=8, ch_mult=(2, 2, 4, 12), num_res_blocks=1, attn_resolutions=(),
                           z_channels=64, embed_dim=32, n_embed=1024, resolution=64, norm_groups=8)


@dataclass(frozen=True)
class VQTrainConfig:
    steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    commitment: float = 0.25
    ema_decay: float = 0.99
    reseed_every: int = 200
    edge_weight: float = 0.5
    object_weight: float = 3.0
    eval_every: int = 1000
    eval_scenes: int = 200
    checkpoint_every: int = 250
    ae_warmup: int = 200   # steps as a plain autoencoder before the codebook is initialised from z


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ShapesEncoder(nn.Module):
    """pixels (B, 3, S, S) in [0, 1] -> latents (B, embed_dim, S/8, S/8). Training only, never exported.

    Strided convolutions without normalisation (cheap at full resolution), residual blocks at the
    two coarsest levels, a 1x1 projection to the codebook dimension.
    """

    def __init__(self, cfg: VQGANConfig, width: int = 128) -> None:
        super().__init__()
        levels = len(cfg.ch_mult) - 1
        chans = [32, 64] + [width] * max(0, levels - 2)
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, 32, 3, padding=1)]
        c = 32
        for i in range(levels):
            layers += [nn.SiLU(), nn.Conv2d(c, chans[i], 4, stride=2, padding=1)]
            c = chans[i]
            if i >= levels - 2:
                layers.append(_Res(c))
        layers += [_Res(c), nn.SiLU(), nn.Conv2d(c, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EMAQuantizer(nn.Module):
    """Nearest-code quantiser whose codebook (the decoder's ``embedding.weight``) follows EMAs."""

    def __init__(self, codebook: torch.Tensor, decay: float) -> None:
        super().__init__()
        self.codebook = codebook                      # (K, E), shared with the decoder, no grad
        k, e = codebook.shape
        self.decay = decay
        self.register_buffer("cluster_size", torch.zeros(k))
        self.register_buffer("embed_sum", torch.zeros(k, e))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def flatten(z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])                      # (B*g*g, E)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        cb = self.codebook
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
        return d.argmin(1)

    @torch.no_grad()
    def initialise(self, flat: torch.Tensor, gen: torch.Generator) -> None:
        k = self.codebook.shape[0]
        idx = torch.randint(0, flat.shape[0], (k,), generator=gen, device="cpu").to(flat.device)
        self.codebook.copy_(flat[idx])
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(flat[idx])
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.codebook.shape[0]
        onehot = F.one_hot(idx, k).type_as(flat)                                   # (M, K)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def reseed_dead(self, flat: torch.Tensor, gen: torch.Generator, threshold: float = 0.03) -> int:
        dead = (self.cluster_size < threshold).nonzero().flatten()
        if len(dead):
            pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen, device="cpu").to(flat.device)
            self.codebook[dead] = flat[pick]
            self.embed_sum[dead] = flat[pick]
            self.cluster_size[dead] = 1.0
        return len(dead)


def pixels_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _object_weights(x: torch.Tensor, extra: float) -> torch.Tensor:
    """1 on the background, 1 + extra on object pixels and a one-pixel ring around them."""
    bg = x[:, :, :1, :1]                                           # the top-left pixel's colour
    fg = ((x - bg).abs().sum(1, keepdim=True) > 0.1).float()
    return 1.0 + extra * F.max_pool2d(fg, 3, stride=1, padding=1)


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, edge_weight: float, object_weight: float
                        ) -> torch.Tensor:
    w = _object_weights(x, object_weight)
    diff = y - x
    pix = (w * (diff.pow(2) + diff.abs())).mean() / w.mean()
    dx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return pix + edge_weight * (dx.abs().mean() + dy.abs().mean())


class ShapesVQ(nn.Module):
    """Encoder + quantiser + the engine's decoder, trained together."""

    def __init__(self, cfg: VQGANConfig, decay: float = 0.99) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ShapesEncoder(cfg)
        self.vqgan = VQGANDecoder(cfg)
        self.vqgan.embedding.weight.requires_grad_(False)
        self.quantizer = EMAQuantizer(self.vqgan.embedding.weight.data, decay)

    def decode_train(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> unclipped pixels (B, 3, S, S) for the loss."""
        return self.vqgan.decoder(self.vqgan.post_quant_conv(zq))

    @torch.no_grad()
    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> codes (B, g*g) int64, row-major."""
        z = self.encoder(pixels)
        return self.quantizer.nearest(self.quantizer.flatten(z)).view(z.shape[0], -1)


@torch.no_grad()
def encode_images(vq: ShapesVQ, images: np.ndarray, device: torch.device, batch: int = 256) -> np.ndarray:
    """uint8 (B, S, S, 3) -> codes (B, g*g) int16."""
    vq.eval()
    out = [vq.codes(pixels_to_tensor(images[i:i + batch], device)).cpu().numpy().astype(np.int16)
           for i in range(0, len(images), batch)]
    return np.concatenate(out)


@torch.no_grad()
def reconstruction_report(vq: ShapesVQ, device: torch.device, scenes: int = 200, seed: int = 12345
                          ) -> Report:
    """Encode and decode fresh scenes (held-out pairs included) and score them by the spec."""
    vq.eval()
    rng = np.random.default_rng(seed)
    prompts, images = render_batch(rng, scenes, vq.cfg.resolution, held_out="include")
    recon = []
    for i in range(0, scenes, 100):
        codes = vq.codes(pixels_to_tensor(images[i:i + 100], device))
        recon.append((vq.vqgan(codes) * 255.0).round().clamp(0, 255).byte().cpu().numpy())
    recon_images = list(np.concatenate(recon))
    scores = [score_scene(p, parse(p), im) for p, im in zip(prompts, recon_images)]
    vq.train()
    return Report(scores, recon_images)


def train_vq(work_dir: Path, data: SceneDataset, cfg: VQTrainConfig = VQTrainConfig(),
             vq_cfg: VQGANConfig = SHAPES_VQGAN, device: torch.device = torch.device("cpu"),
             progress: bool = True, budget_s: float | None = None) -> ShapesVQ:
    """Train (or resume) the VQ in ``work_dir``: ckpt.pt (resumable), final.pt (weights only, when
    done), history.jsonl, loss.png, recon_sheet.png. A finished run is loaded, not retrained."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if (work_dir / "final.pt").is_file():
        return load_vq(work_dir, device)
    ckpt_path = work_dir / "ckpt.pt"
    torch.manual_seed(cfg.seed)
    vq = ShapesVQ(vq_cfg, cfg.ema_decay).to(device)
    vq.quantizer.codebook = vq.vqgan.embedding.weight.data
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start, total = 0, cfg.steps
    state = load_checkpoint(ckpt_path, str(device))
    if state is not None:
        vq.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        history, start, total = state["history"], state["step"], state.get("total", cfg.steps)
        _log.info("resumed VQ training at step %d of %d", start, total)
    budget = StepBudget(total, budget_s if state is None else None)
    vq.train()
    bar = progress_bar(range(start, total), desc="VQ", unit="step", initial=start, total=total,
                       disable=not progress)
    t0 = time.perf_counter()
    budget.start(start)
    step = start
    for step in bar:
        if step >= total:
            break
        pick = step_rng(cfg.seed, step, stream=2).integers(0, len(data), cfg.batch)
        x = pixels_to_tensor(data.images[pick], device)
        z = vq.encoder(x)
        flat = vq.quantizer.flatten(z)
        warm = step < cfg.ae_warmup          # plain autoencoder: meaningful z before the codebook exists
        if not warm and not bool(vq.quantizer.initialised):
            vq.quantizer.initialise(flat.detach(), gen)
        idx = vq.quantizer.nearest(flat.detach())
        zq = vq.vqgan.embedding.weight[idx].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        zq_st = z if warm else z + (zq - z).detach()
        y = vq.decode_train(zq_st)
        rec = reconstruction_loss(y, x, cfg.edge_weight, cfg.object_weight)
        commit = F.mse_loss(z, zq.detach())
        loss = rec + (0.0 if warm else cfg.commitment) * commit
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not warm:
            vq.quantizer.update(flat.detach(), idx)
        reseeded = 0
        if not warm and (step + 1) % cfg.reseed_every == 0 and step + 1 < total * 0.9:
            reseeded = vq.quantizer.reseed_dead(flat.detach(), gen)
        total = budget.update(step + 1)
        mse = F.mse_loss(y.detach().clamp(0, 1), x).item()
        used = int((vq.quantizer.cluster_size > 0.03).sum())
        rec_ = {"step": step + 1, "loss": loss.item(), "mse": mse, "commit": commit.item(),
                "codes_used": used, "reseeded": reseeded, "secs": time.perf_counter() - t0}
        history.append(rec_)
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse:.4f}", codes=used)
        last = step + 1 >= total
        if (step + 1) % cfg.eval_every == 0 or last:
            report = reconstruction_report(vq, device, cfg.eval_scenes)
            rec_["recon_fully_correct"] = report.fully_correct
            rec_["recon_attributes"] = {k: v[0] for k, v in report.accuracy().items()}
            rec_["recon_unseen"] = report.unseen_fully_correct
            bar.write(f"VQ step {step + 1}: reconstructions fully correct {report.fully_correct:.1%}, "
                      f"unseen pairs {report.unseen_fully_correct:.1%}; "
                      + " ".join(f"{k} {v[0]:.0%}" for k, v in report.accuracy().items()))
            try_artefact(contact_sheet, report, work_dir / "recon_sheet.png")
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            append_jsonl(work_dir / "history.jsonl", rec_)
            save_checkpoint(ckpt_path, {"step": step + 1, "total": total, "model": vq.state_dict(),
                                        "opt": opt.state_dict(), "gen": gen.get_state(), "history": history,
                                        "config": asdict(cfg), "vqgan_config": vq_cfg.to_dict()})
            try_artefact(loss_curve_png, work_dir / "loss.png", {
                "loss": [(h["step"], h["loss"]) for h in history],
                "mse": [(h["step"], h["mse"]) for h in history],
                "1 - recon fully correct": [(h["step"], 1 - h["recon_fully_correct"])
                                            for h in history if "recon_fully_correct" in h],
            }, title="VQGAN training (shapes world, 64 px, 8x8 codes)")
        if last:
            break
    bar.close()
    save_final_vq(work_dir, vq, history, cfg)
    return vq.eval()


def save_final_vq(work_dir: Path, vq: ShapesVQ, history: list[dict[str, Any]],
                  cfg: VQTrainConfig | None = None) -> None:
    """Weights only (what export needs), the VQ's reconstruction score, the training record."""
    evals = [h for h in history if "recon_fully_correct" in h]
    save_checkpoint(work_dir / "final.pt", {
        "model": {k: v.detach().cpu() for k, v in vq.state_dict().items()},
        "vqgan_config": vq.cfg.to_dict(), "steps": history[-1]["step"] if history else 0,
        "train_seconds": history[-1]["secs"] if history else 0.0,
        "recon": evals[-1] if evals else None,
        "config": asdict(cfg) if cfg is not None else None,
    })


def load_vq(work_dir: Path, device: torch.device = torch.device("cpu"), checkpoint: str = "final.pt") -> ShapesVQ:
    """A trained VQ from ``final.pt`` (or an unfinished run's ``ckpt.pt``)."""
    state = load_checkpoint(work_dir / checkpoint, str(device))
    if state is None:
        raise FileNotFoundError(f"no VQ {checkpoint} in {work_dir}")
    vq = ShapesVQ(VQGANConfig.from_dict(state["vqgan_config"])).to(device)
    vq.quantizer.codebook = vq.vqgan.embedding.weight.data
    vq.load_state_dict(state["model"])
    return vq.eval()
