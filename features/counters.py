"""Point-in-time counters: impressions, clicks and smoothed click rates of items, users and surfaces.

What a ranking engineer's first model reads (issue 16): an item's and a user's click rate over every earlier
impression. Nothing in the FM's ids, side features or short history remembers that long-run rate.

Kinds (`KINDS`: name -> (key column, counted per surface?)), each event falls in one group per kind:
  item (item_id, across surfaces), user (user_id, across surfaces), item_surface (item_id, on the event's
  surface), user_surface (user_id, on the event's surface), surface (constant key 0, per surface: the
  surface's own CTR, the smoothing prior).

Contracts:
- ``counter_state(ds=W)`` (schemas.COUNTER_STATE): one row per (kind, key, surface) with ``imps`` and
  ``clicks`` over every event of every window up to and including W; ``surface`` is `ALL` for kinds counted
  across surfaces. `build_counter_state(lake, window)` writes it from counter_state(window.prev()) (built
  first if missing) + events(window, every surface); a window without events carries the state forward.
- `read_counter_state(lake, window)`: the state at the END of window.prev(); None only when no events
  window of the lake starts before `window`. Missing states are built on demand, in window order from the
  lake's first events window (`ensure_counter_state`), so a window gets the same counters whether or not
  ingest wrote the states. `build_counters_through(lake, window)` is what ingest runs after landing a
  window: missing earlier states, then counter_state(window) rebuilt.
- `counter_features(events, state)`: per event (events' order), for each kind two horizons, int64:
  ``{kind}_past_imps / _past_clicks`` from the state (every earlier window) and ``{kind}_now_imps /
  _now_clicks`` from this window's events with ts STRICTLY before the event's ts (ties excluded, as
  features.history). Nothing at or after the event's time enters its counters.
- `window_counters(lake, window)`: counter_features of every event of the window (all surfaces).
- `dense_counters(frame)`: (N, C) float32 model inputs in `DENSE_NAMES` order: per kind except surface,
  log1p(past + now imps) / 4, log1p(now imps) / 4, logit of the Beta-smoothed rate over past + now and over
  now alone (`SMOOTHING` pseudo-impressions at the prior), then logit(prior); prior = the surface's
  point-in-time CTR (past + now, +1 / +2). Every earlier impression counts the same whichever window it
  fell in (past + now), so a model trained on the lake's first window (no past) has seen the inputs'
  range; "now" is the recent horizon. (Measured: a separate log1p(past) input, all zero in the first
  window, left live's FM calibration at 1.22 on the built-in stream's days 2-4.)
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features.history import window_chain
from features.lake import Lake
from features.schemas import CLICK, COUNTER_STATE, EVENT_ID, EVENTS, ITEM_ID, SURFACE, TS, USER_ID
from features.windows import Window

ALL = "*"  # the surface of kinds counted across surfaces
KINDS: dict[str, tuple[str | None, bool]] = {
    "item": (ITEM_ID, False), "user": (USER_ID, False), "item_surface": (ITEM_ID, True),
    "user_surface": (USER_ID, True), "surface": (None, True),
}
RATE_KINDS = tuple(k for k in KINDS if k != "surface")
HORIZONS = ("past", "now")
SMOOTHING = 10.0  # Beta prior strength in pseudo-impressions (as experts.reference)
_LOG_SCALE = 4.0  # log1p(counts) / 4: O(1) inputs up to ~e^8 impressions
DENSE_NAMES = tuple(f"{k}_{f}" for k in RATE_KINDS for f in ("log_all", "log_now", "rate", "rate_now")) + ("prior",)
STATE_COLUMNS = COUNTER_STATE.columns  # kind, key, surface, imps, clicks


def count_col(kind: str, horizon: str, what: str) -> str:
    return f"{kind}_{horizon}_{what}"


COUNT_COLUMNS = tuple(count_col(k, h, w) for k in KINDS for h in HORIZONS for w in ("imps", "clicks"))


def _keyed(events: pl.LazyFrame, kind: str) -> pl.LazyFrame:
    """events + key (int64) and scope (the surface counted on, or ALL) of `kind`."""
    col, per_surface = KINDS[kind]
    key = pl.col(col).cast(pl.Int64) if col else pl.lit(0, pl.Int64)
    scope = pl.col(SURFACE).cast(pl.String) if per_surface else pl.lit(ALL, pl.String)
    return events.with_columns(key.alias("key"), scope.alias("scope"))


def advance_counters(events: pl.LazyFrame, state: pl.LazyFrame | None) -> pl.LazyFrame:
    """The state after `events` (event_id, user_id, item_id, surface, click): state + this window's counts."""
    counts = [
        _keyed(events, kind).group_by("key", "scope").agg(
            pl.len().cast(pl.Int64).alias("imps"), pl.col(CLICK).cast(pl.Int64).sum().alias("clicks"))
        .select(pl.lit(kind).alias("kind"), "key", pl.col("scope").alias(SURFACE), "imps", "clicks")
        for kind in KINDS
    ]
    frames = ([state.select(STATE_COLUMNS)] if state is not None else []) + counts
    return (pl.concat(frames).group_by("kind", "key", SURFACE)
            .agg(pl.col("imps").sum(), pl.col("clicks").sum()).sort("kind", SURFACE, "key"))


