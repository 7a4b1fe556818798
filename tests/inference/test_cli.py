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


def test_prompts_file_skips_blank_lines_keeping_line_numbers(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n   \ntwo green triangles\n", encoding="utf-8")
    out = tmp_path / "new" / "folder"                                 # created, parents too
    dallebot(["generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--seed", "1",
              "--model", str(tiny_bundle), "--threads", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "3.png"]   # file name = line number from 0
    assert "skipped 2 blank lines" in capsys.readouterr().err
    dallebot(["generate", "two green triangles", "--seed", "1", "--model", str(tiny_bundle),
              "--out", str(tmp_path / "one.png"), "--threads", "1"])
    assert (tmp_path / "one.png").read_bytes() == (out / "3.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["generate", "!!!", "--model", "{bundle}"], "empty after normalisation"),
    (["generate", "a cat", "--model", "{tmp}/missing"], "does not exist"),
    (["generate", "--prompts-file", "{tmp}/none.txt", "--out-dir", "{tmp}/o", "--model", "{bundle}"], "cannot read prompts file"),
    (["export", "--from", "{tmp}", "--out", "{tmp}/b"], "no VQGAN found"),
    # seeds and sampling numbers are checked before anything loads (the model here does not exist)
    (["generate", "a red circle", "--seed", "-5", "--model", "{tmp}/missing"], "'--seed': -5 is not in the range"),
    (["generate", "a red circle", "--seed", str(2**63), "--model", "{tmp}/missing"], "is not in the range"),
    (["generate", "a red circle", "--condition-scale", "nan", "--model", "{tmp}/missing"], "'nan' is not a finite number"),
    (["generate", "a red circle", "--condition-scale", "inf", "--model", "{tmp}/missing"], "'inf' is not a finite number"),
    (["generate", "a red circle", "--temperature", "-inf", "--model", "{tmp}/missing"], "is not a finite number"),
    (["generate", "a red circle", "--top-p", "nan", "--model", "{tmp}/missing"], "is not a finite number"),
    (["generate", "a red circle", "--temperature", "0", "--model", "{bundle}"], "temperature must be > 0"),
    # where the images go is checked before the model loads (and long before anything is generated)
    (["generate", "a cat", "--out", "{tmp}/nowhere/x.png", "--model", "{tmp}/missing"],
     "cannot write --out {tmp}/nowhere/x.png: the folder {tmp}/nowhere does not exist (it is not created"),
    (["generate", "a cat", "--out", "{tmp}/afile/x.png", "--model", "{tmp}/missing"], "the folder {tmp}/afile is not a folder"),
    (["generate", "a cat", "--out", "{tmp}", "--model", "{tmp}/missing"], "is a folder; give a file name"),
    (["generate", "--prompts-file", "{tmp}/prompts.txt", "--out-dir", "{tmp}/afile/sub", "--model", "{tmp}/missing"],
     "cannot create --out-dir {tmp}/afile/sub"),
    (["generate", "--prompts-file", "{tmp}/prompts.txt", "--out-dir", "{tmp}/afile", "--model", "{tmp}/missing"],
     "cannot use --out-dir {tmp}/afile: it exists and is not a folder"),
    (["generate", "a cat", "--out", "/dev/full", "--model", "{bundle}"], "cannot write /dev/full (No space left on device)"),
    (["generate", "--prompts-file", "{tmp}/blank.txt", "--out-dir", "{tmp}/o", "--model", "{bundle}"], "holds no prompts"),
    (["generate", "--prompts-file", "{tmp}/bad.txt", "--out-dir", "{tmp}/o", "--model", "{bundle}"],
     "bad.txt line 4 (3.png): prompt ('!!!') is empty after normalisation"),
])
def test_bad_input_gives_one_line_error(tiny_bundle: Path, tmp_path: Path, capsys, args, message) -> None:
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "bad.txt").write_text("a red circle\n\nhello world\n!!!\n")
    args = [a.format(bundle=tiny_bundle, tmp=tmp_path) for a in args]
    message = message.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exc:
        dallebot(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    lines = err.strip().splitlines()          # a progress bar or a note may come first
    assert lines[-1].startswith("dallebot: error:") and message in lines[-1] and err.count("error") == 1
