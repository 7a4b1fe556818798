"""The whole shapes-model recipe: data -> VQ -> codes -> transformer -> base bundle -> refine
(:mod:`inference.training.refine`) -> bundle -> tuned defaults -> eval.

``dallebot train shapes --out DIR`` calls :func:`train_shapes`. Every stage resumes: finished stages
(``DIR/vq/final.pt``, ``DIR/transformer/final.pt``) are loaded, unfinished ones continue from their
``ckpt.pt``. ``python -m inference.training.pipeline`` runs the training stages with torch and numpy
only (no click, tokenizers, onnx or Pillow needed), for bare GPU machines; export and tuning then
run wherever the ``train`` extra is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import pick_device
from .data import SceneDataset, build_dataset, load_dataset, save_dataset
from .text import load_tokenizer
from .transformer import TransformerTrainConfig, make_token_data, shapes_model_config, train_transformer
from ..config import VQGANConfig
from .refine import RefineConfig
from .vq import SHAPES_VQGAN, ShapesVQ, VQTrainConfig, encode_images, train_vq

_log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"     # committed; re-made by train_tokenizer (tested)
BUNDLE_NAME = "shapes-v2"        # refined (stage 3); the stage-2 bundle before it is "shapes-v2-base"
TEXT_VOCAB_ROWS = 512


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    scenes: int = 60000
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)
    transformer: TransformerTrainConfig = field(default_factory=TransformerTrainConfig)
    vqgan: dict[str, Any] = field(default_factory=SHAPES_VQGAN.to_dict)   # VQGANConfig fields
    refine: RefineConfig | None = field(default_factory=RefineConfig)       # None: ship the base bundle

    @property
    def vqgan_config(self) -> VQGANConfig:
        return VQGANConfig.from_dict(self.vqgan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dataset(work: Path, recipe: Recipe, cache: bool) -> SceneDataset:
    path = work / f"scenes-{recipe.scenes}-seed{recipe.seed}.npz"
    if path.is_file():
        return load_dataset(path)
    t0 = time.perf_counter()
    ds = build_dataset(recipe.scenes, recipe.vqgan_config.resolution, recipe.seed)
    _log.info("rendered %d scenes in %.0f s", len(ds), time.perf_counter() - t0)
    if cache:
        save_dataset(ds, path)
    return ds


def _codes(work: Path, vq: ShapesVQ, vq_dir: Path, ds: SceneDataset, device: torch.device) -> np.ndarray:
    path = work / "codes.npy"
    final = vq_dir / "final.pt"
    if path.is_file() and final.is_file() and path.stat().st_mtime > final.stat().st_mtime:
        codes = np.load(path)
        if len(codes) == len(ds):
            return codes
    t0 = time.perf_counter()
    codes = encode_images(vq, ds.images, device)
    _log.info("encoded %d scenes in %.0f s", len(ds), time.perf_counter() - t0)
    np.save(path, codes)
    return codes


def train_models(out: Path, recipe: Recipe = Recipe(), *, device: str = "auto", work: Path | None = None,
                 cache_data: bool = True, vq_budget_s: float | None = None, tf_budget_s: float | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Stages 1-2 (torch + numpy only). Returns a summary (also written to OUT/training.json)."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out.mkdir(parents=True, exist_ok=True)
    done = [out / "vq" / "final.pt", out / "transformer" / "final.pt", out / "training.json"]
    if all(p.is_file() for p in done):
        _log.info("both stages are finished in %s: nothing to train", out)
        return json.loads(done[2].read_text(encoding="utf-8"))
    work = work or out
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = _dataset(work, recipe, cache_data)
    t_data = time.perf_counter() - t0
    vq = train_vq(out / "vq", ds, recipe.vq, recipe.vqgan_config, device=dev, progress=progress,
                  budget_s=vq_budget_s)
    codes = _codes(work, vq, out / "vq", ds, dev)
    tok = load_tokenizer(TOKENIZER_DIR, shapes_model_config().text_length)
    data = make_token_data(tok, ds.prompts, codes)
    model_cfg = shapes_model_config(TEXT_VOCAB_ROWS, vq.cfg.n_embed, vq.cfg.token_grid)
    train_transformer(out / "transformer", data, tok, vq.vqgan, recipe.transformer, model_cfg, device=dev,
                      progress=progress, budget_s=tf_budget_s)
    vq_final = torch.load(out / "vq" / "final.pt", map_location="cpu", weights_only=False)
    tf_final = torch.load(out / "transformer" / "final.pt", map_location="cpu", weights_only=False)
    summary = {
        "recipe": {**recipe.to_dict(), "vqgan": vq_final["vqgan_config"],
                   "vq": vq_final.get("config") or recipe.to_dict()["vq"]}, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "data_seconds": t_data, "scenes": len(ds),
        "vq_steps": vq_final["steps"], "vq_seconds": vq_final["train_seconds"], "vq_recon": vq_final["recon"],
        "transformer_steps": tf_final["steps"], "transformer_seconds": tf_final["train_seconds"],
        "transformer_final_loss": tf_final["final_loss"],
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


DESCRIPTION = ("The project's own shapes-world model (64 px, 8x8 codes), trained from scratch by "
               "`dallebot train shapes`.")
WORLD = "shapes world (docs/model-card.md); held out: purple triangle, orange star, green square"


def _training_provenance(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "training": {k: summary.get(k) for k in ("device_name", "scenes", "vq_steps", "vq_seconds",
                                                  "transformer_steps", "transformer_seconds",
                                                  "transformer_final_loss")},
        "vq_reconstruction_fully_correct": (summary.get("vq_recon") or {}).get("recon_fully_correct"),
        "recipe": summary.get("recipe"),
    }


def export_parts(parts: Any, bundle_dir: Path, *, name: str, sampling: Any, provenance: dict[str, Any] | None = None,
                 dtype: str = "float32", progress: bool = True):
    """Every shapes bundle (base, refine rounds, refined) is written by this one call."""
    from ..export import export_bundle

    return export_bundle(parts.eval(), TOKENIZER_DIR, bundle_dir, name=name, dtype=dtype, sampling=sampling,
                         provenance=provenance, license="Apache-2.0", overwrite=True, progress=progress,
                         description=DESCRIPTION)


def export(out: Path, bundle_dir: Path, summary: dict[str, Any] | None = None, progress: bool = True,
           dtype: str = "float32", name: str = BUNDLE_NAME + "-base"):
    """Export the stage 1-2 parts with the engine's exporter (needs the ``train`` extra)."""
    from ..bundle import SamplingDefaults
    from ..export import ModelParts
    from .transformer import load_transformer
    from .vq import load_vq

    vq = load_vq(out / "vq")
    encoder, decoder = load_transformer(out / "transformer")
    summary = summary or json.loads((out / "training.json").read_text(encoding="utf-8"))
    provenance = {"trained_by": "dallebot train shapes (inference/training)", "world": WORLD,
                  **_training_provenance(summary)}
    return export_parts(ModelParts(encoder, decoder, vq.vqgan), bundle_dir, name=name, dtype=dtype,
                        sampling=SamplingDefaults(condition_scale=1.5, top_k=8, temperature=0.6),
                        provenance=provenance, progress=progress)


