"""``dallebot bench inference``: our ONNX Runtime pipeline vs min-dalle, full-size DALL·E Mini.

Both sides run the same architecture with random weights (min-dalle's modules are built directly
from its classes with the Mini config; nothing is downloaded), float32, the same batch and the same
thread count. The development machine is shared and noisy, so timing is interleaved: one process
holds every implementation and runs their encoders, then their decoder steps, then their VQGAN
decodes in turn (A, B, A, B, ...), so a burst of load hits all of them alike. Idle threads do not
spin on either side (onnxruntime: allow_spinning=0; torch/OpenMP: OMP_WAIT_POLICY=PASSIVE), or
they would steal the cores from whichever runs next. Peak memory (ru_maxrss) is measured in a
separate process per implementation: load, encode, a few steps, VQGAN decode of the whole batch.

Seconds per image = (encoder + 256 x median step + VQGAN decode of the batch) / batch. Step cost
does not depend on the position for either implementation (both attend over a fixed 256-column
cache), so timing ``--steps`` steps (first dropped as warm-up) and scaling is fair.

GPU: ``python -m inference bench inference --provider cuda --bundle BUNDLE --batch 1,16
--no-min-dalle --no-small`` (see scripts/gpu_bench.sh).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

DEFAULT_BUNDLE = Path(".work/bundles/random-mini")
PROMPT = "an armchair in the shape of an avocado"
IMAGE_TOKENS = 256


class Ours:
    def __init__(self, bundle: str, threads: int, provider: str) -> None:
        from .pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, threads=threads, provider=provider, verify=False)
        extra = (", device sampling" if self.pipe._sampler else "") + (", CUDA graphs" if self.pipe.cuda_graph else "")
        self.label = f"ours ({self.pipe.bundle.dtype}, {self.pipe.device}{extra})"

    def start(self, batch: int) -> None:
        self.steps = self.pipe.start([PROMPT], batch, [0]).steps

    def step(self) -> None:
        next(self.steps)

    def vqgan(self, codes: np.ndarray) -> None:
        self.pipe.decode_pixels(codes)


class MinDalle:
    """min-dalle 0.4.11's modules and loop (MinDalle.generate_raw_image_stream), random weights."""

    label = "min-dalle 0.4.11 (torch float32, cpu)"

    def __init__(self, threads: int) -> None:
        import torch
        from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer  # sets threads at import

        self.torch = torch
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        torch.manual_seed(0)
        # DALL·E Mini as MinDalle(is_mega=False) configures it
        self.layers, heads, self.d, glu, tv, iv = 12, 16, 1024, 2730, 50264, 16384
        self.encoder = DalleBartEncoder(layer_count=self.layers, embed_count=self.d, attention_head_count=heads,
                                        text_vocab_count=tv, text_token_count=64, glu_embed_count=glu,
                                        device="cpu").eval()
        self.decoder = DalleBartDecoder(image_vocab_count=iv, embed_count=self.d, attention_head_count=heads,
                                        glu_embed_count=glu, layer_count=self.layers, device="cpu").eval()
        self.detok = VQGanDetokenizer().eval()
        for m in (self.encoder, self.decoder):     # activations in a sane range, as trained weights give
            for p in m.parameters():
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.02)

    def start(self, batch: int) -> None:
        torch = self.torch
        text = torch.ones((2, 64), dtype=torch.long)
        text[0, :2] = torch.tensor([0, 2])
        text[1, :6] = torch.tensor([0, 100, 200, 300, 400, 2])
        enc = self.encoder.forward(text)
        idx = [0] * batch + [1] * batch
        self.text, self.enc = text[idx], enc[idx]
        self.mask = self.text.not_equal(1)[:, None, None, :]
        self.state = torch.zeros((self.layers, batch * 4, IMAGE_TOKENS, self.d))
        self.tokens = torch.full((batch, IMAGE_TOKENS + 1), 2 ** 14 - 1, dtype=torch.long)
        self.settings = torch.tensor([1.0, 256, 16], dtype=torch.float32)
        self.positions = torch.arange(IMAGE_TOKENS)
        self.i = 0

    def step(self) -> None:
        i = self.i
        self.tokens[:, i + 1], self.state = self.decoder.sample_tokens(
            settings=self.settings, attention_mask=self.mask, encoder_state=self.enc, attention_state=self.state,
            prev_tokens=self.tokens[:, [i]], token_index=self.positions[[i]])
        self.i += 1

    def vqgan(self, codes: np.ndarray) -> None:
        """VQGanDetokenizer.forward (non-seamless) minus its final reshape into a square grid,
        which rejects batches that are not a square number."""
        d = self.detok
        z = d.embedding.forward(self.torch.from_numpy(codes)).view((codes.shape[0], 16, 16, 256))
        z = d.post_quant_conv.forward(z.permute(0, 3, 1, 2).contiguous())
        d.decoder.forward(z).permute(0, 2, 3, 1).clip(0.0, 1.0) * 255


