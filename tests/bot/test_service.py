"""`dallebot serve` (bot.service): stopping without losing or repeating work, the worker role's
/healthz and /metrics listener, uvicorn's log lines in the configured format, and a port in use.

The stop tests run the real service with the real discord.py client against the fake Discord (or the
local platform) on a real SQLite queue; the listener tests run `dallebot serve` as a real process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from PIL import Image

from bot.fakes.discord_server import FakeDiscord
from bot.generation import GenerationJob
from storage.states import Status
from tests.bot.test_cli import assert_one_line_error, run
from tests.conftest import FakeClock
from tests.e2e.adapter_support import LetterGenerator
from tests.e2e.conftest import offline_guard  # noqa: F401  (autouse: nothing here leaves the machine)
from tests.e2e.test_discord_adapter import TIMEOUT
from tests.e2e.test_discord_adapter import settings as discord_settings


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        monkeypatch.setattr(discord.http.Route, "BASE", server.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(server.gateway_url))
        yield server


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# ---- stopping ---------------------------------------------------------------------------------

async def test_a_stop_mid_delivery_lets_the_delivery_finish_before_discord_is_closed(
        fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM while a reply is being posted: the post completes and is recorded (no retry, no attempt
    spent, not posted again later), then the client closes; no ERROR (a cancelled job is a stop)."""
    from bot.app import open_app
    from bot.config import DatabaseConfig, DataConfig, Settings
    from bot.platforms.discord import DiscordPlatform
    from bot.service import Service

    caplog.set_level(logging.INFO)
    s = Settings(data=DataConfig(dir=str(tmp_path / "data")),
                 database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'queue.sqlite3'}"), discord=discord_settings(fake))
    app = open_app(s, auto_upgrade=True)
    app.__dict__["generator"] = LetterGenerator()  # the model boundary
    app.platforms["discord"].client._connection.guild_ready_timeout = 0.05  # type: ignore[attr-defined]
    posting = asyncio.Event()
    real_deliver = DiscordPlatform._deliver

    async def slow_deliver(self, request, images):  # type: ignore[no-untyped-def]
        posting.set()
        await asyncio.sleep(1.0)  # a slow upload: the stop comes in the middle of it
        return await real_deliver(self, request, images)

    monkeypatch.setattr(DiscordPlatform, "_deliver", slow_deliver)
    service = Service(app, roles=("intake", "worker"))
    task = asyncio.create_task(service.run(handle_signals=False))
    try:
        await fake.wait_until_identified(TIMEOUT)
        await fake.wait_for(lambda f: f.guild_commands.get(f.guild.id), TIMEOUT)
        inter = await fake.send_slash_command("dalle", {"prompt": "a dog on a bike"}, user=fake.add_user("mason"))
        await asyncio.wait_for(posting.wait(), 20)
        service.stopping.set()
        await asyncio.wait_for(task, 30)
        [rec] = app.queue.list()
        assert (rec.status, rec.error) == (Status.POSTED, None)
        assert [a.action for a in app.queue.audit(rec.id)] == ["received", "claimed", "generated", "posting", "posted"]
        assert inter.original is not None and len(inter.original.attachments) == 4
        assert [m for m in fake.messages.values() if m.attachments] == [inter.original]  # posted once
        assert errors(caplog) == []
        assert any(r.getMessage().startswith("waiting up to 60 s for") for r in caplog.records)
    finally:
        service.stopping.set()
        await asyncio.wait_for(asyncio.shield(task), 30)
        app.close()


