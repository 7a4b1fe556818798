import json

import click
import pytest
from click.testing import CliRunner

from inference.shapes.cli import register


def test_register_adds_to_existing_groups_and_eval_runs_on_the_renderer(tmp_path):
    root = click.Group("dallebot")
    train = click.Group("train")
    train.add_command(click.Command("other", callback=lambda: None))
    root.add_command(train)
    register(root)
    assert set(root.commands["train"].commands) == {"other", "shapes"}
    assert "shapes" in root.commands["eval"].commands
    sheet, out = tmp_path / "sheet.png", tmp_path / "eval.json"
    result = CliRunner().invoke(root, ["eval", "shapes", "--renderer", "--n", "30", "--seed", "2",
                                       "--sheet", str(sheet), "--json", str(out), "--diversity", "10"])
    assert result.exit_code == 0, result.output
    assert "fully correct: 100.0%" in result.output and "unseen pairs" in result.output
    data = json.loads(out.read_text())
    assert data["prompts"] == 30 and data["fully_correct"] == 1.0 and data["diversity"] == 1.0
    assert sheet.is_file()


def test_eval_reports_a_missing_bundle(tmp_path):
    root = click.Group("dallebot")
    register(root)
    result = CliRunner().invoke(root, ["eval", "shapes", "--model", str(tmp_path / "nope"), "--n", "2"])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "'--seed': -1 is not in the range"),
    (["--seed", str(2**32)], "'--seed'"),
    (["--n", "0"], "'--n': 0 is not in the range"),
    (["--n", "-3"], "'--n'"),
    (["--diversity", "-1"], "'--diversity'"),
    (["--condition-scale", "nan"], "'nan' is not a finite number"),
    (["--temperature", "inf"], "'inf' is not a finite number"),
    (["--top-k", "-2"], "'--top-k'"),
])
def test_eval_refuses_bad_numbers_before_running(tmp_path, args, message):
    """A usage error (exit 2) naming the option, not a numpy traceback or a nan% report."""
    root = click.Group("dallebot")
    register(root)
    result = CliRunner().invoke(root, ["eval", "shapes", "--renderer", "--sheet", str(tmp_path / "s.png"),
                                       "--n", "3", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "nan%" not in result.output
    assert not (tmp_path / "s.png").exists()
