import numpy as np
import pytest

from inference.shapes.evaluate import contact_sheet, evaluate, renderer_generator
from inference.shapes.grammar import parse
from inference.shapes.render import Placed, paint
from inference.shapes.score import analyse, score


@pytest.mark.parametrize("n, jitter", [(64, 0), (64, 15), (128, 15)])
def test_scorer_is_near_perfect_on_the_renderers_images(n, jitter):
    report = evaluate(renderer_generator(n, jitter), n=150, seed=n + jitter)
    assert report.fully_correct >= 0.99
    assert report.unseen and report.unseen_fully_correct >= 0.99
    for attr, (acc, count) in report.accuracy().items():
        assert count > 0 and acc >= 0.99, attr


def test_scorer_survives_blur():
    """A smoothed (VQ-like) rendering keeps its score: a 3x3 box blur on a 64x64 canvas."""
    from PIL import Image, ImageFilter

    gen = renderer_generator(64)

    def blurred(prompts, seed):
        return [np.asarray(Image.fromarray(im).filter(ImageFilter.BoxBlur(1))) for im in gen(prompts, seed)]

    assert evaluate(blurred, n=100, seed=3).fully_correct >= 0.9


def _draw(objs, background="white", n=64):
    return paint([Placed(parse(f"a {c} {s}").objects[0], x, y, side) for c, s, x, y, side in objs],
                 background, n)


def test_each_attribute_can_fail():
    img = _draw([("red", "circle", 4, 20, 20)])
    assert score("a red circle on the left", img).correct
    checks = score("a blue square on the right on a black background", img).checks
    assert not any(checks[k] for k in ("colour", "shape", "position", "background"))
    assert checks["count"] and checks["size"]
    assert not score("a big red circle", img).checks["size"]
    assert not score("two red circles", img).checks["count"]

    pair = _draw([("red", "circle", 4, 4, 16), ("blue", "star", 40, 40, 16)], "gray")
    assert score("a small red circle above a small blue star on a grey background", pair).correct
    assert score("a small blue star to the right of a small red circle on a gray background", pair).correct
    rel = score("a small red circle below a small blue star on a gray background", pair).checks
    assert rel == {**rel, "relation": False, "colour": True, "shape": True, "background": True}


def test_specks_below_threshold_are_ignored_and_blobs_are_counted():
    img = _draw([("green", "triangle", 20, 20, 22)])
    img[1:5, 1:5] = (40, 80, 220)          # 16 px < 0.8% of 4096
    assert len(analyse(img).objects) == 1
    img[50:58, 50:58] = (40, 80, 220)      # 64 px: an extra object
    assert not score("a green triangle", img).checks["count"]


def test_empty_canvas_fails_everything_but_background():
    img = np.full((64, 64, 3), 255, np.uint8)
    checks = score("a red circle at the top", img).checks
    assert checks["background"] and not any(v for k, v in checks.items() if k != "background")


def test_contact_sheet(tmp_path):
    report = evaluate(renderer_generator(64), n=20, seed=1, diversity_prompts=10)
    assert report.diversity == 1.0
    path = contact_sheet(report, tmp_path / "sheet.png", cols=5)
    from PIL import Image
    with Image.open(path) as im:
        assert im.size[0] == 5 * 128 and im.size[1] >= 4 * 128
    text = report.format()
    assert "fully correct: 100.0%" in text and "unseen pairs" in text


def test_outside_grammar_raises():
    with pytest.raises(ValueError):
        score("a cat", np.zeros((64, 64, 3), np.uint8))
