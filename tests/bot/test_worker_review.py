"""Worker faults found in the second review round: a request whose images cannot be saved, and a
recovered delivery whose platform check fails. Real queue (SQLite and PostgreSQL), real local
platform (its outbox is the platform)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.platforms.base import Delivery, DeliveryError
from bot.platforms.local import LocalPlatform
from bot.worker import Worker
from storage.models import utcnow
from storage.queue import Queue, QueuePolicy
from storage.records import RequestRecord
from storage.states import Status
from tests.e2e.adapter_support import LetterGenerator


def test_an_image_that_cannot_be_saved_fails_that_request_only(queue: Queue, clock, tmp_path: Path) -> None:
    """A local fault while saving one request's images (here its folder's name is taken by a file;
    a full disk does the same) is that request's failed attempt, retried with backoff; the rest of
    the batch is recorded, and nothing is left running until its lease expires."""
    local = LocalPlatform(tmp_path / "outbox")
    bad = local.submit(queue, "a red circle", user="u1", n_images=1).request.id
    good = local.submit(queue, "a blue star", user="u2", n_images=1).request.id
    images = tmp_path / "images"
    images.mkdir()
    (images / str(bad)).write_text("not a folder")
    worker = Worker(queue, LetterGenerator(), {"local": local}, images, owner="w1")
    assert worker.generate_batch() == 2
    assert queue.get(good).status == Status.GENERATED
    rec = queue.get(bad)
    assert rec.status == Status.QUEUED and rec.lease_token is None and rec.run_at > clock.now
    assert "cannot save the images" in (rec.error or "") and "FileExistsError" in rec.error
    assert worker.stats.generated == 1 and worker.stats.failed == 1
    (images / str(bad)).unlink()             # the fault goes away: the retry succeeds
    clock.advance(3600)
    worker.drain(max_wait=1)
    assert queue.get(bad).status == Status.POSTED and queue.get(good).status == Status.POSTED


class _Outbox(LocalPlatform):
    """The local outbox whose look-up for an earlier reply fails the first ``failing`` times (as a
    platform read that times out or is rate limited does); counts the posts."""

    def __init__(self, outbox: Path, failing: int, error: DeliveryError) -> None:
        super().__init__(outbox)
        self.failing, self.error, self.posts = failing, error, 0

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        if self.failing:
            self.failing -= 1
            raise self.error
        return super().find_delivery(request)

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        self.posts += 1
        return super().deliver(request, images)


def _crashed_after_posting(queue: Queue, clock, outbox: _Outbox, tmp_path: Path) -> tuple[Worker, int]:
    """A request whose reply went out but whose worker died before recording it."""
    rid = outbox.submit(queue, "a red circle", user="u1", n_images=1).request.id
    worker = Worker(queue, LetterGenerator(), {"local": outbox}, tmp_path / "images", owner="w1")
    assert worker.generate_batch() == 1
    crashed = queue.claim_deliveries("crashed", 5)
    LocalPlatform.deliver(outbox, crashed.requests[0], [Path(p) for p in crashed.requests[0].image_paths])
    clock.advance(queue.policy.lease_seconds + 1)
    return worker, rid


def test_a_recovered_delivery_whose_check_fails_is_checked_again_not_posted_again(
        queue: Queue, clock, tmp_path: Path) -> None:
    """After a crash mid-post, the platform could not be asked whether the reply is out (a passing
    failure, here one with Retry-After): the next try must ask again before posting, not post a
    second reply."""
    outbox = _Outbox(tmp_path / "outbox", 1, DeliveryError("timeline rate limited", retry_after=30))
    worker, rid = _crashed_after_posting(queue, clock, outbox, tmp_path)
    assert worker.deliver_batch() == 1
    rec = queue.get(rid)
    assert rec.status != Status.POSTED and "timeline rate limited" in (rec.error or "")
    assert worker.deliver_batch() == 0      # the platform's wait is honoured
    clock.advance(31)
    assert worker.deliver_batch() == 1
    rec = queue.get(rid)
    assert rec.status == Status.POSTED and rec.reply_id == f"local-{rid}"
    assert outbox.posts == 0, "posted a second reply without checking the platform"
    assert [a.action for a in queue.audit(rid)].count("recovering") == 2


def test_a_recovered_delivery_whose_check_keeps_failing_ends_dead_without_posting(
        queue: Queue, clock, tmp_path: Path) -> None:
    outbox = _Outbox(tmp_path / "outbox", 100, DeliveryError("Discord delivery timed out"))
    worker, rid = _crashed_after_posting(queue, clock, outbox, tmp_path)
    for _ in range(10):
        worker.deliver_batch()
        clock.advance(3600)
    rec = queue.get(rid)
    assert rec.status == Status.DEAD and rec.finished_at is not None and outbox.posts == 0
    assert "Discord delivery timed out" in (rec.error or "")


def test_a_drain_waits_for_a_recovery_to_ask_the_platform_again(queue: Queue, clock, tmp_path: Path) -> None:
    """worker --drain does not stop as if nothing were left while a recovery waits for its retry."""
    outbox = _Outbox(tmp_path / "outbox", 1, DeliveryError("timeline rate limited", retry_after=20))
    _, rid = _crashed_after_posting(queue, clock, outbox, tmp_path)
    worker = Worker(queue, LetterGenerator(), {"local": outbox}, tmp_path / "images", owner="w2",
                    sleep=clock.advance)
    stats = worker.drain(max_wait=60)
    assert queue.get(rid).status == Status.POSTED and outbox.posts == 0
    assert stats.left is None and stats.by_status["posted"] == 1


class _SlowLookup(LocalPlatform):
    """The local outbox whose look-up for an earlier reply of ``slow`` takes longer than a lease
    (a platform read that hangs until its timeout: Discord's is 300 s, the default lease), and
    which lets another worker try to take the batch's requests meanwhile."""

    def __init__(self, outbox: Path, queue: Queue, slow: int, seconds: float) -> None:
        super().__init__(outbox)
        self.queue, self.slow, self.seconds = queue, slow, seconds
        self.stolen: list[int] = []
        self.posts: list[int] = []

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        if request.id == self.slow:
            time.sleep(self.seconds)
            self.stolen += self.queue.claim_deliveries("thief", 5).ids
        return super().find_delivery(request)

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        self.posts.append(request.id)
        return super().deliver(request, images)


def test_a_slow_platform_check_keeps_the_whole_delivery_batch_leased(queue: Queue, clock, tmp_path: Path) -> None:
    """Recovering deliveries (their worker crashed mid-post): while the platform is slow to say
    whether the first was posted, the lease of the batch is renewed, so no other worker takes
    these requests and posts them a second time."""
    real = Queue(queue.db, QueuePolicy(lease_seconds=5, max_attempts=5))   # on the real clock
    before = Queue(queue.db, real.policy, clock=lambda: utcnow() - dt.timedelta(hours=1))
    local = LocalPlatform(tmp_path / "outbox")
    ids = [local.submit(before, p, user=f"u{i}", n_images=1).request.id for i, p in enumerate(["a red circle",
                                                                                                "a blue star"])]
    assert Worker(before, LetterGenerator(), {"local": local}, tmp_path / "images").generate_batch() == 2
    assert before.claim_deliveries("crashed", 5).ids == ids     # ... and that worker died an hour ago
    slow = _SlowLookup(tmp_path / "outbox", real, ids[0], 6.0)
    worker = Worker(real, LetterGenerator(), {"local": slow}, tmp_path / "images", owner="w2")
    assert worker.deliver_batch() == 2
    assert slow.stolen == [], "another worker took requests this one was still delivering"
    assert sorted(slow.posts) == ids
    assert all(queue.get(i).status == Status.POSTED for i in ids)


class _PoisonGenerator(LetterGenerator):
    """A model run that fails as a whole when one of its prompts is ``poison`` (as a batch too big
    for the device's memory, or one input the runtime chokes on, fails the whole run)."""

    def generate(self, jobs):  # type: ignore[no-untyped-def]
        if any("poison" in j.prompt for j in jobs):
            raise RuntimeError("onnxruntime: failed to allocate memory")
        return super().generate(jobs)


def test_a_batch_that_fails_as_a_whole_is_tried_one_request_at_a_time(queue: Queue, clock, tmp_path: Path) -> None:
    """One request that makes the model run fail must not take the rest of its batch down with it:
    batched together again at every retry, all of them would end dead."""
    local = LocalPlatform(tmp_path / "outbox")
    ok1 = local.submit(queue, "a red circle", user="u1", n_images=1).request.id
    bad = local.submit(queue, "a poison star", user="u2", n_images=1).request.id
    ok2 = local.submit(queue, "a blue square", user="u3", n_images=1).request.id
    worker = Worker(queue, _PoisonGenerator(), {"local": local}, tmp_path / "images", owner="w1")
    assert worker.generate_batch() == 3
    assert queue.get(ok1).status == Status.GENERATED and queue.get(ok2).status == Status.GENERATED
    rec = queue.get(bad)
    assert rec.status == Status.QUEUED and "failed to allocate memory" in (rec.error or "")
    for _ in range(5):
        clock.advance(3600)
        worker.generate_batch()
        worker.deliver_batch()
    assert [queue.get(i).status for i in (ok1, bad, ok2)] == [Status.POSTED, Status.DEAD, Status.POSTED]


class _NanOnce:
    """An NSFW classifier whose model overflows (fp16 on a GPU) on its first run."""

    def __init__(self) -> None:
        self.calls = 0

    def scores(self, images):  # type: ignore[no-untyped-def]
        self.calls += 1
        return [float("nan") if self.calls == 1 else 0.01 for _ in images]


def test_a_score_that_is_not_a_number_holds_the_request_on_both_databases(queue: Queue, tmp_path: Path) -> None:
    """A NaN score holds the request for a moderator (never posted). PostgreSQL's json type has no
    NaN: storing it as such failed the whole batch's record, left to lease expiry again and again
    (the same seed gives the same NaN) until every request of the batch was dead."""
    local = LocalPlatform(tmp_path / "outbox")
    flagged = local.submit(queue, "a red circle", user="u1", n_images=2).request.id
    fine = local.submit(queue, "a blue star", user="u2", n_images=1).request.id
    worker = Worker(queue, LetterGenerator(), {"local": local}, tmp_path / "images", owner="w1",
                    classifier=_NanOnce())
    assert worker.generate_batch() == 2
    rec = queue.get(flagged)
    assert rec.status == Status.HELD and len(rec.image_paths) == 2
    assert "not a number" in [a.reason for a in queue.audit(flagged)][-1]
    assert queue.get(fine).status == Status.GENERATED and queue.get(fine).nsfw_scores == [0.01]
    assert rec.nsfw_scores == []  # no valid scores: none stored (the same on both databases)


class _Solid:
    """A model that paints every image one colour; ``during`` runs inside the model run."""

    def __init__(self, colour: tuple[int, int, int], during=None) -> None:  # type: ignore[no-untyped-def]
        self.colour, self.during = colour, during

    def generate(self, jobs):  # type: ignore[no-untyped-def]
        if self.during:
            self.during()
        return [[Image.new("RGB", (8, 8), self.colour) for _ in range(j.n_images)] for j in jobs]


def test_a_stalled_worker_cannot_overwrite_the_images_of_the_worker_that_took_over(
        queue: Queue, clock, tmp_path: Path) -> None:
    """Worker A stalls past its lease (a paused VM, a lost network); B takes the request over and
    records its images (checked, about to be posted). A's late result is refused by the lease token,
    and its files must not replace B's on disk either: they would be posted unchecked, under B's seed."""
    local = LocalPlatform(tmp_path / "outbox")
    rid = local.submit(queue, "a red circle", user="u1", n_images=2).request.id
    images = tmp_path / "images"
    b = Worker(queue, _Solid((0, 0, 255)), {"local": local}, images, owner="B")

    def stall_past_the_lease() -> None:
        clock.advance(queue.policy.lease_seconds + 1)
        assert queue.reclaim_expired() == 1
        clock.advance(3600)
        assert b.generate_batch() == 1

    a = Worker(queue, _Solid((255, 0, 0), stall_past_the_lease), {"local": local}, images, owner="A")
    assert a.generate_batch() == 1
    assert a.stats.lost == 1 and b.stats.generated == 1
    rec = queue.get(rid)
    assert rec.status == Status.GENERATED and len(rec.image_paths) == 2
    assert [Image.open(p).convert("RGB").getpixel((0, 0)) for p in rec.image_paths] == [(0, 0, 255)] * 2
    # nothing of A's is left behind on disk
    assert sorted(str(p) for p in (images / str(rid)).iterdir()) == sorted(rec.image_paths)
    assert b.deliver_batch() == 1 and queue.get(rid).status == Status.POSTED


def test_images_of_an_earlier_attempt_do_not_pile_up(queue: Queue, clock, tmp_path: Path) -> None:
    """A worker killed after writing images leaves them behind; the attempt that is recorded
    clears them, so a request's folder holds its recorded images only (prune deletes those)."""
    local = LocalPlatform(tmp_path / "outbox")
    rid = local.submit(queue, "a red circle", user="u1", n_images=2).request.id
    images = tmp_path / "images"
    (images / str(rid)).mkdir(parents=True)
    for name in ("0.png", "1.png", "0-0123abcd.png"):   # older layout and a dead worker's attempt
        Image.new("RGB", (8, 8)).save(images / str(rid) / name)
    worker = Worker(queue, _Solid((0, 255, 0)), {"local": local}, images, owner="w")
    assert worker.generate_batch() == 1
    rec = queue.get(rid)
    assert sorted(str(p) for p in (images / str(rid)).iterdir()) == sorted(rec.image_paths)


class _FailsOnce(LetterGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def generate(self, jobs):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().generate(jobs)


@pytest.mark.parametrize("was_posted", [True, False])
def test_a_last_delivery_attempt_cut_off_mid_post_is_looked_up_before_it_is_given_up(
        queue: Queue, clock, tmp_path: Path, was_posted: bool) -> None:
    """A request that needed a second generation attempt has one delivery attempt left (attempts
    count generation and delivery). When the worker posting it dies mid-post, the platform is asked
    before the request is given up: a reply that went out makes it posted (not dead, which a
    moderator would requeue and post again); no reply: dead, nothing posted past its attempts."""
    outbox = _Outbox(tmp_path / "outbox", 0, DeliveryError("unused"))
    rid = outbox.submit(queue, "a red circle", user="u1", n_images=1).request.id
    worker = Worker(queue, _FailsOnce(), {"local": outbox}, tmp_path / "images", owner="w1")
    assert worker.generate_batch() == 1 and queue.get(rid).status == Status.QUEUED
    clock.advance(3600)
    assert worker.generate_batch() == 1 and queue.get(rid).status == Status.GENERATED
    crashed = queue.claim_deliveries("crashed", 5)
    assert crashed.ids == [rid] and crashed.requests[0].attempts == crashed.requests[0].max_attempts
    if was_posted:   # the platform took the reply, then the worker died before recording it
        LocalPlatform.deliver(outbox, crashed.requests[0], [Path(p) for p in crashed.requests[0].image_paths])
    clock.advance(queue.policy.lease_seconds + 1)
    worker.deliver_batch()
    rec = queue.get(rid)
    assert outbox.posts == 0
    if was_posted:
        assert rec.status == Status.POSTED and rec.reply_id == f"local-{rid}"
    else:
        assert rec.status == Status.DEAD and rec.finished_at is not None
        assert "no reply was found" in (rec.error or "")
    assert worker.deliver_batch() == 0 and queue.get(rid).status == rec.status
