"""The real tweepy 4.17 ``Client`` against the fake X API (bot.fakes.x_server)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import tweepy
from requests_oauthlib import OAuth1

from bot.fakes.x_server import FakeX
from bot.fakes.x_transport import mount_fake_x
from bot.x_media import upload_image, upload_image_for_client

MENTION_FIELDS = dict(
    tweet_fields=["author_id", "conversation_id", "created_at", "in_reply_to_user_id", "referenced_tweets",
                  "entities", "display_text_range", "edit_history_tweet_ids"],
    expansions=["author_id", "referenced_tweets.id"],
    user_fields=["username", "name", "protected"],
)


class Clock:
    """A settable clock for the fake's rate-limit windows."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeX]:
    with FakeX(clock=clock, rate_limits={"GET /2/users/me": (3, None)}) as server:
        yield server


@pytest.fixture
def client(fake: FakeX) -> Iterator[tweepy.Client]:
    c = tweepy.Client(**fake.credentials())
    mount_fake_x(c.session, fake.base_url)
    yield c
    c.session.close()


def test_fake_listens_on_loopback_only(fake: FakeX) -> None:
    assert fake.base_url.startswith("http://127.0.0.1:")
    assert fake.port > 0


def test_mentions_since_id_newest_first_with_expansions(fake: FakeX, client: tweepy.Client) -> None:
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    first = fake.add_mention(alice, "an astronaut riding a horse")
    second = fake.add_mention(bob, "a cat made of sushi")
    fake.add_tweet(bob, "not about the bot")

    page = client.get_users_mentions(fake.bot.id, **MENTION_FIELDS)

    assert [t.id for t in page.data] == [int(second.id), int(first.id)]
    assert page.meta == {"result_count": 2, "newest_id": second.id, "oldest_id": first.id}
    assert {u.username for u in page.includes["users"]} == {"alice", "bob"}
    tweet = page.data[1]
    assert tweet.author_id == int(alice.id)
    assert tweet.text == "@dalle_mini_bot an astronaut riding a horse"
    assert tweet.entities["mentions"][0]["id"] == fake.bot.id
    assert tweet.display_text_range == [0, len(tweet.text)]
    assert fake.requests[-1].auth == "app"  # get_users_mentions sends the Bearer token

    empty = client.get_users_mentions(fake.bot.id, since_id=page.meta["newest_id"])
    assert empty.data is None and empty.meta == {"result_count": 0}

    third = fake.add_mention(alice, "a lighthouse at dusk")
    newer = client.get_users_mentions(fake.bot.id, since_id=page.meta["newest_id"], user_auth=True)
    assert [t.id for t in newer.data] == [int(third.id)]
    assert fake.requests[-1].auth == f"user:{fake.bot.id}"


def test_reply_prefix_is_skipped_by_display_text_range(fake: FakeX, client: tweepy.Client) -> None:
    alice, pixel = fake.add_user("alice"), fake.add_user("pixel_fan")
    lamp = fake.add_tweet(pixel, "look at my new lamp")
    mention = fake.add_mention(alice, "@dalle_mini_bot this lamp as a cathedral", reply_to=lamp)

    page = client.get_users_mentions(fake.bot.id, **MENTION_FIELDS)

    tweet = page.data[0]
    start, end = tweet.display_text_range
    assert tweet.text[start:end] == "@dalle_mini_bot this lamp as a cathedral"
    assert tweet.referenced_tweets[0].id == int(lamp.id)
    assert tweet.conversation_id == int(lamp.id) == int(mention.conversation_id)
    assert [t.id for t in page.includes["tweets"]] == [int(lamp.id)]


def test_pagination_follows_next_token(fake: FakeX, client: tweepy.Client) -> None:
    alice = fake.add_user("alice")
    made = [fake.add_mention(alice, f"prompt {i}") for i in range(12)]

    pages = list(tweepy.Paginator(client.get_users_mentions, fake.bot.id, max_results=5))

    assert [p.meta["result_count"] for p in pages] == [5, 5, 2]
    assert "next_token" not in pages[-1].meta
    seen = [t.id for p in pages for t in p.data]
    assert seen == sorted((int(t.id) for t in made), reverse=True)


