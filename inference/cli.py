"""CLI commands of the inference package (export, generate, bench inference, train, eval).

`bot.cli` calls :func:`register` to attach them to the ``dallebot`` command group. Heavy imports
(torch for ``export``, onnxruntime for ``generate``) happen inside the commands.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from .errors import InferenceError

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "int8": "int8"}


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)


@click.command("export")
@click.option("--from", "source", type=click.Path(path_type=Path), help="Checkpoint folder (dalle-mini HF folder or min-dalle folder).")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Bundle folder to create.")
@click.option("--vqgan", type=click.Path(path_type=Path), help="VQGAN folder (default: a vqgan* folder beside or inside --from).")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_NAMES)), default="fp32", show_default=True,
              help="fp16 for GPUs (VQGAN and lm_head stay fp32); int8 = dynamic quantisation for CPUs.")
@click.option("--cache", type=click.Choice(["auto", "inplace", "present", "sample"]), default="auto", show_default=True,
              help="Decoder interface: inplace (CPU), present (GPU), sample (GPU: also samples on the device, "
                   "so steps replay as CUDA graphs; top_k at most 256); auto picks present for fp16.")
@click.option("--random-weights", type=click.Choice(["mini", "mega"]), help="Full-size architecture with random weights (benchmarks only).")
@click.option("--name", help="Model name for the manifest (default: from the checkpoint).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def export_cmd(source: Path | None, out: Path, vqgan: Path | None, dtype: str, cache: str, random_weights: str | None,
               name: str | None, overwrite: bool) -> None:
    """Convert a published checkpoint (or random weights) into a model bundle."""
    _setup_logging()
    from . import export as ex

    dt = DTYPE_NAMES[dtype]
    if random_weights:
        if source:
            raise click.UsageError("use either --from or --random-weights")
        from .config import MEGA, MINI, VQGAN_F16_16384

        click.echo(f"building DALL·E {random_weights.capitalize()} with random weights (benchmarks only)...", err=True)
        parts = ex.build_parts(MINI if random_weights == "mini" else MEGA, VQGAN_F16_16384)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = ex.export_bundle(parts, ex.placeholder_tokenizer(tmp), out, name=name or f"random-{random_weights}",
                                      dtype=dt, cache=cache, random_weights=True, overwrite=overwrite,
                                      license="none (random weights)",
                                      description="RANDOM WEIGHTS: architecture benchmark only, makes noise",
                                      provenance={"source": f"random weights, DALL·E {random_weights} architecture",
                                                  "tokenizer": "placeholder byte-level BPE, not the real vocabulary"})
    else:
        if not source:
            raise click.UsageError("--from DIR is required (or --random-weights mini|mega)")
        from .convert import load_checkpoint

        ckpt = load_checkpoint(source, vqgan, progress=lambda m: click.echo(m, err=True))
        bundle = ex.export_bundle(ckpt.parts, ckpt.tokenizer_dir, out, name=name or ckpt.name, dtype=dt, cache=cache,
                                  provenance=ckpt.provenance, license=ckpt.license, overwrite=overwrite,
                                  description=f"converted from {ckpt.source_format}")
    report = bundle.manifest.get("provenance", {}).get("int8_report")
    if report:
        click.echo(f"int8 vs fp32 decoder step: max |logit diff| {report['max_abs_logit_diff']:.4g}, "
                   f"step time {report['int8_step_ms']:.1f} ms vs {report['fp32_step_ms']:.1f} ms", err=True)
    click.echo(f"wrote {out} ({bundle.name}, {bundle.dtype})")


def _read_prompts(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InferenceError(f"cannot read prompts file {path} ({e})") from None


@click.command("generate")
@click.argument("prompt", required=False)
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line; writes OUT_DIR/<line>.png.")
@click.option("--out-dir", type=click.Path(path_type=Path), help="Output folder for --prompts-file.")
@click.option("--n", "n_images", type=click.IntRange(1, 64), default=1, show_default=True, help="Images per prompt (tiled as a grid).")
@click.option("--seed", type=int, help="Seed: same seed, same image (default: random, printed).")
@click.option("--model", "model", type=click.Path(path_type=Path), envvar="DALLEBOT_MODEL", help="Bundle folder [env DALLEBOT_MODEL; default: the shipped shapes model].")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Prompts per decoder run (--prompts-file).")
@click.option("--upscale", type=click.IntRange(0, 4096), default=0, help="Scale the output's longer side to this many px.")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="onnxruntime threads (0 = all cores).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--condition-scale", type=float)
@click.option("--top-k", type=click.IntRange(0, None))
@click.option("--top-p", type=float)
@click.option("--temperature", type=float)
def generate_cmd(prompt: str | None, prompts_file: Path | None, out_dir: Path | None, n_images: int, seed: int | None,
                 model: Path | None, out: Path, batch: int, upscale: int, threads: int, provider: str,
                 condition_scale: float | None, top_k: int | None, top_p: float | None, temperature: float | None) -> None:
    """Generate images for PROMPT (or each line of --prompts-file)."""
    _setup_logging()
    from tqdm import tqdm

    from .images import make_grid, png_bytes
    from .images import upscale as upscale_image
    from .pipeline import Pipeline

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give a PROMPT or --prompts-file FILE (not both)")
    if prompts_file and not out_dir:
        raise click.UsageError("--prompts-file needs --out-dir DIR")
    if model is None:  # the shipped shapes-world model, as for the bot when the config names none
        from .shipped import SHAPES_BUNDLE

        if not (SHAPES_BUNDLE / "manifest.json").exists():
            raise click.UsageError("no model: pass --model BUNDLE or set DALLEBOT_MODEL")
        model = SHAPES_BUNDLE
    prompts = [prompt] if prompt is not None else _read_prompts(prompts_file)
    if not prompts:
        raise InferenceError(f"{prompts_file} holds no prompts")
    pipe = Pipeline.load(model, threads=threads, provider=provider)
    if pipe.bundle.random_weights:
        click.echo(f"warning: {model} has random weights (benchmark bundle): images are noise", err=True)
    # check every prompt before the long run (empty prompts fail here, long ones warn)
    pipe.prepare(prompts)
    sampling = dict(condition_scale=condition_scale, top_k=top_k, top_p=top_p, temperature=temperature)
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    steps = pipe.config.image_length
    with tqdm(total=len(prompts) * steps, unit="step", desc="generating", file=sys.stderr, mininterval=0.5) as bar:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            done = bar.n
            images = pipe.generate(chunk, n_images, [seed] * len(chunk),
                                   progress=lambda t, _n: bar.update(done + t * len(chunk) - bar.n), **sampling)
            for i, ims in enumerate(images):
                im = make_grid(ims)
                if upscale:
                    im = upscale_image(im, upscale)
                path = out if prompts_file is None else out_dir / f"{start + i}.png"
                path.write_bytes(png_bytes(im))
    click.echo(f"seed {seed}: wrote {out if prompts_file is None else out_dir}")


def register(root: click.Group, bench: click.Group) -> None:
    """Attach this package's commands to the root ``dallebot`` group and its ``bench`` group."""
    from .bench import bench_inference

    root.add_command(export_cmd, "export")
    root.add_command(generate_cmd, "generate")
    bench.add_command(bench_inference, "inference")
