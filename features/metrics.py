"""Evaluation metrics shared by the FM and the experts (numpy, vectorised).

Every function takes labels y in {0, 1} and predicted probabilities p (any array-likes of equal length).

- `auc`: ROC AUC from ranks (ties get their average rank, as scikit-learn); nan if one class is absent.
- `logloss`: mean binary cross-entropy, p clipped to [EPS, 1 - EPS].
- `ne`: normalized entropy = logloss / H(base_rate), H the binary entropy (NaN for a base rate of 0 or 1). The base rate must come from
  data the model trained on (e.g. the CTR of the training window), never from the evaluated rows —
  callers record which base rate they used.
- `calibration`: mean(p) / mean(y) (1 is perfectly calibrated on average; nan if no positives).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-7


def _arrays(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ya, pa_ = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if ya.shape != pa_.shape:
        raise ValueError(f"labels and predictions differ in length: {ya.shape[0]} vs {pa_.shape[0]}")
    if ya.size == 0:
        raise ValueError("metrics of an empty set of rows are undefined")
    return ya, pa_


def auc(y: ArrayLike, p: ArrayLike) -> float:
    ya, pa_ = _arrays(y, p)
    n_pos = float(ya.sum())
    n_neg = ya.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(pa_, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct score's first row
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]  # average rank over ties
    return float((ranks[ya == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(y: ArrayLike, p: ArrayLike) -> float:
    return float(row_logloss(y, p).mean())


def entropy(base_rate: float) -> float:
    """Binary entropy (nats) of a base rate in (0, 1)."""
    if not 0 < base_rate < 1:
        raise ValueError(f"base rate must be strictly between 0 and 1 for NE, got {base_rate}")
    return float(-(base_rate * np.log(base_rate) + (1 - base_rate) * np.log1p(-base_rate)))


def ne(y: ArrayLike, p: ArrayLike, base_rate: float) -> float:
    """logloss / H(base_rate); NaN when the base rate is 0 or 1 (a training window without clicks, or with
    nothing else: NE is undefined there, the other metrics are not)."""
    if not 0 < base_rate < 1:
        return float("nan")
    return logloss(y, p) / entropy(base_rate)


def calibration(y: ArrayLike, p: ArrayLike) -> float:
    ya, pa_ = _arrays(y, p)
    mean_y = ya.mean()
    return float(pa_.mean() / mean_y) if mean_y > 0 else float("nan")


def all_metrics(y: ArrayLike, p: ArrayLike, base_rate: float) -> dict[str, float]:
    """{auc, logloss, ne, calibration} — the keys features.tracking.METRIC_KEYS expects."""
    return {"auc": auc(y, p), "logloss": logloss(y, p), "ne": ne(y, p, base_rate), "calibration": calibration(y, p)}


def row_logloss(y: ArrayLike, p: ArrayLike) -> np.ndarray:
    """Per-row binary cross-entropy (N,), p clipped to [EPS, 1 - EPS]; `logloss` is its mean."""
    ya, pa_ = _arrays(y, p)
    pc = np.clip(pa_, EPS, 1 - EPS)
    return -(ya * np.log(pc) + (1 - ya) * np.log1p(-pc))


def paired_bootstrap_mean(d: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                          ) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-row differences `d` and its percentile bootstrap interval at `level`.

    Rows are resampled with replacement `n_boot` times (seeded: the same rows give the same interval), in
    chunks of at most ~4M drawn indices so memory stays flat whatever the row count.
    """
    da = np.asarray(d, dtype=np.float64).ravel()
    if da.size == 0:
        raise ValueError("a bootstrap interval of an empty set of rows is undefined")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // da.size)
    means = np.concatenate([da[rng.integers(0, da.size, (min(chunk, n_boot - i), da.size))].mean(axis=1)
                            for i in range(0, n_boot, chunk)])
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(da.mean()), float(lo), float(hi)
