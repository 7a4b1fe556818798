"""The queue suite: every test runs on a real SQLite file and on the real PostgreSQL server."""

from __future__ import annotations

import pytest

from storage.errors import IllegalTransition, LeaseLost, NotFound
from storage.queue import Queue, backoff_seconds
from storage.records import Generated, NewRequest
from storage.states import Status


def new(ext: str, user: str = "alice", prompt: str = "a red circle", platform: str = "local", **kw) -> NewRequest:
    return NewRequest(platform=platform, external_id=ext, author_id=user, author_name=user.title(),
                      prompt_raw=prompt, prompt=prompt, **kw)


def test_enqueue_is_idempotent_on_platform_and_external_id(queue: Queue) -> None:
    first = queue.enqueue(new("m1"))
    again = queue.enqueue(new("m1", prompt="something else"))
    other_platform = queue.enqueue(new("m1", platform="x"))
    assert first.created and not again.created and other_platform.created
    assert again.request.id == first.request.id
    assert again.request.prompt_raw == "a red circle"
    assert queue.stats()["queued"] == 2
    # the duplicate left no second "received" entry in the queue log
    assert [a.action for a in queue.audit(first.request.id)] == ["received"]


def test_claim_leases_a_batch_and_never_hands_out_a_request_twice(queue: Queue) -> None:
    ids = [queue.enqueue(new(f"m{i}", user=f"u{i}")).request.id for i in range(10)]
    a = queue.claim("worker-a", 4)
    b = queue.claim("worker-b", 4)
    c = queue.claim("worker-c", 4)
    assert len(a) == 4 and len(b) == 4 and len(c) == 2
    assert sorted(a.ids + b.ids + c.ids) == ids
    assert a.token != b.token
    for r in a.requests:
        assert r.status == Status.RUNNING and r.attempts == 1 and r.lease_owner == "worker-a"
    assert len(queue.claim("worker-d", 4)) == 0


def test_claim_is_fair_across_users(queue: Queue) -> None:
    for i in range(50):
        queue.enqueue(new(f"flood{i}", user="flooder"))
    queue.enqueue(new("b1", user="bob"))
    queue.enqueue(new("c1", user="carol"))
    first = queue.claim("w", 3)
    assert sorted(r.author_id for r in first.requests) == ["bob", "carol", "flooder"]
    # bob's next request, enqueued while the flooder still has 49 waiting, is served next round
    queue.enqueue(new("b2", user="bob"))
    second = queue.claim("w", 2)
    assert sorted(r.author_id for r in second.requests) == ["bob", "flooder"]


def test_priority_comes_before_fair_order(queue: Queue) -> None:
    queue.enqueue(new("low", user="a", priority=5))
    urgent = queue.enqueue(new("urgent", user="b", priority=-1)).request
    assert queue.claim("w", 1).ids == [urgent.id]


def test_position_counts_requests_ahead(queue: Queue) -> None:
    ids = [queue.enqueue(new(f"m{i}", user="same")).request.id for i in range(5)]
    assert [queue.position(i) for i in ids] == [0, 1, 2, 3, 4]
    claim = queue.claim("w", 2)
    assert queue.position(claim.ids[0]) is None
    assert [queue.position(i) for i in ids[2:]] == [0, 1, 2]
    with pytest.raises(NotFound):
        queue.position(999_999)


