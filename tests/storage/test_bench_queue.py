"""`dallebot bench queue` end to end on a small queue: every request is drained exactly once on
both backends and by pgqueuer, with and without the worker's result payload."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from bot.bench_queue import bench_queue
from tests.conftest import PG_SERVER


@pytest.mark.parametrize("flags", [[], ["--with-results"]])
def test_bench_queue_drains_everything_and_prints_the_ratio(flags: list[str]) -> None:
    result = CliRunner().invoke(bench_queue, ["--n", "120", "--workers", "2", "--batch", "25", "--pg", PG_SERVER,
                                              *flags])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| 1 |")]
    assert [r.split("|")[2].strip() + "/" + r.split("|")[3].strip() for r in rows] == [
        "dallebot/sqlite", "dallebot/postgresql", "pgqueuer/postgresql"]
    assert all(float(r.split("|")[7].strip().replace(",", "")) > 0 for r in rows)
    assert re.search(r"2 worker\(s\) on PostgreSQL: dallebot/pgqueuer completed/s = \d+\.\d\d", result.output)
