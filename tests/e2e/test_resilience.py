"""Start-up and outage resilience of the platform adapters: the real discord.py client against the
fake Discord started late, failing its login, or refusing its gateway; the real tweepy client against
the fake X failing (5xx) or answering 200 with only an ``errors`` list. The real queue and worker."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.config import ConfigError, DiscordConfig, XConfig
from bot.fakes.discord_server import FakeDiscord, FakeDiscordThread
from bot.fakes.x_server import FakeX
from bot.platforms import discord as discord_platform
from bot.platforms import x as x_platform
from bot.platforms.admission import IntakeEvent, admit
from bot.platforms.base import DeliveryError
from bot.platforms.discord import DiscordPlatform
from bot.platforms.x import XPlatform
from bot.worker import Worker
from storage.queue import Queue
from storage.states import Status
from tests.e2e.adapter_support import LetterGenerator
from tests.e2e.test_x_adapter import EpochClock, fake_x, make_x, one_request, xclock  # noqa: F401 (fixtures)

TIMEOUT = 10.0
LOGGER = "bot.platforms.discord"
MENTIONS = "GET /2/users/:id/mentions"


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discord's seams restored after the test; the adapter's first retry wait shortened (the doubling
    and its cap are the real ones)."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    monkeypatch.setattr(discord_platform, "RECONNECT_MIN_S", 0.2, raising=False)


def discord_settings(fake: FakeDiscord, **overrides: Any) -> DiscordConfig:
    return DiscordConfig(**{"enabled": True, "token": fake.token, "api_base_url": fake.api_base,
                            "gateway_url": fake.gateway_url, "guild_ids": (fake.guild.id,),
                            "position_update_seconds": 3600.0, **overrides})


def adapter_for(fake: FakeDiscord, queue: Queue, **overrides: Any) -> DiscordPlatform:
    return DiscordPlatform(discord_settings(fake, **overrides), queue, client_options={"guild_ready_timeout": 0.05})


def warnings_of(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def channel_request(queue: Queue, fake: FakeDiscord, prompt: str) -> int:
    """A Discord request whose result goes to the channel (as one taken by another process)."""
    user = fake.add_user("ruth")
    adm = admit(queue, IntakeEvent(platform="discord", external_id=f"ext-{prompt}", author_id=user.id,
                                   prompt_raw=prompt, channel_id=fake.channel.id, guild_id=fake.guild.id, n_images=2),
                max_chars=280)
    assert adm.accepted
    return adm.request.id


async def slash(fake: FakeDiscord, prompt: str) -> Any:
    inter = await fake.send_slash_command("dalle", {"prompt": prompt}, user=fake.add_user("mason"))
    return await fake.wait_for(lambda f: inter.original if inter.original and not inter.original.loading else None,
                               TIMEOUT)


async def test_discord_unreachable_at_start_does_not_stop_the_start_and_connects_later(
        fast_retries: None, queue: Queue, clock: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Discord not reachable at start-up (no connection): start() raised after its ready timeout and
    took the whole service (X poller, dashboard, worker) down with it. It now returns at once with one
    warning, a delivery meanwhile fails as retryable (the request waits, nothing is lost), and the
    client logs in and connects in the background: /dalle is answered, the waiting result delivered."""
    fake = FakeDiscord(port=free_port())  # not started yet: nothing listens there
    adapter = adapter_for(fake, queue)
    worker = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w",
                    sleep=lambda s: None, delivery_retry_seconds=0)
    try:
        with caplog.at_level(logging.INFO):
            t0 = time.monotonic()
            await adapter.start(intake=True, ready_timeout=TIMEOUT)
            assert time.monotonic() - t0 < TIMEOUT / 2
            [warning] = warnings_of(caplog)
            assert "cannot log in yet" in warning and "/dalle is answered once connected" in warning
            assert "\n" not in warning and fake.token not in warning

            rid = channel_request(queue, fake, "a patient tortoise")
            assert await asyncio.to_thread(worker.generate_batch) == 1
            assert await asyncio.to_thread(worker.deliver_batch) == 1
            rec = queue.get(rid)
            assert rec.status == Status.GENERATED and "not connected to Discord" in (rec.error or "")

            await asyncio.sleep(0.5)  # a few tries fail meanwhile: quietly (INFO), with growing waits
            assert len(warnings_of(caplog)) == 1
            await fake.start()  # Discord is back
            await asyncio.wait_for(adapter.client.wait_until_ready(), 2 * TIMEOUT)
            assert any("connected; /dalle is answered again" in m for m in warnings_of(caplog))
            assert not [m for m in warnings_of(caplog, logging.ERROR)]

        message = await slash(fake, "a lighthouse at dusk")
        assert message.content.startswith("Queued")
        clock.advance(3600)  # the failed delivery's retry is due
        while await asyncio.to_thread(worker.deliver_batch):
            pass
        assert queue.get(rid).status == Status.POSTED
        [posted] = [m for m in fake.channel_messages(fake.channel) if m.attachments]
        assert [a.filename for a in posted.attachments] == [f"dalle-{rid}-1.png", f"dalle-{rid}-2.png"]
    finally:
        await adapter.stop()
        await fake.stop()


