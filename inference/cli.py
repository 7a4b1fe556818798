"""CLI commands of the inference package (export, generate, bench inference, train, eval).

`bot.cli` calls :func:`register` to attach them to the ``dallebot`` command group. Heavy imports
(torch for ``export``, onnxruntime for ``generate``) happen inside the commands.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from .errors import InferenceError, PromptError

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "int8": "int8"}
MAX_SEED = 2**63 - 1
SEED = click.IntRange(0, MAX_SEED)     # seeds are stored as signed 64-bit integers


class FiniteFloat(click.ParamType):
    """A float that is not nan or inf (click's float type accepts both)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


FINITE_FLOAT = FiniteFloat()


def _check_name(value: str | None, param: click.Parameter, ctx: click.Context) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("the model name must not be empty.", ctx, param)
    return value


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
@click.option("--name", help="Model name for the manifest (default: from the checkpoint).",
              callback=lambda ctx, param, v: _check_name(v, param, ctx))
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

        ex.check_out_dir(out, [], overwrite)            # before minutes of building
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

        # before the (long) conversion: --out must not be, or hold, what is being converted
        ex.check_out_dir(out, [source, *([vqgan] if vqgan else [])], overwrite)
        with load_checkpoint(source, vqgan, progress=lambda m: click.echo(m, err=True)) as ckpt:
            bundle = ex.export_bundle(ckpt.parts, ckpt.tokenizer_dir, out, name=name or ckpt.name, dtype=dt,
                                      cache=cache, provenance=ckpt.provenance, license=ckpt.license,
                                      overwrite=overwrite, description=f"converted from {ckpt.source_format}",
                                      keep=[source, Path(ckpt.provenance["vqgan_source"])])
    report = bundle.manifest.get("provenance", {}).get("int8_report")
    if report:
        click.echo(f"int8 vs fp32 decoder step: max |logit diff| {report['max_abs_logit_diff']:.4g}, "
                   f"step time {report['int8_step_ms']:.1f} ms vs {report['fp32_step_ms']:.1f} ms", err=True)
    click.echo(f"wrote {out} ({bundle.name}, {bundle.dtype})")


def _read_prompts(path: Path) -> tuple[list[tuple[int, str]], int]:
    """Non-blank lines of a prompts file as (line index from 0, text), and how many were blank."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InferenceError(f"cannot read prompts file {path} ({e})") from None
    prompts = [(i, line) for i, line in enumerate(lines) if line.strip()]
    return prompts, len(lines) - len(prompts)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _check_out_file(out: Path) -> None:
    """--out: a PNG file in an existing folder (the folder is not created: a typo fails here, before
    the model loads, not after generating)."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InferenceError(f"--out {out} is a folder; give a file name, e.g. {out / 'out.png'}")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise InferenceError(f"cannot write --out {out}: the folder {parent} {what} (it is not created; make it first)")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InferenceError(f"cannot write --out {out}: permission denied")


def _make_out_dir(out_dir: Path) -> None:
    """--out-dir: created with its parents when missing."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InferenceError(f"cannot use --out-dir {out_dir}: it exists and is not a folder") from None
    except OSError as e:
        raise InferenceError(f"cannot create --out-dir {out_dir} ({_why(e)})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InferenceError(f"cannot write into --out-dir {out_dir}: permission denied")


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise InferenceError(f"cannot write {path} ({_why(e)})") from None


@click.command("generate")
@click.argument("prompt", required=False)
@click.option("--prompts-file", type=click.Path(path_type=Path),
              help="One prompt per line; writes OUT_DIR/<line>.png (lines numbered from 0; blank lines are skipped).")
@click.option("--out-dir", type=click.Path(path_type=Path), help="Output folder for --prompts-file (created if missing).")
@click.option("--n", "n_images", type=click.IntRange(1, 64), default=1, show_default=True, help="Images per prompt (tiled as a grid).")
@click.option("--seed", type=SEED, help="Seed: same seed, same image (default: random, printed).")
@click.option("--model", "model", type=click.Path(path_type=Path), envvar="DALLEBOT_MODEL", help="Bundle folder [env DALLEBOT_MODEL; default: the shipped shapes model].")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True,
              help="PNG file to write; its folder must exist.")
@click.option("--batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Prompts per decoder run (--prompts-file).")
@click.option("--upscale", type=click.IntRange(0, 4096), default=0, help="Scale the output's longer side to this many px.")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="onnxruntime threads (0 = all cores).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--condition-scale", type=FINITE_FLOAT)
@click.option("--top-k", type=click.IntRange(0, None))
@click.option("--top-p", type=FINITE_FLOAT)
@click.option("--temperature", type=FINITE_FLOAT)
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
    if prompts_file is None:
        items, blank = [(0, prompt)], 0
    else:
        items, blank = _read_prompts(prompts_file)
        if not items:
            raise InferenceError(f"{prompts_file} holds no prompts")
        if blank:
            click.echo(f"skipped {blank} blank line{'s' if blank != 1 else ''} of {prompts_file}", err=True)
    # where the images go is checked before the model loads and anything is generated
    if out_dir is not None and prompts_file is not None:
        _make_out_dir(out_dir)
    else:
        _check_out_file(out)
    pipe = Pipeline.load(model, threads=threads, provider=provider)
    if pipe.bundle.random_weights:
        click.echo(f"warning: {model} has random weights (benchmark bundle): images are noise", err=True)
    sampling = dict(condition_scale=condition_scale, top_k=top_k, top_p=top_p, temperature=temperature)
    pipe.sampling_params(**sampling)          # bad settings fail here, not after the first batch
    prompts = [text for _, text in items]
    # check every prompt before the long run (empty prompts fail here, long ones warn)
    try:
        pipe.prepare(prompts)
    except PromptError:
        if prompts_file is None:
            raise
        for line, text in items:             # name the line, as the output files are named
            try:
                pipe.prepare([text])
            except PromptError as e:
                raise PromptError(f"{prompts_file} line {line + 1} ({line}.png): "
                                  f"{str(e).replace('prompt 0 ', 'prompt ', 1)}") from None
        raise
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    steps = pipe.config.image_length
    with tqdm(total=len(prompts) * steps, unit="step", desc="generating", file=sys.stderr, mininterval=0.5) as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            done = bar.n
            try:
                images = pipe.generate([text for _, text in chunk], n_images, [seed] * len(chunk),
                                       progress=lambda t, _n: bar.update(done + t * len(chunk) - bar.n), **sampling)
            except MemoryError:
                raise InferenceError(f"out of memory generating {len(chunk) * n_images} images at once; "
                                     "lower --n or --batch") from None
            except Exception as e:  # onnxruntime's own exception types (a damaged bundle, no memory left)
                if not type(e).__module__.startswith("onnxruntime"):
                    raise
                lines = str(e).strip().splitlines()
                raise InferenceError(f"onnxruntime failed while generating ({lines[0][:300] if lines else type(e).__name__})"
                                     f"; if this repeats, re-export or re-copy the bundle {model}") from None
            for (line, _), ims in zip(chunk, images):
                im = make_grid(ims)
                if upscale:
                    im = upscale_image(im, upscale)
                path = out if prompts_file is None else out_dir / f"{line}.png"
                _write(path, png_bytes(im))
    click.echo(f"seed {seed}: wrote {out if prompts_file is None else out_dir}")


def register(root: click.Group, bench: click.Group) -> None:
    """Attach this package's commands to the root ``dallebot`` group and its ``bench`` group."""
    from .bench import bench_inference

    root.add_command(export_cmd, "export")
    root.add_command(generate_cmd, "generate")
    bench.add_command(bench_inference, "inference")
