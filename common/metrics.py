"""Evaluation metrics shared by the FM and the experts (numpy, vectorised).

Every function takes labels y in {0, 1} and predicted probabilities p (any array-likes of equal length).

- `auc`: ROC AUC from ranks (ties get their average rank, as scikit-learn); nan if one class is absent.
- `logloss`: mean binary cross-entropy, p clipped to [EPS, 1 - EPS].
- `ne`: normalized entropy = logloss / H(base_rate), H the binary entropy (NaN for a base rate of 0 or 1). The base rate must come from
  data the model trained on (e.g. the CTR of the training window), never from the evaluated rows —
  callers record which base rate they used.
- `calibration`: mean(p) / mean(y) (1 is perfectly calibrated on average; nan if no positives).
- `MetricSums`: `all_metrics` of rows added chunk by chunk, in memory that stops growing (a streamed
  window): the same figures, AUC exact up to 1Mi rows and from a fine histogram past that (see the class).
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
    """{auc, logloss, ne, calibration} — the keys common.tracking.METRIC_KEYS expects."""
    return {"auc": auc(y, p), "logloss": logloss(y, p), "ne": ne(y, p, base_rate), "calibration": calibration(y, p)}


AUC_EXACT_ROWS = 1 << 20  # MetricSums keeps up to this many (label, logit) rows for an exact AUC
AUC_BINS = 1 << 16  # then: histogram bins over the kept rows' logit range


class MetricSums:
    """`all_metrics` over rows added in chunks (`add(y, logit)`), in memory that stops growing.

    logloss, calibration and NE come from sums (equal to the whole-array figures up to float rounding). AUC
    is exact (`auc`) while at most AUC_EXACT_ROWS rows have been added (every window of the built-in stream
    and of MovieLens): their labels and logits are kept (5 bytes a row). Past that, the kept rows fold into
    one histogram per class over AUC_BINS equal bins spanning the kept logits' range (later logits outside
    it go to the end bins), and AUC counts, for each positive, the negatives in lower bins plus half of
    those in its own bin: a pair inside one bin counts half, as a tie does in `auc` (tests: within 1e-4 of
    the exact figure on 2M rows). Memory: at most 5 MB for the rows, or 1 MB of counts.
    """

    def __init__(self, exact_rows: int = AUC_EXACT_ROWS) -> None:
        self.exact_rows = exact_rows
        self.rows, self.positives, self.sum_p, self.sum_loss = 0, 0.0, 0.0, 0.0
        self.kept: list[tuple[np.ndarray, np.ndarray]] | None = []  # (int8 labels, float32 logits) until folded
        self.hist = np.zeros((2, AUC_BINS), dtype=np.int64)
        self.lo, self.width = 0.0, 1.0

    def add(self, y: ArrayLike, logit: ArrayLike) -> None:
        ya, za = _arrays(y, logit)
        p = 1 / (1 + np.exp(-za))
        self.rows += ya.size
        self.positives += float(ya.sum())
        self.sum_p += float(p.sum())
        self.sum_loss += float(row_logloss(ya, p).sum())
        if self.kept is None:
            self._count(ya, za)
            return
        self.kept.append((ya.astype(np.int8), za.astype(np.float32)))
        if self.rows > self.exact_rows:
            self._fold()

    def _fold(self) -> None:
        y, z = (np.concatenate(c) for c in zip(*self.kept, strict=True)) if self.kept else (np.zeros(0), np.zeros(0))
        self.kept = None
        self.lo = float(z.min())
        self.width = max(float(z.max()) - self.lo, 1e-6) / AUC_BINS
        self._count(y, z.astype(np.float64))

    def _count(self, y: np.ndarray, z: np.ndarray) -> None:
        bins = np.clip(((z - self.lo) / self.width).astype(np.int64), 0, AUC_BINS - 1)
        pos = y > 0.5
        self.hist[0] += np.bincount(bins[~pos], minlength=AUC_BINS)
        self.hist[1] += np.bincount(bins[pos], minlength=AUC_BINS)

    def auc(self) -> float:
        if self.kept is not None:
            if not self.kept:
                return float("nan")
            y, z = (np.concatenate(c) for c in zip(*self.kept, strict=True))
            return auc(y, z)  # ranks of the logits = ranks of the probabilities
        neg, pos = self.hist.astype(np.float64)
        n_neg, n_pos = neg.sum(), pos.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def result(self, base_rate: float) -> dict[str, float]:
        """`all_metrics` of every row added (base rate as there: NaN NE outside (0, 1))."""
        if self.rows == 0:
            raise ValueError("metrics of an empty set of rows are undefined")
        loss = self.sum_loss / self.rows
        norm = loss / entropy(base_rate) if 0 < base_rate < 1 else float("nan")
        calib = self.sum_p / self.positives if self.positives > 0 else float("nan")
        return {"auc": self.auc(), "logloss": loss, "ne": norm, "calibration": calib}


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
