"""SIGKILL a real worker process mid-generation, and again between posting and recording: every
request still ends posted exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bot.platforms.local import LocalPlatform
from storage import db as dbmod
from storage.queue import Queue
from storage.states import Status
from tests.bot.fault_worker import LEASE

ROOT = Path(__file__).resolve().parents[2]


def _spawn(mode: str, url: str, data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.bot.fault_worker", mode, url, str(data)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _setup(db_url: str, data: Path, n: int) -> tuple[Queue, list[int]]:
    db = dbmod.connect(db_url)
    dbmod.upgrade(db)
    queue = Queue(db)
    local = LocalPlatform(data / "outbox")
    ids = [local.submit(queue, f"a red circle {i}", user=f"u{i}", n_images=1, seed=i).request.id for i in range(n)]
    return queue, ids


def _posted_once(queue: Queue, ids: list[int], data: Path) -> None:
    posts = Counter(int(line) for line in (data / "deliveries.log").read_text().split())
    assert sorted(posts) == ids and set(posts.values()) == {1}, posts
    for i in ids:
        rec = queue.get(i)
        assert rec.status == Status.POSTED and rec.reply_id == f"local-{i}"
        assert (data / "outbox" / str(i) / "reply.json").exists()


def test_worker_killed_mid_generation(db_url: str, tmp_path: Path) -> None:
    queue, ids = _setup(db_url, tmp_path, 3)
    victim = _spawn("hang", db_url, tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "generating").exists():
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    assert all(queue.get(i).status == Status.RUNNING for i in ids)
    time.sleep(LEASE + 0.2)
    survivor = _spawn("normal", db_url, tmp_path)
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    _posted_once(queue, ids, tmp_path)
    for i in ids:  # claimed by the victim, reclaimed when its lease ran out, claimed again by the survivor
        trail = [(a.action, a.actor.split("-")[0]) for a in queue.audit(i)]
        assert [t for t in trail if t[0] in ("claimed", "retry")] == [
            ("claimed", "worker:hang"), ("retry", "worker:reclaimer"), ("claimed", "worker:normal")]
    queue.db.dispose()


def test_worker_killed_between_posting_and_recording(db_url: str, tmp_path: Path) -> None:
    queue, ids = _setup(db_url, tmp_path, 3)
    victim = _spawn("die-after-post", db_url, tmp_path)
    victim.communicate(timeout=120)
    assert victim.returncode == -signal.SIGKILL
    posted_before = (tmp_path / "deliveries.log").read_text().split()
    assert len(posted_before) == 1
    crashed = int(posted_before[0])
    assert queue.get(crashed).status == Status.POSTING  # the intent was recorded, the outcome was not
    time.sleep(LEASE + 0.2)
    survivor = _spawn("normal", db_url, tmp_path)
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    _posted_once(queue, ids, tmp_path)  # the crashed one was found on the platform, not posted again
    assert "recovering" in [a.action for a in queue.audit(crashed)]
    queue.db.dispose()
