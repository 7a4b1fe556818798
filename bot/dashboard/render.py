"""Templates and the filters they use. Autoescape is on for every template, whatever its name.

No filter here marks user text safe: :func:`show_invisible` escapes every piece of the text itself
and adds only its own fixed markup; :func:`safe_href` lets through http(s) URLs only, so a
``javascript:`` or ``data:`` URL is never put in a link.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import jinja2
from markupsafe import Markup, escape
from starlette.templating import Jinja2Templates

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _hidden(ch: str) -> bool:
    if ch in "\n\t ":
        return False
    cat = unicodedata.category(ch)
    return cat[0] == "C" or cat in ("Zl", "Zp") or (cat == "Zs" and ch != " ")


def show_invisible(text: str | None) -> Markup:
    """Escaped text in which control, format (zero-width, bidi) and odd space characters are shown as
    visible ``U+XXXX`` marks, so a moderator sees what the prompt really holds."""
    if not text:
        return Markup("")
    out: list[str] = []
    run: list[str] = []
    for ch in text:
        if _hidden(ch):
            if run:
                out.append(str(escape("".join(run))))
                run = []
            out.append(f'<span class="ctl">U+{ord(ch):04X}</span>')
        else:
            run.append(ch)
    if run:
        out.append(str(escape("".join(run))))
    return Markup("".join(out))


def safe_href(url: str | None) -> str | None:
    """The URL when it is an absolute http(s) URL, else None (render it as text, not as a link)."""
    if not url:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme.lower() in ("http", "https") and parts.netloc and url == url.strip():
        return url
    return None


def ts(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def query(params: dict[str, object]) -> str:
    """A query string from the non-empty values (lists repeat the key)."""
    items: list[tuple[str, str]] = []
    for k, v in params.items():
        if v is None or v == "" or v == []:
            continue
        for one in v if isinstance(v, (list, tuple)) else [v]:
            items.append((k, str(one)))
    return urlencode(items)


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(show_invisible=show_invisible, safe_href=safe_href, ts=ts, query=query)
    return Jinja2Templates(env=env)
