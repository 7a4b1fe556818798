"""Write docs/model-card.md from a training folder, the shipped bundle and an evaluation JSON.

    dallebot eval shapes --n 300 --seed 0 --diversity 100 --speed \\
        --json DIR/eval.json --sheet docs/shapes-contact-sheet.png
    python -m inference.training.card --train DIR --eval DIR/eval.json --out docs/model-card.md

Every number in the card comes from those files, so the card cannot drift from the measurements.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ..shipped import SHAPES_BUNDLE

ATTR_TARGETS = {"fully correct": 0.85, "colour": 0.97, "shape": 0.93, "count": 0.93, "position": 0.90,
                "relation": 0.85, "background": 0.98, "unseen pairs": 0.70, "diversity": 0.90}


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _mark(value: float | None, target: float) -> str:
    if value is None or value != value:
        return "n/a"
    return "met" if value >= target else "**not met**"


def _params(bundle: dict[str, Any]) -> str:
    m = bundle["model"]
    return (f"width {m['d_model']}, {m['encoder_layers']} encoder + {m['decoder_layers']} decoder layers, "
            f"{m['decoder_heads']} heads, GLU {m['decoder_ffn_dim']}, text length {m['text_length']}, "
            f"{m['image_grid']}x{m['image_grid']} image tokens, {m['num_codes']} codes")


def render_card(train_dir: Path, eval_json: dict[str, Any], bundle_dir: Path, sheet: str,
                loss_pngs: dict[str, str]) -> str:
    training = json.loads((train_dir / "training.json").read_text(encoding="utf-8"))
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    recipe = training["recipe"]
    vq_recon = training.get("vq_recon") or {}
    attrs = eval_json["attributes"]
    size_mb = sum(p.stat().st_size for p in bundle_dir.iterdir() if p.is_file()) / 1e6
    tuning = manifest.get("provenance", {}).get("sampling_tuning", {})
    speed = eval_json.get("speed") or {}
    rows = [("fully correct", eval_json["fully_correct"]), *[(k, attrs.get(k)) for k in
            ("colour", "shape", "count", "position", "relation", "background")],
            ("unseen pairs", eval_json["unseen_pairs_fully_correct"]), ("diversity", eval_json.get("diversity"))]
    lines = [
        f"# Model card: {manifest['name']}, the embedded default model",
        "",
        "The model a fresh install uses when the configuration names none (`inference/shipped/shapes/`, "
        f"{size_mb:.1f} MB). It is a small DALL·E Mini: the same DalleBart text encoder, image-token decoder "
        "with super-conditioning and VQGAN decoder as the big checkpoints (`inference/model/`), exported "
        "with the same exporter and run by the same onnxruntime pipeline, trained from scratch by this "
        "repository's own code on the *shapes world* (flat coloured shapes on a plain background; grammar, "
        "looks and scoring in the project's shapes-world spec, implemented in `inference/shapes/`).",
        "",
        "## Model",
        f"- Transformer: {_params(manifest)}; sampling masked to the real codes.",
        f"- VQGAN: {manifest['vqgan']['resolution']} px images, f{manifest['vqgan']['resolution'] // manifest['image']['token_grid']} "
        f"-> {manifest['image']['token_grid']}x{manifest['image']['token_grid']} codes, codebook "
        f"{manifest['vqgan']['n_embed']} x {manifest['vqgan']['embed_dim']} (EMA-trained, initialised from encoder "
        "outputs, dead codes re-seeded); channels "
        f"{manifest['vqgan']['ch']} x {manifest['vqgan']['ch_mult']}. The encoder used for training is not shipped.",
        "- Text: byte-level BPE trained on the grammar (`inference/training/tokenizer/`, every grammar word one "
        "piece), dalle-mini's normaliser, unconditional row `<s></s>`.",
        f"- Sampling defaults (manifest, chosen by measurement, below): {json.dumps(manifest['sampling'])}.",
        "",
        "## Data",
        f"- {training['scenes']:,} scenes rendered by `inference/shapes/render.py` (seed {recipe['seed']}) from "
        "prompts sampled from the grammar with every paraphrase (prefixes, big/large, center/centre, "
        "gray/grey, stated or implied white background), 64x64, exact reference colours.",
        "- Held out of all training data, in every role: **purple triangle, orange star, green square** "
        "(the renderer's training sampler never emits them; tested). They are scored separately below.",
        "",
        "## Training",
        f"- Device: {training.get('device_name')} ({training.get('device')}).",
        f"- VQGAN: {training['vq_steps']} steps at batch {recipe['vq']['batch']}, "
        f"{training['vq_seconds'] / 60:.1f} min. Loss: pixel MSE + L1, object pixels weighted x"
        f"{1 + recipe['vq']['object_weight']:.0f}, L1 on pixel differences (edges) x{recipe['vq']['edge_weight']}.",
        f"- **VQ reconstruction score** (encode + decode {200} fresh scenes incl. held-out pairs, scored by the "
        f"spec): fully correct {_pct(vq_recon.get('recon_fully_correct'))}, unseen pairs "
        f"{_pct(vq_recon.get('recon_unseen'))}; "
        + ", ".join(f"{k} {_pct(v)}" for k, v in (vq_recon.get("recon_attributes") or {}).items())
        + ". This caps what the transformer can reach.",
        f"- Transformer: {training['transformer_steps']} steps at batch {recipe['transformer']['batch']}, "
        f"{training['transformer_seconds'] / 60:.1f} min, final token loss "
        f"{training['transformer_final_loss']:.3f} nats; {100 * recipe['transformer']['cond_drop']:.0f}% of "
        "captions dropped to the unconditional row (classifier-free guidance).",
        *[f"- Loss curve ({k}): ![{k} loss]({v})" for k, v in loss_pngs.items()],
        "",
        "## Results",
        f"`dallebot eval shapes --n {eval_json['prompts']} --seed {eval_json.get('seed', 0)}` with the shipped "
        "bundle and its default sampling settings, prompts sampled from the grammar (held-out pairs included):",
        "",
        "| measure | score | target | |",
        "|---|---|---|---|",
        *[f"| {k} | {_pct(v)} | {_pct(ATTR_TARGETS[k])} | {_mark(v, ATTR_TARGETS[k])} |" for k, v in rows],
        f"| size (checked always; not a target) | {_pct(attrs.get('size'))} | | |",
        "",
        "By scene kind (fully correct): " + ", ".join(f"{k} {_pct(v)}" for k, v in eval_json["by_kind"].items())
        + f". Seen pairs only: {_pct(eval_json['seen_pairs_fully_correct'])} "
        f"({eval_json['prompts'] - eval_json['unseen_pair_prompts']} prompts); unseen: "
        f"{eval_json['unseen_pair_prompts']} prompts.",
        "",
    ]
    if speed:
        lines += [f"Speed on this 2-core machine (onnxruntime CPU, shared with other work while measured): model "
                  f"load {speed['load_s']:.2f} s (target < 2 s), one prompt's 4-image grid "
                  f"{speed['grid4_s']:.3f} s median of {speed['runs']} (target < 0.5 s).", ""]
    if tuning.get("results"):
        lines += [f"Sampling settings were chosen on {tuning['sweep_prompts']} other prompts (seed "
                  f"{tuning['sweep_seed']}): best fully-correct rate among settings whose two seeds differ "
                  f"visibly for at least {_pct(tuning['min_diversity'])} of prompts.", "",
                  "| condition scale | top-k | temperature | fully correct | unseen | diversity |",
                  "|---|---|---|---|---|---|",
                  *[f"| {r['condition_scale']} | {r['top_k']} | {r['temperature']} | {_pct(r['fully_correct'])} | "
                    f"{_pct(r['unseen'])} | {_pct(r['diversity'])} |" for r in tuning["results"]], ""]
    lines += [f"Contact sheet (first 64 prompts; failed attributes in red): ![contact sheet]({sheet})", ""]
    if eval_json.get("failures"):
        lines += ["## Known failure modes", "",
                  "The most frequent sets of failed attributes in the evaluation above (share of all prompts, "
                  "examples):", ""]
        for f in eval_json["failures"]:
            lines.append(f"- {', '.join(f['failed'])}: {_pct(f['share'])}, e.g. "
                         + "; ".join(f"`{e}`" for e in f["examples"]))
        lines += ["- Prompts outside the grammar still produce an image (the model does its best), but "
                  "nothing outside the shapes world was ever seen: expect shapes, not cats.", ""]
    lines += [
        "## Reproduce",
        "",
        "```",
        "pip install -e '.[train]'",
        "dallebot train shapes --out DIR " + " ".join(
            f"--{k} {v}" for k, v in (("seed", recipe["seed"]), ("scenes", recipe["scenes"]),
                                      ("vq-steps", training["vq_steps"]), ("vq-batch", recipe["vq"]["batch"]),
                                      ("vq-lr", recipe["vq"]["lr"]),
                                      ("vq-ae-warmup", recipe["vq"].get("ae_warmup", 0)),
                                      ("steps", training["transformer_steps"]),
                                      ("batch", recipe["transformer"]["batch"]),
                                      ("lr", recipe["transformer"]["lr"]),
                                      *((("vq-ch", recipe["vqgan"]["ch"]),
                                         ("vq-ch-mult", ",".join(map(str, recipe["vqgan"]["ch_mult"]))),
                                         ("vq-norm-groups", recipe["vqgan"]["norm_groups"]))
                                        if "vqgan" in recipe else ()))),
        "dallebot eval shapes --model DIR/bundle --n 300 --seed 0 --diversity 100 --speed --json DIR/eval.json",
        "```",
        "",
        "Training resumes where it stopped (same command); each stage writes `ckpt.pt`, `history.jsonl`, "
        "`loss.png` and a contact sheet under `DIR/vq/` and `DIR/transformer/`. On a machine with a GPU, "
        "`scripts/gpu_train_shapes.sh` runs the same recipe with time budgets (about 7 minutes on one "
        "H200) and packs the weights; `python -m inference.training.pipeline --unpack` and `dallebot train "
        "shapes --out DIR` then export and tune on any machine. On this project's 2-core CPU machines the "
        "recipe is slow (a VQ step at batch 32 takes 0.4-2.6 s and a transformer step at batch 64 "
        "0.7-4 s, depending on what else runs), i.e. several hours for the full recipe.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inference.training.card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="the `dallebot train shapes --out` folder")
    p.add_argument("--eval", type=Path, required=True, help="JSON from `dallebot eval shapes --json`")
    p.add_argument("--bundle", type=Path, default=SHAPES_BUNDLE)
    p.add_argument("--sheet", default="shapes-contact-sheet.png", help="contact sheet path relative to the card")
    p.add_argument("--out", type=Path, default=Path("docs/model-card.md"))
    p.add_argument("--extra", type=Path, help="markdown appended verbatim (reproduction, failure modes)")
    a = p.parse_args(argv)
    pngs = {}
    for stage, name in (("vq", "shapes-loss-vq.png"), ("transformer", "shapes-loss-transformer.png")):
        src = a.train / stage / "loss.png"
        if src.is_file():
            shutil.copyfile(src, a.out.parent / name)
            pngs[stage] = name
    text = render_card(a.train, json.loads(a.eval.read_text(encoding="utf-8")), a.bundle, a.sheet, pngs)
    if a.extra:
        text += "\n" + a.extra.read_text(encoding="utf-8")
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
