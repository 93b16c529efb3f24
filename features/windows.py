"""Windows: the unit of time every stage works on, defined once.

A lake declares its window length in days (1 by default; longer for sparse logs, e.g. 7 for
MovieLens). A window is keyed by its first day: partition ``ds=YYYY-MM-DD`` holds the events with
``start <= ts < start + days``. The window before W is W.prev(); a model "trained through W" may only
score windows strictly after W (see `assert_after`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta


@dataclass(frozen=True, order=True)
class Window:
    start: date
    days: int = 1

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError(f"window length must be >= 1 day, got {self.days}")

    @classmethod
    def parse(cls, ds: str, days: int = 1) -> Window:
        try:
            return cls(date.fromisoformat(ds), days)
        except ValueError:
            raise ValueError(f"bad window day {ds!r}: expected YYYY-MM-DD") from None

    @property
    def ds(self) -> str:
        return self.start.isoformat()

    @property
    def end(self) -> date:
        """First day after the window (exclusive)."""
        return self.start + timedelta(days=self.days)

    @property
    def start_ts(self) -> datetime:
        return datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC)

    @property
    def end_ts(self) -> datetime:
        return datetime(self.end.year, self.end.month, self.end.day, tzinfo=UTC)

    def prev(self) -> Window:
        return Window(self.start - timedelta(days=self.days), self.days)

    def next(self) -> Window:
        return Window(self.end, self.days)

    def index(self, origin: date) -> int:
        """Number of windows between `origin` and this window's start (MLflow step)."""
        return (self.start - origin).days // self.days

    def __str__(self) -> str:
        return self.ds if self.days == 1 else f"{self.ds}+{self.days}d"


def window_series(start: date, count: int, days: int = 1) -> list[Window]:
    """`count` consecutive windows starting at `start`."""
    out = [Window(start, days)]
    while len(out) < count:
        out.append(out[-1].next())
    return out


def parse_window_length(text: str | int) -> int:
    """'1d', '7d', '7' or 7 -> 7."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*d?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"bad window length {text!r}: expected e.g. '1d' or '7d'")
    return int(m.group(1))


def assert_after(trained_through: Window | None, scored: Window, what: str) -> None:
    """Leakage guard: a model trained through `trained_through` may only score later windows."""
    if trained_through is not None and trained_through.end > scored.start:
        raise ValueError(
            f"leakage guard: {what} was trained through window {trained_through} (ending {trained_through.end}), "
            f"so it cannot score window {scored}, which starts {scored.start}; use a model trained through "
            f"{scored.prev()} or earlier"
        )
