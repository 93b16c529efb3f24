"""The promotion rule and the paired intervals behind it (experts.promote): pure functions, no store."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import ne, paired_bootstrap_mean
from experts.promote import Interval, decide, ne_diff, pool


def _rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(0.01, 0.3, n)
    return (rng.uniform(size=n) < p_true).astype(float), p_true


def test_ne_diff_is_the_difference_of_nes_with_an_interval_around_it() -> None:
    y, p = _rows(20_000)
    worse = np.clip(p * 1.5, 0, 1)
    d = ne_diff(y, worse, p, 0.15)
    assert d.mean == pytest.approx(ne(y, worse, 0.15) - ne(y, p, 0.15))
    assert d.lo < d.mean < d.hi and d.lo > 0  # a clearly worse model: the whole interval above 0
    assert d.rows == 20_000 and d == ne_diff(y, worse, p, 0.15)  # seeded: same rows, same interval


def test_a_model_against_itself_has_a_zero_interval_and_noise_straddles_zero() -> None:
    y, p = _rows(5_000)
    assert ne_diff(y, p, p, 0.1) == Interval(0.0, 0.0, 0.0, 5_000)
    rng = np.random.default_rng(1)
    jitter = np.clip(p * np.exp(rng.normal(0, 0.01, p.size)), 1e-4, 1)
    d = ne_diff(y, jitter, p, 0.1)
    assert d.lo < 0 < d.hi


def test_bootstrap_interval_matches_the_normal_one_for_a_mean() -> None:
    d = np.random.default_rng(2).normal(0.3, 2.0, 4_000)
    mean, lo, hi = paired_bootstrap_mean(d, n_boot=2000)
    se = d.std() / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert (hi - lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_mean([])


def test_pool_averages_days_and_narrows_the_interval() -> None:
    a, b = Interval(-0.01, -0.02, 0.0, 100), Interval(-0.03, -0.04, -0.02, 300)
    both = pool([a, b])
    assert both.mean == pytest.approx(-0.02) and both.rows == 400 and both.days == 2
    assert both.hi - both.lo < a.hi - a.lo  # two days of evidence: a tighter interval than one alone
    assert pool([a]).lo == pytest.approx(a.lo, abs=1e-6)
    with pytest.raises(ValueError):
        pool([])


@pytest.mark.parametrize(("champion", "diff", "promote", "serving"), [
    (None, None, True, "fe"),  # nothing serves yet: install the best
    ("fe", None, False, "fe"),  # the champion's variant is the best: it stays
    ("kd", Interval(-0.010, -0.015, -0.005, 1000), True, "fe"),  # better with confidence
    ("kd", Interval(-0.010, -0.025, 0.004, 1000), False, "kd"),  # better on average, not with confidence
    ("kd", Interval(0.002, 0.001, 0.003, 1000), False, "kd"),  # worse
])
def test_decide(champion: str | None, diff: Interval | None, promote: bool, serving: str) -> None:
    out = decide("fe", champion, diff)
    assert (out.promote, out.variant) == (promote, serving)
    assert out.reason and "\n" not in out.reason
    if diff is not None:
        assert str(diff) in out.reason  # the figures travel with the decision


def test_margin_asks_for_a_minimum_gain() -> None:
    diff = Interval(-0.010, -0.015, -0.005, 1000)
    assert decide("fe", "kd", diff, margin=0.004).promote
    assert not decide("fe", "kd", diff, margin=0.006).promote
