import numpy as np
import pytest

from inference.shapes.grammar import BACKGROUNDS, COLOURS, SIZE_RANGES, parse, sample_prompt
from inference.shapes.render import ideal_mask, layout, render


@pytest.mark.parametrize("n", [64, 128])
def test_layouts_follow_the_spec(n):
    rng = np.random.default_rng(n)
    for _ in range(400):
        scene = parse(sample_prompt(rng, "include"))
        placed = layout(scene, n, rng)
        assert len(placed) == len(scene.objects)
        for p in placed:
            lo, hi = SIZE_RANGES[p.spec.size]
            assert lo <= p.side / n <= hi
            assert 0 <= p.x0 and p.x0 + p.side <= n and 0 <= p.y0 and p.y0 + p.side <= n
        for i, a in enumerate(placed):
            for b in placed[i + 1:]:
                assert (a.x0 + a.side < b.x0 or b.x0 + b.side < a.x0
                        or a.y0 + a.side < b.y0 or b.y0 + b.side < a.y0), "objects overlap or touch"
        if scene.position:
            cx, cy = placed[0].cx / n, placed[0].cy / n
            assert {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                    "center": 0.35 <= cx <= 0.65 and 0.35 <= cy <= 0.65}[scene.position]
        if scene.relation and scene.relation != "and":
            a, b = placed
            assert {"above": a.cy <= b.cy - 0.2 * n, "below": a.cy >= b.cy + 0.2 * n,
                    "left_of": a.cx <= b.cx - 0.2 * n, "right_of": a.cx >= b.cx + 0.2 * n}[scene.relation]
        if scene.kind != "single":
            assert all(p.spec.size != "big" for p in placed)


def test_exact_colours_and_background():
    rng = np.random.default_rng(5)
    palette = {tuple(c) for c in COLOURS.values()}
    for _ in range(100):
        scene = parse(sample_prompt(rng, "include"))
        img = render(scene, 64, rng)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        colours = {tuple(int(v) for v in c) for c in img.reshape(-1, 3)}
        bg = BACKGROUNDS[scene.background]
        assert bg in colours
        assert colours - {bg} <= palette
        assert colours - {bg} == {COLOURS[o.colour] for o in scene.objects}


def test_jitter_stays_within_15():
    rng = np.random.default_rng(6)
    scene = parse("a blue circle")
    img = render(scene, 64, rng, jitter=15)
    obj = img[(img != 255).any(-1)].astype(int)
    assert len(obj) > 100
    assert np.abs(obj - np.array(COLOURS["blue"])).max() <= 15
    with pytest.raises(ValueError):
        render(scene, 64, rng, jitter=16)


def test_seeded():
    scene = parse("three small red stars on a gray background")
    a = render(scene, 64, np.random.default_rng(9))
    b = render(scene, 64, np.random.default_rng(9))
    c = render(scene, 64, np.random.default_rng(10))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star"])
def test_ideal_masks_fill_their_box(shape):
    for side in range(10, 80):
        m = ideal_mask(shape, side, side)
        ys, xs = np.nonzero(m)
        assert (ys.min(), xs.min(), ys.max(), xs.max()) == (0, 0, side - 1, side - 1)
    fill = ideal_mask(shape, 64, 64).mean()
    assert {"square": fill == 1.0, "circle": 0.75 < fill < 0.82, "triangle": 0.45 < fill < 0.56,
            "star": 0.3 < fill < 0.5}[shape]
    # one point up: the top row is narrower than the widest row, except for squares and circles
    top = ideal_mask(shape, 64, 64)[0].sum()
    assert (top < 10) == (shape in ("triangle", "star"))
