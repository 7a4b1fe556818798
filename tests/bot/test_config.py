from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path

import pytest

from bot.config import SECTIONS, ConfigError, documented_keys, load_settings, secret_values

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_any_config(tmp_path: Path) -> None:
    s = load_settings(env={})
    assert s.data.dir == "./dallebot-data"
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("dallebot-data/dallebot.sqlite3")
    assert s.outbox_dir == Path("./dallebot-data/outbox").resolve()  # absolute: every reader agrees
    assert s.source == "defaults"


def test_environment_moves_data_and_database(tmp_path: Path) -> None:
    s = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path / "d"),
                           "DALLEBOT_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1/test"})
    assert s.data_dir == tmp_path / "d"
    assert s.database_url == "postgresql+psycopg://postgres@127.0.0.1/test"


def test_data_dir_from_environment_keeps_the_files_other_data_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndir = "from-file"\nimage_retention_days = 0\n[database]\npool_size = 7\n')
    s = load_settings(cfg, env={"DALLEBOT_DATA_DIR": str(tmp_path / "d"),
                                "DALLEBOT_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1/test"})
    assert s.data_dir == tmp_path / "d"
    assert s.data.image_retention_days == 0.0  # was reset to the default, 30
    assert s.database.pool_size == 7 and s.database.url == "postgresql+psycopg://postgres@127.0.0.1/test"


def test_file_values_and_secret_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[queue]\nbatch_size = 16\nlease_seconds = 90\n[server]\nport = 9000\nsession_secret = "from-file"\n')
    s = load_settings(cfg, env={"DALLEBOT_SERVER_SESSION_SECRET": "from-env"})
    assert s.queue.batch_size == 16 and s.queue.lease_seconds == 90.0 and s.server.port == 9000
    assert s.server.session_secret == "from-env"
    assert secret_values(s) == ["from-env"]


def test_config_env_var_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nthreads = 2\n")
    assert load_settings(env={"DALLEBOT_CONFIG": str(cfg)}).model.threads == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[queue]\nbatch_sise = 3\n", r"unknown key 'queue.batch_sise' in .*c\.toml"),
        ("[queu]\nbatch_size = 3\n", r"unknown section '\[queu\]' in .*c\.toml"),
        ("[queue]\nbatch_size = \"eight\"\n", r"\[queue\] batch_size in .*c\.toml: expected an integer"),
        ("[queue]\nbatch_size = true\n", r"\[queue\] batch_size in .*c\.toml: expected an integer"),
        ("[local]\nenabled = 1\n", r"\[local\] enabled in .*c\.toml: expected true or false"),
        ("[queue]\nbatch_size = 0\n", r"queue\.batch_size in .*c\.toml must be between 1 and"),
        ("[model]\nprovider = \"tpu\"\n", r"model\.provider in .*c\.toml must be one of"),
        ("queue = 3\n", r"'queue' in .*c\.toml must be a table"),
        ("[queue\n", r"c\.toml is not valid TOML"),
        ("[queue]\nlease_seconds = inf\n", r"queue\.lease_seconds in .*c\.toml must be a finite number"),
        ("[queue]\nretry_max_seconds = 5\nretry_base_seconds = 10\n", r"queue\.retry_max_seconds in .*c\.toml"),
        ("[data]\nimage_retention_days = nan\n", r"data\.image_retention_days in .*c\.toml must be a finite number"),
        ("[database]\npool_size = 0\n", r"database\.pool_size in .*c\.toml must be between 1 and"),
        ("[limits]\nqueue_cap = -1\n", r"limits\.queue_cap in .*c\.toml"),
        ("[queue]\nmax_images = 2\ndefault_images = 1\n", r"discord\.max_images in .*c\.toml must be at most queue"),
    ],
)
def test_bad_config_names_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_example_config_documents_every_key_and_loads() -> None:
    example = ROOT / "config.example.toml"
    data = tomllib.loads(example.read_text())
    present = {f"{section}.{key}" for section, table in data.items() for key in table}
    assert present == set(documented_keys())
    load_settings(example, env={})  # and it is valid
    text = example.read_text()
    for key in documented_keys():  # every key has a comment line above it
        section, name = key.split(".")
        idx = text.index(f"\n{name} =", text.index(f"[{section}]"))
        assert text[:idx].rstrip().splitlines()[-1].lstrip().startswith("#"), key


def _numeric_keys() -> list[tuple[str, str, type]]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]
    return out


@pytest.mark.parametrize(("section", "key", "tp"), _numeric_keys(), ids=[f"{s}.{k}" for s, k, _ in _numeric_keys()])
def test_every_numeric_key_is_finite_and_bounded(tmp_path: Path, section: str, key: str, tp: type) -> None:
    bad = ["-1", "1e300", "inf", "-inf", "nan"] if tp is float else ["-1", str(10**15), str(2**70)]
    cfg = tmp_path / "c.toml"
    for value in bad:
        cfg.write_text(f"[{section}]\n{key} = {value}\n")
        with pytest.raises(ConfigError, match=rf"^{section}\.{key} in .*c\.toml "):
            load_settings(cfg, env={})


def test_zero_and_edge_values_that_mean_something_still_load(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nimage_retention_days = 0\n[model]\nthreads = 0\n[queue]\nretry_base_seconds = 0\n"
                   "delivery_retry_seconds = 0\n[limits]\nuser_burst = 0\nqueue_cap = 0\n[server]\nport = 65535\n"
                   "[x]\ndaily_post_budget = 0\n")
    s = load_settings(cfg, env={})
    assert s.data.image_retention_days == 0 and s.server.port == 65535 and not math.isnan(s.queue.retry_base_seconds)
