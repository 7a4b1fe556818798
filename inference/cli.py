"""CLI commands of the inference package (export, generate, bench inference, train, eval).

`bot.cli` calls :func:`register` to attach them to the ``dallebot`` command group.
"""

from __future__ import annotations

import click


def register(root: click.Group, bench: click.Group) -> None:
    """Attach this package's commands to the root ``dallebot`` group and its ``bench`` group."""
