"""Logging set-up, done once by the entry point. Modules only call ``logging.getLogger(__name__)``.

Every record may carry ``extra={"request_id": ..., "action": ...}``; both formats print them. A filter
replaces configured secrets with ``***`` in every message, traceback and stack, so they never reach a
log line: each secret as given, without surrounding whitespace, and as ``repr()`` and JSON escape it
(an error message often quotes a header value, e.g. ``'Bearer abc\\n'``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator

_SECRETS: list[str] = []
_CONTEXT: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar("dallebot_log_context", default={})


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Every log line inside the block (any logger, this thread or task) carries ``fields``,
    e.g. ``with log_context(request_id=42): ...``."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _forms(secret: str) -> set[str]:
    """The ways a secret shows up in text: as is, stripped, and escaped by repr() and JSON."""
    out = set()
    for v in (secret, secret.strip()):
        if v:
            out |= {v, repr(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1], json.dumps(v)[1:-1]}
    return out


def scrub(text: str) -> str:
    """``text`` with every configured secret replaced by ``***``."""
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, "***")
    return text


class _Scrub(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg, record.args = scrub(record.getMessage()), None
            if record.exc_info and not record.exc_text:  # formatted once here, then used by formatters
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub(record.exc_text)
            if record.stack_info:
                record.stack_info = scrub(record.stack_info)
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        rid = getattr(record, "request_id", None)
        return scrub(f"{base} [request {rid}]" if rid is not None else base)


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key in ("request_id", "action", "worker"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = scrub(record.exc_text)
        if record.stack_info:
            out["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str | None = None, fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    """Configure the root logger (idempotent). ``level=None`` means WARNING."""
    # longest first, so that no shorter form replaces part of a longer one
    _SECRETS[:] = sorted({form for s in secrets if s for form in _forms(s)}, key=len, reverse=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dallebot", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._dallebot = True  # type: ignore[attr-defined]
    handler.setFormatter(_Json() if fmt == "json" else _Text("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Context())
    handler.addFilter(_Scrub())
    root.addHandler(handler)
    root.setLevel(level or "WARNING")
    if (level or "WARNING").upper() != "DEBUG":
        logging.getLogger("alembic").setLevel("WARNING")  # migration chatter at every start