def test_invalid_parameters_are_400(fake: FakeX, client: tweepy.Client) -> None:
    with pytest.raises(tweepy.BadRequest):
        client.get_users_mentions(fake.bot.id, max_results=200)
    with pytest.raises(tweepy.BadRequest):
        client.get_users_mentions(fake.bot.id, tweet_fields=["no_such_field"])


def test_reply_with_media_uploaded_through_signed_v2_upload(fake: FakeX, client: tweepy.Client,
                                                            png: bytes) -> None:
    alice = fake.add_user("alice")
    mention = fake.add_mention(alice, "an astronaut riding a horse")

    media = upload_image_for_client(client, png)
    reply = client.create_tweet(text="an astronaut riding a horse (job 1)", in_reply_to_tweet_id=mention.id,
                                media_ids=[media.id])

    upload = fake.requests_to("POST /2/media/upload")[0]
    assert upload.status == 200 and upload.auth == f"user:{fake.bot.id}"  # signature verified
    assert upload.headers["authorization"].startswith("OAuth ")
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert upload.headers["x-fake-original-url"] == "https://api.x.com/2/media/upload"
    assert fake.media[media.id].data == png
    assert (fake.media[media.id].width, fake.media[media.id].height) == (256, 256)

    post = fake.requests_to("POST /2/tweets")[0]
    assert post.json() == {"text": "an astronaut riding a horse (job 1)",
                           "reply": {"in_reply_to_tweet_id": mention.id}, "media": {"media_ids": [media.id]}}
    [stored] = fake.replies_to(mention)
    assert stored.id == reply.data["id"]
    assert stored.author_id == fake.bot.id
    assert stored.media_keys == [fake.media[media.id].media_key]
    assert stored.conversation_id == mention.conversation_id


def test_upload_with_wrong_secret_is_rejected(fake: FakeX, client: tweepy.Client, png: bytes) -> None:
    bad = OAuth1(fake.consumer_key, client_secret="wrong", resource_owner_key=fake.access_token,
                 resource_owner_secret=fake.access_token_secret)
    with pytest.raises(tweepy.Unauthorized):
        upload_image(client.session, bad, png)
    bearer_only = client.session.post(  # app-only Bearer cannot upload
        "https://api.x.com/2/media/upload", headers={"Authorization": f"Bearer {fake.bearer_token}"},
        files={"media": ("a.png", png, "image/png")}, data={"media_category": "tweet_image"})
    assert bearer_only.status_code == 403
    assert bearer_only.json()["title"] == "Unsupported Authentication"
    assert fake.media == {}


def test_rate_limit_headers_on_every_response(fake: FakeX) -> None:
    raw = tweepy.Client(**fake.credentials(), return_type=requests.Response)
    mount_fake_x(raw.session, fake.base_url)
    with raw.session:
        first = raw.get_users_mentions(fake.bot.id)
        second = raw.get_users_mentions(fake.bot.id)
    assert first.headers["x-rate-limit-limit"] == "450"  # app context
    assert int(first.headers["x-rate-limit-remaining"]) == int(second.headers["x-rate-limit-remaining"]) + 1
    assert int(first.headers["x-rate-limit-reset"]) > time.time()


def test_injected_429_surfaces_as_too_many_requests_with_reset(fake: FakeX, client: tweepy.Client,
                                                               clock: Clock) -> None:
    fake.inject_rate_limit("GET /2/users/:id/mentions", count=1, reset_after=42)

    with pytest.raises(tweepy.TooManyRequests) as caught:
        client.get_users_mentions(fake.bot.id)

    headers = caught.value.response.headers
    assert headers["x-rate-limit-remaining"] == "0"
    assert caught.value.reset_time == int(headers["x-rate-limit-reset"]) == int(clock.now + 42)
    assert client.get_users_mentions(fake.bot.id).meta == {"result_count": 0}  # one 429 only


