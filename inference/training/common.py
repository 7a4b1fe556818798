"""Shared training plumbing: checkpoints that resume, learning-rate schedule, history, devices."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

_log = logging.getLogger(__name__)


def lr_at(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class _PlainBar:
    """Stand-in for tqdm where it is not installed (bare GPU machines): a line every ``every`` steps."""

    def __init__(self, iterable, desc: str = "", initial: int = 0, total: int | None = None, every: int = 100,
                 **_: Any) -> None:
        self.iterable, self.desc, self.n, self.total, self.every = iterable, desc, initial, total, every
        self.postfix: dict[str, Any] = {}

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.n += 1
            if self.n % self.every == 0:
                print(f"{self.desc} {self.n}/{self.total} {self.postfix}", flush=True)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        pass


def progress_bar(iterable, *, disable: bool = False, **kw: Any):
    """tqdm on a terminal; plain lines every 100 steps in logs (or where tqdm is missing)."""
    import sys

    if disable:
        return _PlainBar(iterable, every=10**12, **kw)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(iterable, **kw)
    if not sys.stderr.isatty():
        return _PlainBar(iterable, **kw)
    return tqdm(iterable, dynamic_ncols=True, **kw)


def try_artefact(fn, *args: Any, **kw: Any) -> None:
    """Write a PNG artefact (contact sheet, loss curve); skipped where Pillow is missing."""
    try:
        fn(*args, **kw)
    except ImportError as e:
        _log.info("skipped %s: %s", getattr(fn, "__name__", fn), e)


def loss_curve_png(*args: Any, **kw: Any) -> None:
    from .plot import loss_curve   # Pillow

    loss_curve(*args, **kw)


def init_weights(module: torch.nn.Module, std: float = 0.02) -> None:
    """dalle-mini style: normal(0, std) Linear/Embedding weights, zero biases (as inference.export's)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)


class StepBudget:
    """Fits a stage into a wall-clock budget: the pace is measured over ``probe`` steps after
    ``skip`` warm-up steps, then the planned number of steps shrinks to what the budget allows (the
    LR schedule follows the new total). Without a budget the plan stands."""

    def __init__(self, planned: int, seconds: float | None, probe: int = 40, skip: int = 10) -> None:
        self.total, self.seconds, self.probe, self.skip = planned, seconds, probe, skip
        self._t0 = 0.0
        self._begin = 0
        self._t_skip: float | None = None

    def start(self, step: int) -> None:
        import time

        self._t0, self._begin = time.perf_counter(), step

    def update(self, step: int) -> int:
        """Call after each step (``step`` = steps done); returns the (possibly reduced) total."""
        import time

        if not self.seconds:
            return self.total
        done = step - self._begin
        if done == self.skip:
            self._t_skip = time.perf_counter()
        elif done == self.skip + self.probe and self._t_skip is not None:
            now = time.perf_counter()
            pace = (now - self._t_skip) / self.probe
            fit = step + int((self.seconds - (now - self._t0)) / pace)
            if fit < self.total:
                _log.info("time budget %.0f s at %.4f s/step: %d steps instead of %d", self.seconds, pace, fit,
                          self.total)
                self.total = max(step + 1, fit)
        return self.total