async def test_discord_login_failing_with_5xx_is_retried_with_growing_waits(
        fast_retries: None, queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    """Discord's REST answering 503 at login: one warning, then the login is tried again in the
    background, each wait twice the one before, until it works."""
    async with FakeDiscord() as fake:
        logins: list[float] = []  # when the failed logins came
        fake.inject_server_error(
            lambda rec: rec.route == "GET /users/@me" and logins.append(time.monotonic()) is None, status=503, count=3)
        adapter = adapter_for(fake, queue)
        try:
            with caplog.at_level(logging.INFO):
                await adapter.start(intake=True, ready_timeout=TIMEOUT)
                [warning] = warnings_of(caplog)
                assert "cannot log in yet" in warning and "503" in warning
                await asyncio.wait_for(adapter.client.wait_until_ready(), TIMEOUT)
            assert len(fake.requests_to("GET /users/@me")) == 4 and len(logins) == 3
            assert logins[1] - logins[0] >= 0.19 and logins[2] - logins[1] >= 0.39
            retries = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO
                       and "still cannot log in" in r.getMessage()]
            assert [m.rsplit("next try in ", 1)[1] for m in retries] == ["0.4s", "0.8s"]
            assert all("503" in m for m in retries)
            assert (await slash(fake, "a red fox")).content.startswith("Queued")
        finally:
            await adapter.stop()


async def test_a_gateway_down_at_start_does_not_stop_the_start_and_deliveries_go_on(
        fast_retries: None, queue: Queue, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """REST works but the gateway refuses connections: discord.py cannot reconnect a first connection
    (it raised AttributeError out of connect()), so the adapter retries it itself; start() returns with
    one warning, and results are still delivered over REST meanwhile."""
    async with FakeDiscord() as fake:
        fake.gateway_available = False
        adapter = adapter_for(fake, queue)
        worker = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w",
                        sleep=lambda s: None, delivery_retry_seconds=0)
        try:
            with caplog.at_level(logging.WARNING):
                t0 = time.monotonic()
                await adapter.start(intake=True, ready_timeout=TIMEOUT)
                assert time.monotonic() - t0 < TIMEOUT / 2
                [warning] = warnings_of(caplog)
                assert "cannot connect to the gateway yet" in warning and "503" in warning
                rid = channel_request(queue, fake, "a quiet harbour")
                assert await asyncio.to_thread(worker.generate_batch) == 1
                assert await asyncio.to_thread(worker.deliver_batch) == 1
                assert queue.get(rid).status == Status.POSTED
                await fake.wait_for(lambda f: f.gateway_refused >= 2, TIMEOUT)
                fake.gateway_available = True
                await asyncio.wait_for(adapter.client.wait_until_ready(), TIMEOUT)
                # discord.py's own "Attempting a reconnect" tracebacks stay out of the log
                assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert (await slash(fake, "a red fox")).content.startswith("Queued")
        finally:
            await adapter.stop()


