from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bot.config import ConfigError, documented_keys, load_settings, secret_values

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_any_config(tmp_path: Path) -> None:
    s = load_settings(env={})
    assert s.data.dir == "./dallebot-data"
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("dallebot-data/dallebot.sqlite3")
    assert s.outbox_dir == Path("./dallebot-data/outbox")
    assert s.source == "defaults"


def test_environment_moves_data_and_database(tmp_path: Path) -> None:
    s = load_settings(env={"DALLEBOT_DATA_DIR": str(tmp_path / "d"),
                           "DALLEBOT_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1/test"})
    assert s.data_dir == tmp_path / "d"
    assert s.database_url == "postgresql+psycopg://postgres@127.0.0.1/test"


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
        ("[queue]\nbatch_size = 0\n", r"queue\.batch_size in .*c\.toml must be >= 1"),
        ("[model]\nprovider = \"tpu\"\n", r"model\.provider in .*c\.toml must be one of"),
        ("queue = 3\n", r"'queue' in .*c\.toml must be a table"),
        ("[queue\n", r"c\.toml is not valid TOML"),
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
