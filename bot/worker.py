"""The worker: claim batches, generate, record; claim deliveries, post, record.

Synchronous by design: `dallebot worker --drain` calls it directly, and `dallebot serve` runs it in
a worker thread so inference never blocks the event loop. While a batch generates, a background
thread renews its lease (every third of the lease), so a long batch keeps its claim and a dead
worker loses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tenacity
from PIL import Image

from bot.generation import GenerationJob, Generator
from bot.logs import log_context
from bot.metrics import Metrics
from bot.model import JobError
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


def _remove_files(paths: Sequence[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def _remove_others(folder: Path, keep: Sequence[str]) -> None:
    """Delete the image files in a request's folder that are not ``keep`` (best effort)."""
    kept = {Path(p).name for p in keep if Path(p).parent == folder}
    try:
        others = [p for p in folder.iterdir() if p.is_file() and p.suffix == ".png" and p.name not in kept]
    except OSError:
        return
    _remove_files([str(p) for p in others])


@dataclass(frozen=True, slots=True)
class _RunFailed:
    """A request whose model run failed (on its own too): a failed attempt, retried with backoff.
    (An exception *returned* by the generator is different: that request can never be generated.)"""

    error: Exception


@dataclass
class _PostState:
    """One delivery attempt's knowledge of the platform: ``unknown``, the reply may be out (a crash
    or a try that failed after its request was sent) and the platform has not been asked since;
    ``found``, the reply was found there rather than posted by this attempt."""

    unknown: bool = False
    found: bool = False


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
                images = self._run_model(claim, jobs)
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
        # This run's own file names: a worker that stalled past its lease (and so will not be
        # recorded) must not overwrite the images of the worker that took the request over.
        run = secrets.token_hex(4)
        results = []
        for r, job, imgs in zip(claim.requests, jobs, images, strict=True):
            if isinstance(imgs, _RunFailed):  # failed on its own as well: this request retries
                self.metrics.failures.labels(reason="generation_error").inc()
                try:
                    self.queue.fail(claim, r.id, f"generation failed: {imgs.error}")
                    self.stats.failed += 1
                except LeaseLost:
                    self.stats.lost += 1
                continue
            with log_context(request_id=r.id):
                result = self._save(claim, r, job, imgs, run)
            if result is not None:
                results.append(result)
        recorded = set(self.queue.complete_many(claim, results))  # the batch in one statement
        for g in results:
            if g.request_id not in recorded:
                self.stats.lost += 1
                _log.warning("%s", LeaseLost.for_request(g.request_id, Status.RUNNING),
                             extra={"request_id": g.request_id})
                _remove_files(g.image_paths)  # nobody will ever read them
                continue
            # files of earlier attempts (a worker killed after writing, a regeneration) are no
            # longer referenced by anything: only the recorded ones stay (and prune deletes those)
            _remove_others(self.images_dir / str(g.request_id), g.image_paths)
            self.stats.generated += 1
            self.metrics.images.inc(len(g.image_paths))
            if g.hold_reason:
                self.metrics.held.inc()
            _log.info("generated %d image(s)", len(g.image_paths),
                      extra={"request_id": g.request_id, "action": g.action})
        return len(claim)

    def _run_model(self, claim: Claim, jobs: list[GenerationJob]) -> list[list[Image.Image] | Exception | _RunFailed]:
        """One batched model run; when it fails as a whole, each request is run on its own, so that
        one request that breaks the run (or a batch too big for the device) does not fail the
        others with it at every retry until all of them are dead."""
        try:
            return self.generator.generate(jobs)
        except Exception:
            if len(jobs) == 1:
                raise
            _log.exception("generation failed for batch %s; generating its requests one at a time", claim.ids)
        out: list[list[Image.Image] | Exception | _RunFailed] = []
        for r, job in zip(claim.requests, jobs, strict=True):
            try:
                out += self.generator.generate([job])
            except Exception as exc:
                _log.exception("generation failed", extra={"request_id": r.id})
                out.append(_RunFailed(exc))
        return out

    def _save(self, claim: Claim, r: RequestRecord, job: GenerationJob, imgs: list[Image.Image] | Exception,
              run: str) -> Generated | None:
        """Save (as ``<id>/<k>-<run>.png``) and check one request's images; None when it failed
        (recorded here)."""
        if isinstance(imgs, Exception):  # this request can never be generated
            # a seed or image count the model refuses is not an unreadable prompt
            self.metrics.failures.labels(
                reason="settings_unusable" if isinstance(imgs, JobError) else "prompt_unreadable").inc()
            try:
                self.queue.fail(claim, r.id, str(imgs), permanent=True)
                self.stats.failed += 1
            except LeaseLost:
                self.stats.lost += 1
            return None
        folder = self.images_dir / str(r.id)
        paths = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(imgs):
                p = folder / f"{k}-{run}.png"
                img.save(p, format="PNG")
                paths.append(str(p))
        except Exception as exc:  # a local fault (full disk, a file in the way): this request retries
            # with backoff (then dead); the rest of the batch is recorded, not left to lease expiry
            _log.exception("saving the images failed", extra={"request_id": r.id})
            self.metrics.failures.labels(reason="save_error").inc()
            try:
                self.queue.fail(claim, r.id, f"cannot save the images: {exc!r}"[:500])
                self.stats.failed += 1
            except LeaseLost:
                self.stats.lost += 1
            return None
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
        if not claim.requests:
            return 0
        try:
            self._deliver_claimed(claim, claim.requests)
        except DatabaseUnavailable:
            self._stranded.append(("deliver", claim))
            raise
        return len(claim)

    def _deliver_claimed(self, claim: Claim, requests: Sequence[RequestRecord]) -> None:
        """Deliver a claim's requests one after the other, its lease renewed all along (a slow
        platform on the first must not let the lease of the last expire, or another worker would
        take it and post it too); a request the claim no longer owns is left to its new owner."""
        with LeaseKeeper(self.queue, claim, max(1.0, self.queue.policy.lease_seconds / 3)) as keeper:
            for r in requests:
                if r.id not in keeper.owned:
                    self.stats.lost += 1
                    _log.warning("%s", LeaseLost.for_request(r.id, Status.POSTING), extra={"request_id": r.id})
                    continue
                with log_context(request_id=r.id):
                    self._deliver_one(claim, r)

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
            todo = []
            for r in claim.requests:
                if r.id not in owned:
                    continue
                cur = self.queue.get(r.id)
                if cur.status == Status.POSTING and cur.lease_token == claim.token:
                    todo.append(cur)
            self._deliver_claimed(again, todo)
            self._stranded.pop(0)

    def _deliver_one(self, claim: Claim, r: RequestRecord) -> None:
        """Post one request's result (or, after a crash mid-post, find the reply already there)."""
        platform = self.platforms[r.platform]
        # Whether the reply may be out without the platform having said so: a recovery (a crash
        # mid-post) until the platform has been asked, or a try that may have posted although it
        # failed (timed out, connection lost). A failure meanwhile keeps it so: the retry asks first.
        posting = _PostState(unknown=r.id in claim.recovering)
        try:
            with self.metrics.post_seconds.labels(platform=r.platform).time():
                try:
                    found = None
                    if posting.unknown:
                        found = platform.find_delivery(r)
                        posting.unknown = False
                    if found is None and r.id in claim.final:  # out of attempts: nothing more is posted
                        raise DeliveryError("the delivery lease expired on the last attempt and no reply was "
                                            "found on the platform")
                    delivery = found or self._post(claim, platform, r, posting)
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
            _log.info("posted reply %s%s", delivery.reply_id,
                      " (found after a crash)" if found else
                      " (found on the platform after a try that failed)" if posting.found else "",
                      extra={"request_id": r.id, "action": "posted"})
        except DeliveryError as exc:
            self.stats.delivery_failures += 1
            self.metrics.failures.labels(
                reason="delivery_permanent" if exc.permanent else "delivery_transient").inc()
            try:
                self.queue.delivery_failed(claim, r.id, str(exc), permanent=exc.permanent,
                                           retry_after=exc.retry_after, posted_unknown=posting.unknown)
            except LeaseLost:
                self.stats.lost += 1
        except LeaseLost:
            self.stats.lost += 1

    def _post(self, claim: Claim, platform: Platform, r: RequestRecord, posting: _PostState) -> Delivery:
        """``platform.deliver`` with in-attempt retries (tenacity) for transient errors: exponential
        backoff with jitter, never shorter than the platform's Retry-After / rate-limit reset, for at
        most ``delivery_retry_seconds``. A permanent error, or a wait longer than what is left of
        that budget, goes back to the queue (which honours ``retry_after`` across restarts). After a
        try that may have posted (``maybe_posted``), the next one first looks for the reply
        (``find_delivery``) and posts only when it is not there; ``posting`` tells the caller whether
        that is still unknown when the attempt ends (when it is the request's last attempt, the
        platform is asked once more before the attempt fails)."""
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
        # (the caller, _deliver_claimed, keeps the claim's lease renewed meanwhile)
        try:
            for attempt in tenacity.Retrying(retry=tenacity.retry_if_exception(transient), wait=wait, stop=stop,
                                             sleep=self.sleep, before_sleep=log_retry, reraise=True):
                with attempt:
                    if posting.unknown:
                        found = platform.find_delivery(r)
                        posting.unknown = False
                        if found is not None:
                            posting.found = True
                            return found
                    try:
                        return platform.deliver(r, paths)
                    except DeliveryError as exc:
                        posting.unknown = exc.maybe_posted
                        raise
        except DeliveryError as exc:
            if not (posting.unknown and r.attempts >= r.max_attempts and exc.retry_after is None
                    and not exc.permanent):
                raise
            # The last attempt ends, and its last try may have posted: one look, so that a reply
            # that is out does not leave its request dead (and open to being posted again).
            try:
                found = platform.find_delivery(r)
            except Exception:
                _log.warning("cannot look for the reply after the last try failed", exc_info=True)
                raise exc from None
            posting.unknown = False
            if found is None:
                raise
            posting.found = True
            return found
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
