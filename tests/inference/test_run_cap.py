"""``[model] max_images_per_run``: a claimed batch is generated in decoder runs of at most that many
images, with the same images (byte for byte) whatever the cap, and progress over the whole batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bot.config import ConfigError, ModelConfig, load_settings
from bot.generation import GenerationJob
from bot.model import PipelineGenerator, load_generator
from inference.errors import InferenceError, PromptError
from inference.images import png_bytes
from inference.pipeline import Pipeline

# job 0 spans runs with caps 3 (3 + 1) and 4 ... ; the empty prompt is refused on its own
JOBS = [GenerationJob("a red circle", 4, 7), GenerationJob("two green triangles", 2, 5),
        GenerationJob("   ", 2, 3), GenerationJob("a blue star", 5, 2**40), GenerationJob("a red circle", 1, 7)]


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.load(tiny_bundle, threads=1)


def _record_runs(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The decoder batch of every run the pipeline starts (images; the decoder sees twice as many rows)."""
    sizes: list[int] = []
    start = pipe.start

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        gen = start(*args, **kwargs)
        sizes.append(gen.codes.shape[0])
        return gen

    monkeypatch.setattr(pipe, "start", recording)
    return sizes


def _pngs(out: list) -> list:  # type: ignore[type-arg]
    return [x if isinstance(x, Exception) else [png_bytes(im) for im in x] for x in out]


def test_same_png_bytes_whatever_the_cap_and_runs_are_bounded(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _record_runs(pipe, monkeypatch)
    want = _pngs(PipelineGenerator(pipe).generate(JOBS))
    assert sizes == [12]                                     # no cap: one run of every good image
    assert [len(x) for x in want if not isinstance(x, Exception)] == [4, 2, 5, 1]
    assert isinstance(want[2], PromptError)
    for cap, runs in ((1, [1] * 12), (3, [3, 3, 3, 3]), (5, [5, 5, 2]), (12, [12]), (100, [12]), (0, [12])):
        sizes.clear()
        got = _pngs(PipelineGenerator(pipe, max_images_per_run=cap).generate(JOBS))
        assert sizes == runs, cap
        assert isinstance(got[2], PromptError)
        assert [g for i, g in enumerate(got) if i != 2] == [w for i, w in enumerate(want) if i != 2], cap
    # images within a job still differ (each its own stream, also across a run boundary)
    assert len(set(want[0])) == 4


def test_progress_covers_every_run(pipe: Pipeline) -> None:
    n = pipe.config.image_length
    calls: list[tuple[int, int]] = []
    codes = pipe.generate_codes(["a red circle", "a blue star"], [4, 3], [1, 2], max_images_per_run=3,
                                progress=lambda t, total: calls.append((t, total)))
    assert [c.shape for c in codes] == [(4, n), (3, n)]
    assert {total for _, total in calls} == {3 * n}
    assert [t for t, _ in calls] == list(range(1, 3 * n + 1))
    assert pipe.last_seeds == [1, 2]
    np.testing.assert_array_equal(np.concatenate(codes),
                                  np.concatenate(pipe.generate_codes(["a red circle", "a blue star"], [4, 3], [1, 2])))


def test_random_seeds_are_drawn_once_for_all_runs(pipe: Pipeline) -> None:
    codes = pipe.generate_codes(["a red circle"], 5, None, max_images_per_run=2)
    again = pipe.generate_codes(["a red circle"], 5, pipe.last_seeds)
    np.testing.assert_array_equal(codes[0], again[0])


def test_bad_cap_and_first_image_are_refused(pipe: Pipeline) -> None:
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(InferenceError, match="max_images_per_run"):
            pipe.generate_codes(["a red circle"], 2, [1], max_images_per_run=bad)  # type: ignore[arg-type]
    with pytest.raises(InferenceError, match="first_image"):
        pipe.start(["a red circle"], 1, [1], first_image=[-1])


def test_shipped_model_same_png_bytes_with_cap_1_3_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [GenerationJob("a red circle", 2, 11), GenerationJob("two blue squares", 3, 12),
            GenerationJob("a green triangle", 1, 13)]
    results = {}
    for cap in (0, 1, 3):
        gen = load_generator(ModelConfig(threads=1, max_images_per_run=cap))
        sizes = _record_runs(gen.pipeline, monkeypatch)  # type: ignore[attr-defined]
        results[cap] = _pngs(gen.generate(jobs))
        assert max(sizes) == (cap or 6) and sum(sizes) == 6
    assert [len(x) for x in results[0]] == [2, 3, 1]
    assert results[1] == results[0] and results[3] == results[0]


@pytest.mark.parametrize("value", ["-1", "1.5", "true", "\"all\"", "100000"])
def test_bad_config_value_names_the_key(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[model]\nmax_images_per_run = {value}\n")
    with pytest.raises(ConfigError, match=r"max_images_per_run"):
        load_settings(cfg, env={})


def test_config_default_caps_the_run_and_zero_means_none(tmp_path: Path) -> None:
    assert load_settings(None, env={}).model.max_images_per_run == 16
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nmax_images_per_run = 0\n")
    assert load_settings(cfg, env={}).model.max_images_per_run == 0
    cfg.write_text("[model]\nmax_images_per_run = 4\n")
    assert load_settings(cfg, env={}).model.max_images_per_run == 4


@pytest.mark.parametrize("cache", ["present", "sample"])
def test_gpu_style_bundles_same_codes_whatever_the_cap(tiny_parts, tokenizer_dir: Path, tmp_path: Path, pipe: Pipeline,
                                                       cache: str) -> None:
    """The device loops (ping-pong caches; device sampling with buffers kept per batch size) split
    the same way: each run's images are those of the one-run batch."""
    from inference.export import export_bundle

    export_bundle(tiny_parts, tokenizer_dir, tmp_path / cache, name=f"tiny-{cache}", cache=cache, progress=False)
    dev = Pipeline.load(tmp_path / cache, threads=1)
    dev.cuda_graph = cache == "sample"      # the CPU provider ignores graph ids: exercises the kept buffers
    prompts, counts, seeds = ["a red circle", "hello world", "a blue star"], [3, 4, 2], [4, 5, 6]
    want = pipe.generate_codes(prompts, counts, seeds)
    for cap in (1, 2, 4, 0):
        got = dev.generate_codes(prompts, counts, seeds, max_images_per_run=cap)
        for x, y in zip(want, got, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"cap {cap}")
