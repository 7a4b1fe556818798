import json

import click
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
