"""`dallebot generate` end to end on the tiny bundle (in-process, through bot.cli.main)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bot.cli import main as dallebot

from .helpers import TINY_VQ


def test_generate_same_seed_same_png(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        dallebot(["generate", "a red circle", "--n", "4", "--seed", str(seed), "--model", str(tiny_bundle),
                  "--out", str(out), "--threads", "1"])
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    with Image.open(a) as im:
        assert im.size == (2 * TINY_VQ.resolution, 2 * TINY_VQ.resolution)   # 2x2 grid
    assert "seed 3" in capsys.readouterr().out


def test_generate_prompts_file(tiny_bundle: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo green triangles\nКошка\n", encoding="utf-8")
    out = tmp_path / "out"
    dallebot(["generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--seed", "1", "--batch", "2",
              "--model", str(tiny_bundle), "--upscale", "64"])
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]
    with Image.open(out / "2.png") as im:
        assert im.size == (64, 64)
    # one prompt alone, same seed: the same picture as in the batch
    dallebot(["generate", "two green triangles", "--seed", "1", "--model", str(tiny_bundle),
              "--out", str(tmp_path / "one.png"), "--upscale", "64"])
    assert (tmp_path / "one.png").read_bytes() == (out / "1.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["generate", "!!!", "--model", "{bundle}"], "empty after normalisation"),
    (["generate", "a cat", "--model", "{tmp}/missing"], "does not exist"),
    (["generate", "--prompts-file", "{tmp}/none.txt", "--out-dir", "{tmp}/o", "--model", "{bundle}"], "cannot read prompts file"),
    (["export", "--from", "{tmp}", "--out", "{tmp}/b"], "no VQGAN found"),
])
def test_bad_input_gives_one_line_error(tiny_bundle: Path, tmp_path: Path, capsys, args, message) -> None:
    args = [a.format(bundle=tiny_bundle, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        dallebot(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().startswith("dallebot: error:")
