"""`dallebot moderator add|list|remove` as a user runs them (real processes, real databases), and the
dashboard benchmark command on a small database so it keeps working."""

from __future__ import annotations

import json
from pathlib import Path

from bot.app import open_app
from storage.moderators import Moderators
from tests.bot.test_cli import assert_one_line_error, run
from tests.dashboard.conftest import settings_for

PASSWORD = "a long enough password"


def test_add_list_remove_with_the_password_from_stdin(tmp_path: Path, db_url: str) -> None:
    assert run("db", "upgrade", data=tmp_path, db_url=db_url).returncode == 0
    add = run("moderator", "add", "alice", data=tmp_path, db_url=db_url, stdin=PASSWORD + "\n")
    assert add.returncode == 0, add.stderr
    assert add.stdout.strip() == "moderator alice added" and PASSWORD not in add.stdout + add.stderr
    # stored as an argon2id hash (memory-hard, salted), and it verifies
    with open_app(settings_for(tmp_path, db_url)) as app:
        mods = Moderators(app.queue)
        with app.db.read.connect() as conn:
            stored = conn.exec_driver_sql("SELECT password_hash FROM moderators").scalar_one()
        assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$") and PASSWORD not in stored
        assert mods.authenticate("alice", PASSWORD, ip="127.0.0.1") is not None
        assert mods.authenticate("alice", PASSWORD + "x", ip="127.0.0.1") is None
        assert [(a.action, a.actor, a.reason) for a in app.queue.audit(limit=10)][:2] == [
            ("moderator_added", "cli", "alice"), ("login", "moderator:alice", "from 127.0.0.1")]
    listed = json.loads(run("moderator", "list", "--json", data=tmp_path, db_url=db_url).stdout)
    assert [m["name"] for m in listed] == ["alice"] and listed[0]["last_login_at"] is not None
    assert run("moderator", "remove", "alice", data=tmp_path, db_url=db_url).stdout.strip() == "moderator alice removed"


def test_refusals_are_one_line_errors(tmp_path: Path) -> None:
    assert run("moderator", "add", "alice", data=tmp_path, stdin=PASSWORD + "\n").returncode == 0
    assert_one_line_error(run("moderator", "add", "alice", data=tmp_path, stdin="another pw 123\n"), "already exists")
    assert_one_line_error(run("moderator", "add", "bob", data=tmp_path, stdin="short\n"), "at least 8 characters")
    assert_one_line_error(run("moderator", "remove", "carol", data=tmp_path), "no moderator named 'carol'")
    assert run("moderator", "list", data=tmp_path).stdout.startswith("alice ")


def test_dashboard_benchmark_runs_on_a_small_database(tmp_path: Path) -> None:
    p = run("bench", "dashboard", "--n", "300", "--repeat", "2", "--backend", "sqlite", data=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "| sqlite | newest 50 |" in p.stdout and "| sqlite | live counters (JSON) |" in p.stdout
    assert "slowest p95:" in p.stdout