def test_complete_and_deliver_with_fenced_updates(queue: Queue) -> None:
    rid = queue.enqueue(new("m1")).request.id
    claim = queue.claim("w", 1)
    done = queue.complete(claim, rid, ["/tmp/0.png"], [0.01], seed=7)
    assert done.status == Status.GENERATED and done.image_paths == ["/tmp/0.png"] and done.seed == 7
    with pytest.raises(LeaseLost):  # finishing twice is refused
        queue.complete(claim, rid, ["/tmp/1.png"])
    d = queue.claim_deliveries("w", 5)
    assert d.ids == [rid] and not d.recovering
    assert queue.get(rid).status == Status.POSTING
    posted = queue.mark_posted(d, rid, "reply-1", "https://example.invalid/1")
    assert posted.status == Status.POSTED and posted.reply_id == "reply-1" and posted.finished_at is not None
    trail = [(a.action, a.from_status, a.to_status) for a in queue.audit(rid)]
    assert trail == [
        ("received", None, "queued"),
        ("claimed", "queued", "running"),
        ("generated", "running", "generated"),
        ("posting", "generated", "posting"),
        ("posted", "posting", "posted"),
    ]


def test_complete_many_records_a_batch_with_holds_scores_and_seeds(queue: Queue) -> None:
    ids = [queue.enqueue(new(f"m{i}", user=f"u{i}", seed=100 + i)).request.id for i in range(4)]
    claim = queue.claim("w", 4)
    stolen = queue.claim("other", 1)  # nothing left to steal: the batch owns all four
    assert not stolen.requests
    queue.cancel(ids[3], actor="moderator:mo", reason="changed my mind")  # lost before completion
    done = queue.complete_many(claim, [
        Generated(ids[2], ["/i/2/0.png", "/i/2/1.png"], [0.1, 0.2], None, 7),
        Generated(ids[0], ["/i/0/0.png"], [0.95], "NSFW score 0.95 >= 0.8", None),
        Generated(ids[1], [], [], None, None),
        Generated(ids[3], ["/i/3/0.png"], [0.0], None, 9),
    ])
    assert done == [ids[2], ids[0], ids[1]]  # in the order given; the cancelled one is not recorded
    two, zero, one, three = (queue.get(i) for i in (ids[2], ids[0], ids[1], ids[3]))
    assert two.status == Status.GENERATED and two.image_paths == ["/i/2/0.png", "/i/2/1.png"]
    assert two.nsfw_scores == [0.1, 0.2] and two.seed == 7 and two.lease_token is None
    assert zero.status == Status.HELD and zero.nsfw_scores == [0.95] and zero.seed == 100  # seed kept
    assert one.status == Status.GENERATED and one.image_paths == [] and one.seed == 101
    assert three.status == Status.CANCELLED and three.image_paths == [] and three.seed == 103
    trails = {i: [(a.action, a.from_status, a.to_status, a.reason, a.actor) for a in queue.audit(i)][2:]
              for i in ids}
    assert trails[ids[2]] == [("generated", "running", "generated", None, "worker:w")]
    assert trails[ids[0]] == [("held", "running", "held_for_review", "NSFW score 0.95 >= 0.8", "worker:w")]
    assert trails[ids[1]] == [("generated", "running", "generated", None, "worker:w")]
    assert [t[0] for t in trails[ids[3]]] == ["cancelled"]
    assert queue.complete_many(claim, [Generated(ids[2], ["/again.png"])]) == []  # finishing twice: refused
    assert queue.get(ids[2]).image_paths == ["/i/2/0.png", "/i/2/1.png"]
    assert queue.complete_many(claim, []) == []


def test_expired_lease_is_reclaimed_and_the_stale_worker_cannot_finish(queue: Queue, clock) -> None:
    rid = queue.enqueue(new("m1")).request.id
    stale = queue.claim("sleepy", 1)
    clock.advance(30)
    assert queue.renew(stale) == {rid}  # renewal keeps it alive
    clock.advance(59)
    assert queue.reclaim_expired() == 0
    clock.advance(2)  # now past the renewed lease
    assert queue.reclaim_expired() == 1
    back = queue.get(rid)
    assert back.status == Status.QUEUED and back.lease_token is None and back.run_at > clock.now
    assert len(queue.claim("fresh", 1)) == 0  # not before the backoff
    clock.advance(backoff_seconds(1, 10, 600, 1.0) + 1)
    fresh = queue.claim("fresh", 1)
    assert fresh.ids == [rid] and fresh.requests[0].attempts == 2
    with pytest.raises(LeaseLost):
        queue.complete(stale, rid, ["/tmp/stale.png"])
    assert queue.renew(stale) == set()
    assert queue.complete(fresh, rid, ["/tmp/fresh.png"]).image_paths == ["/tmp/fresh.png"]


