"""The worker end to end: queue -> real ONNX pipeline (a tiny exported bundle) -> local outbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.model import PipelineGenerator
from bot.platforms.local import LocalPlatform
from bot.worker import Worker
from inference.export import build_parts, export_bundle
from inference.pipeline import Pipeline
from storage.queue import Queue
from storage.states import Status
from tests.inference.helpers import TINY, TINY_VQ, write_tokenizer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(build_parts(TINY, TINY_VQ, seed=1, std=0.3), tok, out, name="tiny-test", progress=False,
                  license="Apache-2.0")
    return out


def test_drain_generates_and_delivers_to_the_outbox(queue: Queue, bundle: Path, tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "outbox")
    a = local.submit(queue, "a red circle", user="u1", n_images=2, seed=5).request
    b = local.submit(queue, "a blue square", user="u2", n_images=1).request
    unreadable = local.submit(queue, "\u65e5\u672c\u8a9e", user="u3", n_images=1).request  # no letters the model knows
    worker = Worker(queue, PipelineGenerator(Pipeline.load(bundle)), {"local": local}, tmp_path / "images",
                    owner="w1", batch_size=8)
    stats = worker.drain(max_wait=1)
    assert stats.generated == 2 and stats.posted == 2
    ra, rb, ru = queue.get(a.id), queue.get(b.id), queue.get(unreadable.id)
    assert ra.status == Status.POSTED and ra.reply_id == f"local-{a.id}" and len(ra.image_paths) == 2
    assert rb.status == Status.POSTED and rb.seed is not None  # the seed used is recorded
    assert ru.status == Status.FAILED and "empty after normalisation" in (ru.error or "")
    reply = json.loads((tmp_path / "outbox" / str(a.id) / "reply.json").read_text())
    assert reply["images"] == ["0.png", "1.png"] and reply["prompt"] == "a red circle"
    first = (tmp_path / "outbox" / str(a.id) / "0.png").read_bytes()
    assert first.startswith(b"\x89PNG")
    # the process metrics saw it all
    m = worker.metrics.registry
    assert m.get_sample_value("dallebot_images_generated_total") == 3
    assert m.get_sample_value("dallebot_replies_posted_total", {"platform": "local"}) == 2
    assert m.get_sample_value("dallebot_failures_total", {"reason": "prompt_unreadable"}) == 1
    assert m.get_sample_value("dallebot_generate_seconds_count") == 1
    # same prompt and seed through the queue again: byte-identical image
    again = local.submit(queue, "a red circle", user="u1", n_images=2, seed=5).request
    worker.drain(max_wait=1)
    assert (tmp_path / "outbox" / str(again.id) / "0.png").read_bytes() == first


def test_cli_worker_drain_with_a_configured_bundle(tmp_path: Path, bundle: Path, sqlite_url: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndir = "{tmp_path / "data"}"\n[database]\nurl = "{sqlite_url}"\n'
                   f'[model]\nbundle = "{bundle}"\nthreads = 1\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DALLEBOT_")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(cfg), *a],  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=180)
    assert run("queue", "add", "a green star", "--n", "1").returncode == 0
    p = run("worker", "--drain")
    assert p.returncode == 0, p.stderr
    assert "generated 1, posted 1" in p.stdout
    assert (tmp_path / "data" / "outbox" / "1" / "reply.json").exists()
    # work left that this worker cannot do (generation paused): exit 1, saying why
    assert run("queue", "add", "a red circle", "--n", "1").returncode == 0
    from bot.app import open_app
    from bot.config import load_settings
    from storage.moderators import Switches

    with open_app(load_settings(cfg, env={})) as app:
        Switches(app.queue).set("generation_paused", True, actor="moderator:m")
    p = run("worker", "--drain")
    assert p.returncode == 1 and "generated 0, posted 0" in p.stdout
    assert p.stderr.strip().splitlines()[-1] == ("dallebot: error: stopped with work left: 1 request(s) wait in the "
                                                 "queue, but generation is paused by a moderator")


def test_missing_bundle_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndir = "{tmp_path}"\n[model]\nbundle = "{tmp_path / "nope"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DALLEBOT_")}
    p = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(cfg), "worker", "--drain"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dallebot: error: no model bundle at") and "[model] bundle" in last


def test_every_log_line_about_a_request_carries_its_id(queue: Queue, bundle: Path, tmp_path: Path, caplog) -> None:
    import logging

    from bot.logs import _Context

    local = LocalPlatform(tmp_path / "outbox")
    rid = local.submit(queue, "a red circle", user="u1", n_images=1, seed=1).request.id
    caplog.handler.addFilter(_Context())
    with caplog.at_level(logging.INFO):
        Worker(queue, PipelineGenerator(Pipeline.load(bundle)), {"local": local}, tmp_path / "images").drain(max_wait=1)
    about = [r for r in caplog.records if r.name == "bot.worker"]
    assert about and all(getattr(r, "request_id", None) == rid for r in about)


def test_drain_stops_when_generation_is_paused(queue: Queue, bundle: Path, tmp_path: Path) -> None:
    from storage.moderators import Switches

    local = LocalPlatform(tmp_path / "outbox")
    local.submit(queue, "a red circle", user="u1", n_images=1)
    Switches(queue).set("generation_paused", True, actor="moderator:m")
    stats = Worker(queue, PipelineGenerator(Pipeline.load(bundle)), {"local": local}, tmp_path / "images").drain(
        max_wait=1)
    assert stats.generated == 0 and queue.stats()["queued"] == 1
