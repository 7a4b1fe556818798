"""The ``local`` platform: requests from the CLI and the dashboard, replies written to an outbox.

A reply is a folder ``<data dir>/outbox/<request id>/`` holding the images and ``reply.json``.
Every file is written to a temporary name, flushed to disk (fsync) and renamed, and the folder is
flushed after the renames; ``reply.json`` is written last, after the images are on disk, so its
presence means the reply is complete even after a power cut: that is what
:meth:`LocalPlatform.find_delivery` checks after a crash mid-delivery (a record it cannot read, as an
older version could leave, counts as not delivered, and the reply is written again). A refusal (a
request a moderator rejected) is ``refusal.json`` in the same folder, with no images.

Prompts refused by the prompt filter (:func:`bot.safety.check_prompt`) are stored as ``rejected``
with the polite refusal as the reason, so the refusal is in the queue log; the caller gets the
stored request back. Such a refusal is counted in ``dallebot_refusals{reason="prompt_filter"}`` of
the process's :class:`bot.metrics.Metrics` (when given), as the X and Discord intakes count theirs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from bot.intake import PromptRejected, validate_prompt
from bot.platforms.admission import MAX_STORED_CHARS, storable
from bot.platforms.base import Delivery
from bot.safety import PromptFilter, check_prompt
from storage.moderators import intake_paused
from storage.queue import Queue
from storage.records import EnqueueResult, NewRequest, RequestRecord
from storage.states import Status

if TYPE_CHECKING:
    from bot.metrics import Metrics

_log = logging.getLogger(__name__)

#: Longest requester id (the database column holds 128 characters).
MAX_USER_CHARS = 128


class LocalPlatform:
    name = "local"

    def __init__(self, outbox: Path, prompt_filter: PromptFilter | None = None, *,
                 metrics: Metrics | None = None) -> None:
        self.outbox = Path(outbox)
        self.prompt_filter = prompt_filter
        #: The process's metrics: prompt-filter refusals are counted there (None: not counted).
        self.metrics = metrics

    # ---- intake -------------------------------------------------------------------------

    def submit(
        self,
        queue: Queue,
        prompt: str,
        *,
        user: str = "local-user",
        user_name: str = "",
        n_images: int = 4,
        seed: int | None = None,
        max_chars: int = 280,
        external_id: str | None = None,
        actor: str = "intake:local",
    ) -> EnqueueResult:
        if intake_paused(queue):
            raise PromptRejected("The bot is paused right now and is not taking new requests; please try again later.")
        # As the other platforms store text: no NUL, no lone surrogates (a non-UTF-8 byte in a
        # command-line argument arrives as one, and neither database can store it), 4000 characters.
        clean = storable(prompt, len(prompt))
        normalised = validate_prompt(clean, max_chars=max_chars)
        raw = clean[:MAX_STORED_CHARS]
        author = storable(user, MAX_USER_CHARS + 1)
        if not author.strip():
            raise PromptRejected("Please say who is asking: the user id is empty.")
        if len(author) > MAX_USER_CHARS:
            raise PromptRejected(f"That user id is too long (the limit is {MAX_USER_CHARS} characters).")
        refusal = check_prompt(self.prompt_filter, raw)
        result = queue.enqueue(
            NewRequest(
                platform=self.name,
                external_id=external_id or uuid.uuid4().hex,
                author_id=author,
                author_name=storable(user_name or author, 256),
                prompt_raw=raw,
                prompt=normalised,
                n_images=n_images,
                seed=seed,
            ),
            actor=actor,
            status=Status.QUEUED if refusal is None else Status.REJECTED,
            reason=refusal,
        )
        if (refusal is not None and self.metrics is not None and result.created
                and result.request.status == Status.REJECTED):
            self.metrics.refusals.labels(reason="prompt_filter").inc()
        return result

    # ---- delivery -----------------------------------------------------------------------

    def _dir(self, request: RequestRecord) -> Path:
        return self.outbox / str(request.id)

    def _folder(self, request: RequestRecord) -> Path:
        """The request's outbox folder, created durably (its entry flushed in the outbox and above)."""
        folder = self._dir(request)
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.outbox)
            _fsync_dir(self.outbox.parent)
        return folder

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        folder = self._folder(request)
        names = []
        for i, src in enumerate(images):
            dst = folder / f"{i}{Path(src).suffix or '.png'}"
            with open(src, "rb") as f:
                _write_durably(dst, lambda out, src_file=f: shutil.copyfileobj(src_file, out))
            names.append(dst.name)
        _fsync_dir(folder)  # the images' names are on disk before the record that lists them
        return self._write_record(folder, "reply.json", request, seed=request.seed, images=names,
                                  reply_id=f"local-{request.id}")

    def deliver_refusal(self, request: RequestRecord, reason: str) -> Delivery:
        """Tell the requester that ``request`` will not be drawn: ``<outbox>/<id>/refusal.json``."""
        folder = self._folder(request)
        return self._write_record(folder, "refusal.json", request, refusal=reason,
                                  reply_id=f"local-refusal-{request.id}")

    @staticmethod
    def _write_record(folder: Path, name: str, request: RequestRecord, *, reply_id: str, **fields: object) -> Delivery:
        """Write ``folder/name`` durably and atomically (fsync, rename, fsync of the folder): its
        presence means the reply is complete."""
        record = {"request_id": request.id, "external_id": request.external_id, "user": request.user_ref,
                  "prompt": request.prompt_raw, **fields, "reply_id": reply_id}
        data = json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8")
        _write_durably(folder / name, lambda out: out.write(data))
        _fsync_dir(folder)
        return Delivery(reply_id=reply_id, reply_url=str(folder / name))

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        path = self._dir(request) / "reply.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            reply_id = record["reply_id"]
            if not isinstance(reply_id, str) or not reply_id:
                raise ValueError("no reply_id")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A torn or empty record (a crash or power cut while an older version wrote it) is not
            # a delivered reply: write it again rather than fail the request for good.
            _log.warning("outbox record %s is unreadable (%s): writing the reply again", path, exc,
                         extra={"request_id": request.id})
            return None
        return Delivery(reply_id=reply_id, reply_url=str(path))


def _write_durably(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` with what ``write(file)`` writes: a temporary file in the same folder, flushed
    to disk, then renamed over ``path`` (a reader sees the old file or the whole new one, never a
    part). Unique temporary names, so two writers of the same file do not trip over each other."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk. POSIX only: elsewhere a
    folder cannot be opened for this, and the rename alone is what there is."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