def export_refined(out: Path, bundle_dir: Path, base_bundle: Path, refined: dict[str, Any], progress: bool = True,
                   dtype: str = "float32", base_parts: Any = None):
    """Export the refined transformer with the base bundle's VQGAN; provenance names both stages.
    ``base_parts``: the base bundle already read back by :func:`load_parts` (else it is read here)."""
    import copy

    from ..bundle import Bundle
    from ..export import ModelParts
    from .from_bundle import load_parts
    from .transformer import load_transformer

    base = Bundle.open(base_bundle, verify=False)
    vqgan = (base_parts or load_parts(base_bundle, check=False)).vqgan
    if refined.get("vqgan"):        # stage 4b fine-tuned the VQGAN decoder
        vqgan = copy.deepcopy(vqgan)
        vqgan.load_state_dict(torch.load(refined["vqgan"], map_location="cpu", weights_only=False)["model"])
    encoder, decoder = load_transformer(Path(refined.get("transformer_dir") or out / "refine" / "transformer"))
    base_prov = base.manifest.get("provenance", {})
    provenance = {
        "trained_by": "dallebot train shapes (inference/training): stages 1-2, then refine (stage 3)",
        "world": WORLD,
        **{k: base_prov.get(k) for k in ("training", "vq_reconstruction_fully_correct", "recipe")},
        "refine": {k: refined.get(k) for k in ("base", "config", "device", "transformer_steps",
                                               "transformer_seconds", "transformer_final_loss", "wall_seconds")}
        | {"code_encoder_recon_fully_correct": (refined.get("recon") or {}).get("fully_correct")},
    }
    return export_parts(ModelParts(encoder, decoder, vqgan.cpu()), bundle_dir, name=BUNDLE_NAME, dtype=dtype,
                        sampling=base.sampling, provenance=provenance, progress=progress)


