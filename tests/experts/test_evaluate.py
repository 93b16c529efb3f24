"""Metrics against scikit-learn; gap closure and transfer ratio formulas; FM lineage refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from common.metrics import all_metrics
from experts.checkpoint import Checkpoint
from experts.config import ExpertConfig
from experts.evaluate import gap_closure, smaller_first, transfer_ratio
from experts.lineage import FMLineageError, check_lineage


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.1).astype(float)
    p = np.clip(0.1 + 0.3 * (y - 0.1) + 0.05 * rng.standard_normal(2000), 1e-3, 1 - 1e-3)
    base = 0.12
    m = all_metrics(y, p, base)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert m["logloss"] == pytest.approx(log_loss(y, p), rel=1e-9)
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert m["ne"] == pytest.approx(log_loss(y, p) / entropy, rel=1e-9)
    assert m["calibration"] == pytest.approx(p.mean() / y.mean(), rel=1e-9)


def test_gap_closure_formula() -> None:
    assert gap_closure(ne_base=0.90, ne_variant=0.86, ne_fm=0.80) == pytest.approx(0.4)
    assert gap_closure(0.90, 0.90, 0.80) == 0.0
    assert gap_closure(0.90, 0.80, 0.80) == pytest.approx(1.0)
    assert math.isnan(gap_closure(0.80, 0.79, 0.85))  # FM no better than base: undefined


def test_transfer_ratio_formula() -> None:
    assert transfer_ratio(0.86, 0.84, 0.80, 0.76) == pytest.approx(0.5)
    assert math.isnan(transfer_ratio(0.86, 0.84, 0.80, 0.80))
    assert smaller_first("large", "small") == ("small", "large")
    assert smaller_first("base", "large") == ("base", "large")


def _ckpt(versions: list[tuple[str, str]], preset: str = "small") -> Checkpoint:
    return Checkpoint(ExpertConfig(), 4, 4, {}, None, versions[-1][0] if versions else "", preset, "feed", versions)


def test_lineage_accepts_the_next_fm_version() -> None:
    ck = _ckpt([("2026-01-02", "small-2026-01-01-aaaa"), ("2026-01-03", "small-2026-01-02-bbbb")])
    out = check_lineage(ck, "small", ["small-2026-01-03-cccc"], "2026-01-04")
    assert out[-1] == ("2026-01-04", "small-2026-01-03-cccc") and len(out) == 3
    # the FM skipped a day of training: the same version again is accepted
    assert check_lineage(ck, "small", ["small-2026-01-02-bbbb"], "2026-01-04")[-1][1] == "small-2026-01-02-bbbb"


def test_lineage_refuses_foreign_or_stale_fm_unless_rebaseline() -> None:
    ck = _ckpt([("2026-01-02", "small-2026-01-01-aaaa"), ("2026-01-03", "small-2026-01-02-bbbb")])
    with pytest.raises(FMLineageError, match="preset 'small'.*preset 'large'"):
        check_lineage(ck, "large", ["large-2026-01-03-dddd"], "2026-01-04")
    with pytest.raises(FMLineageError, match="older version"):
        check_lineage(ck, "small", ["small-2026-01-01-aaaa"], "2026-01-04")
    with pytest.raises(FMLineageError, match="stale"):
        check_lineage(ck, "small", ["small-2026-01-01-eeee"], "2026-01-04")
    with pytest.raises(FMLineageError, match="2 FM versions"):
        check_lineage(ck, "small", ["small-2026-01-03-c", "small-2026-01-03-d"], "2026-01-04")
    assert check_lineage(ck, "large", ["large-2026-01-03-dddd"], "2026-01-04", rebaseline=True) == [
        ("2026-01-04", "large-2026-01-03-dddd")]


def test_lineage_leakage_guard_holds_even_with_rebaseline() -> None:
    ck = _ckpt([("2026-01-02", "small-2026-01-01-aaaa")])
    with pytest.raises(FMLineageError, match="leakage guard"):
        check_lineage(ck, "small", ["small-2026-01-04-ffff"], "2026-01-04", rebaseline=True)
