"""features.metrics against scikit-learn, including tied scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from features.metrics import all_metrics, auc, calibration, entropy, logloss, ne
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
