"""Prompt normaliser, tokenizer rows and the sampler, without any model."""

from __future__ import annotations

import numpy as np
import pytest

from inference.sampling import SamplingParams, guide, image_uniforms, sample
from inference.text import HashtagSplitter, TextNormalizer
from inference.tokenizer import BartTokenizer


@pytest.mark.parametrize("raw, want", [
    ("A Cat in a hat!!!", " a cat in a hat"),
    ("Café crème at 1,000 km/h", " cafe creme at 1000 km, h"),
    ("it's 3.5 o'clock on 12/05", " it's 3.5 o \" clock on 12/05"),
    ("Tom &amp; Jerry <b>cartoon</b> http://x.y/z", " tom & jerry cartoon"),
    ("sooooo cute — a dog", " so cute, a dog"),
    ("[12] a well-known painting", " a well known painting"),
    ("Кошка на луне", " koshka na lune"),
    ("Ελληνικά γράμματα", " ellenika grammata"),
    ("a 🐱 on a mat", " a, cat face, on a mat"),
    ("一只猫", " "),
])
def test_normaliser(raw: str, want: str) -> None:
    assert TextNormalizer()(raw) == want


def test_hashtags_are_split_with_a_word_list() -> None:
    n = TextNormalizer(HashtagSplitter(["the", "cat", "in", "hat", "a"]))
    assert n("#CatInTheHat rocks") == " cat in the hat rocks"
    assert TextNormalizer()("#CatInTheHat") == " catinthehat"


def test_tokenizer_rows(tokenizer_dir) -> None:
    tok = BartTokenizer(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt", text_length=12)
    u = tok.unconditional()
    assert u.ids.tolist() == [0, 2] + [1] * 10 and u.mask.tolist() == [1, 1] + [0] * 10
    e = tok.encode(" a red circle")
    n = int(e.mask.sum())
    assert e.ids[0] == 0 and e.ids[n - 1] == 2 and (e.ids[n:] == 1).all() and e.truncated == 0
    long = tok.encode(" a red circle" * 10)
    assert long.truncated > 0 and long.mask.all() and long.ids[-1] == 2


def test_guidance_formula() -> None:
    logits = np.array([[1.0, 2.0, 3.0, 9.0], [2.0, 0.0, 5.0, 9.0]], np.float32)   # rows: uncond, cond
    np.testing.assert_allclose(guide(logits, 3, 2.0), [[3.0, -2.0, 7.0]])         # u + 2 (c - u), 3 codes
    np.testing.assert_allclose(guide(logits, 3, 1.0), [[2.0, 0.0, 5.0]])


def test_sampler_top_k_top_p_and_frequencies() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    u = np.random.default_rng(0).random(4000)
    freq = np.bincount(sample(logits, u, SamplingParams(top_k=0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert set(sample(logits, u, SamplingParams(top_k=2)).tolist()) == {0, 1}
    assert set(sample(logits, u, SamplingParams(top_k=0, top_p=0.75)).tolist()) == {0, 1}
    assert set(sample(logits, u, SamplingParams(top_k=1)).tolist()) == {0}
    hot = np.bincount(sample(logits, u, SamplingParams(top_k=0, temperature=100.0)), minlength=4) / 4000
    assert hot.min() > 0.2                                          # high temperature flattens


def test_uniform_streams_depend_on_seed_and_index_only() -> None:
    a = image_uniforms([5], 3, 10)
    b = image_uniforms([1, 5], 3, 10)
    np.testing.assert_array_equal(a, b[3:])
    assert not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("settings", [
    {"condition_scale": 10.0, "top_k": 50}, {"condition_scale": 1.0, "top_k": 1},
    {"condition_scale": 3.0, "top_k": 64, "temperature": 0.6}, {"condition_scale": 2.0, "top_k": 20, "top_p": 0.7},
])
def test_device_sampler_draws_what_the_numpy_sampler_draws(settings: dict) -> None:
    """inference.model.sampler (exported into --cache sample decoders) against guide + sample, on
    many rows, with fewer kept candidates (kmax) than codes."""
    import torch

    from inference.model.sampler import DeviceSampler

    rng = np.random.default_rng(9)
    b, vi, codes = 300, 1030, 1024                     # logits carry extra non-code columns, as Vi > num_codes
    logits = (rng.standard_normal((2 * b, vi)) * 3).astype(np.float32)
    u = rng.random(b)
    p = SamplingParams(**settings)
    want = sample(guide(logits, codes, p.condition_scale), u, p)
    got = DeviceSampler(codes, kmax=64)(
        torch.from_numpy(logits), torch.from_numpy(u), torch.tensor([p.condition_scale], dtype=torch.float32),
        torch.tensor([p.temperature], dtype=torch.float32), torch.tensor([p.top_k]),
        torch.tensor([p.top_p], dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(set(want.tolist())) > (1 if p.top_k == 1 else 20)


def test_person_replacement_is_a_function_of_the_prompt() -> None:
    """dalle-mini replaces ``<person>`` by a weighted random choice; here the draw is seeded from the
    text, so a prompt normalises the same way however many prompts came before it (the pipeline
    normalises every prompt twice per CLI request)."""
    prompt = "a <person> with a red circle"
    first = TextNormalizer()(prompt)
    n = TextNormalizer()
    for i in range(12):
        assert n(prompt) == first
        n(f"<person> number {i} next to a <person> on a <person> and <person>")   # other prompts between
    assert TextNormalizer()(prompt) == first
    assert n("<person> and <person> on a hill") == " people on a hill"
    # still dalle-mini's three replacements, different prompts drawing different ones
    drawn = {TextNormalizer()(f"<person> {i}").rsplit(" ", 1)[0].strip() for i in range(200)}
    assert drawn == {"a person", "someone", "somebody"}
