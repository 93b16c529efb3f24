"""common.metrics against scikit-learn, including tied scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from common.metrics import MetricSums, all_metrics, auc, calibration, entropy, logloss, ne
from fm.compress import dequantize_int8, quantize_int8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.uniform(0.1, 0.9, 500), 1)  # rounding makes many ties
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
    base = 0.3
    h = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert ne(y, p, base) == pytest.approx(log_loss(y, p) / h, rel=1e-12)
    assert calibration(y, p) == pytest.approx(p.mean() / y.mean())
    assert set(all_metrics(y, p, base)) == {"auc", "logloss", "ne", "calibration"}


def test_metric_edge_cases() -> None:
    assert math.isnan(auc([1, 1], [0.2, 0.4]))
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        logloss([0, 1], [0.5])
    with pytest.raises(ValueError, match="strictly between"):
        entropy(0.0)
    assert math.isnan(ne([0, 1], [0.2, 0.4], 0.0)) and math.isnan(ne([0, 1], [0.2, 0.4], 1.0))  # undefined


def test_int8_quantisation_error_bound() -> None:
    x = np.tanh(np.random.default_rng(0).normal(size=(200, 32))).astype(np.float32)
    x[0] = 0.0
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    err = np.abs(dequantize_int8(q, scale) - x)
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert err[0].max() == 0.0


def test_metric_sums_in_chunks_equal_the_whole_arrays() -> None:
    """A streamed window's metrics (common.metrics.MetricSums, bounded memory) match all_metrics on the same
    rows: sums to float rounding, AUC exact below the row bound and within 1e-4 past it (histogram); a
    degenerate base rate gives NaN NE."""
    rng = np.random.default_rng(3)
    logit = rng.normal(-2.0, 1.5, 2_000_000)
    y = (rng.random(logit.size) < 1 / (1 + np.exp(-(logit + rng.normal(0, 1, logit.size))))).astype(np.float64)
    logit = logit.astype(np.float32)
    want = all_metrics(y, 1 / (1 + np.exp(-logit.astype(np.float64))), 0.12)
    exact, folded = MetricSums(exact_rows=logit.size), MetricSums(exact_rows=300_000)
    for lo in range(0, logit.size, 250_000):
        for sums in (exact, folded):
            sums.add(y[lo:lo + 250_000], logit[lo:lo + 250_000])
    assert folded.kept is None and exact.kept is not None
    assert exact.result(0.12)["auc"] == pytest.approx(want["auc"], abs=1e-12)
    assert abs(folded.result(0.12)["auc"] - want["auc"]) < 1e-4
    for key in ("logloss", "ne", "calibration"):
        assert folded.result(0.12)[key] == pytest.approx(want[key], rel=1e-9)
    assert np.isnan(folded.result(0.0)["ne"])
    with pytest.raises(ValueError, match="empty"):
        MetricSums().result(0.1)
