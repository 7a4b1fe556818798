"""The ``dallebot`` command line: a thin layer over the app's services.

Errors that a person can act on (bad config, unreachable database, unknown id, illegal transition,
missing model) print one line, ``dallebot: error: ...``, and exit non-zero, without a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

import click

from bot.config import ConfigError, Settings, load_settings
from bot.intake import PromptRejected
from storage.errors import StorageError
from storage.states import Status
from storage.states import Status

EXIT_USAGE = 2
EXIT_ERROR = 1

# Bounds for numbers on the command line: out of range is a one-line usage error, never a
# traceback from the database (ids and seeds are stored as signed 64-bit integers) or a socket.
MAX_INT64 = 2**63 - 1
REQUEST_ID = click.IntRange(1, MAX_INT64)
COUNT = click.IntRange(1, MAX_INT64)
SEED = click.IntRange(0, MAX_INT64)
PORT = click.IntRange(1, 65535)
BATCH_SIZE = click.IntRange(1, 1024)  # as [queue] batch_size


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through)."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Ctx:
    def __init__(self, config_path: str | None, verbose: int) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self.service = False  # serve/worker log at the configured level; other commands stay quiet
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from bot.config import secret_values
            from bot.logs import setup_logging

            s = self._settings = load_settings(self.config_path)
            level = {0: s.logging.level if self.service else None, 1: "INFO"}.get(self.verbose, "DEBUG")
            setup_logging(level=level, fmt=s.logging.format, secrets=secret_values(s))
        return self._settings

    def app(self, **kw: Any):  # type: ignore[no-untyped-def]
        from bot.app import open_app

        return open_app(self.settings, **kw)


pass_ctx = click.make_pass_decorator(Ctx)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="DALLEBOT_CONFIG", type=click.Path(dir_okay=False),
              help="TOML config file (default: $DALLEBOT_CONFIG, else built-in defaults).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="dallebot")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """dallebot: a DALL·E Mini style image bot for X/Twitter, Discord and the local dashboard."""
    from bot.logs import setup_logging

    ctx.obj = Ctx(config_path, verbose)
    setup_logging(level={0: None, 1: "INFO"}.get(verbose, "DEBUG"))


# ---- db ------------------------------------------------------------------------------------

@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(c: Ctx) -> None:
    """Create or upgrade the database schema to the newest revision."""
    from storage import db as dbmod

    with c.app(check_schema=False) as app:
        before = dbmod.current_revision(app.db)
        dbmod.upgrade(app.db)
        after = dbmod.current_revision(app.db)
    click.echo(f"database {dbmod.safe_url(c.settings.database_url)}: schema {before or '(empty)'} -> {after}")


@db.command("current")
@pass_ctx
def db_current(c: Ctx) -> None:
    """Print the schema revision of the database and of the code."""
    from storage import db as dbmod

    with c.app(check_schema=False) as app:
        click.echo(f"database: {dbmod.current_revision(app.db) or '(empty)'}  code: {dbmod.head_revision()}")


# ---- queue ---------------------------------------------------------------------------------

@cli.group()
def queue() -> None:
    """Inspect and moderate the request queue."""


@queue.command("add")
@click.argument("prompt")
@click.option("--user", default="local-user", show_default=True, help="Requester id on the local platform.")
@click.option("--n", "n_images", type=int, default=None, help="Number of images (default: [queue] default_images).")
@click.option("--seed", type=SEED, default=None, help="Seed: same seed, same images (default: random).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_add(c: Ctx, prompt: str, user: str, n_images: int | None, seed: int | None, as_json: bool) -> None:
    """Add a request on the local platform."""
    qc = c.settings.queue
    n = qc.default_images if n_images is None else n_images
    if not 1 <= n <= qc.max_images:
        raise click.BadParameter(f"must be between 1 and {qc.max_images}", param_hint="--n")
    with c.app() as app:
        res = app.local.submit(app.queue, prompt, user=user, n_images=n, seed=seed, max_chars=qc.max_prompt_chars,
                               actor="cli")
        pos = app.queue.position(res.request.id)
    if as_json:
        _echo_json({**res.request.to_json(), "position": pos})
    else:
        state = res.request.status
        why = f": {res.request.error}" if state == Status.REJECTED and res.request.error else ""
        click.echo(f"request {res.request.id} {state}{why}"
                   + (f", position {pos + 1} in the queue" if pos is not None else ""))


def _status_option(f):  # type: ignore[no-untyped-def]
    return click.option("--status", "status", multiple=True, type=click.Choice([s.value for s in Status]),
                        help="Only requests in this status (repeatable).")(f)


@queue.command("list")
@_status_option
@click.option("--platform", default=None)
@click.option("--user", default=None, help="Author id, or platform:id.")
@click.option("--search", default=None, help="Text in the prompt or author name.")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--before", "before_id", type=REQUEST_ID, default=None, help="Page: ids below this one.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_list(c: Ctx, status: tuple[str, ...], platform: str | None, user: str | None, search: str | None,
               limit: int, before_id: int | None, as_json: bool) -> None:
    """List requests, newest first."""
    with c.app() as app:
        rows = app.queue.list(status=list(status) or None, platform=platform, user=user, text=search,
                              limit=limit, before_id=before_id)
    if as_json:
        _echo_json([r.to_json() for r in rows])
        return
    for r in rows:
        prompt = r.prompt_raw if len(r.prompt_raw) <= 60 else r.prompt_raw[:57] + "..."
        click.echo(f"{r.id:>8}  {r.status.value:<15} {r.created_at:%Y-%m-%d %H:%M:%S}  {r.user_ref:<24} {prompt!r}")
    if not rows:
        click.echo("(no requests)")


@queue.command("show")
@click.argument("request_id", type=REQUEST_ID)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_show(c: Ctx, request_id: int, as_json: bool) -> None:
    """One request with its audit trail."""
    with c.app() as app:
        r = app.queue.get(request_id)
        trail = app.queue.audit(request_id)
        pos = app.queue.position(request_id)
    data = {**r.to_json(), "position": pos, "audit": [a.to_json() for a in trail]}
    if as_json:
        _echo_json(data)
        return
    for k in ("id", "status", "platform", "external_id", "user", "author_name", "prompt_raw", "prompt",
              "n_images", "seed", "attempts", "error", "image_paths", "reply_id", "created_at", "updated_at"):
        click.echo(f"{k:>12}: {data[k]}")
    if pos is not None:
        click.echo(f"{'position':>12}: {pos + 1}")
    click.echo("audit:")
    for a in trail:
        change = f"{a.from_status or '-'} -> {a.to_status or '-'}"
        click.echo(f"  {a.created_at:%Y-%m-%d %H:%M:%S}  {a.action:<10} {change:<30} {a.actor}"
                   + (f"  ({a.reason})" if a.reason else ""))


@queue.command("stats")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_stats(c: Ctx, as_json: bool) -> None:
    """Number of requests in each status."""
    with c.app() as app:
        counts = app.queue.stats()
    if as_json:
        _echo_json(counts)
        return
    for k, v in counts.items():
        click.echo(f"{k:>16}: {v}")


def _moderation_command(name: str, help_text: str):  # type: ignore[no-untyped-def]
    @queue.command(name, help=help_text)
    @click.argument("request_id", type=REQUEST_ID)
    @click.option("--reason", default=None, help="Why (kept in the queue log).")
    @click.option("--as", "actor", default="cli", show_default=True, help="Moderator name for the queue log.")
    @pass_ctx
    def command(c: Ctx, request_id: int, reason: str | None, actor: str) -> None:
        from bot import moderation

        with c.app() as app:
            # A local requester is told of a rejection here (its outbox); an X requester by the intake
            # process's sweep of owed refusals; Discord needs its running client (the dashboard's).
            local = {"local": app.platforms["local"]} if "local" in app.platforms else {}
            rec = moderation.act(app.queue, name, request_id, actor=f"moderator:{actor}", reason=reason,
                                 platforms=local)
        click.echo(f"request {rec.id} is now {rec.status.value}")

    return command


for _name, _help in (
    ("approve", "Approve a held request (it is then generated or posted)."),
    ("reject", "Reject a request (the requester gets a refusal)."),
    ("requeue", "Put a failed, dead, cancelled or rejected request back in the queue."),
    ("cancel", "Cancel a request that has not been posted."),
):
    _moderation_command(_name, _help)


def _ban_command(name: str, banned: bool, help_text: str):  # type: ignore[no-untyped-def]
    @queue.command(name, help=help_text)
    @click.argument("user")
    @click.option("--reason", default=None, help="Why, or a note (kept in the queue log).")
    @click.option("--as", "actor", default="cli", show_default=True, help="Moderator name for the queue log.")
    @pass_ctx
    def command(c: Ctx, user: str, reason: str | None, actor: str) -> None:
        from bot import moderation

        with c.app() as app:
            act = moderation.ban if banned else moderation.unban
            u = act(app.queue, user, actor=f"moderator:{actor}", reason=reason)
        click.echo(f"user {u.ref} is banned" if banned else f"user {u.ref} is no longer banned")

    return command


_ban_command("ban", True, "Ban USER (platform:id, or an id on the local platform): their requests are refused.")
_ban_command("unban", False, "Lift a ban on USER.")


# ---- worker and server --------------------------------------------------------------------

@cli.command()
@click.option("--drain", is_flag=True,
              help="Process until the queue is empty, then exit 0 (1, saying why, when work is left).")
@click.option("--batch-size", type=BATCH_SIZE, default=None, help="Requests per batch (default: [queue] batch_size).")
@click.option("--max-wait", type=FiniteFloatRange(0, 86400), default=30.0, show_default=True,
              help="With --drain: longest wait for a retry that is not yet due.")
@pass_ctx
def worker(c: Ctx, drain: bool, batch_size: int | None, max_wait: float) -> None:
    """Generate and deliver queued requests."""
    from bot.worker import Worker

    c.service = True
    with c.app() as app:
        w = Worker(app.queue, app.generator, app.platforms, app.settings.images_dir,
                   batch_size=batch_size or app.settings.queue.batch_size,
                   classifier=app.classifier, nsfw_threshold=app.settings.safety.nsfw_threshold,
                   metrics=app.metrics, delivery_retry_seconds=app.settings.queue.delivery_retry_seconds)
        if drain:
            stats = w.drain(max_wait=max_wait, progress=lambda s: click.echo(
                f"generated {s.generated}  posted {s.posted}  failed {s.failed}", err=True))
            click.echo(f"drained in {stats.seconds:.1f}s: generated {stats.generated}, posted {stats.posted}, "
                       f"failed attempts {stats.failed}, delivery failures {stats.delivery_failures}")
            if stats.left:  # exit 0 means the queue holds nothing this worker could still do
                raise click.ClickException(f"stopped with work left: {stats.left}")
        else:
            from bot.service import run_service

            run_service(app, roles=("worker",))


@cli.command()
@click.option("--host", default=None, help="Listen address (default: [server] host).")
@click.option("--port", type=PORT, default=None, help="Listen port (default: [server] port).")
@click.option("--role", type=click.Choice(["all", "intake", "worker"]), default="all", show_default=True)
@pass_ctx
def serve(c: Ctx, host: str | None, port: int | None, role: str) -> None:
    """Run the bot: scheduler (worker, platforms) and the dashboard.

    \b
    --role all     intake, worker and the dashboard (with /healthz and /metrics)
    --role intake  the platforms' intake and the dashboard (with /healthz and /metrics)
    --role worker  generate and deliver; listens for /healthz and /metrics only
    """
    from bot.service import ServiceError, run_service

    c.service = True
    roles = {"all": ("intake", "worker", "web"), "intake": ("intake", "web"), "worker": ("worker", "metrics")}[role]
    with c.app() as app:
        try:
            run_service(app, roles=roles, host=host or app.settings.server.host,
                        port=port or app.settings.server.port)
        except ServiceError as exc:
            raise click.ClickException(str(exc)) from None


@cli.group()
def bench() -> None:
    """Benchmarks (results go in docs/benchmarks.md)."""


def _attach_plugins() -> None:
    from bot.bench_dashboard import bench_dashboard
    from bot.bench_queue import bench_queue
    from bot.cli_moderator import moderator
    from inference import cli as inference_cli

    bench.add_command(bench_queue, "queue")
    from bot.bench_load import bench_load

    bench.add_command(bench_load, "load")
    cli.add_command(moderator)
    bench.add_command(bench_dashboard, "dashboard")
    inference_cli.register(cli, bench)
    try:
        from inference.shapes import cli as shapes_cli
    except ImportError:  # the shapes world package lands with the shipped model
        return
    shapes_cli.register(cli)


_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def main(argv: list[str] | None = None) -> None:
    from inference.errors import InferenceError

    _attach_plugins()
    try:
        rv = cli.main(args=argv, prog_name="dallebot", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("dallebot: aborted", err=True)
        sys.exit(EXIT_ERROR)
    except _NO_ARGS_IS_HELP as exc:  # a group run without a command: its help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # One line like every other error (click's own format is usage, a hint and the message).
        message = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
        click.echo(f"dallebot: error: {message}{hint}", err=True)
        sys.exit(exc.exit_code)
    except (ConfigError, StorageError, InferenceError, PromptRejected) as exc:
        click.echo(f"dallebot: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
