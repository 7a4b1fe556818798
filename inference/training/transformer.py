"""Stage 2: the text-to-image-token transformer (the engine's DalleBart encoder and decoder).

Trained by teacher forcing on (caption, VQ codes of a rendering of it); a fraction of captions is
replaced by the unconditional row ``<s></s>`` (exactly the runtime's) so that super-conditioning
``l_u + s (l_c - l_u)`` has a trained unconditional branch to push away from.
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

from ..config import ModelConfig
from ..model import DalleBartDecoder, DalleBartEncoder, VQGANDecoder
from ..shapes.evaluate import Report, contact_sheet, sample_prompts
from ..shapes.grammar import parse
from ..shapes.score import score_scene
from .common import (StepBudget, append_jsonl, init_weights, load_checkpoint, loss_curve_png, lr_at,
                     progress_bar, save_checkpoint, try_artefact)
from .data import step_rng
from .text import encode_prompts

_log = logging.getLogger(__name__)


def shapes_model_config(text_vocab_size: int = 512, num_codes: int = 1024, image_grid: int = 8) -> ModelConfig:
    """About 5.5 M parameters: width 256, 4 heads of 64, 2 encoder and 4 decoder layers."""
    return ModelConfig(d_model=256, encoder_layers=2, decoder_layers=4, encoder_heads=4, decoder_heads=4,
                       encoder_ffn_dim=512, decoder_ffn_dim=512, text_vocab_size=text_vocab_size,
                       image_vocab_size=num_codes, num_codes=num_codes, decoder_start_token_id=num_codes,
                       text_length=24, image_grid=image_grid)


@dataclass(frozen=True)
class TransformerTrainConfig:
    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    seed: int = 0
    cond_drop: float = 0.15          # caption dropout for classifier-free guidance
    bf16: bool = False               # bfloat16 autocast on CPUs too (always on CUDA): 2.3x faster per
                                     # step on this AVX512-BF16 machine, float32 master weights
    eval_every: int = 1000
    eval_prompts: int = 64
    checkpoint_every: int = 250
    eval_sampling: tuple[float, int, float] = (3.0, 32, 1.0)   # condition scale, top-k, temperature


@dataclass
class TokenData:
    ids: torch.Tensor     # (M, T) int64
    mask: torch.Tensor    # (M, T) int64
    codes: torch.Tensor   # (M, N) int64


def make_token_data(tok: Any, prompts: list[str], codes: np.ndarray) -> TokenData:
    ids, mask = encode_prompts(tok, prompts)
    return TokenData(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(codes.astype(np.int64)))


@torch.no_grad()
def sample_codes(encoder: DalleBartEncoder, decoder: DalleBartDecoder, tok: Any, prompts: list[str],
                 seed: int, condition_scale: float = 3.0, top_k: int = 32, temperature: float = 1.0,
                 device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Torch reference sampler with the KV-cached step (what the ONNX runtime does): (B, N) codes."""
    cfg = decoder.cfg
    b = len(prompts)
    ids, mask = encode_prompts(tok, prompts)
    u = tok.unconditional()
    ids = torch.from_numpy(np.concatenate([np.repeat(u.ids[None], b, 0), ids])).to(device)
    mask = torch.from_numpy(np.concatenate([np.repeat(u.mask[None], b, 0), mask])).to(device)
    enc = encoder(ids, mask)
    cross = decoder.cross_kv(enc)                                          # (L, 2, R, H, T, Dh)
    cross_list = [cross[i // 2, i % 2] for i in range(2 * cfg.decoder_layers)]
    r, h, n, dh = 2 * b, cfg.decoder_heads, cfg.image_length, cfg.head_dim
    past = [torch.zeros(r, h, n, dh, device=device) for _ in range(2 * cfg.decoder_layers)]
    token = torch.full((r,), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty(b, n, dtype=torch.long)
    for t in range(n):
        logits, new_kv = decoder.step(token, torch.tensor([t], device=device), past, cross_list, mask)
        for i in range(cfg.decoder_layers):
            past[2 * i][:, :, t] = new_kv[i, 0]
            past[2 * i + 1][:, :, t] = new_kv[i, 1]
        lu, lc = logits[:b, :cfg.num_codes].float(), logits[b:, :cfg.num_codes].float()
        g = (lu + condition_scale * (lc - lu)) / temperature
        if top_k:
            kth = g.topk(min(top_k, g.shape[1]), dim=1).values[:, -1:]
            g = g.masked_fill(g < kth, float("-inf"))
        code = torch.multinomial(g.softmax(1).cpu(), 1, generator=gen)[:, 0]
        out[:, t] = code
        token = torch.cat([code, code]).to(device)
    return out


@torch.no_grad()
def generation_report(encoder: DalleBartEncoder, decoder: DalleBartDecoder, vqgan: VQGANDecoder,
                      tok: Any, n: int, seed: int, device: torch.device, **sampling: Any) -> Report:
    """Sample ``n`` grammar prompts with the torch model and score the images (training-time check)."""
    encoder.eval()
    decoder.eval()
    prompts = sample_prompts(n, seed)
    codes = sample_codes(encoder, decoder, tok, prompts, seed, device=device, **sampling)
    images = list((vqgan(codes.to(device)) * 255).round().byte().cpu().numpy())
    scores = [score_scene(p, parse(p), im) for p, im in zip(prompts, images)]
    return Report(scores, images)


def train_transformer(work_dir: Path, data: TokenData, tok: Any, vqgan: VQGANDecoder,
                      cfg: TransformerTrainConfig = TransformerTrainConfig(),
                      model_cfg: ModelConfig | None = None, device: torch.device = torch.device("cpu"),
                      progress: bool = True, budget_s: float | None = None,
                      init: tuple[DalleBartEncoder, DalleBartDecoder] | None = None
                      ) -> tuple[DalleBartEncoder, DalleBartDecoder]:
    """Train (or resume) in ``work_dir``: ckpt.pt (resumable), final.pt (weights, when done),
    history.jsonl, loss.png, sample_sheet.png. A finished run is loaded, not retrained.
    ``init``: start from these weights (fine-tuning) instead of a fresh initialisation."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if (work_dir / "final.pt").is_file():
        return load_transformer(work_dir, device)
    ckpt_path = work_dir / "ckpt.pt"
    if init is not None:
        model_cfg = init[1].cfg
    model_cfg = model_cfg or shapes_model_config(num_codes=vqgan.cfg.n_embed, image_grid=vqgan.cfg.token_grid)
    torch.manual_seed(cfg.seed)
    encoder, decoder = DalleBartEncoder(model_cfg), DalleBartDecoder(model_cfg)
    if init is None:
        init_weights(encoder)
        init_weights(decoder)
    else:
        encoder.load_state_dict(init[0].state_dict())
        decoder.load_state_dict(init[1].state_dict())
    encoder.to(device)
    decoder.to(device)
    vqgan = vqgan.to(device).eval()
    params = [p for m in (encoder, decoder) for p in m.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    history: list[dict[str, Any]] = []
    start, total = 0, cfg.steps
    state = load_checkpoint(ckpt_path, str(device))
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["opt"])
        history, start, total = state["history"], state["step"], state.get("total", cfg.steps)
        _log.info("resumed transformer training at step %d of %d", start, total)
    budget = StepBudget(total, budget_s if state is None else None)
    u = tok.unconditional()
    u_ids, u_mask = torch.from_numpy(u.ids).to(device), torch.from_numpy(u.mask).to(device)
    bos = model_cfg.decoder_start_token_id
    m = len(data.ids)
    amp = device.type == "cuda" or cfg.bf16
    bar = progress_bar(range(start, total), desc="transformer", unit="step", initial=start, total=total,
                       disable=not progress)
    t0 = time.perf_counter()
    budget.start(start)
    encoder.train()
    decoder.train()
    for step in bar:
        if step >= total:
            break
        rng = step_rng(cfg.seed, step, stream=3)
        pick = torch.from_numpy(rng.integers(0, m, cfg.batch))
        drop = torch.from_numpy(rng.random(cfg.batch) < cfg.cond_drop).to(device)
        ids, mask, codes = (data.ids[pick].to(device), data.mask[pick].to(device), data.codes[pick].to(device))
        ids = torch.where(drop[:, None], u_ids[None], ids)
        mask = torch.where(drop[:, None], u_mask[None], mask)
        tokens_in = torch.cat([torch.full_like(codes[:, :1], bos), codes[:, :-1]], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = decoder(tokens_in, encoder(ids, mask), mask)[..., :model_cfg.num_codes]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, warmup=cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        total = budget.update(step + 1)
        rec: dict[str, Any] = {"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                               "secs": time.perf_counter() - t0}
        history.append(rec)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step + 1 >= total
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            scale, top_k, temperature = cfg.eval_sampling
            report = generation_report(encoder, decoder, vqgan, tok, cfg.eval_prompts, 777, device,
                                       condition_scale=scale, top_k=top_k, temperature=temperature)
            encoder.train()
            decoder.train()
            rec["sample_fully_correct"] = report.fully_correct
            rec["sample_attributes"] = {k: v[0] for k, v in report.accuracy().items()}
            bar.write(f"transformer step {step + 1}: loss {loss.item():.3f}, samples (scale {scale:g}, "
                      f"top-k {top_k}, temperature {temperature:g}) "
                      f"fully correct {report.fully_correct:.1%}: "
                      + " ".join(f"{k} {v[0]:.0%}" for k, v in report.accuracy().items()))
            try_artefact(contact_sheet, report, work_dir / "sample_sheet.png")
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            append_jsonl(work_dir / "history.jsonl", rec)
            save_checkpoint(ckpt_path, {"step": step + 1, "total": total, "encoder": encoder.state_dict(),
                                        "decoder": decoder.state_dict(), "opt": opt.state_dict(),
                                        "history": history, "config": asdict(cfg),
                                        "model_config": model_cfg.to_dict()})
            try_artefact(loss_curve_png, work_dir / "loss.png", {
                "token loss (nats)": [(h["step"], h["loss"]) for h in history],
                "1 - samples fully correct": [(h["step"], 1 - h["sample_fully_correct"])
                                              for h in history if "sample_fully_correct" in h],
            }, title="text-to-image-token transformer (shapes world)")
        if last:
            break
    bar.close()
    save_checkpoint(work_dir / "final.pt", {
        "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "decoder": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
        "model_config": model_cfg.to_dict(), "steps": history[-1]["step"] if history else 0,
        "train_seconds": history[-1]["secs"] if history else 0.0,
        "final_loss": float(np.mean([h["loss"] for h in history[-100:]])) if history else None,
    })
    return encoder.eval(), decoder.eval()


def load_transformer(work_dir: Path, device: torch.device = torch.device("cpu"), checkpoint: str = "final.pt"
                     ) -> tuple[DalleBartEncoder, DalleBartDecoder]:
    state = load_checkpoint(work_dir / checkpoint, str(device))
    if state is None:
        raise FileNotFoundError(f"no transformer {checkpoint} in {work_dir}")
    cfg = ModelConfig.from_dict(state["model_config"])
    encoder, decoder = DalleBartEncoder(cfg).to(device), DalleBartDecoder(cfg).to(device)
    encoder.load_state_dict(state["encoder"])
    decoder.load_state_dict(state["decoder"])
    return encoder.eval(), decoder.eval()