def test_failures_back_off_then_die(queue: Queue, clock) -> None:
    rid = queue.enqueue(new("m1")).request.id
    delays = []
    for attempt in (1, 2):
        claim = queue.claim("w", 1)
        assert claim.ids == [rid]
        rec = queue.fail(claim, rid, "boom")
        assert rec.status == Status.QUEUED and rec.error == "boom"
        delays.append((rec.run_at - clock.now).total_seconds())
        clock.advance(delays[-1] + 0.001)
    assert 10 <= delays[0] <= 12 and 20 <= delays[1] <= 24  # 10 s, then 20 s, with <= 20% jitter
    claim = queue.claim("w", 1)
    dead = queue.fail(claim, rid, "boom")
    assert dead.status == Status.DEAD and dead.attempts == 3
    assert "out of attempts" in queue.audit(rid)[-1].reason


def test_permanent_failure_is_not_retried(queue: Queue) -> None:
    rid = queue.enqueue(new("m1")).request.id
    claim = queue.claim("w", 1)
    assert queue.fail(claim, rid, "tweet deleted", permanent=True).status == Status.FAILED


def test_delivery_recovery_after_an_expired_posting_lease(queue: Queue, clock) -> None:
    rid = queue.enqueue(new("m1")).request.id
    c = queue.claim("w", 1)
    queue.complete(c, rid, ["/tmp/0.png"])
    crashed = queue.claim_deliveries("w1", 1)
    assert crashed.ids == [rid]
    assert queue.claim_deliveries("w2", 1).ids == []  # still leased
    clock.advance(61)
    recovery = queue.claim_deliveries("w2", 1)
    assert recovery.ids == [rid] and recovery.recovering == {rid}
    with pytest.raises(LeaseLost):
        queue.mark_posted(crashed, rid, "late")
    assert queue.mark_posted(recovery, rid, "found").reply_id == "found"


def test_transient_delivery_failure_honours_retry_after(queue: Queue, clock) -> None:
    rid = queue.enqueue(new("m1")).request.id
    c = queue.claim("w", 1)
    queue.complete(c, rid, ["/tmp/0.png"])
    d = queue.claim_deliveries("w", 1)
    rec = queue.delivery_failed(d, rid, "429 Too Many Requests", retry_after=900)
    assert rec.status == Status.GENERATED and (rec.run_at - clock.now).total_seconds() >= 900
    assert queue.claim_deliveries("w", 1).ids == []
    # waiting out rate limits never uses up attempts: ten in a row and the request is still alive
    for _ in range(10):
        clock.advance(901)
        d = queue.claim_deliveries("w", 1)
        assert d.ids == [rid]
        rec = queue.delivery_failed(d, rid, "429 Too Many Requests", retry_after=900)
    assert rec.status == Status.GENERATED and rec.attempts == 1  # the generation attempt only


def test_moderation_transitions(queue: Queue) -> None:
    rid = queue.enqueue(new("m1")).request.id
    c = queue.claim("w", 1)
    held = queue.complete(c, rid, ["/tmp/0.png"], [0.97], hold_reason="nsfw score 0.97")
    assert held.status == Status.HELD
    approved = queue.approve(rid, actor="moderator:mia", reason="false positive")
    assert approved.status == Status.GENERATED
    d = queue.claim_deliveries("w", 1)
    queue.mark_posted(d, rid, "r1")
    with pytest.raises(IllegalTransition, match="cannot approve request .*: it is posted"):
        queue.approve(rid, actor="moderator:mia")
    with pytest.raises(IllegalTransition):
        queue.cancel(rid, actor="moderator:mia")
    with pytest.raises(NotFound, match="no request with id 424242"):
        queue.reject(424242, actor="moderator:mia")
    entry = queue.audit(rid)[3]
    assert (entry.actor, entry.action, entry.reason) == ("moderator:mia", "approved", "false positive")


