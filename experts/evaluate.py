"""Progressive evaluation of experts: predictions, metric dicts, gap closure and transfer ratio.

NE's base rate is the CTR of the surface's TRAINING window (the window before the scored one, i.e. the
last window the model trained on): `training_ctr`. Every model is scored on rows it never trained on
(the caller asserts trained_through < scored window). The metric functions themselves (auc, logloss,
ne, calibration) are the project's shared ones in common.metrics (`all_metrics`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.names import FM_PRESETS
from experts.checkpoint import Checkpoint
from experts.data import ExpertData
from experts.model import Expert
from features.lake import Lake
from features.schemas import CLICK, EVENTS
from features.windows import Window, assert_after


@torch.no_grad()
def predict(model: Expert, data: ExpertData, batch_size: int = 8192) -> np.ndarray:
    """Serving-head click probabilities (N,) for every row of `data`."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        out.append(torch.sigmoid(model(data.batch(idx))["logit"]))
    return torch.cat(out).numpy().astype(np.float64)


def score_before(ckpt: Checkpoint, data: ExpertData, window: Window, what: str) -> np.ndarray:
    """Serving predictions of `ckpt` on `data` (rows of `window`); refuses a model trained through `window` or later."""
    assert_after(Window.parse(ckpt.trained_through, window.days), window, what)
    return predict(ckpt.build(), data)


def fm_probs(data: ExpertData) -> np.ndarray:
    """The FM's click probability for the same rows (from fm_logit_click)."""
    return torch.sigmoid(data.tensors["fm_logit"]).numpy().astype(np.float64)


def training_ctr(lake: Lake, window: Window, surface: str) -> float:
    """CTR of events(window.prev(), surface): the base rate of NE for window `window` (documented choice)."""
    prev = window.prev()
    if not lake.exists(EVENTS.name, ds=prev.ds, surface=surface):
        raise FileNotFoundError(f"NE base rate: events for surface {surface!r} window {prev} are missing")
    clicks = lake.read(EVENTS.name, columns=[CLICK], ds=prev.ds, surface=surface)[CLICK].to_numpy()
    if len(clicks) == 0:
        raise ValueError(f"NE base rate: surface {surface!r} has no events in window {prev}")
    return float(np.mean(clicks))


def gap_closure(ne_base: float, ne_variant: float, ne_fm: float) -> float:
    """(NE(base) - NE(variant)) / (NE(base) - NE(FM)); NaN when the FM is no better than base."""
    gap = ne_base - ne_fm
    if not math.isfinite(gap) or gap <= 1e-12:
        return float("nan")
    return (ne_base - ne_variant) / gap


def transfer_ratio(ne_expert_small: float, ne_expert_large: float, ne_fm_small: float, ne_fm_large: float) -> float:
    """(NE(expert|FM small) - NE(expert|FM large)) / (NE(FM small) - NE(FM large)); NaN without an FM gain."""
    gain = ne_fm_small - ne_fm_large
    if not math.isfinite(gain) or abs(gain) <= 1e-12:
        return float("nan")
    return (ne_expert_small - ne_expert_large) / gain


def smaller_first(preset_a: str, preset_b: str) -> tuple[str, str]:
    """The two FM presets ordered (smaller, larger) by common.names.FM_PRESETS (unknown names sort by name)."""
    def rank(p: str) -> tuple[int, str]:
        return (FM_PRESETS.index(p) if p in FM_PRESETS else len(FM_PRESETS), p)

    small, large = sorted((preset_a, preset_b), key=rank)
    return small, large
