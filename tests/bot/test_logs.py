"""Secrets never reach a log line: not in messages, not escaped by repr() (an HTTP library quoting a
header), not in tracebacks or stacks, in either format; and a secret read with a trailing newline is
loaded without it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bot import logs
from bot.config import load_settings, secret_values
from bot.logs import setup_logging

TOKEN = "AAAAtokenSECRET123"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging() configures the root logger; put it back as the test run had it."""
    root = logging.getLogger()
    handlers, level, secrets = list(root.handlers), root.level, list(logs._SECRETS)
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logs._SECRETS[:] = secrets


def x_credentials(token: str) -> dict[str, str]:
    return {f"DALLEBOT_X_{k.upper()}": v for k, v in {
        "bearer_token": token, "consumer_key": "ck-value", "consumer_secret": "cs-value",
        "access_token": "at-value", "access_token_secret": "ats-value"}.items()}


def test_secrets_are_loaded_without_surrounding_whitespace(tmp_path: Path) -> None:
    config = tmp_path / "dallebot.toml"
    config.write_text('[x]\nenabled = true\n[server]\nsession_secret = "  from-file\\n"\n'
                      '[discord]\ntoken = "tok-file\\r\\n"\n')
    s = load_settings(config, env={**x_credentials(TOKEN + "\n"), "DALLEBOT_X_CONSUMER_KEY": " ck-value\t\n",
                                   "DALLEBOT_DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}\n"})
    assert s.x.bearer_token == TOKEN and s.x.consumer_key == "ck-value"
    assert s.server.session_secret == "from-file" and s.discord.token == "tok-file"
    assert s.database.url == f"sqlite:///{tmp_path / 'q.db'}"
    assert all(v == v.strip() for v in secret_values(s))


def header_error(token: str) -> requests.RequestException:
    """What requests raises (before sending anything) for a bearer token that ends in a newline; its
    message quotes the header value with repr(): 'Bearer ...\\n'."""
    with pytest.raises(requests.RequestException) as info:
        requests.Request("GET", "http://127.0.0.1:9/2/users/1/mentions",
                         headers={"Authorization": f"Bearer {token}"}).prepare()
    return info.value


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_secret_quoted_by_repr_is_scrubbed(fmt: str, capsys: pytest.CaptureFixture[str],
                                             restore_logging: None) -> None:
    """The X poller's error line quotes the header; with the secret as given (newline and all), the
    escaped form must be scrubbed too."""
    setup_logging("INFO", fmt=fmt, secrets=[TOKEN + "\n"])
    exc = header_error(TOKEN + "\n")
    assert repr(TOKEN + "\n")[1:-1] in str(exc)  # the form the scrubber used to miss
    logging.getLogger("bot.platforms.x").warning("X: polling mentions failed: %s", exc)
    err = capsys.readouterr().err
    assert "X: polling mentions failed" in err and "Bearer ***" in err
    assert TOKEN not in err


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tracebacks_and_stacks_are_scrubbed(fmt: str, capsys: pytest.CaptureFixture[str],
                                            restore_logging: None) -> None:
    setup_logging("INFO", fmt=fmt, secrets=[TOKEN])
    log = logging.getLogger("bot.platforms.discord")
    try:
        try:
            raise KeyError(f"token {TOKEN!r} refused")
        except KeyError as inner:
            raise RuntimeError(f"login failed with {TOKEN}") from inner
    except RuntimeError:
        log.exception("could not log in")
    log.warning("where", stack_info=True)  # the stack quotes this source line: AAAAtokenSECRET123
    err = capsys.readouterr().err
    assert "could not log in" in err and "RuntimeError: login failed with ***" in err
    assert "KeyError" in err and "stack_info=True" in err  # the traceback and the stack were printed
    assert TOKEN not in err
    if fmt == "json":
        records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert "***" in records[0]["exc"] and TOKEN not in records[0]["exc"]
        assert "stack_info=True" in records[1]["stack"]


def test_secrets_from_the_environment_are_scrubbed_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              restore_logging: None) -> None:
    """As `dallebot serve` does it: settings (secret read with a newline), then logging with them."""
    config = tmp_path / "dallebot.toml"
    config.write_text("[x]\nenabled = true\n")
    s = load_settings(config, env=x_credentials(TOKEN + "\n"))
    setup_logging("INFO", fmt="json", secrets=secret_values(s))
    try:
        raise ValueError(f"bad credentials: {TOKEN!r}, {'ats-value'}")
    except ValueError:
        logging.getLogger("bot.platforms.x").exception("X: polling mentions failed: %s", repr(TOKEN + "\n"))
    err = capsys.readouterr().err
    assert TOKEN not in err and "ats-value" not in err
    [record] = [json.loads(line) for line in err.splitlines()]
    assert record["message"] == "X: polling mentions failed: '***\\n'"
    assert "ValueError: bad credentials: '***', ***" in record["exc"]