def test_exhausted_window_is_429_until_reset(fake: FakeX, client: tweepy.Client, clock: Clock) -> None:
    for _ in range(3):
        client.get_me()
    with pytest.raises(tweepy.TooManyRequests) as caught:
        client.get_me()
    assert caught.value.reset_time == int(clock.now + 900)
    clock.now += 901
    assert client.get_me().data.username == "dalle_mini_bot"


def test_rate_limited_until_reset_when_count_is_none(fake: FakeX, client: tweepy.Client, clock: Clock) -> None:
    fake.inject_rate_limit("POST /2/tweets", count=None, reset_after=60)
    alice = fake.add_user("alice")
    mention = fake.add_mention(alice, "a red fox")
    for _ in range(2):
        with pytest.raises(tweepy.TooManyRequests):
            client.create_tweet(text="a red fox", in_reply_to_tweet_id=mention.id)
    clock.now += 61
    assert client.create_tweet(text="a red fox", in_reply_to_tweet_id=mention.id).data["id"]


def test_server_errors_for_a_period(fake: FakeX, client: tweepy.Client, clock: Clock) -> None:
    fake.inject_server_error("GET /2/users/:id/mentions", status=503, count=None, duration=30)
    with pytest.raises(tweepy.TwitterServerError) as caught:
        client.get_users_mentions(fake.bot.id)
    assert caught.value.response.status_code == 503
    clock.now += 31
    assert client.get_users_mentions(fake.bot.id).meta == {"result_count": 0}


def test_replies_to_deleted_or_protected_tweets_fail(fake: FakeX, client: tweepy.Client) -> None:
    alice, carol, dave = fake.add_user("alice"), fake.add_user("carol"), fake.add_user("dave")
    deleted = fake.add_mention(alice, "a castle")
    protected = fake.add_mention(carol, "a forest")
    gone = fake.add_mention(dave, "a river")
    fake.delete_tweet(deleted)
    fake.protect_user(carol)
    fake.delete_tweet(gone, reply_error=404)

    assert client.get_users_mentions(fake.bot.id).data is None  # none of them is visible any more
    for tweet in (deleted, protected):
        with pytest.raises(tweepy.Forbidden) as caught:
            client.create_tweet(text=f"reply to {tweet.id}", in_reply_to_tweet_id=tweet.id)
        assert caught.value.api_messages == [
            "You attempted to reply to a Tweet that is deleted or not visible to you."]
    with pytest.raises(tweepy.NotFound):
        client.create_tweet(text="reply", in_reply_to_tweet_id=gone.id)
    assert client.get_tweet(deleted.id).errors[0]["title"] == "Not Found Error"


def test_duplicate_text_and_unsummoned_replies_are_403(fake: FakeX, client: tweepy.Client) -> None:
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    mention = fake.add_mention(alice, "a cat")
    unrelated = fake.add_tweet(bob, "just a tweet")
    client.create_tweet(text="a cat", in_reply_to_tweet_id=mention.id)
    with pytest.raises(tweepy.Forbidden) as caught:
        client.create_tweet(text="a cat", in_reply_to_tweet_id=mention.id)
    assert caught.value.api_messages == ["You are not allowed to create a Tweet with duplicate content."]
    with pytest.raises(tweepy.Forbidden):
        client.create_tweet(text="hello", in_reply_to_tweet_id=unrelated.id)


