"""``dallebot bench inference``: our ONNX Runtime pipeline vs min-dalle, full-size DALL·E Mini.

Both sides use the same architecture with random weights (min-dalle's modules are built directly
from its classes with the Mini config, nothing is downloaded), float32, the same batch and the same
thread count. Each measurement runs in its own subprocess so peak memory (ru_maxrss) is per side,
and the sides alternate within one run so machine noise hits both.

Per configuration: encoder time, the median decoder step over ``--steps`` steps (the first is
discarded as warm-up), the VQGAN decode of the batch, and seconds per image =
(encoder + 256 x step + VQGAN) / batch. Step cost does not depend on the position for either
implementation (both attend over a fixed 256-column cache), so timing a prefix of the 256 steps and
scaling is fair; ``--steps 256`` times the whole run.

GPU: ``dallebot bench inference --provider cuda --bundle BUNDLE_FP16 --batch 1,16 --no-min-dalle``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

DEFAULT_BUNDLE = Path(".work/bundles/random-mini")
PROMPT = "an armchair in the shape of an avocado"


class _Stop(Exception):
    """Raised from the progress callback to end a timed run early."""


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(bundle: str, batch: int, steps: int, threads: int, provider: str) -> dict[str, Any]:
    from .pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, threads=threads, provider=provider, verify=False)
    load_s = time.perf_counter() - t0
    n = pipe.config.image_length
    steps = min(steps, n)
    stamps: list[float] = []

    def tick(t: int, _n: int) -> None:
        stamps.append(time.perf_counter())
        if t >= steps:
            raise _Stop

    enc_s = 0.0
    for _ in range(2):          # the first run warms up sessions and allocations
        stamps.clear()
        t0 = time.perf_counter()
        try:
            pipe.generate_codes([PROMPT], batch, [0], progress=tick)
        except _Stop:
            pass
        enc_s = stamps[0] - t0   # encoder + first step; the first step is dropped below
    step_s = float(np.median(np.diff(stamps))) if len(stamps) > 1 else float(stamps[0] - t0)
    codes = np.random.default_rng(0).integers(0, pipe.config.num_codes, (batch, n))
    pipe.decode_pixels(codes[:1])
    t0 = time.perf_counter()
    pipe.decode_pixels(codes)
    vq_s = time.perf_counter() - t0
    return {"impl": f"ours ({pipe.bundle.dtype}, {pipe.device})", "batch": batch, "load_s": load_s,
            "encoder_s": enc_s - step_s, "step_s": step_s, "vqgan_s": vq_s, "steps_timed": len(stamps),
            "image_length": n, "peak_mb": _peak_mb()}


def worker_min_dalle(batch: int, steps: int, threads: int) -> dict[str, Any]:
    import torch
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer  # sets threads at import

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # DALL·E Mini as min-dalle's MinDalle(is_mega=False) configures it
    layers, heads, d, glu, tv, iv = 12, 16, 1024, 2730, 50264, 16384
    encoder = DalleBartEncoder(layer_count=layers, embed_count=d, attention_head_count=heads, text_vocab_count=tv,
                               text_token_count=64, glu_embed_count=glu, device="cpu").eval()
    decoder = DalleBartDecoder(image_vocab_count=iv, embed_count=d, attention_head_count=heads,
                               glu_embed_count=glu, layer_count=layers, device="cpu").eval()
    detok = VQGanDetokenizer().eval()
    for m in (encoder, decoder):   # keep activations in a sane range, as trained weights would
        for p in m.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    load_s = time.perf_counter() - t0
    n = 256
    steps = min(steps, n)
    text = torch.ones((2, 64), dtype=torch.long)
    text[0, :2] = torch.tensor([0, 2])
    text[1, :6] = torch.tensor([0, 100, 200, 300, 400, 2])
    step_times: list[float] = []
    enc_s = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        enc_state = encoder.forward(text)
        enc_s = time.perf_counter() - t0
        idx = [0] * batch + [1] * batch
        tt, enc_state = text[idx], enc_state[idx]
        mask = tt.not_equal(1)[:, None, None, :]
        state = torch.zeros((layers, batch * 4, n, d))
        tokens = torch.full((batch, n + 1), 2 ** 14 - 1, dtype=torch.long)
        settings = torch.tensor([1.0, 256, 16], dtype=torch.float32)
        positions = torch.arange(n)
        step_times = []
        for i in range(steps):
            t0 = time.perf_counter()
            tokens[:, i + 1], state = decoder.sample_tokens(settings=settings, attention_mask=mask,
                                                             encoder_state=enc_state, attention_state=state,
                                                             prev_tokens=tokens[:, [i]], token_index=positions[[i]])
            step_times.append(time.perf_counter() - t0)
    step_s = float(np.median(step_times[1:] or step_times))
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 2 ** 14, (batch, n)))
    _min_dalle_detokenize(detok, codes[:1])
    t0 = time.perf_counter()
    _min_dalle_detokenize(detok, codes)
    vq_s = time.perf_counter() - t0
    return {"impl": "min-dalle 0.4.11 (torch float32, cpu)", "batch": batch, "load_s": load_s, "encoder_s": enc_s,
            "step_s": step_s, "vqgan_s": vq_s, "steps_timed": len(step_times), "image_length": n,
            "peak_mb": _peak_mb()}


def _min_dalle_detokenize(detok: Any, codes: Any) -> Any:
    """min-dalle's VQGanDetokenizer.forward (non-seamless) minus its final reshape into a square
    grid, which rejects batches that are not a square number."""
    z = detok.embedding.forward(codes).view((codes.shape[0], 16, 16, 256))
    z = detok.post_quant_conv.forward(z.permute(0, 3, 1, 2).contiguous())
    return detok.decoder.forward(z).permute(0, 2, 3, 1).clip(0.0, 1.0) * 255


def _run_worker(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "inference.bench", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise click.ClickException(f"benchmark worker {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _per_image(r: dict[str, Any]) -> float:
    return (r["encoder_s"] + r["image_length"] * r["step_s"] + r["vqgan_s"]) / r["batch"]


def small_model_grid(threads: int, tmp: Path) -> dict[str, Any]:
    """A ~4M-parameter shapes-style model (64x64 px, 8x8 tokens): seconds for a 4-image grid."""
    from .config import ModelConfig, VQGANConfig
    from .export import build_parts, export_bundle, placeholder_tokenizer
    from .images import make_grid
    from .pipeline import Pipeline

    cfg = ModelConfig(d_model=192, encoder_layers=2, decoder_layers=4, encoder_heads=3, decoder_heads=3,
                      encoder_ffn_dim=512, decoder_ffn_dim=512, text_vocab_size=512, image_vocab_size=512,
                      text_length=32, image_grid=8, num_codes=512, decoder_start_token_id=512)
    vq = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=64,
                     embed_dim=64, n_embed=512, resolution=64)
    parts = build_parts(cfg, vq)
    params = sum(p.numel() for m in (parts.encoder, parts.decoder, parts.vqgan) for p in m.parameters())
    out = tmp / "small"
    export_bundle(parts, placeholder_tokenizer(tmp / "small-tok"), out, name="small-bench", random_weights=True,
                  overwrite=True, progress=False)
    pipe = Pipeline.load(out, threads=threads)
    pipe.generate(["a red circle"], 4, [0])
    times = []
    for seed in range(5):
        t0 = time.perf_counter()
        make_grid(pipe.generate(["a red circle"], 4, [seed])[0])
        times.append(time.perf_counter() - t0)
    return {"params": params, "tokens": cfg.image_length, "grid4_s": float(np.median(times))}


@click.command("inference")
@click.option("--bundle", type=click.Path(path_type=Path), default=DEFAULT_BUNDLE, show_default=True,
              help="Full-size bundle to time (built with random weights if missing and it is the default).")
@click.option("--int8-bundle", type=click.Path(path_type=Path), help="Also time this int8 bundle.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Comma-separated batch sizes (images).")
@click.option("--steps", type=click.IntRange(2, 256), default=16, show_default=True,
              help="Decoder steps to time per run (per-step cost is position independent).")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="Threads for both sides (0 = all cores).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--min-dalle/--no-min-dalle", "with_min_dalle", default=True, show_default=True)
@click.option("--small/--no-small", "with_small", default=True, show_default=True,
              help="Also time a 4-image grid of a ~4M-parameter model.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Write all results as JSON here.")
def bench_inference(bundle: Path, int8_bundle: Path | None, batches: str, steps: int, threads: int, provider: str,
                    with_min_dalle: bool, with_small: bool, json_out: Path | None) -> None:
    """Seconds per image, decoder steps/s, VQGAN time and peak memory: ours vs min-dalle."""
    threads = threads or len(os.sched_getaffinity(0))
    sizes = [int(b) for b in batches.split(",") if b.strip()]
    if not (bundle / "manifest.json").is_file():
        if bundle != DEFAULT_BUNDLE:
            raise click.ClickException(f"{bundle} is not a bundle")
        click.echo(f"building {bundle} (random-weight DALL·E Mini, ~2 min)...", err=True)
        subprocess.run([sys.executable, "-m", "inference", "export", "--random-weights", "mini", "--out", str(bundle)],
                       check=True)
    results: list[dict[str, Any]] = []
    for b in sizes:
        runs = [["ours", str(bundle)]] + ([["ours", str(int8_bundle)]] if int8_bundle else []) + \
               ([["min-dalle"]] if with_min_dalle else [])
        for run in runs:
            click.echo(f"batch {b}: {run[0]} {run[1] if len(run) > 1 else ''}...", err=True)
            args = [*run, "--batch", str(b), "--steps", str(steps), "--threads", str(threads), "--provider", provider]
            r = _run_worker(args, timeout=3600)
            r["s_per_image"] = _per_image(r)
            r["steps_per_s"] = 1 / r["step_s"]
            results.append(r)
            click.echo(f"  {r['impl']}: {r['s_per_image']:.2f} s/image, {r['steps_per_s']:.2f} steps/s, "
                       f"VQGAN {r['vqgan_s']:.2f} s, peak {r['peak_mb']:.0f} MB", err=True)
    small = small_model_grid(threads, bundle.parent) if with_small else None
    header = (f"{platform.processor() or platform.machine()}, {threads} threads, provider {provider}, "
              f"{steps} timed decoder steps per run")
    click.echo(f"\n{header}\n")
    click.echo("| implementation | batch | s / image | decoder steps / s | encoder s | VQGAN s (batch) | peak MB |")
    click.echo("|---|---|---|---|---|---|---|")
    for r in results:
        click.echo(f"| {r['impl']} | {r['batch']} | {r['s_per_image']:.2f} | {r['steps_per_s']:.2f} | "
                   f"{r['encoder_s']:.2f} | {r['vqgan_s']:.2f} | {r['peak_mb']:.0f} |")
    for b in sizes:
        ours = next((r for r in results if r["batch"] == b and r["impl"].startswith("ours")), None)
        theirs = next((r for r in results if r["batch"] == b and r["impl"].startswith("min-dalle")), None)
        if ours and theirs:
            click.echo(f"\nbatch {b}: ours is {theirs['s_per_image'] / ours['s_per_image']:.1f}x faster per image, "
                       f"peak memory {ours['peak_mb'] / theirs['peak_mb']:.2f}x of min-dalle's")
    if small:
        click.echo(f"\nsmall model ({small['params'] / 1e6:.1f}M params, {small['tokens']} tokens): "
                   f"4-image grid in {small['grid4_s']:.3f} s")
    if json_out:
        json_out.write_text(json.dumps({"setup": header, "results": results, "small": small}, indent=2))


def _main(argv: list[str]) -> None:
    """Worker entry point: python -m inference.bench ours BUNDLE|min-dalle --batch B --steps S --threads T."""
    kind = argv[0]
    opts = dict(zip(argv[1::2], argv[2::2])) if kind == "min-dalle" else dict(zip(argv[2::2], argv[3::2]))
    b, s, t = int(opts["--batch"]), int(opts["--steps"]), int(opts["--threads"])
    if kind == "ours":
        r = worker_ours(argv[1], b, s, t, opts.get("--provider", "cpu"))
    else:
        r = worker_min_dalle(b, s, t)
    print(json.dumps(r))


if __name__ == "__main__":
    _main(sys.argv[1:])
