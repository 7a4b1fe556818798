"""The worker: claim batches, generate, record; claim deliveries, post, record.

Synchronous by design: `dallebot worker --drain` calls it directly, and `dallebot serve` runs it in
a worker thread so inference never blocks the event loop. While a batch generates, a background
thread renews its lease (every third of the lease), so a long batch keeps its claim and a dead
worker loses it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tenacity
from PIL import Image

from bot.generation import GenerationJob, Generator
from bot.logs import log_context
from bot.metrics import Metrics
from bot.platforms.base import Delivery, DeliveryError, Platform
from bot.safety import ImageClassifier, nsfw_hold_reason
from storage.errors import DatabaseUnavailable, LeaseLost
from storage.moderators import generation_paused
from storage.queue import Queue
from storage.records import Claim, Generated, RequestRecord
from storage.states import Status

_log = logging.getLogger(__name__)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseKeeper:
    """Renews a claim's lease from a background thread until closed."""

    def __init__(self, queue: Queue, claim: Claim, interval: float) -> None:
        self.queue, self.claim, self.interval = queue, claim, interval
        self.owned: set[int] = set(claim.ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.owned = self.queue.renew(self.claim)
            except Exception:  # keep trying: the lease is only lost when it expires
                _log.warning("lease renewal failed", exc_info=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class DrainStats:
    generated: int = 0
    failed: int = 0
    posted: int = 0
    delivery_failures: int = 0
    lost: int = 0
    batches: int = 0
    seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)
    left: str | None = None     # why a drain stopped with work left (None: nothing left it can do)


class Worker:
    def __init__(
        self,
        queue: Queue,
        generator: Generator | None,
        platforms: Mapping[str, Platform],
        images_dir: Path,
        *,
        owner: str | None = None,
        batch_size: int = 8,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        classifier: ImageClassifier | None = None,
        nsfw_threshold: float = 0.8,
        metrics: Metrics | None = None,
        delivery_retry_seconds: float = 120.0,
        db_outage_seconds: float = 300.0,
    ) -> None:
        self.queue = queue
        self.generator = generator
        self.platforms = dict(platforms)
        self.images_dir = Path(images_dir).resolve()   # stored paths are absolute: any reader finds them
        self.owner = owner or default_owner()
        self.batch_size = batch_size
        self.rng = rng or random.Random()
        self.sleep = sleep
        # Every generated image is scored; a request with one at or above the threshold is held
        # for a moderator (never posted automatically), as is one whose images cannot be scored.
        self.classifier = classifier
        self.nsfw_threshold = nsfw_threshold
        self.metrics = metrics or Metrics()
        self.delivery_retry_seconds = delivery_retry_seconds
        self.db_outage_seconds = db_outage_seconds
        self._stranded: list[tuple[str, Claim]] = []  # claims in flight when the database went away
        self.stats = DrainStats()

    # ---- generation -----------------------------------------------------------------------

    def generate_batch(self) -> int:
        """Claim and generate one batch; returns how many requests were claimed."""
        if generation_paused(self.queue):  # a moderator paused generation: requests wait in the queue
            return 0
        if self.generator is None:
            return 0
        with self.metrics.claim_seconds.time():
            claim = self.queue.claim(self.owner, self.batch_size)
        if not claim.requests:
            return 0
        try:
            return self._generate_claimed(claim)
        except DatabaseUnavailable:
            self._stranded.append(("generate", claim))  # handed back once the database answers again
            raise

    def _generate_claimed(self, claim: Claim) -> int:
        self.stats.batches += 1
        self.metrics.batches.inc()
        jobs = [
            GenerationJob(r.prompt, r.n_images, r.seed if r.seed is not None else self.rng.randrange(2**31))
            for r in claim.requests
        ]
        try:
            with LeaseKeeper(self.queue, claim, max(1.0, self.queue.policy.lease_seconds / 3)), \
                    self.metrics.generate_seconds.time():
                images = self.generator.generate(jobs)
        except Exception as exc:  # the model failed for the whole batch: every request retries
            _log.exception("generation failed for batch %s", claim.ids)
            self.metrics.failures.labels(reason="generation_error").inc(len(claim))
            for r in claim.requests:
                try:
                    self.queue.fail(claim, r.id, f"generation failed: {exc}")
                    self.stats.failed += 1
                except LeaseLost:
                    self.stats.lost += 1
            return len(claim)
        results = []
        for r, job, imgs in zip(claim.requests, jobs, images, strict=True):
            with log_context(request_id=r.id):
                result = self._save(claim, r, job, imgs)
            if result is not None:
                results.append(result)
        recorded = set(self.queue.complete_many(claim, results))  # the batch in one statement
        for g in results:
            if g.request_id not in recorded:
                self.stats.lost += 1
                _log.warning("%s", LeaseLost.for_request(g.request_id, Status.RUNNING),
                             extra={"request_id": g.request_id})
                continue
            self.stats.generated += 1
            self.metrics.images.inc(len(g.image_paths))
            if g.hold_reason:
                self.metrics.held.inc()
            _log.info("generated %d image(s)", len(g.image_paths),
                      extra={"request_id": g.request_id, "action": g.action})
        return len(claim)

    def _save(self, claim: Claim, r: RequestRecord, job: GenerationJob, imgs: list[Image.Image] | Exception
              ) -> Generated | None:
        """Save and check one request's images; None when it failed for good (recorded here)."""
        if isinstance(imgs, Exception):  # this request can never be generated
            self.metrics.failures.labels(reason="prompt_unreadable").inc()
            try:
                self.queue.fail(claim, r.id, str(imgs), permanent=True)
                self.stats.failed += 1
            except LeaseLost:
                self.stats.lost += 1
            return None
        folder = self.images_dir / str(r.id)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, img in enumerate(imgs):
            p = folder / f"{k}.png"
            img.save(p, format="PNG")
            paths.append(str(p))
        scores: list[float] = []
        hold_reason = None
        if self.classifier is not None:
            try:
                scores = self.classifier.scores(imgs)
                hold_reason = nsfw_hold_reason(scores, self.nsfw_threshold)
            except Exception as exc:  # unchecked images are never posted automatically
                _log.exception("NSFW check failed", extra={"request_id": r.id})
                hold_reason = f"NSFW check failed: {exc}"[:500]
        return Generated(r.id, paths, scores, hold_reason, job.seed)

    # ---- delivery -------------------------------------------------------------------------

    def deliver_batch(self) -> int:
        claim = self.queue.claim_deliveries(self.owner, self.batch_size, platforms=list(self.platforms))
        try:
            for r in claim.requests:
                with log_context(request_id=r.id):
                    self._deliver_one(claim, r)
        except DatabaseUnavailable:
            self._stranded.append(("deliver", claim))
            raise
        return len(claim)

    def resume_stranded(self) -> None:
        """After a database outage, settle the claims that were in flight when it went away: a
        generation batch goes back to the queue (no attempt spent); a delivery is finished under
        its still-valid lease, checking the platform first, since a reply may already be out."""
        while self._stranded:
            kind, claim = self._stranded[0]
            if kind == "generate":
                n = self.queue.release(claim, "database outage: handed back for another try")
                _log.warning("handed %d request(s) back to the queue after a database outage", n)
                self._stranded.pop(0)
                continue
            # Renew first: the outage may have outlasted the lease, and a request another worker
            # has re-claimed meanwhile (as recovering) must not be posted from here too.
            owned = self.queue.renew(claim)
            again = dataclasses.replace(claim, recovering=frozenset(claim.ids))
            for r in claim.requests:
                if r.id not in owned:
                    continue
                cur = self.queue.get(r.id)
                if cur.status == Status.POSTING and cur.lease_token == claim.token:
                    with log_context(request_id=r.id):
                        self._deliver_one(again, cur)
            self._stranded.pop(0)

    def _deliver_one(self, claim: Claim, r: RequestRecord) -> None:
        """Post one request's result (or, after a crash mid-post, find the reply already there)."""
        platform = self.platforms[r.platform]
        try:
            with self.metrics.post_seconds.labels(platform=r.platform).time():
                try:
                    found = platform.find_delivery(r) if r.id in claim.recovering else None
                    delivery = found or self._post(claim, platform, r)
                except (DeliveryError, LeaseLost, DatabaseUnavailable):
                    raise
                except Exception as exc:  # a bug or a local fault (missing image file, full disk)
                    # fails this request (retried with backoff, then dead), not the whole batch
                    _log.exception("posting raised an unexpected error", extra={"request_id": r.id})
                    raise DeliveryError(f"unexpected error while posting: {exc!r}"[:500]) from exc
            posted = self.queue.mark_posted(claim, r.id, delivery.reply_id, delivery.reply_url)
            self.stats.posted += 1
            self.metrics.posted.labels(platform=r.platform).inc()
            if posted.finished_at is not None:
                self.metrics.request_seconds.labels(platform=r.platform).observe(
                    max(0.0, (posted.finished_at - posted.created_at).total_seconds()))
            _log.info("posted reply %s%s", delivery.reply_id, " (found after a crash)" if found else "",
                      extra={"request_id": r.id, "action": "posted"})
        except DeliveryError as exc:
            self.stats.delivery_failures += 1
            self.metrics.failures.labels(
                reason="delivery_permanent" if exc.permanent else "delivery_transient").inc()
            try:
                self.queue.delivery_failed(claim, r.id, str(exc), permanent=exc.permanent,
                                           retry_after=exc.retry_after)
            except LeaseLost:
                self.stats.lost += 1
        except LeaseLost:
            self.stats.lost += 1

    def _post(self, claim: Claim, platform: Platform, r: RequestRecord) -> Delivery:
        """``platform.deliver`` with in-attempt retries (tenacity) for transient errors: exponential
        backoff with jitter, never shorter than the platform's Retry-After / rate-limit reset, for at
        most ``delivery_retry_seconds``. A permanent error, or a wait longer than what is left of
        that budget, goes back to the queue (which honours ``retry_after`` across restarts)."""
        budget = self.delivery_retry_seconds
        backoff = tenacity.wait_exponential_jitter(multiplier=0.5, max=30, jitter=0.5)

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, DeliveryError) and not exc.permanent

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return max(backoff(state), getattr(exc, "retry_after", None) or 0.0)

        def stop(state: tenacity.RetryCallState) -> bool:  # the waits so far plus the next one
            return state.idle_for + wait(state) > budget

        def log_retry(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.metrics.failures.labels(reason="delivery_retry").inc()
            _log.warning("delivery failed (%s); retrying in %.1fs", exc, state.upcoming_sleep)

        paths = [Path(p) for p in r.image_paths]
        with LeaseKeeper(self.queue, claim, max(1.0, self.queue.policy.lease_seconds / 3)):
            for attempt in tenacity.Retrying(retry=tenacity.retry_if_exception(transient), wait=wait, stop=stop,
                                             sleep=self.sleep, before_sleep=log_retry, reraise=True):
                with attempt:
                    return platform.deliver(r, paths)
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- drain ----------------------------------------------------------------------------

    def drain(self, *, max_wait: float = 30.0, progress: Callable[[DrainStats], None] | None = None) -> DrainStats:
        """Work until nothing is left that this worker can do, waiting for retries that come due."""
        t0 = time.monotonic()
        outage: float | None = None  # when the database stopped answering
        while True:
            try:
                self.resume_stranded()
                self.queue.reclaim_expired()
                n = self.generate_batch()
                m = self.deliver_batch()
                pending = None if (n or m) else self.queue.pending_work(platforms=list(self.platforms))
            except DatabaseUnavailable as exc:
                # Ride out a database restart: back off and try again, up to db_outage_seconds.
                now = time.monotonic()
                outage = outage or now
                if now - outage > self.db_outage_seconds:
                    raise
                _log.warning("database unavailable (%s); retrying", exc)
                self.sleep(min(10.0, 0.5 * 2 ** min(5, int(now - outage))))
                continue
            if outage is not None:
                _log.warning("database is back after %.1fs", time.monotonic() - outage)
                outage = None
            if progress and (n or m):
                progress(self.stats)
            if n or m:
                continue
            assert pending is not None
            if pending["deliverable"] or pending["expired_leases"]:
                continue
            if pending["queued_now"]:
                if self.generator is not None and not generation_paused(self.queue):
                    continue
                why = "generation is paused by a moderator" if self.generator is not None else "no model"
                self.stats.left = f"{pending['queued_now']} request(s) wait in the queue, but {why}"
                _log.warning("%s; stopping", self.stats.left)
                break
            next_run = pending["next_run_at"]
            if next_run is None:
                if pending["elsewhere"]:
                    self.stats.left = (f"{pending['elsewhere']} result(s) wait for platforms this worker does "
                                       f"not deliver to (it has: {', '.join(sorted(self.platforms)) or 'none'})")
                    _log.warning("%s; stopping", self.stats.left)
                break
            wait = (next_run - self.queue.clock()).total_seconds()
            if wait > max_wait:
                self.stats.left = f"the next retry is due in {wait:.0f}s, more than --max-wait"
                _log.warning("%s; stopping", self.stats.left)
                break
            self.sleep(max(0.05, wait))
        self.stats.seconds = time.monotonic() - t0
        self.stats.by_status = self.queue.stats()
        return self.stats