@pytest.mark.parametrize("intake", [True, False])
async def test_a_wrong_discord_token_is_a_one_line_configuration_error(
        fast_retries: None, queue: Queue, intake: bool) -> None:
    """A token Discord refuses (401 at login) is not an outage: start() says so at once, naming the
    setting and its environment variable, without the token."""
    async with FakeDiscord() as fake:
        adapter = DiscordPlatform(discord_settings(fake, token="not-the-token"), queue)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            await adapter.start(intake=intake, ready_timeout=TIMEOUT)
        assert time.monotonic() - t0 < 3
        text = str(err.value)
        assert "[discord] token" in text and "DALLEBOT_DISCORD_TOKEN" in text and "401" in text
        assert "\n" not in text and "not-the-token" not in text
        assert len(fake.requests_to("GET /users/@me")) == 1  # no retries of a refused token
        await adapter.stop()


async def test_a_worker_only_start_survives_discord_being_unreachable(
        fast_retries: None, queue: Queue, tmp_path: Path, clock: Any, caplog: pytest.LogCaptureFixture) -> None:
    """``serve --role worker`` logs in for REST only: unreachable, it raised and the worker never ran."""
    fake = FakeDiscord(port=free_port())
    adapter = adapter_for(fake, queue)
    worker = Worker(queue, LetterGenerator(), {"discord": adapter}, tmp_path / "img", owner="w",
                    sleep=lambda s: None, delivery_retry_seconds=0)
    try:
        with caplog.at_level(logging.WARNING):
            await adapter.start(intake=False, ready_timeout=TIMEOUT)
            [warning] = warnings_of(caplog)
            assert "cannot log in yet" in warning
        rid = channel_request(queue, fake, "a late owl")
        assert await asyncio.to_thread(worker.generate_batch) == 1
        assert await asyncio.to_thread(worker.deliver_batch) == 1
        assert queue.get(rid).status == Status.GENERATED
        await fake.start()
        for _ in range(200):
            if adapter._logged_in:
                break
            await asyncio.sleep(0.1)
        clock.advance(3600)
        assert await asyncio.to_thread(worker.deliver_batch) == 1
        assert queue.get(rid).status == Status.POSTED
    finally:
        await adapter.stop()
        await fake.stop()


def serve_intake(tmp_path: Path, api_base: str, gateway: str, token: str) -> tuple[subprocess.Popen[str], int, Path]:
    """`dallebot serve --role intake` with Discord on (token from the environment), X off."""
    config = tmp_path / "dallebot.toml"
    config.write_text('[safety]\nnsfw_enabled = false\n[logging]\nformat = "json"\nlevel = "WARNING"\n'
                      f'[discord]\nenabled = true\napi_base_url = "{api_base}"\ngateway_url = "{gateway}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DALLEBOT_")}
    env.update(DALLEBOT_DATA_DIR=str(tmp_path / "data"), DALLEBOT_DISCORD_TOKEN=token)
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config), "serve", "--role",
                                 "intake", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    return proc, port, log


def test_the_service_starts_while_discord_is_unreachable(tmp_path: Path) -> None:
    """`dallebot serve` with Discord unreachable: the dashboard (and X, the worker) never came up,
    the start failing after a minute; now it serves at once, with one warning about Discord."""
    dead = free_port()
    proc, port, log = serve_intake(tmp_path, f"http://127.0.0.1:{dead}/api/v10", f"ws://127.0.0.1:{dead}/",
                                   "fake-discord-bot-token")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    discord_lines = [r for r in records if r["logger"] == LOGGER]
    assert [r["level"] for r in discord_lines] == ["WARNING"]
    assert "cannot log in yet" in discord_lines[0]["message"]
    assert "fake-discord-bot-token" not in log.read_text()