def test_held_prompt_without_images_goes_back_to_the_queue_on_approval(queue: Queue) -> None:
    rid = queue.enqueue(new("m1"), status=Status.HELD, reason="prompt needs review").request.id
    assert queue.approve(rid, actor="moderator:a").status == Status.QUEUED
    rid2 = queue.enqueue(new("m2"), status=Status.HELD).request.id
    rejected = queue.reject(rid2, actor="moderator:a", reason="not allowed")
    assert rejected.status == Status.REJECTED and rejected.error == "not allowed"


def test_requeue_gives_fresh_attempts_and_cancel_stops_a_running_request(queue: Queue) -> None:
    rid = queue.enqueue(new("m1")).request.id
    for _ in range(3):
        queue.fail(queue.claim("w", 1), rid, "boom")
        # jump past the backoff
        queue.clock.advance(700)  # type: ignore[attr-defined]
    assert queue.get(rid).status == Status.DEAD
    again = queue.requeue(rid, actor="moderator:a")
    assert again.status == Status.QUEUED and again.attempts == 0 and again.finished_at is None
    claim = queue.claim("w", 1)
    assert queue.cancel(rid, actor="moderator:a", reason="user asked").status == Status.CANCELLED
    with pytest.raises(LeaseLost):
        queue.complete(claim, rid, ["/tmp/x.png"])


def test_banned_users_are_refused_until_unbanned(queue: Queue) -> None:
    queue.enqueue(new("m1", user="troll"))
    user = queue.set_ban("local:troll", True, actor="moderator:a", reason="spam")
    assert user.banned and user.ban_reason == "spam"
    refused = queue.enqueue(new("m2", user="troll")).request
    assert refused.status == Status.REJECTED and refused.error == "user is banned"
    queue.set_ban("troll", False, actor="moderator:a")
    assert queue.enqueue(new("m3", user="troll")).request.status == Status.QUEUED
    assert [a.action for a in queue.audit(user_ref="local:troll") if a.request_id is None] == ["banned", "unbanned"]


def test_release_returns_requests_without_spending_an_attempt(queue: Queue) -> None:
    rid = queue.enqueue(new("m1")).request.id
    claim = queue.claim("w", 1)
    assert queue.release(claim) == 1
    rec = queue.get(rid)
    assert rec.status == Status.QUEUED and rec.attempts == 0


def test_list_filters_and_paging(queue: Queue) -> None:
    for i in range(7):
        queue.enqueue(new(f"m{i}", user="alice" if i % 2 else "bob", prompt=f"a {'blue' if i < 3 else 'red'} square {i}"))
    page1 = queue.list(limit=3)
    page2 = queue.list(limit=3, before_id=page1[-1].id)
    assert [r.id for r in page1] == sorted((r.id for r in page1), reverse=True)
    assert page2[0].id < page1[-1].id and len(page2) == 3
    assert {r.author_id for r in queue.list(user="local:alice")} == {"alice"}
    assert len(queue.list(text="BLUE")) == 3
    assert len(queue.list(text="50%")) == 0  # LIKE wildcards are escaped
    queue.claim("w", 2)
    assert len(queue.list(status="running")) == 2
    assert len(queue.list(status=["running", "queued"])) == 7


def test_stats_count_every_status(queue: Queue) -> None:
    queue.enqueue(new("m1"))
    queue.enqueue(new("m2"), status=Status.REJECTED, reason="filtered")
    stats = queue.stats()
    assert set(stats) == {s.value for s in Status}
    assert stats["queued"] == 1 and stats["rejected"] == 1 and stats["posted"] == 0


