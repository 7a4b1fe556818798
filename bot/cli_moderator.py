"""`dallebot moderator add|remove|list`: dashboard accounts.

The password is read from standard input (one line), never from the command line, where ``ps`` and
the shell history would show it. At a terminal it is prompted for twice, hidden.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from bot.cli import _echo_json

if TYPE_CHECKING:
    from bot.cli import Ctx

# click.pass_obj, not bot.cli.pass_ctx: under `python -m bot.cli` the running Ctx class is __main__.Ctx,
# which pass_ctx (bound to bot.cli.Ctx) would not find.
pass_ctx = click.pass_obj


def _read_password() -> str:
    if sys.stdin.isatty():
        return click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


@click.group()
def moderator() -> None:
    """Dashboard moderator accounts."""


@moderator.command("add")
@click.argument("name")
@pass_ctx
def moderator_add(c: "Ctx", name: str) -> None:
    """Add moderator NAME; the password is read from stdin (hashed with argon2id)."""
    from storage.moderators import Moderators

    password = _read_password()
    with c.app() as app:
        mod = Moderators(app.queue).add(name, password, actor="cli")
    click.echo(f"moderator {mod.name} added")


@moderator.command("remove")
@click.argument("name")
@pass_ctx
def moderator_remove(c: "Ctx", name: str) -> None:
    """Remove moderator NAME and end their sessions."""
    from storage.moderators import Moderators

    with c.app() as app:
        Moderators(app.queue).remove(name, actor="cli")
    click.echo(f"moderator {name} removed")


@moderator.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def moderator_list(c: "Ctx", as_json: bool) -> None:
    """List moderator accounts."""
    from storage.moderators import Moderators

    with c.app() as app:
        mods = Moderators(app.queue).list()
    if as_json:
        _echo_json([{"name": m.name, "created_at": m.created_at, "last_login_at": m.last_login_at} for m in mods])
        return
    for m in mods:
        last = f"{m.last_login_at:%Y-%m-%d %H:%M:%S}" if m.last_login_at else "never"
        click.echo(f"{m.name:<24} added {m.created_at:%Y-%m-%d %H:%M:%S}  last login {last}")
    if not mods:
        click.echo("(no moderators: add one with `dallebot moderator add NAME`)")