def _kind_features(events: pl.LazyFrame, state: pl.LazyFrame | None, kind: str,
                   now: pl.LazyFrame | None = None) -> pl.LazyFrame:
    """event_id + the four count columns of `kind` (see module docstring); `now` (a state-shaped frame of
    this window's events before `events`) adds to the now counts."""
    ev = _keyed(events, kind).select(EVENT_ID, TS, "key", "scope", pl.col(CLICK).cast(pl.Int64))
    # this window: per (key, scope, ts) group, the counts of the strictly earlier groups
    per_ts = (ev.group_by("key", "scope", TS).agg(pl.len().cast(pl.Int64).alias("n"), pl.col(CLICK).sum().alias("c"))
              .sort("key", "scope", TS)
              .with_columns((pl.col("n").cum_sum().over("key", "scope") - pl.col("n")).alias("now_imps"),
                            (pl.col("c").cum_sum().over("key", "scope") - pl.col("c")).alias("now_clicks")))
    out = ev.join(per_ts.select("key", "scope", TS, "now_imps", "now_clicks"), on=["key", "scope", TS], how="left")
    names = {"now_imps": count_col(kind, "now", "imps"), "now_clicks": count_col(kind, "now", "clicks"),
             "past_imps": count_col(kind, "past", "imps"), "past_clicks": count_col(kind, "past", "clicks")}
    if state is None:
        out = out.with_columns(pl.lit(0, pl.Int64).alias("past_imps"), pl.lit(0, pl.Int64).alias("past_clicks"))
    else:
        past = state.filter(pl.col("kind") == kind).select(
            "key", pl.col(SURFACE).alias("scope"), pl.col("imps").alias("past_imps"),
            pl.col("clicks").alias("past_clicks"))
        out = out.join(past, on=["key", "scope"], how="left")
    if now is not None:
        earlier = now.filter(pl.col("kind") == kind).select(
            "key", pl.col(SURFACE).alias("scope"), pl.col("imps").alias("__imps"), pl.col("clicks").alias("__clicks"))
        out = out.join(earlier, on=["key", "scope"], how="left").with_columns(
            pl.col("now_imps") + pl.col("__imps").fill_null(0), pl.col("now_clicks") + pl.col("__clicks").fill_null(0))
    return out.select(EVENT_ID, *(pl.col(c).fill_null(0).cast(pl.Int64).alias(n) for c, n in names.items()))


def counter_features(events: pl.LazyFrame, state: pl.LazyFrame | None,
                     now: pl.LazyFrame | None = None) -> pl.LazyFrame:
    """Per event, in the events' order: event_id + every kind's past / now impressions and clicks.

    `now` (optional, counter_state-shaped): counts of this window's events that precede every event of
    `events` (the earlier chunks of a streamed window, `CounterStream`)."""
    out = events.select(EVENT_ID)
    for kind in KINDS:
        out = out.join(_kind_features(events, state, kind, now), on=EVENT_ID, how="left", maintain_order="left")
    return out


class CounterStream:
    """`counter_features` for a window read chunk by chunk in time order (whole tie groups per chunk).

    Carries the previous window's state (`past`, collected once) and this window's counts so far (`now`,
    advanced by each chunk); `features(chunk)` equals the whole-window counter_features of those events.
    Memory: the two states (one row per key) plus one chunk.
    """

    def __init__(self, past: pl.LazyFrame | None) -> None:
        self.past = None if past is None else past.select(STATE_COLUMNS).collect()
        self.now: pl.DataFrame | None = None

    def features(self, chunk: pl.DataFrame) -> pl.DataFrame:
        events = chunk.lazy()
        past = None if self.past is None else self.past.lazy()
        now = None if self.now is None else self.now.lazy()
        out = counter_features(events, past, now).collect()
        self.now = advance_counters(events, now).select(STATE_COLUMNS).collect()
        return out