def set_sampling_defaults(bundle_dir: Path, sampling: dict[str, Any], tuning: dict[str, Any] | None = None) -> None:
    """Rewrite the manifest's sampling defaults (the manifest hashes the other files, not itself)."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["sampling"] = dict(sampling)
    if tuning is not None:
        manifest.setdefault("provenance", {})["sampling_tuning"] = tuning
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# Guidance above ~2.5 hurt every setting tried on shapes-v1 (condition scale 3: 26-31% fully correct,
# 5: 6-8%, 8: 0%, on 100 prompts); the useful region is 1-2.5 with a short top-k and a cooler softmax.
SWEEP_GRID = [dict(condition_scale=s, top_k=k, temperature=t)
              for s in (1.0, 1.5, 2.0, 2.5) for k in (2, 4, 8, 16) for t in (0.6, 0.8, 1.0)]


def tune_sampling(bundle_dir: Path, n: int = 300, seed: int = 1000, grid: list[dict[str, Any]] | None = None,
                  diversity_prompts: int = 40, min_diversity: float = 0.93, threads: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """Pick the manifest's sampling defaults by measurement: the best fully-correct rate on ``n``
    sweep prompts (a seed apart from the reported evaluation's) among settings whose two seeds give
    visibly different images for at least ``min_diversity`` of the prompts."""
    from ..pipeline import Pipeline
    from ..shapes.evaluate import evaluate, pipeline_generator
    from .common import progress_bar

    pipe = Pipeline.load(bundle_dir, threads=threads, provider="cpu")
    rows = []
    for setting in progress_bar(grid or SWEEP_GRID, desc="sampling sweep", disable=not progress):
        report = evaluate(pipeline_generator(pipe, **setting), n=n, seed=seed, batch=25)
        rows.append({**setting, "fully_correct": report.fully_correct,
                     "unseen": report.unseen_fully_correct, "diversity": None})
        _log.info("sweep %s: %.1f%%", setting, 100 * report.fully_correct)
    rows.sort(key=lambda r: -r["fully_correct"])
    chosen = None
    for r in rows:
        setting = {k: r[k] for k in ("condition_scale", "top_k", "temperature")}
        report = evaluate(pipeline_generator(pipe, **setting), n=diversity_prompts, seed=seed + 1, batch=25,
                          diversity_prompts=diversity_prompts)
        r["diversity"] = report.diversity
        if report.diversity >= min_diversity:
            chosen = r
            break
    chosen = chosen or rows[0]
    sampling = {"condition_scale": chosen["condition_scale"], "top_k": chosen["top_k"], "top_p": 1.0,
                "temperature": chosen["temperature"]}
    tuning = {"sweep_prompts": n, "sweep_seed": seed, "min_diversity": min_diversity, "results": rows}
    set_sampling_defaults(bundle_dir, sampling, tuning)
    return {"chosen": sampling, **tuning}


def train_shapes(out: Path, recipe: Recipe = Recipe(), *, device: str = "auto", tune: bool = True,
                 bundle_dir: Path | None = None, progress: bool = True, dtype: str = "float32",
                 refine_from: Path | None = None, **train_kw: Any) -> dict[str, Any]:
    """Everything ``dallebot train shapes`` does; writes OUT/bundle and OUT/report.json.

    ``refine_from``: skip stages 1-2 and refine this (float32) bundle instead (how shapes-v2 was
    made from shapes-v1, whose training checkpoints were not kept)."""
    from .refine import refine

    bundle_dir = bundle_dir or out / "bundle"
    result: dict[str, Any] = {"bundle": str(bundle_dir)}
    base_bundle: Path | None = None
    if refine_from is None:
        summary = train_models(out, recipe, device=device, progress=progress, **train_kw)
        result["training"] = summary
        if recipe.refine is None:
            export(out, bundle_dir, summary, progress=progress, dtype=dtype)
        else:
            base_bundle = out / "base-bundle"
            export(out, base_bundle, summary, progress=progress)      # float32: refine reads it back
    elif recipe.refine is None:
        raise ValueError("refine_from needs a refine recipe")
    else:
        base_bundle = Path(refine_from)
    if base_bundle is not None and recipe.refine is not None:
        from .from_bundle import load_parts

        parts = load_parts(base_bundle)
        refined = refine(out, parts, base_bundle, recipe.refine, device=device, progress=progress)
        result["refine"] = refined
        export_refined(out, bundle_dir, base_bundle, refined, progress=progress, dtype=dtype, base_parts=parts)
    if tune:
        result["sampling"] = tune_sampling(bundle_dir, progress=progress)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


PACKED = ("vq.pt", "transformer.pt", "training.json", "vq_history.jsonl", "transformer_history.jsonl",
          "recon_sheet.png", "sample_sheet.png")


def pack(out: Path, dest: Path) -> list[str]:
    """Flatten a finished training folder into at most 7 files (plus the caller's log) for a
    machine that returns few, small files: the transformer's weights travel as float16 (11 MB)."""
    dest.mkdir(parents=True, exist_ok=True)
    vq = torch.load(out / "vq" / "final.pt", map_location="cpu", weights_only=False)
    torch.save(vq, dest / "vq.pt")
    tf = torch.load(out / "transformer" / "final.pt", map_location="cpu", weights_only=False)
    for part in ("encoder", "decoder"):
        tf[part] = {k: (v.half() if v.is_floating_point() else v) for k, v in tf[part].items()}
    tf["packed_float16"] = True
    torch.save(tf, dest / "transformer.pt")
    copies = {"training.json": out / "training.json", "vq_history.jsonl": out / "vq" / "history.jsonl",
              "transformer_history.jsonl": out / "transformer" / "history.jsonl",
              "recon_sheet.png": out / "vq" / "recon_sheet.png",
              "sample_sheet.png": out / "transformer" / "sample_sheet.png"}
    for name, src in copies.items():
        if src.is_file():
            shutil.copyfile(src, dest / name)
    return sorted(f.name for f in dest.iterdir())


def unpack(packed: Path, out: Path) -> None:
    """The reverse of :func:`pack`: OUT/vq/final.pt, OUT/transformer/final.pt (float32 again), so
    that ``dallebot train shapes --out OUT`` skips training and goes on to export and tuning."""
    (out / "vq").mkdir(parents=True, exist_ok=True)
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(packed / "vq.pt", out / "vq" / "final.pt")
    tf = torch.load(packed / "transformer.pt", map_location="cpu", weights_only=False)
    for part in ("encoder", "decoder"):
        tf[part] = {k: (v.float() if v.is_floating_point() else v) for k, v in tf[part].items()}
    torch.save(tf, out / "transformer" / "final.pt")
    for name, dst in {"training.json": out / "training.json", "vq_history.jsonl": out / "vq" / "history.jsonl",
                      "transformer_history.jsonl": out / "transformer" / "history.jsonl",
                      "recon_sheet.png": out / "vq" / "recon_sheet.png",
                      "sample_sheet.png": out / "transformer" / "sample_sheet.png"}.items():
        if (packed / name).is_file():
            shutil.copyfile(packed / name, dst)


def _recipe_from_args(a: argparse.Namespace) -> Recipe:
    r = Recipe(seed=a.seed, scenes=a.scenes)
    vq = replace(r.vq, seed=a.seed, **{k: v for k, v in (("steps", a.vq_steps), ("batch", a.vq_batch),
                                                        ("lr", a.vq_lr),
                                                        ("ae_warmup", getattr(a, "vq_ae_warmup", None)))
                                       if v is not None})
    tf = replace(r.transformer, seed=a.seed, **{k: v for k, v in (("steps", a.steps), ("batch", a.batch),
                                                                 ("lr", a.lr)) if v is not None})
    vqgan = dict(r.vqgan)
    for key in ("ch", "norm_groups"):
        if getattr(a, f"vq_{key}", None) is not None:
            vqgan[key] = getattr(a, f"vq_{key}")
    if getattr(a, "vq_ch_mult", None):
        vqgan["ch_mult"] = [int(x) for x in a.vq_ch_mult.split(",")]
    refine = None
    if getattr(a, "refine", True):
        base = RefineConfig()
        refine = replace(base, seed=a.seed, scenes=getattr(a, "refine_scenes", None) or base.scenes,
                         transformer=replace(base.transformer, seed=a.seed,
                                             steps=getattr(a, "refine_steps", None) or base.transformer.steps),
                         best_of=replace(base.best_of, seed=a.seed))
    return replace(r, vq=vq, transformer=tf, vqgan=vqgan, refine=refine)


MAX_SEED = 2**63 - 1     # as `dallebot generate` and `train shapes`: numpy and torch both take it


def _seed_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not in the range 0<=x<={MAX_SEED}")
    return value


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_seed_arg, default=0)
    p.add_argument("--scenes", type=int, default=Recipe.scenes, help="rendered training scenes")
    p.add_argument("--vq-steps", type=int)
    p.add_argument("--vq-batch", type=int)
    p.add_argument("--vq-lr", type=float)
    p.add_argument("--vq-ae-warmup", type=int, help="VQ steps as a plain autoencoder before quantising")
    p.add_argument("--vq-ch", type=int, help="VQGAN base channels")
    p.add_argument("--vq-ch-mult", help="VQGAN channel multipliers, e.g. 1,2,4,6")
    p.add_argument("--vq-norm-groups", type=int, help="VQGAN GroupNorm groups")
    p.add_argument("--steps", type=int, help="transformer steps")
    p.add_argument("--batch", type=int, help="transformer batch")
    p.add_argument("--lr", type=float, help="transformer peak learning rate")


def main(argv: list[str] | None = None) -> None:
    """Training stages only (torch + numpy), e.g. on a bare GPU machine."""
    p = argparse.ArgumentParser(prog="python -m inference.training.pipeline", description=main.__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, help="big intermediates (scene cache, codes); default OUT")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="do not save the rendered scenes")
    p.add_argument("--vq-budget", type=float, help="seconds for the VQ stage (fewer steps if slower)")
    p.add_argument("--tf-budget", type=float, help="seconds for the transformer stage")
    p.add_argument("--stage", choices=["all", "data", "vq"], default="all",
                   help="data: only render and cache the scenes in WORK; vq: stop after the VQ")
    p.add_argument("--pack", type=Path, help="afterwards, flatten the results into this folder (see pack())")
    p.add_argument("--unpack", type=Path, help="only restore a packed folder into OUT, then exit")
    add_recipe_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.unpack:
        unpack(a.unpack, a.out)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    recipe = _recipe_from_args(a)
    if a.stage != "all":
        work = a.work or a.out
        ds = _dataset(work, recipe, cache=True)
        if a.stage == "vq":
            dev = pick_device(a.device)
            torch.backends.cudnn.benchmark = dev.type == "cuda"
            train_vq(a.out / "vq", ds, recipe.vq, recipe.vqgan_config, device=dev, budget_s=a.vq_budget)
        return
    summary = train_models(a.out, recipe, device=a.device, work=a.work, cache_data=not a.no_cache,
                           vq_budget_s=a.vq_budget, tf_budget_s=a.tf_budget, progress=True)
    print(json.dumps(summary, indent=2))
    if a.pack:
        print("packed:", pack(a.out, a.pack))


if __name__ == "__main__":
    main()
