"""The NSFW hold path end to end, on SQLite and PostgreSQL: local intake -> worker (a colour
generator at the model boundary) -> the tiny test classifier (flags red images) -> held, never in
the outbox -> a moderator approves (posted) or rejects (refusal delivered, in the queue log)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from bot import moderation
from bot.generation import GenerationJob
from bot.platforms.local import LocalPlatform
from bot.safety import REFUSAL, PromptFilter
from bot.worker import Worker
from inference.nsfw import NsfwClassifier
from storage.queue import Queue
from storage.states import Status
from tests.inference.tiny_nsfw import build_tiny_nsfw_model


class ColourGenerator:
    """Solid red images for prompts that mention red, blue otherwise."""

    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image] | Exception]:
        return [[Image.new("RGB", (64, 64), (230, 20, 20) if "red" in j.prompt else (20, 20, 230))
                 for _ in range(j.n_images)] for j in jobs]


class BrokenClassifier:
    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        raise RuntimeError("classifier exploded")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> NsfwClassifier:
    return NsfwClassifier.load(build_tiny_nsfw_model(tmp_path_factory.mktemp("nsfw") / "tiny.onnx"))


def _outbox_has_reply(outbox: Path, request_id: int) -> bool:
    folder = outbox / str(request_id)
    return (folder / "reply.json").exists() or any(folder.glob("*.png"))


def test_flagged_image_is_held_until_a_moderator_approves_or_rejects(
        queue: Queue, classifier: NsfwClassifier, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    local = LocalPlatform(outbox, prompt_filter=PromptFilter())
    red = local.submit(queue, "a red circle", user="u1", n_images=2).request
    red2 = local.submit(queue, "a red square", user="u2", n_images=1).request
    blue = local.submit(queue, "a blue circle", user="u3", n_images=2).request
    worker = Worker(queue, ColourGenerator(), {"local": local}, tmp_path / "images", owner="w1",
                    classifier=classifier, nsfw_threshold=0.8)

    stats = worker.drain(max_wait=1)
    assert stats.generated == 3 and stats.posted == 1

    # the clean request is posted, with its scores recorded
    rb = queue.get(blue.id)
    assert rb.status == Status.POSTED and len(rb.nsfw_scores) == 2 and max(rb.nsfw_scores) < 0.01
    assert (outbox / str(blue.id) / "reply.json").exists()

    # the flagged ones are held, with the reason in the queue log, and nothing is in the outbox
    for req in (red, red2):
        rec = queue.get(req.id)
        assert rec.status == Status.HELD and min(rec.nsfw_scores) > 0.99 and rec.image_paths
        held = [a for a in queue.audit(req.id) if a.action == "held"]
        assert len(held) == 1 and held[0].reason.startswith("NSFW score 1.00 >= threshold 0.80")
        assert not _outbox_has_reply(outbox, req.id)
    # draining again changes nothing: held requests are never claimed for delivery
    again = worker.drain(max_wait=1)
    assert again.posted == 1 and queue.get(red.id).status == Status.HELD
    assert not _outbox_has_reply(outbox, red.id)

    # a moderator approves the first: the next drain posts the images that were held
    approved = moderation.act(queue, "approve", red.id, actor="moderator:x", platforms={"local": local})
    assert approved.status == Status.GENERATED
    stats = worker.drain(max_wait=1)
    assert queue.get(red.id).status == Status.POSTED
    reply = json.loads((outbox / str(red.id) / "reply.json").read_text())
    assert reply["images"] == ["0.png", "1.png"]

    # a moderator rejects the second: it ends rejected and the requester gets the refusal
    rejected = moderation.act(queue, "reject", red2.id, actor="moderator:x", reason="Not suitable for posting.",
                              platforms={"local": local})
    assert rejected.status == Status.REJECTED
    worker.drain(max_wait=1)
    assert queue.get(red2.id).status == Status.REJECTED
    assert not _outbox_has_reply(outbox, red2.id)
    refusal = json.loads((outbox / str(red2.id) / "refusal.json").read_text())
    assert refusal["refusal"] == "Not suitable for posting." and refusal["request_id"] == red2.id
    log = [(a.actor, a.action) for a in queue.audit(red2.id)]
    assert ("moderator:x", "rejected") in log and ("moderator:x", "refusal_posted") in log


def test_a_filtered_prompt_is_stored_rejected_with_the_reason(queue: Queue, tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "outbox", prompt_filter=PromptFilter())
    rec = local.submit(queue, "a n.u.d.e figure", user="u1").request
    assert rec.status == Status.REJECTED and rec.error == REFUSAL
    received = queue.audit(rec.id)[0]
    assert received.action == "received" and received.to_status == "rejected" and received.reason == REFUSAL
    # a clean prompt is queued; without a filter everything is
    assert local.submit(queue, "a cocktail in Sussex", user="u1").request.status == Status.QUEUED
    assert LocalPlatform(tmp_path / "o2").submit(queue, "a nude figure", user="u2").request.status == Status.QUEUED


def test_a_classifier_failure_holds_the_request(queue: Queue, tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "outbox")
    req = local.submit(queue, "a blue square", user="u1", n_images=1).request
    worker = Worker(queue, ColourGenerator(), {"local": local}, tmp_path / "images", owner="w1",
                    classifier=BrokenClassifier())
    stats = worker.drain(max_wait=1)
    assert stats.posted == 0
    rec = queue.get(req.id)
    assert rec.status == Status.HELD and not _outbox_has_reply(tmp_path / "outbox", req.id)
    assert [a.reason for a in queue.audit(req.id) if a.action == "held"] == ["NSFW check failed: classifier exploded"]


def test_threshold_is_inclusive_and_configurable(queue: Queue, classifier: NsfwClassifier, tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "outbox")
    blue = local.submit(queue, "a blue square", user="u1", n_images=1).request
    # a threshold of 0 holds everything (a score is always >= 0)
    worker = Worker(queue, ColourGenerator(), {"local": local}, tmp_path / "images", owner="w1",
                    classifier=classifier, nsfw_threshold=0.0)
    worker.drain(max_wait=1)
    assert queue.get(blue.id).status == Status.HELD
