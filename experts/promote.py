"""Comparisons with confidence: NE differences on the same rows, their intervals, and the promotion rule.

Every comparison is paired: two models scored on the SAME rows of one window, their per-row log losses
subtracted, so the interval reflects how much the difference (not each NE) varies with the rows drawn.

- `ne_diff(y, p_a, p_b, base_rate)`: NE(a) - NE(b) with its 95% paired-bootstrap interval (`Interval`).
  NE is log loss / H(base rate), so the difference of NEs is the mean per-row log-loss difference / H.
- `pool(intervals)`: the equal-weight mean of several days' differences with the interval of that mean,
  each day's standard error read off its bootstrap interval (rows of different days are independent).
  `fmx compare` uses it over the selected days; promotion over its last k days.
- `decide(challenger, champion, diff)`: the promotion rule. A challenger replaces the champion only when
  its NE is below the champion's on the same rows with confidence: the whole interval of
  NE(challenger) - NE(champion) lies below -margin (margin >= 0 asks for a minimum gain; 0 by default).
  No champion yet: the challenger is installed. The champion's own variant never "wins" against itself:
  the champion variant keeps serving, updated to its newest checkpoint (the decision says "kept").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from numpy.typing import ArrayLike

from common.metrics import entropy, paired_bootstrap_mean, row_logloss

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    """A difference (e.g. NE(a) - NE(b)) with its 95% interval, over `rows` rows (and `days` days)."""

    mean: float
    lo: float
    hi: float
    rows: int
    days: int = 1

    @property
    def se(self) -> float:
        """The standard error implied by the 95% interval."""
        return (self.hi - self.lo) / (2 * Z95)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Interval:
        return cls(float(values["mean"]), float(values["lo"]), float(values["hi"]), int(values["rows"]),
                   int(values.get("days", 1)))

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def ne_diff(y: ArrayLike, p_a: ArrayLike, p_b: ArrayLike, base_rate: float, n_boot: int = 1000,
            seed: int = 0) -> Interval:
    """NE(p_a) - NE(p_b) on the same rows with its 95% paired-bootstrap interval."""
    d = row_logloss(y, p_a) - row_logloss(y, p_b)
    h = entropy(base_rate) if 0 < base_rate < 1 else math.nan  # NE undefined: a training window without clicks
    mean, lo, hi = paired_bootstrap_mean(d, n_boot=n_boot, seed=seed)
    return Interval(mean / h, lo / h, hi / h, int(d.size))


def pool(intervals: Sequence[Interval]) -> Interval:
    """Equal-weight mean of `intervals` with a normal 95% interval from their standard errors."""
    if not intervals:
        raise ValueError("nothing to pool")
    k = len(intervals)
    mean = sum(i.mean for i in intervals) / k
    se = math.sqrt(sum(i.se**2 for i in intervals)) / k
    return Interval(mean, mean - Z95 * se, mean + Z95 * se, sum(i.rows for i in intervals),
                    sum(i.days for i in intervals))


@dataclass(frozen=True)
class Decision:
    """What `decide` concluded: promote or keep, and why (one line, with the figures)."""

    promote: bool
    variant: str  # the variant that serves after the decision
    reason: str


def decide(challenger: str, champion: str | None, diff: Interval | None, margin: float = 0.0) -> Decision:
    """The promotion rule (module docstring). `diff` = NE(challenger) - NE(champion) on the same rows."""
    if champion is None:
        return Decision(True, challenger, f"no champion yet: {challenger} installed")
    if challenger == champion or diff is None:
        return Decision(False, champion, f"{champion} is the best variant and stays champion")
    gap = f"NE({challenger}) - NE({champion}) = {diff} on {diff.rows:,} rows over {diff.days} day(s)"
    if diff.hi < -margin:
        return Decision(True, challenger, f"{challenger} beats {champion} with 95% confidence: {gap}")
    return Decision(False, champion, f"{challenger} does not beat {champion} with 95% confidence: {gap}")

