import numpy as np
import pytest

from inference.shapes.grammar import HELD_OUT, ObjectSpec, Scene, all_words, parse, sample_prompt


@pytest.mark.parametrize("prompt, scene", [
    ("a red circle", Scene("single", (ObjectSpec("red", "circle"),))),
    ("A picture of a small blue square on the left.",
     Scene("single", (ObjectSpec("blue", "square", "small"),), position="left")),
    ("a yellow star above a green triangle on a black background",
     Scene("pair", (ObjectSpec("yellow", "star"), ObjectSpec("green", "triangle")), relation="above",
           background="black")),
    ("three purple circles", Scene("count", (ObjectSpec("purple", "circle"),) * 3)),
    ("an image of two small orange triangles on a grey background",
     Scene("count", (ObjectSpec("orange", "triangle", "small"),) * 2, background="gray")),
    ("a drawing of a large green star in the centre on a white background",
     Scene("single", (ObjectSpec("green", "star", "big"),), position="center")),
    ("an orange square  to the right of a small red circle",
     Scene("pair", (ObjectSpec("orange", "square"), ObjectSpec("red", "circle", "small")),
           relation="right_of")),
])
def test_parse_examples(prompt, scene):
    assert parse(prompt) == scene


@pytest.mark.parametrize("prompt", [
    "a cat", "a red circle on the moon", "a big red circle above a blue square",
    "two big red circles", "red circle", "a red circle on a pink background", "",
])
def test_outside_the_grammar(prompt):
    assert parse(prompt) is None


def test_training_prompts_never_mention_held_out_pairs():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        scene = parse(sample_prompt(rng, "exclude"))
        assert scene is not None
        assert not scene.has_unseen_pair


def test_evaluation_prompts_cover_everything():
    rng = np.random.default_rng(2)
    scenes = [parse(sample_prompt(rng, "include")) for _ in range(3000)]
    assert all(s is not None for s in scenes)
    seen_pairs = {(o.colour, o.shape) for s in scenes for o in s.objects}
    assert HELD_OUT <= seen_pairs and len(seen_pairs) == 24
    assert {s.kind for s in scenes} == {"single", "pair", "count"}
    assert {s.background for s in scenes} == {"white", "black", "gray"}
    assert {s.position for s in scenes} >= {None, "left", "right", "top", "bottom", "center"}
    assert {s.relation for s in scenes} >= {"above", "below", "left_of", "right_of", "and"}
    assert {o.size for s in scenes for o in s.objects} == {"small", "default", "big"}


def test_only_mode_always_has_a_held_out_pair():
    rng = np.random.default_rng(3)
    assert all(parse(sample_prompt(rng, "only")).has_unseen_pair for _ in range(500))


def test_paraphrases_are_sampled():
    rng = np.random.default_rng(4)
    text = " ".join(sample_prompt(rng) for _ in range(3000))
    for phrase in ("a picture of", "an image of", "a drawing of", "in the centre", "in the center",
                   "grey", "gray", "large", "big", "an orange", "to the left of", "three"):
        assert phrase in text
    assert set(text.split()) <= set(all_words())
