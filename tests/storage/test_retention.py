"""Retention: old images of finished requests are deleted, nothing a request still needs is."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from PIL import Image

from storage.queue import Queue
from storage.records import Generated, NewRequest
from storage.retention import prune
from storage.states import Status


def _generate(queue: Queue, images: Path, ext: str, user: str = "alice") -> int:
    rid = queue.enqueue(NewRequest("local", ext, user, "a red circle", "a red circle")).request.id
    claim = queue.claim("w", 1)
    assert claim.ids == [rid]
    folder = images / str(rid)
    folder.mkdir(parents=True)
    paths = []
    for k in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{k}.png")
        paths.append(str(folder / f"{k}.png"))
    queue.complete_many(claim, [Generated(rid, paths)])
    return rid


def test_prune_removes_old_finished_images_only(queue: Queue, clock, tmp_path: Path) -> None:
    images = tmp_path / "images"
    old_posted = _generate(queue, images, "m1")
    dc = queue.claim_deliveries("d", 1)
    queue.mark_posted(dc, old_posted, "reply-1")
    old_held = _generate(queue, images, "m2")
    queue.hold(old_held, actor="moderator:test", reason="look at it")
    old_generated = _generate(queue, images, "m3")  # waiting for delivery: its images are needed
    outside = tmp_path / "outside.png"  # a path outside the images folder is never deleted
    Image.new("RGB", (8, 8)).save(outside)
    odd = queue.enqueue(NewRequest("local", "m4", "bob", "p", "p")).request.id
    queue.cancel(odd, actor="moderator:test")
    with queue.db.write.begin() as conn:
        from storage.models import Request

        R = Request.__table__
        conn.execute(R.update().where(R.c.id == odd).values(image_paths=[str(outside)]))

    clock.advance(10 * 86400)
    recent = _generate(queue, images, "m5")
    dc = queue.claim_deliveries("d", 5)
    for rid in dc.ids:
        if rid == recent:
            queue.mark_posted(dc, recent, "reply-5")
    clock.advance(86400)

    done = prune(queue.db, images, image_retention_days=7, clock=clock)
    assert done.requests == 2 and done.files == 2  # old_posted's two files; odd's outside file is refused
    assert queue.get(old_posted).image_paths == [] and not (images / str(old_posted)).exists()
    assert outside.exists() and queue.get(odd).image_paths == []
    for keep in (old_held, old_generated, recent):
        rec = queue.get(keep)
        assert rec.image_paths and all(Path(p).exists() for p in rec.image_paths), rec.status
    assert queue.get(old_held).status == Status.HELD
    assert [a.action for a in queue.audit(old_posted)][-1] == "images_pruned"
    # nothing left to do; retention 0 keeps everything
    assert prune(queue.db, images, image_retention_days=7, clock=clock).requests == 0
    clock.advance(30 * 86400)
    assert prune(queue.db, images, image_retention_days=0, clock=clock).requests == 0
    assert Path(queue.get(recent).image_paths[0]).exists()


def test_prune_clears_stale_login_records(queue: Queue, clock) -> None:
    from storage.moderators import Moderators

    from argon2 import PasswordHasher

    mods = Moderators(queue.db, clock=clock, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    mods.add("ann", "a long enough password", actor="cli")
    assert mods.authenticate("ann", "wrong password!!", ip="10.0.0.1") is None
    ann = mods.authenticate("ann", "a long enough password", ip="10.0.0.1")
    assert ann is not None
    mods.create_session(ann)
    clock.advance(40 * 86400)
    done = prune(queue.db, Path("/nonexistent"), image_retention_days=30, clock=clock)
    assert done.login_attempts == 2 and done.sessions == 1
    assert prune(queue.db, Path("/nonexistent"), image_retention_days=30, clock=clock).login_attempts == 0
    _ = dt


def test_the_service_prune_job_uses_the_configured_retention(tmp_path: Path) -> None:
    """`dallebot serve`'s hourly job: [data] image_retention_days from the settings, images from the
    data folder, the same clock as the queue."""
    import dataclasses

    from bot.app import open_app
    from bot.config import load_settings
    from bot.service import Service
    from tests.conftest import FakeClock

    settings = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path)})
    settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, image_retention_days=2))
    with open_app(settings) as app:
        clock = FakeClock()
        app.queue.clock = clock
        rid = _generate(app.queue, Path(settings.images_dir), "m1")
        app.queue.cancel(rid, actor="moderator:test")
        service = Service(app, roles=("web",))
        service.prune_once()
        assert app.queue.get(rid).image_paths  # one day is not two
        clock.advance(3 * 86400)
        service.prune_once()
        assert app.queue.get(rid).image_paths == [] and not (Path(settings.images_dir) / str(rid)).exists()


def test_a_relative_data_folder_is_pruned_too(tmp_path: Path, monkeypatch) -> None:
    """With a relative [data] dir (the default is ./dallebot-data) the worker's stored image paths and
    the prune job (and the dashboard) agree on where the files are, whatever folder each started in."""
    import dataclasses

    from bot.app import open_app
    from bot.config import load_settings
    from bot.service import Service
    from bot.worker import Worker
    from tests.conftest import FakeClock
    from tests.e2e.adapter_support import LetterGenerator

    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={"DALLEBOT_DATA_DIR": "rel-data"})
    settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, image_retention_days=1))
    with open_app(settings) as app:
        clock = FakeClock()
        app.queue.clock = clock
        rid = app.queue.enqueue(NewRequest("local", "m1", "alice", "a red circle", "a red circle")).request.id
        worker = Worker(app.queue, LetterGenerator(), {}, settings.images_dir, owner="w")
        assert worker.generate_batch() == 1
        paths = [Path(p) for p in app.queue.get(rid).image_paths]
        assert paths and all(p.is_absolute() and p.is_file() for p in paths)
        app.queue.reject(rid, actor="moderator:test", reason="not this one")
        clock.advance(2 * 86400)
        Service(app, roles=("web",)).prune_once()
        assert app.queue.get(rid).image_paths == [] and not any(p.exists() for p in paths)
