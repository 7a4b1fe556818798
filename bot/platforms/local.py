"""The ``local`` platform: requests from the CLI and the dashboard, replies written to an outbox.

A reply is a folder ``<data dir>/outbox/<request id>/`` holding the images and ``reply.json``.
``reply.json`` is written last (via a rename), so its presence means the reply is complete: that is
what :meth:`LocalPlatform.find_delivery` checks after a crash mid-delivery. A refusal (a request a
moderator rejected) is ``refusal.json`` in the same folder, with no images.

Prompts refused by the prompt filter (:func:`bot.safety.check_prompt`) are stored as ``rejected``
with the polite refusal as the reason, so the refusal is in the queue log; the caller gets the
stored request back.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from bot.intake import PromptRejected, validate_prompt
from bot.platforms.base import Delivery
from bot.safety import PromptFilter, check_prompt
from storage.moderators import intake_paused
from storage.queue import Queue
from storage.records import EnqueueResult, NewRequest, RequestRecord
from storage.states import Status


class LocalPlatform:
    name = "local"

    def __init__(self, outbox: Path, prompt_filter: PromptFilter | None = None) -> None:
        self.outbox = Path(outbox)
        self.prompt_filter = prompt_filter

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
        normalised = validate_prompt(prompt, max_chars=max_chars)
        refusal = check_prompt(self.prompt_filter, prompt)
        return queue.enqueue(
            NewRequest(
                platform=self.name,
                external_id=external_id or uuid.uuid4().hex,
                author_id=user,
                author_name=user_name or user,
                prompt_raw=prompt,
                prompt=normalised,
                n_images=n_images,
                seed=seed,
            ),
            actor=actor,
            status=Status.QUEUED if refusal is None else Status.REJECTED,
            reason=refusal,
        )

    # ---- delivery -----------------------------------------------------------------------

    def _dir(self, request: RequestRecord) -> Path:
        return self.outbox / str(request.id)

    def deliver(self, request: RequestRecord, images: list[Path]) -> Delivery:
        folder = self._dir(request)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, src in enumerate(images):
            dst = folder / f"{i}{Path(src).suffix or '.png'}"
            shutil.copyfile(src, dst)
            names.append(dst.name)
        return self._write_record(folder, "reply.json", request, seed=request.seed, images=names,
                                  reply_id=f"local-{request.id}")

    def deliver_refusal(self, request: RequestRecord, reason: str) -> Delivery:
        """Tell the requester that ``request`` will not be drawn: ``<outbox>/<id>/refusal.json``."""
        folder = self._dir(request)
        folder.mkdir(parents=True, exist_ok=True)
        return self._write_record(folder, "refusal.json", request, refusal=reason,
                                  reply_id=f"local-refusal-{request.id}")

    @staticmethod
    def _write_record(folder: Path, name: str, request: RequestRecord, *, reply_id: str, **fields: object) -> Delivery:
        """Write ``folder/name`` atomically (a rename): its presence means the reply is complete."""
        record = {"request_id": request.id, "external_id": request.external_id, "user": request.user_ref,
                  "prompt": request.prompt_raw, **fields, "reply_id": reply_id}
        tmp = folder / f"{name}.tmp"
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, folder / name)
        return Delivery(reply_id=reply_id, reply_url=str(folder / name))

    def find_delivery(self, request: RequestRecord) -> Delivery | None:
        path = self._dir(request) / "reply.json"
        if not path.exists():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return Delivery(reply_id=record["reply_id"], reply_url=str(path))
