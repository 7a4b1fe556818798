"""Real processes against one queue: exactly-once claims, and recovery after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from storage import db as dbmod
from storage.queue import Queue, QueuePolicy
from storage.records import NewRequest
from storage.states import Status

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.storage.claimer", *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fill(url: str, n: int, users: int) -> list[int]:
    db = dbmod.connect(url)
    dbmod.upgrade(db)
    q = Queue(db)
    ids = [q.enqueue(NewRequest("local", f"m{i}", f"u{i % users}", "p", "p")).request.id for i in range(n)]
    db.dispose()
    return ids


@pytest.mark.slow
def test_four_processes_process_each_of_2000_requests_exactly_once(pg_schema_url: str) -> None:
    ids = _fill(pg_schema_url, 2000, users=37)
    procs = [_spawn("drain-together", pg_schema_url, f"w{i}", "25") for i in range(4)]
    for p in procs:  # all four connected: start them at once (a late starter would find nothing left)
        assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    for p in procs:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    processed = Counter(i for r in results for i in r)
    assert sorted(processed) == ids
    assert max(processed.values()) == 1
    assert all(len(r) > 0 for r in results), [len(r) for r in results]  # all four took part
    db = dbmod.connect(pg_schema_url)
    q = Queue(db)
    assert q.stats()["generated"] == 2000
    claims = Counter(a.request_id for a in q.audit(limit=100_000) if a.action == "claimed")
    assert len(claims) == 2000 and max(claims.values()) == 1
    db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_sigkilled_worker_loses_its_leases_and_another_finishes(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_schema_url")
    ids = _fill(url, 6, users=3)
    victim = _spawn("hang", url, "victim", "4", "1.5")
    line = victim.stdout.readline()  # type: ignore[union-attr]
    held = json.loads(line)
    assert len(held) == 4
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)  # reap it and close its pipes
    assert victim.returncode == -signal.SIGKILL
    db = dbmod.connect(url)
    q = Queue(db, QueuePolicy(lease_seconds=1.5))
    assert all(q.get(i).status == Status.RUNNING for i in held)
    time.sleep(1.6)  # the victim's lease runs out
    survivor = _spawn("drain", url, "survivor", "10")
    out, err = survivor.communicate(timeout=60)
    assert survivor.returncode == 0, err
    assert sorted(json.loads(out)) == ids
    for i in held:
        rec = q.get(i)
        assert rec.status == Status.GENERATED and rec.attempts == 2
        actions = [(a.action, a.actor) for a in q.audit(i)]
        assert ("claimed", "worker:victim") in actions and ("retry", "worker:reclaimer") in actions
    db.dispose()
