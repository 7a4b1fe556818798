"""Worker and queue faults found in review: one bad delivery, deliveries whose lease keeps expiring,
a delivery resumed after a database outage, a drain with other platforms' results, moderation and
pruning racing with other changes. Real queue (SQLite and PostgreSQL), real local platform."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bot.platforms.base import Delivery
from bot.platforms.local import LocalPlatform
from bot.worker import Worker
from storage.errors import DatabaseUnavailable, IllegalTransition
from storage.queue import Queue
from storage.records import Generated, NewRequest, RequestRecord
from storage.states import Status
from tests.e2e.adapter_support import LetterGenerator


def _generated(queue: Queue, local: LocalPlatform, tmp_path: Path, *prompts: str) -> tuple[Worker, list[int]]:
    ids = [local.submit(queue, p, user=f"u{i}", n_images=1).request.id for i, p in enumerate(prompts)]
    worker = Worker(queue, LetterGenerator(), {"local": local}, tmp_path / "images", owner="w1")
    assert worker.generate_batch() == len(prompts)
    return worker, ids


def test_an_unexpected_error_while_posting_fails_that_request_only(queue: Queue, clock, tmp_path: Path) -> None:
    """A local fault (here: an image file gone, so copying it fails) is that request's delivery
    failure, retried with backoff and dead when out of attempts; the rest of the batch is posted."""
    local = LocalPlatform(tmp_path / "outbox")
    worker, (bad, good) = _generated(queue, local, tmp_path, "a red circle", "a blue star")
    Path(queue.get(bad).image_paths[0]).unlink()
    assert worker.deliver_batch() == 2
    assert queue.get(good).status == Status.POSTED
    rec = queue.get(bad)
    assert rec.status == Status.GENERATED and "unexpected error while posting" in (rec.error or "")
    assert "FileNotFoundError" in rec.error
    for _ in range(10):
        clock.advance(3600)
        worker.deliver_batch()
    rec = queue.get(bad)
    assert rec.status == Status.DEAD and [a.action for a in queue.audit(bad)][-1] == "dead"


def test_a_delivery_whose_lease_keeps_expiring_ends_dead(queue: Queue, clock, tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "outbox")
    _, (rid,) = _generated(queue, local, tmp_path, "a red circle")
    claims = 0
    while queue.claim_deliveries(f"crashing-{claims}", 5).ids:   # each holder "crashes" with the lease
        claims += 1
        clock.advance(queue.policy.lease_seconds + 1)
        assert claims < 20, "re-claimed for ever"
    rec = queue.get(rid)
    assert rec.status == Status.DEAD and rec.attempts >= rec.max_attempts and rec.finished_at is not None
    assert "lease expired again" in (rec.error or "")


class _FlakyLocal(LocalPlatform):
    """The local outbox, whose first post meets a database outage (as mark_posted would)."""

    def __init__(self, outbox: Path, queue: Queue) -> None:
        super().__init__(outbox)
        self.queue, self.calls, self.stealable = queue, 0, []

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        self.calls += 1
        if self.calls == 1:
            raise DatabaseUnavailable("the database went away")
        # while this post is on its way, nobody else may take the request
        self.stealable.append(self.queue.claim_deliveries("thief", 5).ids)
        return super().deliver(request, images)


def test_a_delivery_resumed_after_an_outage_renews_its_lease_first(queue: Queue, clock, tmp_path: Path) -> None:
    flaky = _FlakyLocal(tmp_path / "outbox", queue)
    rid = flaky.submit(queue, "a red circle", user="u1", n_images=1).request.id
    worker = Worker(queue, LetterGenerator(), {"local": flaky}, tmp_path / "images", owner="w1")
    assert worker.generate_batch() == 1
    with pytest.raises(DatabaseUnavailable):
        worker.deliver_batch()
    clock.advance(queue.policy.lease_seconds + 5)          # the outage outlasted the lease
    worker.resume_stranded()
    assert [list(ids) for ids in flaky.stealable] == [[]]  # renewed before posting: not re-claimable
    rec = queue.get(rid)
    assert rec.status == Status.POSTED and len(list((tmp_path / "outbox").glob("*/reply.json"))) == 1


def test_drain_ends_when_only_other_platforms_results_are_left(queue: Queue, tmp_path: Path) -> None:
    """A result for a platform this worker does not have (e.g. X disabled here) is left to the
    workers that have it; the drain finishes instead of spinning on it."""
    rid = queue.enqueue(NewRequest("x", "m1", "u1", "a red circle", "a red circle")).request.id
    worker = Worker(queue, LetterGenerator(), {"local": LocalPlatform(tmp_path / "outbox")}, tmp_path / "images")
    done = threading.Event()
    t = threading.Thread(target=lambda: (worker.drain(max_wait=1), done.set()), daemon=True)
    t.start()
    t.join(timeout=30)
    assert done.is_set(), "drain kept looping"
    assert queue.get(rid).status == Status.GENERATED
    assert worker.stats.left == "1 result(s) wait for platforms this worker does not deliver to (it has: local)"


def test_approve_checks_held_under_the_lock(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another moderator rejects between approve's first look and its update: the rejection stands."""
    rid = queue.enqueue(NewRequest("local", "m1", "u1", "a red circle", "a red circle")).request.id
    queue.hold(rid, actor="moderator:a", reason="look")
    stale = queue.get(rid)
    queue.reject(rid, actor="moderator:b", reason="no")
    monkeypatch.setattr(queue, "get", lambda request_id: stale)   # approve's first look saw it held
    with pytest.raises(IllegalTransition, match=r"cannot approve request \d+: it is rejected, and only requests "
                                                r"held for review can be approved"):
        queue.approve(rid, actor="moderator:a")
    monkeypatch.undo()
    assert queue.get(rid).status == Status.REJECTED


def test_moderation_errors_name_the_action(queue: Queue) -> None:
    rid = queue.enqueue(NewRequest("local", "m1", "u1", "a red circle", "a red circle")).request.id
    queue.cancel(rid, actor="moderator:a")
    with pytest.raises(IllegalTransition, match=rf"^cannot reject request {rid}: it is cancelled, "):
        queue.reject(rid, actor="moderator:a")
    with pytest.raises(IllegalTransition, match=rf"^cannot hold request {rid}: "):
        queue.hold(rid, actor="moderator:a")


def test_prune_keeps_the_images_of_a_request_regenerated_meanwhile(queue: Queue, clock, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from storage import retention

    images = tmp_path / "images"
    rid = queue.enqueue(NewRequest("local", "m1", "u1", "a red circle", "a red circle")).request.id
    claim = queue.claim("w", 1)
    old = images / "old.png"
    images.mkdir()
    old.write_bytes(b"x")
    queue.complete_many(claim, [Generated(rid, [str(old)])])
    queue.reject(rid, actor="moderator:a")
    clock.advance(10 * 86400)
    real_remove = retention._remove

    def remove_while_requeued(path: Path, images_dir: Path) -> int:
        queue.requeue(rid, actor="moderator:b")           # a moderator gives it another go meanwhile
        again = queue.claim("w2", 1)
        queue.complete_many(again, [Generated(rid, [str(images / "new.png")])])
        return real_remove(path, images_dir)

    monkeypatch.setattr(retention, "_remove", remove_while_requeued)
    retention.prune(queue.db, images, image_retention_days=1, clock=clock)
    rec = queue.get(rid)
    assert rec.status == Status.GENERATED and rec.image_paths == [str(images / "new.png")]