def _make(spec: str, threads: int, provider: str) -> Ours | MinDalle:
    return MinDalle(threads) if spec == "min-dalle" else Ours(spec, threads, provider)


def _timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def worker_timing(specs: list[str], batch: int, steps: int, threads: int, provider: str) -> list[dict[str, Any]]:
    impls = [_make(s, threads, provider) for s in specs]
    enc: dict[int, list[float]] = {i: [] for i in range(len(impls))}
    for _ in range(3):                                # the last start() is the one whose steps run
        for i, impl in enumerate(impls):
            enc[i].append(_timed(impl.start, batch))
    step: dict[int, list[float]] = {i: [] for i in range(len(impls))}
    for _ in range(steps):
        for i, impl in enumerate(impls):
            step[i].append(_timed(impl.step))
    codes = np.random.default_rng(0).integers(0, 2 ** 14, (batch, IMAGE_TOKENS))
    vq: dict[int, list[float]] = {i: [] for i in range(len(impls))}
    for _ in range(2):
        for i, impl in enumerate(impls):
            vq[i].append(_timed(impl.vqgan, codes))
    out = []
    for i, impl in enumerate(impls):
        r = {"impl": impl.label, "spec": specs[i], "batch": batch, "encoder_s": float(np.median(enc[i][1:])),
             "step_s": float(np.median(step[i][1:])), "vqgan_s": vq[i][-1], "steps_timed": steps - 1}
        r["s_per_image"] = (r["encoder_s"] + IMAGE_TOKENS * r["step_s"] + r["vqgan_s"]) / batch
        r["steps_per_s"] = 1 / r["step_s"]
        out.append(r)
    return out