class BlockedGenerator:
    """A generation that does not end until the test lets it."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[Image.Image]]:
        self.started.set()
        self.release.wait(30)
        return [[Image.new("RGB", (16, 16))] * j.n_images for j in jobs]


async def test_a_stop_that_times_out_leaves_the_claim_to_lease_expiry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A generation that outlives the stop's wait: the service still stops (with a warning, no ERROR),
    and the request stays claimed until its lease expires, then goes back to the queue."""
    import dataclasses

    from bot.app import open_app
    from bot.config import load_settings
    from bot.service import Service

    caplog.set_level(logging.INFO)
    settings = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path)})
    settings = dataclasses.replace(settings, safety=dataclasses.replace(settings.safety, nsfw_enabled=False))
    app = open_app(settings)
    clock = FakeClock()
    app.queue.clock = clock
    generator = BlockedGenerator()
    app.__dict__["generator"] = generator
    rid = app.local.submit(app.queue, "a red circle", user="u1", n_images=1).request.id
    service = Service(app, roles=("worker",), stop_timeout=0.3)
    task = asyncio.create_task(service.run(handle_signals=False))
    try:
        assert await asyncio.to_thread(generator.started.wait, 20)
        service.stopping.set()
        t0 = time.monotonic()
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - t0 < 5
        rec = app.queue.get(rid)
        assert rec.status == Status.RUNNING and rec.lease_owner  # still claimed: nothing failed, nothing lost
        assert any("still in flight after 0.3 s" in r.getMessage() and "leases expire" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
        assert errors(caplog) == []
        clock.advance(app.queue.policy.lease_seconds + 1)
        assert app.queue.reclaim_expired() == 1
        assert app.queue.get(rid).status == Status.QUEUED
    finally:
        generator.release.set()
        for t in threading.enumerate():
            if t.name.startswith("dallebot-"):
                t.join(10)
        service.stopping.set()
        await asyncio.wait_for(asyncio.shield(task), 10)
        app.close()
    assert app.queue.get(rid).status == Status.QUEUED  # the late generation could not overwrite it


async def test_a_long_generation_does_not_log_a_warning_every_second(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The generate job ticks every second and keeps running while there is work: the ticks that
    find it still running are expected (max_instances=1), not a warning each second in the logs."""
    import dataclasses

    from bot.app import open_app
    from bot.config import load_settings
    from bot.service import Service

    caplog.set_level(logging.INFO)
    settings = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path)})
    settings = dataclasses.replace(settings, safety=dataclasses.replace(settings.safety, nsfw_enabled=False))
    app = open_app(settings)
    generator = BlockedGenerator()
    app.__dict__["generator"] = generator
    rid = app.local.submit(app.queue, "a red circle", user="u1", n_images=1).request.id
    service = Service(app, roles=("worker",), stop_timeout=30)
    task = asyncio.create_task(service.run(handle_signals=False))
    try:
        assert await asyncio.to_thread(generator.started.wait, 20)
        await asyncio.sleep(3.5)   # three or more ticks of the generate job while its run goes on
        generator.release.set()
        for _ in range(100):
            if app.queue.get(rid).status == Status.POSTED:
                break
            await asyncio.sleep(0.1)
        assert app.queue.get(rid).status == Status.POSTED
        noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [m for m in noisy if "maximum number of running instances" in m], noisy
        ticks = [r.getMessage() for r in caplog.records if r.name.startswith("apscheduler.executors")]
        assert ticks == [], ticks[:4]  # no "Running job" / "executed successfully" lines each second at INFO
    finally:
        generator.release.set()
        service.stopping.set()
        await asyncio.wait_for(asyncio.shield(task), 30)
        app.close()


# ---- the listener ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port another process already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, stderr: Path) -> None:
        self.proc, self.port, self.stderr = proc, port, stderr
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.stderr.read_text()
            try:
                status, body = get(self.url + "/healthz")
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /healthz on port {self.port}: {self.stderr.read_text()}"
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start `dallebot serve ARGS --port P` (JSON logs to a file, no NSFW model to load)."""
    procs: list[subprocess.Popen[str]] = []
    config = tmp_path / "dallebot.toml"
    config.write_text('[safety]\nnsfw_enabled = false\n[logging]\nformat = "json"\nlevel = "WARNING"\n')

    def start(*args: str) -> Served:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DALLEBOT_")}
        env["DALLEBOT_DATA_DIR"] = str(tmp_path / "data")
        stderr = tmp_path / f"serve-{len(procs)}.log"
        with stderr.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config), "serve", *args,
                                     "--host", "127.0.0.1", "--port", str(port)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        procs.append(proc)
        return Served(proc, port, stderr)

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def test_a_worker_serves_healthz_and_metrics_on_its_port(serve) -> None:  # type: ignore[no-untyped-def]
    """`serve --role worker` listens on --host/--port for /healthz and /metrics (with this worker's own
    metrics), without the moderator pages."""
    w = serve("--role", "worker")
    health = w.wait_ready()
    assert health["ok"] is True and health["model_loaded"] is True
    status, body = get(w.url + "/metrics")
    assert status == 200
    text = body.decode()
    assert "dallebot_requests{" in text and "dallebot_generate_seconds_count" in text
    assert get(w.url + "/login")[0] == 404 and get(w.url + "/")[0] == 404
    assert w.stop() == 0
    lines = w.stderr.read_text().splitlines()
    assert any(json.loads(line)["message"] == f"/healthz and /metrics on http://127.0.0.1:{w.port}/" for line in lines)


def test_uvicorn_log_lines_use_the_configured_format(serve) -> None:  # type: ignore[no-untyped-def]
    """The web server's own warnings go through the root handler: JSON like every other line."""
    w = serve("--role", "intake")
    w.wait_ready()
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as c:
        c.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        c.recv(1024)
    assert w.stop() == 0
    records = [json.loads(line) for line in w.stderr.read_text().splitlines()]  # every line is JSON
    assert any(r["logger"] == "uvicorn.error" and r["message"] == "Invalid HTTP request received." for r in records)


@pytest.mark.parametrize("role", ["all", "worker"])
def test_a_port_in_use_is_a_one_line_error_before_anything_starts(tmp_path: Path, listening: int, role: str) -> None:
    """Found before the model loads and before any job or adapter starts (it was exit 3 from inside
    uvicorn, with a traceback, the adapters never stopped)."""
    quiet = tmp_path / "quiet.toml"
    quiet.write_text('[logging]\nlevel = "WARNING"\n')
    p = run("serve", "--role", role, "--port", str(listening), data=tmp_path, config=quiet)
    assert_one_line_error(p, f"cannot listen on 127.0.0.1:{listening}", f"port {listening} is in use")
    assert p.returncode == 1
    chatty = run("serve", "--role", role, "--port", str(listening), data=tmp_path)  # [logging] level INFO
    assert chatty.returncode == 1 and "Traceback" not in chatty.stderr
    assert chatty.stderr.strip().splitlines()[-1] == p.stderr.strip()
    assert "model loaded" not in chatty.stderr and "Scheduler started" not in chatty.stderr


async def test_a_port_in_use_starts_no_adapter(fake: FakeDiscord, tmp_path: Path, listening: int) -> None:
    from bot.app import open_app
    from bot.config import DatabaseConfig, DataConfig, Settings
    from bot.service import Service, ServiceError

    s = Settings(data=DataConfig(dir=str(tmp_path / "data")),
                 database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'queue.sqlite3'}"), discord=discord_settings(fake))
    with open_app(s, auto_upgrade=True) as app:
        app.__dict__["generator"] = LetterGenerator()
        service = Service(app, roles=("intake", "worker", "web"), port=listening)
        with pytest.raises(ServiceError, match=f"port {listening} is in use"):
            await asyncio.wait_for(service.run(handle_signals=False), TIMEOUT)
    assert fake.identifies == [] and fake.requests == []  # the Discord client never started


def test_the_apps_local_platform_counts_its_prompt_filter_refusals_in_the_apps_metrics(tmp_path: Path) -> None:
    """A refusal of the CLI/dashboard intake shows in the process's /metrics like X's and Discord's."""
    from bot.app import open_app
    from bot.config import DatabaseConfig, DataConfig, Settings

    s = Settings(data=DataConfig(dir=str(tmp_path / "data")),
                 database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'queue.sqlite3'}"))
    with open_app(s, auto_upgrade=True) as app:
        app.local.submit(app.queue, "a nude figure", user="u1")
        assert app.metrics.registry.get_sample_value("dallebot_refusals_total", {"reason": "prompt_filter"}) == 1


class _GatedPlatform:
    """A platform adapter (the service's IntakeSource interface) whose start waits for ``gate``."""

    poll_interval = None

    def __init__(self, name: str, gate: asyncio.Event, opens: asyncio.Event | None = None) -> None:
        self.name, self.gate, self.opens = name, gate, opens
        self.stopped = False

    async def start(self, *, intake: bool) -> None:
        if self.opens is not None:
            self.opens.set()
        await self.gate.wait()

    async def poll(self) -> int:
        return 0

    async def stop(self) -> None:
        self.stopped = True


async def test_platforms_start_side_by_side(tmp_path: Path) -> None:
    """A platform slow to start (Discord's login waits up to its ready timeout on a host that does not
    answer) does not hold up the others' start, nor the dashboard: the platforms start concurrently."""
    from bot.app import open_app
    from bot.config import load_settings
    from bot.service import Service

    settings = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path)})
    app = open_app(settings)
    other_started = asyncio.Event()
    slow = _GatedPlatform("slow", gate=other_started)           # waits until "fast" has started
    fast = _GatedPlatform("fast", gate=asyncio.Event(), opens=other_started)
    fast.gate.set()
    app.platforms["slow"], app.platforms["fast"] = slow, fast  # type: ignore[assignment]
    service = Service(app, roles=("intake",), sock=bind_free_socket())
    task = asyncio.create_task(service.run(handle_signals=False))
    try:
        await asyncio.wait_for(other_started.wait(), 10)
        await asyncio.sleep(0.2)
        assert not task.done(), task.exception() if task.done() else None
    finally:
        service.stopping.set()
        await asyncio.wait_for(task, 20)
        app.close()
    assert slow.stopped and fast.stopped


def bind_free_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s