def test_duplicate_and_out_of_order_mentions(fake: FakeX, client: tweepy.Client) -> None:
    alice = fake.add_user("alice")
    late = fake.add_mention(alice, "indexed late", hidden=True)
    first = fake.add_mention(alice, "first")
    page = client.get_users_mentions(fake.bot.id)
    assert [t.id for t in page.data] == [int(first.id)]
    since_id = page.meta["newest_id"]

    # An older id shows up after since_id moved past it: a since_id poll misses it.
    fake.reveal(late)
    assert client.get_users_mentions(fake.bot.id, since_id=since_id).data is None
    assert int(late.id) in [t.id for t in client.get_users_mentions(fake.bot.id).data]

    # The same mention delivered again, despite since_id.
    fake.redeliver(first)
    again = client.get_users_mentions(fake.bot.id, since_id=since_id)
    assert [t.id for t in again.data] == [int(first.id)]
    assert client.get_users_mentions(fake.bot.id, since_id=since_id).data is None

    # An edit is a new post id whose history starts at the original.
    edited = fake.edit_tweet(first, "@dalle_mini_bot first, but better")
    page = client.get_users_mentions(fake.bot.id, since_id=since_id, tweet_fields=["edit_history_tweet_ids"])
    assert [t.id for t in page.data] == [int(edited.id)]
    assert page.data[0].edit_history_tweet_ids == [int(first.id), int(edited.id)]


def test_own_recent_replies_for_crash_recovery(fake: FakeX, client: tweepy.Client, png: bytes) -> None:
    alice = fake.add_user("alice")
    mentions = [fake.add_mention(alice, f"prompt {i}") for i in range(3)]
    for m in mentions[:2]:
        media = upload_image_for_client(client, png)
        client.create_tweet(text=f"done {m.id}", in_reply_to_tweet_id=m.id, media_ids=[media.id])

    mine = client.get_users_tweets(fake.bot.id, tweet_fields=["referenced_tweets", "attachments"],
                                   max_results=100, user_auth=True)

    answered = {ref.id for t in mine.data for ref in t.referenced_tweets if ref.type == "replied_to"}
    assert answered == {int(m.id) for m in mentions[:2]}
    assert all(t.attachments["media_keys"] for t in mine.data)


def test_transport_refuses_other_hosts(fake: FakeX, client: tweepy.Client,
                                       offline_guard: list[str]) -> None:
    with pytest.raises(requests.ConnectionError, match="refuses"):
        client.session.get("https://example.com/")
    with pytest.raises(socket.gaierror):  # and the suite-wide guard catches anything else
        socket.getaddrinfo("api.x.com", 443)
    assert offline_guard == ["resolve 'api.x.com'"]
    offline_guard.clear()


def test_wait_for_sees_requests_from_other_threads(fake: FakeX, client: tweepy.Client) -> None:
    worker = threading.Thread(target=client.get_users_mentions, args=(fake.bot.id,))
    worker.start()
    request = fake.wait_for(lambda f: f.requests_to("GET /2/users/:id/mentions"), timeout=5)
    worker.join(5)
    assert request[0].status == 200


def test_daily_limits_send_24_hour_headers_and_a_429_when_spent(clock: Clock) -> None:
    with FakeX(clock=clock, daily_limits={"POST /2/tweets": (3, 2)}) as fake:
        raw = tweepy.Client(**fake.credentials(), return_type=requests.Response)
        mount_fake_x(raw.session, fake.base_url)
        mention = fake.add_mention(fake.add_user("alice"), "a red fox")
        with raw.session:
            first = raw.create_tweet(text="one", in_reply_to_tweet_id=mention.id)
            assert (first.headers["x-user-limit-24hour-remaining"], first.headers["x-app-limit-24hour-remaining"]) \
                == ("2", "1")
            raw.create_tweet(text="two", in_reply_to_tweet_id=mention.id)
            with pytest.raises(tweepy.TooManyRequests) as caught:  # the app's day is spent, not the user's
                raw.create_tweet(text="three", in_reply_to_tweet_id=mention.id)
            h = caught.value.response.headers
            assert h["x-app-limit-24hour-remaining"] == "0" and h["x-user-limit-24hour-remaining"] == "1"
            assert int(h["x-app-limit-24hour-reset"]) == int(clock.now + 24 * 3600)
            assert int(h["x-rate-limit-remaining"]) > 0  # the 15-minute window has requests left
            clock.now += 24 * 3600 + 1
            assert raw.create_tweet(text="three", in_reply_to_tweet_id=mention.id).status_code == 201
