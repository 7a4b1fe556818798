"""The CLI as a user runs it: a real process, a real database, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, data: Path, db_url: str | None = None, config: Path | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DALLEBOT_")}
    env["DALLEBOT_DATA_DIR"] = str(data)
    if db_url:
        env["DALLEBOT_DATABASE_URL"] = db_url
    cmd = [sys.executable, "-m", "bot.cli"] + (["--config", str(config)] if config else []) + list(args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, input=stdin, timeout=120)


def assert_one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("dallebot: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_queue_workflow_and_json_output(tmp_path: Path, db_url: str) -> None:
    up = run("db", "upgrade", data=tmp_path, db_url=db_url)
    assert up.returncode == 0, up.stderr
    add = run("queue", "add", "a red  circle\u200b", "--user", "u1", "--n", "2", "--json", data=tmp_path, db_url=db_url)
    assert add.returncode == 0, add.stderr
    req = json.loads(add.stdout)
    assert req["prompt"] == "a red circle" and req["prompt_raw"] == "a red  circle\u200b" and req["position"] == 0
    run("queue", "add", "a blue square", "--user", "u2", data=tmp_path, db_url=db_url)
    stats = json.loads(run("queue", "stats", "--json", data=tmp_path, db_url=db_url).stdout)
    assert stats["queued"] == 2 and stats["posted"] == 0
    cancel = run("queue", "cancel", str(req["id"]), "--reason", "test", "--as", "mia", data=tmp_path, db_url=db_url)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    show = json.loads(run("queue", "show", str(req["id"]), "--json", data=tmp_path, db_url=db_url).stdout)
    assert show["status"] == "cancelled" and "lease_token" not in show
    assert [(a["action"], a["actor"], a["reason"]) for a in show["audit"]] == [
        ("received", "cli", None), ("cancelled", "moderator:mia", "test")]
    listed = json.loads(run("queue", "list", "--status", "queued", "--json", data=tmp_path, db_url=db_url).stdout)
    assert [r["prompt"] for r in listed] == ["a blue square"]
    ban = run("queue", "ban", "u2", "--reason", "spam", data=tmp_path, db_url=db_url)
    assert ban.returncode == 0 and "local:u2 is banned" in ban.stdout
    refused = json.loads(run("queue", "add", "x y", "--user", "u2", "--json", data=tmp_path, db_url=db_url).stdout)
    assert refused["status"] == "rejected"
    plain = run("queue", "add", "a green star", "--user", "u2", data=tmp_path, db_url=db_url)
    assert plain.returncode == 0 and plain.stdout.strip().endswith("rejected: user is banned"), plain.stdout


def test_unknown_request_and_illegal_transition(tmp_path: Path) -> None:
    assert_one_line_error(run("queue", "show", "4242", data=tmp_path), "no request with id 4242")
    add = json.loads(run("queue", "add", "a red circle", "--json", data=tmp_path).stdout)
    run("queue", "cancel", str(add["id"]), data=tmp_path)
    assert_one_line_error(run("queue", "approve", str(add["id"]), data=tmp_path),
                          f"cannot approve request {add['id']}", "cancelled")


def test_malformed_config_is_one_line_naming_key_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[queue]\nlease_seconds = \"long\"\n")
    assert_one_line_error(run("queue", "stats", data=tmp_path, config=cfg), "lease_seconds", str(cfg))
    cfg.write_text("[queue\n")
    assert_one_line_error(run("queue", "stats", data=tmp_path, config=cfg), "not valid TOML", str(cfg))


def test_unreachable_database_at_startup(tmp_path: Path) -> None:
    p = run("queue", "stats", data=tmp_path, db_url="postgresql+psycopg://postgres@127.0.0.1:1/test")
    assert_one_line_error(p, "cannot reach the database", "127.0.0.1:1")


def test_postgres_schema_must_be_upgraded_explicitly(tmp_path: Path, pg_schema_url: str) -> None:
    assert_one_line_error(run("queue", "stats", data=tmp_path, db_url=pg_schema_url), "dallebot db upgrade")


def test_password_is_hidden_in_errors(tmp_path: Path) -> None:
    p = run("queue", "stats", data=tmp_path, db_url="postgresql+psycopg://bot:hunter2@127.0.0.1:1/test")
    assert_one_line_error(p, "***")
    assert "hunter2" not in p.stderr


@pytest.mark.parametrize("prompt", ["", "   ", "\u200b\u200b", "!!!"])
def test_bad_prompts_are_refused_politely(tmp_path: Path, prompt: str) -> None:
    assert_one_line_error(run("queue", "add", prompt, data=tmp_path), "Please")


BIG = "99999999999999999999"  # > 2**63-1: no database can hold it


def test_out_of_range_numbers_are_one_line_errors(tmp_path: Path, db_url: str) -> None:
    assert run("db", "upgrade", data=tmp_path, db_url=db_url).returncode == 0
    add = json.loads(run("queue", "add", "a red circle", "--json", data=tmp_path, db_url=db_url).stdout)
    cases = [
        *[(("queue", name, BIG), "REQUEST_ID") for name in ("show", "cancel", "approve", "reject", "requeue")],
        (("queue", "show", "0"), "REQUEST_ID"),
        (("queue", "list", "--limit", "-1"), "--limit"),
        (("queue", "list", "--limit", "0"), "--limit"),
        (("queue", "list", "--limit", BIG), "--limit"),
        (("queue", "list", "--before", BIG), "--before"),
        (("queue", "add", "a blue square", "--seed", BIG), "--seed"),
        (("queue", "add", "a blue square", "--seed", "-1"), "--seed"),
        (("queue", "add", "a blue square", "--n", BIG), "--n"),
    ]
    for args, needle in cases:
        assert_one_line_error(run(*args, data=tmp_path, db_url=db_url), needle)
    stats = json.loads(run("queue", "stats", "--json", data=tmp_path, db_url=db_url).stdout)
    assert stats["queued"] == 1  # nothing was added, cancelled or claimed
    assert json.loads(run("queue", "show", str(add["id"]), "--json", data=tmp_path, db_url=db_url).stdout)["status"] == "queued"


@pytest.mark.parametrize(("args", "needle"), [
    (("worker", "--drain", "--batch-size", "-1"), "--batch-size"),
    (("worker", "--drain", "--batch-size", "0"), "--batch-size"),
    (("worker", "--drain", "--max-wait", "nan"), "--max-wait"),
    (("worker", "--drain", "--max-wait", "-1"), "--max-wait"),
    (("serve", "--port", "99999"), "--port"),
    (("serve", "--port", "0"), "--port"),
])
def test_worker_and_serve_options_are_checked(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    run("queue", "add", "a red circle", data=tmp_path)
    assert_one_line_error(run(*args, data=tmp_path), needle)
    stats = json.loads(run("queue", "stats", "--json", data=tmp_path).stdout)
    assert stats["queued"] == 1  # --batch-size -1 (SQLite's LIMIT -1) had claimed the whole queue


def test_non_finite_config_values_are_one_line_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    for text, key in [("[queue]\nlease_seconds = inf\n", "queue.lease_seconds"),
                      ("[queue]\nretry_base_seconds = nan\n", "queue.retry_base_seconds"),
                      ("[database]\npool_size = -1\n", "database.pool_size")]:
        cfg.write_text(text)
        assert_one_line_error(run("worker", "--drain", data=tmp_path, config=cfg), key, str(cfg))


def test_a_cli_rejection_tells_the_local_requester(tmp_path: Path) -> None:
    """`queue reject` on a local request writes its refusal to the outbox, as the dashboard does."""
    add = run("queue", "add", "a red circle", "--user", "u1", "--json", data=tmp_path)
    rid = json.loads(add.stdout)["id"]
    rej = run("queue", "reject", str(rid), "--reason", "not today", data=tmp_path)
    assert rej.returncode == 0, rej.stderr
    refusal = json.loads((tmp_path / "outbox" / str(rid) / "refusal.json").read_text())
    assert refusal["refusal"] == "not today" and refusal["request_id"] == rid