def test_the_service_stops_at_once_on_a_token_discord_refuses(tmp_path: Path) -> None:
    """A wrong token stays what it is, a configuration error: one line naming the setting, exit 1."""
    with FakeDiscordThread() as handle:
        fake = handle.fake
        proc, _, log = serve_intake(tmp_path, fake.api_base, fake.gateway_url, "a-wrong-token")
        try:
            assert proc.wait(60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    lines = log.read_text().splitlines()
    assert lines[-1] == ("dallebot: error: Discord refused the bot token (401 Unauthorized at login): check "
                         "[discord] token (or the DALLEBOT_DISCORD_TOKEN environment variable)")
    assert "a-wrong-token" not in log.read_text()


# ---- X -----------------------------------------------------------------------------------------


@pytest.fixture
def x(fake_x: FakeX, queue: Queue, xclock: EpochClock) -> Iterator[XPlatform]:
    adapter = make_x(fake_x, queue, xclock)
    yield adapter
    adapter.client.session.close()


def test_the_mention_poller_backs_off_while_x_fails(fake_x: FakeX, x: XPlatform, queue: Queue, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """X answering 5xx: the poller tried (and warned) at every poll interval for as long as it lasted.
    It now waits twice as long after each failure in a row (up to a cap) and is back to every interval
    after a round that works; deliveries are not held back meanwhile."""
    alice = fake_x.add_user("alice")
    fake_x.add_mention(alice, "a first fox")
    assert x.poll_once() == 1
    fault = fake_x.inject_server_error(MENTIONS, status=503, count=None)
    tries: list[int] = []  # the rounds (of 40, one per poll interval) that asked X
    with caplog.at_level(logging.WARNING, logger="bot.platforms.x"):
        for n in range(40):
            before = len(fake_x.requests_to(MENTIONS))
            assert x.poll_once() == 0
            if len(fake_x.requests_to(MENTIONS)) > before:
                tries.append(n)
    assert tries[:5] == [0, 2, 6, 14, 30]  # waits of 2, 4, 8, 16 intervals
    warnings = [r.getMessage() for r in caplog.records if r.name == "bot.platforms.x"]
    assert len(warnings) == len(tries) and all("\n" not in w for w in warnings)
    assert "5 in a row; next try in 160s" in warnings[4] and "503 Service Unavailable" in warnings[4]

    capped = XPlatform(XConfig(enabled=True, api_base_url=fake_x.base_url, poll_interval=100.0,
                               **fake_x.credentials()), queue)
    try:
        for _ in range(6):
            capped._poll_failed("polling mentions failed", RuntimeError("503"))
        assert (capped._polls_to_skip + 1) * 100.0 == x_platform.POLL_BACKOFF_MAX_S
    finally:
        capped.client.session.close()

    # a delivery goes out at once meanwhile
    mention = fake_x.add_mention(alice, "a second fox")
    fault.count = fault.hits  # X is back
    rounds = 0
    while x.poll_once() == 0:
        rounds += 1
        assert rounds < 80  # (at most the cap, 60 rounds)
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
    fake_x.inject_server_error(MENTIONS, status=503, count=1)
    assert x.poll_once() == 0  # one failure: the next round is skipped, deliveries are not
    worker.generate_batch()
    while worker.deliver_batch():
        pass
    assert one_request(queue, mention).status == Status.POSTED
    assert x.poll_once() == 0 and x.poll_once() == 0  # skipped, then a round that works
    fake_x.add_mention(alice, "a third fox")
    assert x.poll_once() == 1  # back to every interval after success
    assert x._poll_failures == 0


async def test_users_me_answering_only_errors_does_not_break_the_start_or_the_poller(
        fake_x: FakeX, queue: Queue, xclock: EpochClock, caplog: pytest.LogCaptureFixture) -> None:
    """GET /2/users/me with status 200 and only ``errors``: the start crashed with AttributeError
    ('NoneType' object has no attribute 'id'), and so did every poll; now it is a warning naming X's
    error, and the poller reads mentions once X names the account."""
    fake_x.inject_partial_error("GET /2/users/me", count=2,
                                errors=[{"title": "Not Found Error", "detail": "Could not find the account."}])
    adapter = make_x(fake_x, queue, xclock)
    try:
        with caplog.at_level(logging.WARNING, logger="bot.platforms.x"):
            await adapter.start(intake=True)
            assert await asyncio.to_thread(adapter.poll_once) == 0
        messages = [r.getMessage() for r in caplog.records if r.name == "bot.platforms.x"]
        assert len(messages) == 2
        assert all("GET /2/users/me" in m and "Could not find the account." in m for m in messages)
        fake_x.add_mention(fake_x.add_user("alice"), "a red kite")
        for _ in range(3):  # the backoff skips a round
            if await asyncio.to_thread(adapter.poll_once):
                break
        else:
            pytest.fail("the poller never read the mention")
    finally:
        await adapter.stop()


def test_a_media_upload_answering_only_errors_is_a_clear_retryable_failure(
        fake_x: FakeX, x: XPlatform, queue: Queue, tmp_path: Path) -> None:
    """POST /2/media/upload with status 200 and only ``errors``: the delivery failed with a bare
    KeyError ('data') logged as an unexpected error; it is now a retryable failure naming X's error,
    nothing is posted, the posting budget is given back, and the next try posts the images."""
    mention = fake_x.add_mention(fake_x.add_user("alice"), "a stormy sea")
    x.poll_once()
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
    worker.generate_batch()
    rec = one_request(queue, mention)
    fake_x.inject_partial_error("POST /2/media/upload", count=1,
                                errors=[{"title": "Operation failed", "detail": "Media processing failed."}])
    with pytest.raises(DeliveryError) as err:
        x.deliver(rec, [Path(p) for p in rec.image_paths])
    assert not err.value.permanent
    assert "media upload without a media id" in str(err.value) and "Media processing failed." in str(err.value)
    assert fake_x.replies_to(mention) == [] and x.posts.used() == 0
    delivery = x.deliver(rec, [Path(p) for p in rec.image_paths])
    assert [t.id for t in fake_x.replies_to(mention)] == [delivery.reply_id]


def test_a_post_answering_only_errors_is_retried_not_a_crash(fake_x: FakeX, x: XPlatform, queue: Queue,
                                                             tmp_path: Path) -> None:
    """POST /2/tweets with status 200 and only ``errors``: the reply raised TypeError (resp.data is None)
    after the budget was spent, and a refusal crashed the whole poll round. Now the delivery is a
    retryable failure with the budget given back, and the refusal stays owed (sent at a later round)."""
    alice = fake_x.add_user("alice")
    mention = fake_x.add_mention(alice, "a windmill")
    x.poll_once()
    worker = Worker(queue, LetterGenerator(), {"x": x}, tmp_path / "img", owner="w")
    worker.generate_batch()
    rec = one_request(queue, mention)
    fake_x.inject_partial_error("POST /2/tweets", count=1)
    with pytest.raises(DeliveryError) as err:
        x.deliver(rec, [Path(p) for p in rec.image_paths])
    assert not err.value.permanent and "without its id" in str(err.value)
    assert x.posts.used() == 0
    assert x.deliver(rec, [Path(p) for p in rec.image_paths]).reply_id == fake_x.replies_to(mention)[0].id

    empty = fake_x.add_mention(alice, "")  # refused: owes a reply
    fake_x.inject_partial_error("POST /2/tweets", count=1)
    assert x.poll_once() == 1  # stored (refused), without a crash
    refused = one_request(queue, empty)
    assert refused.status == Status.REJECTED and fake_x.replies_to(empty) == []
    assert x.refusals.used() == 0
    assert [a.action for a in queue.audit(refused.id)][-1] != "refusal_failed"


async def test_a_token_the_gateway_refuses_at_start_is_a_configuration_error(fast_retries: None,
                                                                             queue: Queue) -> None:
    """The gateway closing with 4004 (authentication failed) before READY is the same configuration
    error as a 401 at login, not an outage to ride out."""
    async with FakeDiscord() as fake:
        fake.gateway_token = "the-token-after-a-reset"
        adapter = adapter_for(fake, queue)
        with pytest.raises(ConfigError, match=r"\(gateway close 4004\): check \[discord\] token"):
            await adapter.start(intake=True, ready_timeout=TIMEOUT)
        assert len(fake.identifies) == 1
        await adapter.stop()
