"""``dallebot train shapes`` and ``dallebot eval shapes``.

``register(root)`` attaches both to the root command group (adding to existing ``train`` / ``eval``
groups when the root already has them). Evaluation needs only the serving dependencies; training
imports torch lazily (``pip install 'dallebot[train]'``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ..cli import FINITE_FLOAT, SEED
from ..errors import InferenceError
from ..shipped import SHAPES_BUNDLE

# evaluate() seeds batch i of prompts with seed * 1_000_003 + i (+ 7_777 for diversity), and the
# pipeline takes seeds below 2**63: these bounds keep every derived seed in range.
EVAL_MAX_PROMPTS = 1_000_000
EVAL_MAX_SEED = 2**32 - 1


POSITIVE = click.IntRange(1, None)


class LearningRate(click.ParamType):
    """A finite float above 0 (nan, inf, 0 or a negative rate would train garbage for hours)."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = FINITE_FLOAT.convert(value, param, ctx)
        if rv <= 0:
            self.fail(f"{value!r} is not above 0.", param, ctx)
        return rv


LEARNING_RATE = LearningRate()


def _check_ch_mult(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--vq-ch-mult: comma-separated whole numbers >= 1 (kept as the string the recipe parses)."""
    if value is None:
        return None
    try:
        ok = all(int(x) >= 1 for x in value.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers >= 1, e.g. 1,2,4,8.",
                                 ctx, param)
    return value


def _check_output(path: Path, option: str, image: bool = False) -> None:
    """An output file of eval: not a folder, a PIL image type for the sheet, in a folder that exists
    or can be made (made here, as the sheet's always was) and written to."""
    import os

    if path.is_dir():
        raise InferenceError(f"{option} {path} is a folder; give a file name")
    if image:
        from PIL import Image

        if path.suffix.lower() not in Image.registered_extensions():
            raise InferenceError(f"{option} {path}: give an image file name, e.g. ending in .png")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InferenceError(f"cannot write {option} {path}: {parent} is not a folder") from None
    except OSError as e:
        raise InferenceError(f"cannot create the folder of {option} {path} ({e.strerror or type(e).__name__})") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InferenceError(f"cannot write {option} {path}: permission denied")


def _check_device(device: str) -> None:
    """--device: auto, or a torch device this machine has (checked before hours of work start)."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{device!r} is not a torch device: use auto, cpu, cuda or cuda:N.",
                                 param_hint="'--device'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (dev.index is not None and dev.index >= count):
            raise click.BadParameter(f"{device!r}: torch sees {count} CUDA device(s) on this machine; "
                                     "use --device cpu or auto.", param_hint="'--device'")


def _group(root: click.Group, name: str, help: str) -> click.Group:
    existing = root.commands.get(name)
    if isinstance(existing, click.Group):
        return existing
    group = click.Group(name, help=help)
    root.add_command(group)
    return group


@click.command("shapes")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Training folder: checkpoints, logs, loss curves, the bundle (OUT/bundle).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=click.IntRange(0, 4096), default=0, help="torch CPU threads (0 = torch's default).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--scenes", type=POSITIVE, default=None, help="Rendered training scenes (default 60000).")
@click.option("--vq-steps", type=POSITIVE, default=None, help="VQ training steps (default 6000).")
@click.option("--vq-batch", type=POSITIVE, default=None)
@click.option("--vq-lr", type=LEARNING_RATE, default=None)
@click.option("--vq-ae-warmup", type=click.IntRange(0, None), default=None,
              help="VQ steps as a plain autoencoder before the codebook is initialised (default 200).")
@click.option("--vq-ch", type=POSITIVE, default=None, help="VQGAN base channels.")
@click.option("--vq-ch-mult", default=None, callback=_check_ch_mult, help="VQGAN channel multipliers, e.g. 1,2,4,8.")
@click.option("--vq-norm-groups", type=POSITIVE, default=None, help="VQGAN GroupNorm groups.")
@click.option("--steps", type=POSITIVE, default=None, help="Transformer training steps (default 6000).")
@click.option("--batch", type=POSITIVE, default=None, help="Transformer batch (default 64).")
@click.option("--lr", type=LEARNING_RATE, default=None)
@click.option("--dtype", type=click.Choice(["float32", "float16", "int8"]), default="float32", show_default=True,
              help="Bundle weights (int8: MatMul weights of the transformer quantised).")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Choose the manifest's sampling defaults by measurement after export.")
@click.option("--refine/--no-refine", default=True, show_default=True,
              help="Stage 3: train the transformer further on the base model's own codes of new scenes.")
@click.option("--refine-from", "refine_from", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Skip stages 1-2 and refine this float32 bundle (how shapes-v2 was made from shapes-v1).")
@click.option("--refine-steps", type=POSITIVE, default=None, help="Stage 3 transformer steps (default 3000).")
@click.option("--refine-scenes", type=POSITIVE, default=None, help="Stage 3 rendered scenes (default 120000).")
def train_shapes_cmd(out: Path, device: str, threads: int, seed: int, scenes: int | None, vq_steps: int | None,
                     vq_batch: int | None, vq_lr: float | None, vq_ae_warmup: int | None, vq_ch: int | None, vq_ch_mult: str | None,
                     vq_norm_groups: int | None, steps: int | None, batch: int | None,
                     lr: float | None, dtype: str, tune: bool, refine: bool, refine_from: Path | None,
                     refine_steps: int | None, refine_scenes: int | None) -> None:
    """Train the shapes-world model end to end (VQGAN, transformer, refine), export and tune the bundle.

    Seeded and resumable: run the same command again to continue an interrupted run; finished
    stages are loaded, not retrained.
    """
    import argparse

    try:
        import torch
    except ImportError:
        raise click.ClickException("training needs torch: pip install 'dallebot[train]'") from None
    from ..training.pipeline import Recipe, _recipe_from_args, train_shapes

    _check_device(device)
    if refine_from is not None and not refine:
        raise click.UsageError("--refine-from and --no-refine contradict each other")
    if refine_from is not None and not (refine_from / "manifest.json").is_file():
        raise click.BadParameter(f"{refine_from}: no model bundle there (manifest.json missing)",
                                 param_hint="'--refine-from'")
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ns = argparse.Namespace(seed=seed, scenes=scenes or Recipe.scenes, vq_steps=vq_steps, vq_batch=vq_batch,
                            vq_lr=vq_lr, vq_ae_warmup=vq_ae_warmup, vq_ch=vq_ch, vq_ch_mult=vq_ch_mult, vq_norm_groups=vq_norm_groups,
                            steps=steps, batch=batch, lr=lr, refine=refine, refine_steps=refine_steps,
                            refine_scenes=refine_scenes)
    result = train_shapes(out, _recipe_from_args(ns), device=device, tune=tune, dtype=dtype,
                          refine_from=refine_from)
    click.echo(json.dumps({"bundle": result["bundle"], "sampling": result.get("sampling", {}).get("chosen"),
                           "training": {k: result.get("training", {}).get(k) for k in (
                               "vq_steps", "vq_seconds", "transformer_steps", "transformer_seconds")},
                           "refine": {k: result.get("refine", {}).get(k) for k in (
                               "transformer_steps", "transformer_seconds", "wall_seconds")}},
                          indent=2))


@click.command("shapes")
@click.option("--model", "model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Bundle to evaluate (default: the shipped {SHAPES_BUNDLE.name} model).")
@click.option("--n", "n", type=click.IntRange(1, EVAL_MAX_PROMPTS), default=300, show_default=True,
              help="Prompts sampled from the grammar.")
@click.option("--seed", type=click.IntRange(0, EVAL_MAX_SEED), default=0, show_default=True)
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=Path("shapes-eval.png"),
              show_default=True, help="Contact sheet PNG of prompts and images.")
@click.option("--diversity", type=click.IntRange(0, EVAL_MAX_PROMPTS), default=0,
              help="Also measure two-seed diversity on this many prompts.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the scores as JSON too.")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="onnxruntime threads (0 = all cores).")
@click.option("--speed", is_flag=True, help="Also time model load and a 4-image grid (median of 5).")
@click.option("--renderer", is_flag=True, help="Score the procedural renderer instead of a model (calibration).")
@click.option("--condition-scale", type=FINITE_FLOAT, default=None)
@click.option("--top-k", type=click.IntRange(0, None), default=None)
@click.option("--temperature", type=FINITE_FLOAT, default=None)
def eval_shapes_cmd(model: Path | None, n: int, seed: int, sheet: Path, diversity: int, json_out: Path | None,
                    threads: int, speed: bool, renderer: bool, condition_scale: float | None, top_k: int | None,
                    temperature: float | None) -> None:
    """Score a model on shapes-world prompts by the spec's rules (per attribute, unseen pairs)."""
    from .evaluate import contact_sheet, evaluate, pipeline_generator, renderer_generator

    # where the results go is checked before the (possibly hours-long) evaluation, not after it
    _check_output(sheet, "--sheet", image=True)
    if json_out:
        _check_output(json_out, "--json")
    if renderer:
        generate, name = renderer_generator(64), "renderer"
    else:
        from ..pipeline import Pipeline

        bundle = model or SHAPES_BUNDLE
        pipe = Pipeline.load(bundle, threads=threads, provider="cpu")
        generate = pipeline_generator(pipe, condition_scale=condition_scale, top_k=top_k, temperature=temperature)
        name = f"{pipe.bundle.name} ({bundle}), sampling {pipe.sampling_params(condition_scale=condition_scale, top_k=top_k, temperature=temperature)}"
    timings = measure_speed(model or SHAPES_BUNDLE, threads) if speed and not renderer else None
    report = evaluate(generate, n=n, seed=seed, diversity_prompts=diversity, progress=True)
    click.echo(f"model: {name}")
    click.echo(report.format())
    if timings:
        click.echo(f"speed: load {timings['load_s']:.2f} s, 4-image grid {timings['grid4_s']:.3f} s "
                   f"(median of {timings['runs']}, after load)")
    if json_out:   # first: the scores matter more than the picture
        try:
            json_out.write_text(json.dumps({"model": name, "seed": seed, **report.as_dict(), "speed": timings},
                                           indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise InferenceError(f"cannot write --json {json_out} ({e.strerror or type(e).__name__})") from None
    try:
        click.echo(f"contact sheet: {contact_sheet(report, sheet)}")
    except OSError as e:
        raise InferenceError(f"cannot write --sheet {sheet} ({e.strerror or type(e).__name__})") from None


def measure_speed(bundle: Path, threads: int = 0, runs: int = 5) -> dict:
    """Model load time (fresh sessions, hashes verified) and one prompt's 4-image grid, median."""
    import statistics
    import time

    from ..pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, threads=threads, provider="cpu")
    load = time.perf_counter() - t0
    pipe.generate(["a red circle"], n_images=4, seeds=[0])          # warm-up
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        pipe.generate(["a yellow star above a green triangle on a black background"], n_images=4, seeds=[i])
        times.append(time.perf_counter() - t0)
    return {"load_s": load, "grid4_s": statistics.median(times), "grid4_all_s": times, "runs": runs}


def register(root: click.Group) -> None:
    """Add ``train shapes`` and ``eval shapes`` to the root ``dallebot`` group."""
    _group(root, "train", "Train models.").add_command(train_shapes_cmd)
    _group(root, "eval", "Evaluate models.").add_command(eval_shapes_cmd)
