"""Load the configured model bundle (or the shipped shapes-world model) as the worker's Generator."""

from __future__ import annotations

from bot.config import ModelConfig
from bot.generation import Generator
from inference.errors import BundleError


def load_generator(cfg: ModelConfig) -> Generator:
    raise BundleError("no inference runtime is wired in yet")
