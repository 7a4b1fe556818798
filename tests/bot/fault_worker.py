"""A worker process for the SIGKILL fault tests (run as ``python -m tests.bot.fault_worker``).

    python -m tests.bot.fault_worker MODE DB_URL DATA_DIR

MODE ``hang``: claims a batch, writes DATA_DIR/generating, then hangs inside generation (to be killed).
MODE ``die-after-post``: generates, then SIGKILLs itself right after the first reply is written to
the outbox and before the queue records it. MODE ``normal``: drains the queue.
Every delivery appends the request id to DATA_DIR/deliveries.log (the test counts posts there).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from PIL import Image

from bot.platforms.local import LocalPlatform
from bot.worker import Worker
from storage import db as dbmod
from storage.queue import Queue, QueuePolicy

LEASE = 1.5


class SolidGenerator:
    def __init__(self, hang_marker: Path | None = None) -> None:
        self.hang_marker = hang_marker

    def generate(self, jobs):  # type: ignore[no-untyped-def]
        if self.hang_marker is not None:
            self.hang_marker.write_text("x")
            time.sleep(3600)
        return [[Image.new("RGB", (32, 32), (j.seed % 256, 90, 160)) for _ in range(j.n_images)] for j in jobs]


class CountingLocal(LocalPlatform):
    def __init__(self, outbox: Path, log: Path, die_after_post: bool) -> None:
        super().__init__(outbox)
        self.log, self.die_after_post = log, die_after_post

    def deliver(self, request, images):  # type: ignore[no-untyped-def]
        delivery = super().deliver(request, images)
        with self.log.open("a") as f:
            f.write(f"{request.id}\n")
        if self.die_after_post:
            os.kill(os.getpid(), signal.SIGKILL)
        return delivery


def main() -> None:
    mode, url, data = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    queue = Queue(dbmod.connect(url), QueuePolicy(lease_seconds=LEASE, retry_base_seconds=0.05, retry_max_seconds=0.1))
    platform = CountingLocal(data / "outbox", data / "deliveries.log", die_after_post=mode == "die-after-post")
    gen = SolidGenerator(data / "generating" if mode == "hang" else None)
    Worker(queue, gen, {"local": platform}, data / "images", owner=f"{mode}-{os.getpid()}", batch_size=8).drain(
        max_wait=5)


if __name__ == "__main__":
    main()