def test_cursors(queue: Queue) -> None:
    assert queue.get_cursor("x:mentions") is None
    queue.set_cursor("x:mentions", "100")
    queue.set_cursor("x:mentions", "250")
    assert queue.get_cursor("x:mentions") == "250"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_enqueue_many_decides_as_one_by_one(queue: Queue, twin_queue: Queue, seed: int) -> None:
    """A batch (one transaction; one statement on PostgreSQL) stores what enqueueing the same requests
    one after another stores: ids in order, fair-share slots, duplicates (stored before, or twice in
    the batch) returned with created=False, a banned user's requests rejected, intake decisions kept."""
    import random

    rng = random.Random(seed)
    for q in (queue, twin_queue):  # the same history on both: a few stored requests, a banned user
        for i in range(5):
            q.enqueue(new(f"old{i}", user=f"u{i % 3}"))
        q.claim("w", 2)
        q.set_ban("local:u4", True, actor="moderator:test")
    decisions = [(Status.QUEUED, None)] * 6 + [(Status.REJECTED, "filtered"), (Status.HELD, "needs review")]
    items = []
    for i in range(40):
        ext = rng.choice([f"new{i}", f"new{i}", f"new{i}", f"old{rng.randrange(5)}", f"new{rng.randrange(i + 1)}"])
        status, reason = rng.choice(decisions)
        items.append((new(ext, user=f"u{rng.randrange(6)}", prompt=f"p{i}"), status, reason))

    one_by_one = [queue.enqueue(n, status=s, reason=r) for n, s, r in items]
    batch = twin_queue.enqueue_many(items)

    def shape(results):  # type: ignore[no-untyped-def]
        return [(r.created, r.request.id, r.request.external_id, r.request.author_id, r.request.prompt,
                 r.request.status, r.request.error, r.request.slot) for r in results]

    assert shape(batch) == shape(one_by_one)
    assert any(not r.created for r in batch) and any(r.request.error == "user is banned" for r in batch)
    assert queue.stats() == twin_queue.stats()
    # the same serving order, and one "received" entry per stored request in both queue logs
    assert [c.ids for c in (queue.claim("w", 100),)] == [c.ids for c in (twin_queue.claim("w", 100),)]
    for r in batch:
        assert [a.action for a in twin_queue.audit(r.request.id)][:1] == ["received"]


def test_enqueue_many_of_nothing_and_bad_status(queue: Queue) -> None:
    assert queue.enqueue_many([]) == []
    with pytest.raises(ValueError, match="cannot store a request as posted"):
        queue.enqueue_many([(new("m1"), Status.QUEUED, None), (new("m2"), Status.POSTED, None)])
    assert queue.stats().get("queued", 0) == 0  # nothing of a refused batch was stored


def test_a_last_delivery_attempt_that_may_have_posted_gets_a_last_look_not_dead(queue: Queue, clock) -> None:
    """Out of attempts, but the reply may be out (the platform could not be asked): the request stays
    `posting` so that the next claim is a last look on the platform (posted if the reply is there);
    only when that look cannot tell either is it dead."""
    rid = queue.enqueue(new("m1")).request.id
    queue.complete(queue.claim("w", 1), rid, ["/tmp/0.png"])
    while True:
        clock.advance(100_000)
        d = queue.claim_deliveries("w", 1)
        assert d.ids == [rid] and not d.final
        if d.requests[0].attempts >= d.requests[0].max_attempts:
            break
        assert queue.delivery_failed(d, rid, "503").status == Status.GENERATED
    rec = queue.delivery_failed(d, rid, "read timeout after sending", posted_unknown=True)
    assert rec.status == Status.POSTING and rec.lease_token is None
    clock.advance(100_000)
    look = queue.claim_deliveries("w2", 1)
    assert look.ids == [rid] and look.final == {rid}
    assert queue.delivery_failed(look, rid, "timeline unreachable", posted_unknown=True).status == Status.DEAD
