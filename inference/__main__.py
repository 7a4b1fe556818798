"""``python -m inference export|generate|bench inference``: the inference commands without the bot.

Same commands as ``dallebot export`` etc., for machines that only have the inference dependencies
(a GPU box running the benchmark, a converter host).
"""

from __future__ import annotations

import sys

import click

from .cli import register
from .errors import InferenceError


@click.group()
def cli() -> None:
    """dallebot inference commands."""


@cli.group()
def bench() -> None:
    """Benchmarks."""


def main() -> None:
    register(cli, bench)
    try:
        cli.main(prog_name="python -m inference", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except InferenceError as exc:
        click.echo(f"dallebot: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