def _logit(clicks: pl.Expr, imps: pl.Expr, prior: pl.Expr) -> pl.Expr:
    rate = (clicks + SMOOTHING * prior) / (imps + SMOOTHING)
    return (rate / (1 - rate)).log()


def dense_exprs() -> list[pl.Expr]:
    """The DENSE_NAMES columns as expressions over counter_features' columns."""
    def c(kind: str, horizon: str, what: str) -> pl.Expr:
        return pl.col(count_col(kind, horizon, what)).cast(pl.Float64)

    prior = (c("surface", "past", "clicks") + c("surface", "now", "clicks") + 1) / (
        c("surface", "past", "imps") + c("surface", "now", "imps") + 2)
    exprs = []
    for k in RATE_KINDS:
        exprs += [
            ((c(k, "past", "imps") + c(k, "now", "imps")).log1p() / _LOG_SCALE).alias(f"{k}_log_all"),
            (c(k, "now", "imps").log1p() / _LOG_SCALE).alias(f"{k}_log_now"),
            _logit(c(k, "past", "clicks") + c(k, "now", "clicks"), c(k, "past", "imps") + c(k, "now", "imps"),
                   prior).alias(f"{k}_rate"),
            _logit(c(k, "now", "clicks"), c(k, "now", "imps"), prior).alias(f"{k}_rate_now"),
        ]
    return [*exprs, (prior / (1 - prior)).log().alias("prior")]


def dense_counters(frame: pl.DataFrame) -> np.ndarray:
    """(N, len(DENSE_NAMES)) float32 model inputs from counter_features' columns (all counts 0 where the
    frame has none of them: an event with no earlier impressions, prior 1/2)."""
    if not set(COUNT_COLUMNS) & set(frame.columns):
        frame = pl.DataFrame({c: np.zeros(frame.height, np.int64) for c in COUNT_COLUMNS})
    return frame.select(dense_exprs()).to_numpy().astype(np.float32).reshape(frame.height, len(DENSE_NAMES))


# ---- the carried state in the lake -------------------------------------------------------------------


def _window_events(lake: Lake, window: Window) -> pl.LazyFrame | None:
    parts = lake.partitions(EVENTS.name, ds=window.ds)
    if not parts:
        return None
    return lake.scan_many(EVENTS.name, parts).select(EVENT_ID, TS, USER_ID, ITEM_ID, SURFACE, CLICK)


def ensure_counter_state(lake: Lake, window: Window) -> None:
    """Build, in order, counter_state of every window from the lake's first events window through `window`
    that lacks it (existing states are kept)."""
    for w in window_chain(lake, window):
        if not lake.exists(COUNTER_STATE.name, ds=w.ds):
            build_counter_state(lake, w)


def read_counter_state(lake: Lake, window: Window) -> pl.LazyFrame | None:
    """counter_state at the END of window.prev() (see module docstring); None for the lake's first window."""
    prev = window.prev()
    if not window_chain(lake, prev):
        return None
    ensure_counter_state(lake, prev)
    return lake.scan(COUNTER_STATE.name, ds=prev.ds)


def build_counter_state(lake: Lake, window: Window) -> str:
    """Write counter_state(ds=window.ds) = counter_state(window.prev()) + events(window); returns the path."""
    state = read_counter_state(lake, window)
    events = _window_events(lake, window)
    if events is None:
        new = state if state is not None else pl.LazyFrame(schema=_state_schema())
    else:
        new = advance_counters(events, state)
    # polars's streaming engine: the window's events are aggregated in batches, not loaded whole
    return lake.write(COUNTER_STATE.name, new.select(STATE_COLUMNS).collect(engine="streaming"), ds=window.ds)


def build_counters_through(lake: Lake, window: Window) -> str:
    """Missing states before `window` (in order), then counter_state(window) rebuilt — for ingest."""
    ensure_counter_state(lake, window.prev())
    return build_counter_state(lake, window)


def window_counters(lake: Lake, window: Window) -> pl.DataFrame:
    """counter_features of every event of `window` (all surfaces), sorted by event_id."""
    events = _window_events(lake, window)
    if events is None:
        raise ValueError(f"no events partitions for window {window} in lake {lake.uri}")
    return counter_features(events.sort(EVENT_ID), read_counter_state(lake, window)).collect()


def _state_schema() -> dict[str, pl.DataType]:
    return {"kind": pl.String(), "key": pl.Int64(), SURFACE: pl.String(), "imps": pl.Int64(), "clicks": pl.Int64()}