def worker_memory(spec: str, batch: int, threads: int, provider: str) -> dict[str, Any]:
    impl = _make(spec, threads, provider)
    impl.start(batch)
    for _ in range(3):
        impl.step()
    impl.vqgan(np.random.default_rng(0).integers(0, 2 ** 14, (batch, IMAGE_TOKENS)))
    return {"spec": spec, "batch": batch, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_worker(args: list[str]) -> Any:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "inference.bench", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise click.ClickException(f"benchmark worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def small_model_grid(threads: int, tmp: Path) -> dict[str, Any]:
    """A ~5M-parameter shapes-style model (64x64 px, 8x8 tokens): seconds for a 4-image grid."""
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
    with tempfile.TemporaryDirectory() as tok:
        export_bundle(parts, placeholder_tokenizer(tok), out, name="small-bench", random_weights=True,
                      overwrite=True, progress=False)
    pipe = Pipeline.load(out, threads=threads)
    pipe.generate(["a red circle"], 4, [0])
    times = [_timed(lambda s: make_grid(pipe.generate(["a red circle"], 4, [s])[0]), seed) for seed in range(5)]
    return {"params": params, "tokens": cfg.image_length, "grid4_s": float(np.median(times))}


@click.command("inference")
@click.option("--bundle", type=click.Path(path_type=Path), default=DEFAULT_BUNDLE, show_default=True,
              help="Full-size bundle to time (built with random weights if missing and it is the default).")
@click.option("--int8-bundle", type=click.Path(path_type=Path), help="Also time this int8 bundle.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Comma-separated batch sizes (images).")
@click.option("--steps", type=click.IntRange(2, 256), default=16, show_default=True,
              help="Decoder steps to time per implementation (the first is dropped).")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="Threads for every side (0 = all cores).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--min-dalle/--no-min-dalle", "with_min_dalle", default=True, show_default=True)
@click.option("--memory/--no-memory", "with_memory", default=True, show_default=True,
              help="Measure peak memory (one extra process per implementation and batch).")
@click.option("--small/--no-small", "with_small", default=True, show_default=True,
              help="Also time a 4-image grid of a ~5M-parameter model.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Write all results as JSON here.")
def bench_inference(bundle: Path, int8_bundle: Path | None, batches: str, steps: int, threads: int, provider: str,
                    with_min_dalle: bool, with_memory: bool, with_small: bool, json_out: Path | None) -> None:
    """Seconds per image, decoder steps/s, VQGAN time and peak memory: ours vs min-dalle."""
    threads = threads or len(os.sched_getaffinity(0))
    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{batches!r} is not a comma-separated list of whole numbers >= 1, e.g. 1,8.",
                                 param_hint="'--batch'")
    if not (bundle / "manifest.json").is_file():
        if bundle != DEFAULT_BUNDLE:
            raise click.ClickException(f"{bundle} is not a bundle")
        click.echo(f"building {bundle} (random-weight DALL·E Mini, a few minutes)...", err=True)
        subprocess.run([sys.executable, "-m", "inference", "export", "--random-weights", "mini", "--out", str(bundle)],
                       check=True)
    specs = [str(bundle)] + ([str(int8_bundle)] if int8_bundle else []) + (["min-dalle"] if with_min_dalle else [])
    common = ["--threads", str(threads), "--provider", provider]
    results: list[dict[str, Any]] = []
    for b in sizes:
        click.echo(f"batch {b}: timing {', '.join(specs)} interleaved ({steps} steps each)...", err=True)
        rows = _run_worker(["timing", "--batch", str(b), "--steps", str(steps), *common, *specs])
        for r in rows:
            if with_memory:
                r["peak_mb"] = _run_worker(["memory", "--batch", str(b), *common, r["spec"]])["peak_mb"]
            click.echo(f"  {r['impl']}: {r['s_per_image']:.2f} s/image, {r['steps_per_s']:.2f} steps/s, "
                       f"VQGAN {r['vqgan_s']:.2f} s, peak {r.get('peak_mb', float('nan')):.0f} MB", err=True)
        results += rows
    small = small_model_grid(threads, bundle.parent) if with_small else None
    header = (f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} threads, provider {provider}, "
              f"{steps} interleaved decoder steps per implementation")
    lines = [header, "", "| implementation | batch | s / image | decoder steps / s | encoder s | VQGAN s (whole batch) | peak MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['batch']} | {r['s_per_image']:.2f} | {r['steps_per_s']:.2f} | {r['encoder_s']:.2f} | "
              f"{r['vqgan_s']:.2f} | {r.get('peak_mb', float('nan')):.0f} |" for r in results]
    for b in sizes:
        batch_rows = [r for r in results if r["batch"] == b]
        theirs = next((r for r in batch_rows if r["spec"] == "min-dalle"), None)
        for ours in (r for r in batch_rows if r["spec"] != "min-dalle"):
            if theirs:
                mem = (f", peak memory {ours['peak_mb'] / theirs['peak_mb']:.2f}x of min-dalle's"
                       if "peak_mb" in ours else "")
                lines.append(f"\nbatch {b}: {ours['impl']} is {theirs['s_per_image'] / ours['s_per_image']:.1f}x "
                             f"faster per image than min-dalle (decoder step {theirs['step_s'] / ours['step_s']:.1f}x){mem}")
    if small:
        lines.append(f"\nsmall model ({small['params'] / 1e6:.1f}M params, {small['tokens']} tokens): "
                     f"4-image grid in {small['grid4_s']:.3f} s")
    click.echo("\n" + "\n".join(lines))
    if json_out:
        json_out.write_text(json.dumps({"setup": header, "results": results, "small": small}, indent=2))


def _main(argv: list[str]) -> None:
    """Worker: python -m inference.bench timing|memory --batch B [--steps S] --threads T --provider P SPEC..."""
    kind, rest = argv[0], argv[1:]
    opts, specs = {}, []
    while rest:
        if rest[0].startswith("--"):
            opts[rest[0]], rest = rest[1], rest[2:]
        else:
            specs.append(rest.pop(0))
    b, t, p = int(opts["--batch"]), int(opts["--threads"]), opts["--provider"]
    if kind == "timing":
        print(json.dumps(worker_timing(specs, b, int(opts["--steps"]), t, p)))
    else:
        print(json.dumps(worker_memory(specs[0], b, t, p)))


if __name__ == "__main__":
    _main(sys.argv[1:])
