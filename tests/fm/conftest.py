"""Tiny lakes and tiny FM configs for the FM tests (built-in generator, a few hundred events a day)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from features.generate import GeneratorConfig, generate
from features.history import build_user_history
from features.lake import Lake
from features.windows import Window
from fm.config import FMConfig

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dim=8, user_buckets=512, item_buckets=512, side_buckets=64, hist_len=8, mlp=(16, 8), repr_width=4,
            batch_size=64, ckpt_every=3, log_every=1000)


def tiny_cfg(**overrides: object) -> FMConfig:
    return FMConfig.from_preset("small", **{**TINY, **overrides})


def make_lake(uri: str, days: int, events_per_day: int = 500) -> list[Window]:
    lake = Lake(uri)
    windows = generate(lake, GeneratorConfig(scale="tiny", events_per_day=events_per_day), days, progress=None)
    for w in windows:
        build_user_history(lake, w)
    return windows


def overrides_args(cfg_overrides: dict[str, object]) -> list[str]:
    import json

    out = []
    for k, v in cfg_overrides.items():
        out += ["--set", f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"]
    return out


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return env


PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
