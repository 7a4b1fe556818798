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
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, slots=True)
class ModelConfig:
    # Path to a model bundle folder; empty means the shipped shapes-world model.
    bundle: str = ""
    # Execution provider: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    provider: str = "auto"
    # Intra-op threads for onnxruntime; 0 lets onnxruntime decide.
    threads: int = 0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Where `dallebot serve` listens (dashboard, /metrics, /healthz).
    host: str = "127.0.0.1"
    port: int = 8080
    # Key that signs session cookies; empty means one generated and kept in the data folder.
    session_secret: str = secret("")


@dataclass(frozen=True, slots=True)
class LocalPlatformConfig:
    # The built-in platform: requests from the CLI and dashboard, replies written to <data dir>/outbox/.
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    # Log level name: DEBUG, INFO, WARNING, ERROR.
    level: str = "INFO"
    # "text" for people, "json" for log collectors.
    format: str = "text"


@dataclass(frozen=True, slots=True)
class Settings:
    data: DataConfig = field(default_factory=DataConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    local: LocalPlatformConfig = field(default_factory=LocalPlatformConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Where the settings came from (a file path or "defaults"); not a config key.
    source: str = field(default="defaults", metadata={"internal": True})

    # ---- derived paths -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir).expanduser()

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
        settings = dataclasses.replace(settings, data=DataConfig(dir=env[ENV_DATA_DIR]))
    if env.get(ENV_DATABASE_URL):
        settings = dataclasses.replace(
            settings, database=dataclasses.replace(settings.database, url=env[ENV_DATABASE_URL])
        )
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    src = s.source
    checks = [
        (s.queue.lease_seconds > 0, "queue.lease_seconds", "must be > 0"),
        (s.queue.max_attempts >= 1, "queue.max_attempts", "must be >= 1"),
        (s.queue.batch_size >= 1, "queue.batch_size", "must be >= 1"),
        (1 <= s.queue.default_images <= s.queue.max_images, "queue.default_images", "must be between 1 and queue.max_images"),
        (s.queue.max_images in range(1, 17), "queue.max_images", "must be between 1 and 16"),
        (s.queue.max_prompt_chars >= 1, "queue.max_prompt_chars", "must be >= 1"),
        (s.model.provider in ("auto", "cpu", "cuda"), "model.provider", "must be one of auto, cpu, cuda"),
        (s.model.threads >= 0, "model.threads", "must be >= 0"),
        (0 < s.server.port < 65536, "server.port", "must be a TCP port (1-65535)"),
        (s.logging.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "logging.level", "must be DEBUG, INFO, WARNING or ERROR"),
        (s.logging.format in ("text", "json"), "logging.format", "must be text or json"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key} in {src} {why}")


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
