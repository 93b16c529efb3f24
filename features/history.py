"""Point-in-time user history: each event's last L interactions strictly before it, and the carried state.

Contracts (pinned in the project brief):

- `history_features(events, state, length, payload)`: events has ``event_id, user_id, ts`` and the
  payload columns; state (or None) has ``user_id, hist_ts, hist_<col>`` list columns, the user's last
  interactions at the END of the previous window. Returns one row per event, in the events' order:
  ``event_id, hist_ts, hist_<col>...`` — lists, oldest -> newest, length <= `length`, of the user's
  interactions with ``ts`` STRICTLY before the event's ``ts`` (an interaction at the same instant is
  excluded, whichever window it came from), drawn from the state and from this window's events,
  across all surfaces. Payload columns are generic: scalars, strings, or fixed-size vectors
  (``pl.Array``), e.g. ``repr`` for LoopFM.
- `advance_state(events, state, length, payload)`: the state at the end of this window (every user
  of state or events; each list the user's last `length` interactions).
- `build_user_history(lake, window)`: writes ``user_history(ds=window.ds)`` (schemas.USER_HISTORY)
  from ``events(ds=window.ds, every surface)`` and the state at the end of ``window.prev()``
  (`read_user_history`).
- `read_user_history(lake, window)`: the state at the END of ``window.prev()``. None ONLY when no
  window of the lake's events starts before `window` (the lake's first window has no history).
  Otherwise a missing state is never read as "no history": the missing states from the lake's first
  events window through ``window.prev()`` are built first, in order (`ensure_user_history`; this
  writes them to the lake, the same partitions ingest writes), so a window gives the same history
  whether or not user_history was written beforehand.
- `ensure_user_history(lake, window)`: user_history for every window from the lake's first events
  window through `window` (gaps included) that lacks it, built in order; existing states are kept.
- `build_history_through(lake, window)`: `ensure_user_history` up to ``window.prev()``, then
  user_history(window) (re)built — what ingest runs after landing a window.
  All three raise ValueError when `window` is not aligned with the lake's first events window.
- `asof_snapshot(lake, table, window)`: the snapshot partition with the newest ``ds <= window.prev().ds``.

Ordering among interactions with the same ts: state rows first (in their list order), then events by
event_id; ties never matter for which rows are included (a tie group is in or out as a whole).
The carried state assumes windows do not overlap in time (every state row is older than every event
of the window), which `Window` guarantees.

Method (vectorised, no per-row Python): concatenate the exploded state and the events, sort by
(user, ts, source, order); for each row find the first row of its (user, ts) tie group `g` and the
first row of its user `u`; its history is rows ``[max(u, g - L), g)``. The gather is one numpy index
array over all rows and one Arrow ``take`` per payload column, reassembled as list arrays from
offsets — O(total history length), measured ~1M events/s (see the IMPORT report).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from features.lake import Lake, UnsortedSource, merge_by_time
from features.schemas import EVENTS, TS, USER_HISTORY, USER_ID
from features.windows import Window, window_series

STATE_CHUNK = 65_536  # events per chunk when a window's state is built (build_user_history)

EVENT_ID = "event_id"
HISTORY_PAYLOAD = ("item_id", "surface", "click")  # the columns of schemas.USER_HISTORY
HISTORY_LENGTH = 50  # interactions kept per user in user_history
_SRC, _ORD, _ROW = "__src", "__ord", "__row"


def hist_col(col: str) -> str:
    return f"hist_{col}"


def history_age_seconds(ts: str = TS, hist_ts: str = "hist_ts") -> pl.Expr:
    """Age in seconds (float) of each history interaction at the event's time: a list aligned with hist_ts."""
    event_s = pl.col(ts).dt.epoch("us").cast(pl.Float64) / 1e6
    return (event_s - pl.col(hist_ts).list.eval(pl.element().dt.epoch("us").cast(pl.Float64) / 1e6)).alias(
        "hist_age_s"
    )


def _state_rows(state: pl.LazyFrame, payload: Sequence[str]) -> pl.LazyFrame:
    """One row per remembered interaction: user_id, ts, payload..., source 0, order = position in list."""
    cols = ["hist_ts", *[hist_col(c) for c in payload]]
    missing = [c for c in [USER_ID, *cols] if c not in state.collect_schema().names()]
    if missing:
        raise ValueError(f"history state lacks columns {missing}; it has {state.collect_schema().names()}")
    return (
        state.select(USER_ID, *cols)
        .with_columns(pl.int_ranges(pl.col("hist_ts").list.len()).alias(_ORD))
        .explode([*cols, _ORD])
        .filter(pl.col("hist_ts").is_not_null())
        .rename({"hist_ts": TS, **{hist_col(c): c for c in payload}})
        .with_columns(pl.lit(0, pl.Int8).alias(_SRC), pl.col(_ORD).cast(pl.Int64))
    )


def _all_rows(events: pl.LazyFrame, state: pl.LazyFrame | None, payload: Sequence[str]) -> pl.LazyFrame:
    """State rows then event rows (with their input position in _ROW), sorted for the gather."""
    ev = events.select(USER_ID, TS, *payload, pl.col(EVENT_ID).alias(_ORD)).with_columns(
        pl.lit(1, pl.Int8).alias(_SRC), pl.int_range(pl.len(), dtype=pl.Int64).alias(_ROW)
    )
    frames = [ev]
    if state is not None:
        st = _state_rows(state, payload).with_columns(pl.lit(None, pl.Int64).alias(_ROW))
        ts_type = events.collect_schema()[TS]
        frames.insert(0, st.select(ev.collect_schema().names()).with_columns(pl.col(TS).cast(ts_type)))
    return pl.concat(frames, how="vertical_relaxed").sort(USER_ID, TS, _SRC, _ORD)


def _bounds(rows: pl.DataFrame, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sorted row, the [start, end) row range of its history."""
    n = rows.height
    idx = pl.int_range(pl.len(), dtype=pl.Int64)
    marks = rows.select(
        user_first=pl.when(pl.col(USER_ID) != pl.col(USER_ID).shift(1)).then(idx).otherwise(None),
        group_first=pl.when(
            (pl.col(USER_ID) != pl.col(USER_ID).shift(1)) | (pl.col(TS) != pl.col(TS).shift(1))
        )
        .then(idx)
        .otherwise(None),
    )
    if n:  # the first row starts both
        marks = marks.with_columns(
            pl.when(idx == 0).then(0).otherwise(pl.col(c)).alias(c) for c in ("user_first", "group_first")
        )
    marks = marks.select(pl.all().forward_fill())
    end = marks["group_first"].to_numpy().astype(np.int64)
    start = np.maximum(marks["user_first"].to_numpy().astype(np.int64), end - length)
    return start, end


def _gather_index(start: np.ndarray, end: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """List offsets and the flat row index such that list i holds rows start[i]..end[i]-1.

    Built with one allocation and an in-place cumulative sum (fresh memory is what costs here):
    the index steps by 1 inside a list and jumps to the next list's start at its first slot.
    """
    lengths = end - start
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.int32 if len(start) < 2**31 - 1 else np.int64
    take = np.ones(int(offsets[-1]), dtype=dtype)
    nonempty = lengths > 0
    firsts, starts, ends = offsets[:-1][nonempty], start[nonempty], end[nonempty]
    if len(firsts):
        jumps = starts.copy()
        jumps[1:] -= ends[:-1] - 1  # from the previous list's last index to this list's first
        take[firsts] = jumps
        np.cumsum(take, out=take)
    return pa.array(offsets), pa.array(take)


def history_features(
    events: pl.LazyFrame, state: pl.LazyFrame | None, length: int, payload: Sequence[str]
) -> pl.LazyFrame:
    """Each event's last `length` interactions strictly before its ts (see module docstring)."""
    if length < 1:
        raise ValueError(f"history length must be >= 1, got {length}")
    rows = _all_rows(events, state, payload).collect()
    start, end = _bounds(rows, length)
    is_event = rows[_ROW].is_not_null().to_numpy()
    order = np.argsort(rows[_ROW].to_numpy()[is_event])  # back to the events' input order
    start, end = start[is_event][order], end[is_event][order]
    offsets, take = _gather_index(start, end)
    out: dict[str, pa.Array] = {EVENT_ID: rows.filter(pl.col(_ROW).is_not_null()).sort(_ROW)[_ORD].to_arrow()}
    for col in [TS, *payload]:
        values = rows[col].to_arrow()
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        out[hist_col(col)] = pa.LargeListArray.from_arrays(offsets, values.take(take))
    frame = pl.from_arrow(pa.table(out))
    assert isinstance(frame, pl.DataFrame)
    return frame.lazy()


def advance_state(
    events: pl.LazyFrame, state: pl.LazyFrame | None, length: int, payload: Sequence[str]
) -> pl.LazyFrame:
    """The state at the end of this window: per user, the last `length` interactions, oldest -> newest."""
    rows = _all_rows(events, state, payload)
    cols = [TS, *payload]
    return rows.group_by(USER_ID).agg(pl.col(c).tail(length).alias(hist_col(c)) for c in cols).sort(USER_ID)


def first_events_window(lake: Lake, days: int) -> Window | None:
    """The lake's first window holding an events partition (length `days`), or None for a lake without events."""
    days_with_events = {p["ds"] for p in lake.partitions(EVENTS.name)}
    return Window.parse(min(days_with_events), days) if days_with_events else None


def window_chain(lake: Lake, window: Window) -> list[Window]:
    """Windows from the lake's first events window through `window` ([] when `window` is before it)."""
    first = first_events_window(lake, window.days)
    if first is None or window.start < first.start:
        return []
    steps, rest = divmod((window.start - first.start).days, window.days)
    if rest:
        raise ValueError(f"window {window} is not aligned with the lake's first window {first} ({lake.uri})")
    return window_series(first.start, steps + 1, window.days)


def ensure_user_history(lake: Lake, window: Window, length: int = HISTORY_LENGTH) -> None:
    """Build, in order, user_history of every window of `window_chain(lake, window)` that lacks it."""
    for w in window_chain(lake, window):
        if not lake.exists(USER_HISTORY.name, ds=w.ds):
            build_user_history(lake, w, length)


def build_history_through(lake: Lake, window: Window, length: int = HISTORY_LENGTH) -> str:
    """Missing states before `window` first (in order), then user_history(window) rebuilt; returns its path."""
    ensure_user_history(lake, window.prev(), length)
    return build_user_history(lake, window, length)


def read_user_history(lake: Lake, window: Window, length: int = HISTORY_LENGTH) -> pl.LazyFrame | None:
    """user_history at the END of window.prev() (partition ds=window.prev().ds); see module docstring.

    `length` is the state length used when missing states have to be built.
    """
    prev = window.prev()
    if not lake.exists(USER_HISTORY.name, ds=prev.ds):
        if not window_chain(lake, prev):
            return None  # no events window starts before `window`: the lake's first window
        ensure_user_history(lake, prev, length)
    return lake.scan(USER_HISTORY.name, ds=prev.ds)


def build_user_history(lake: Lake, window: Window, length: int = HISTORY_LENGTH) -> str:
    """Write user_history(ds=window.ds) from events(ds=window.ds, every surface) + the previous state.

    Reads only this window's events, streamed in time order (chunks of about STATE_CHUNK events: memory is
    the state plus a chunk, whatever the window's size; partitions not sorted by ts are read whole), and the
    previous window's state. A window without
    any events partition (a gap in an imported log) carries the previous state forward unchanged. Returns
    the path.
    """
    parts = lake.partitions(EVENTS.name, ds=window.ds)
    state = read_user_history(lake, window, length)
    try:
        new_state = _streamed_state(lake, window, parts, state, length)
    except UnsortedSource:  # a partition not in time order (not written by fmx): read the window whole
        events = lake.scan_many(EVENTS.name, parts).select(EVENT_ID, USER_ID, TS, *HISTORY_PAYLOAD)
        new_state = advance_state(events, state, length, HISTORY_PAYLOAD).collect()
    return lake.write(USER_HISTORY.name, new_state, ds=window.ds)


def _streamed_state(lake: Lake, window: Window, parts: list[dict[str, str]], state: pl.LazyFrame | None,
                    length: int) -> pl.DataFrame:
    """advance_state over `window`'s events read in time-ordered chunks (features.lake.merge_by_time)."""
    stream = HistoryStream(state, length, HISTORY_PAYLOAD)
    columns = [EVENT_ID, USER_ID, TS, *HISTORY_PAYLOAD]
    sources = [lake.iter_batches(EVENTS.name, columns, max(1, STATE_CHUNK // max(1, len(parts))), **p) for p in parts]
    for chunk in merge_by_time(sources, TS, EVENT_ID, f"events(ds={window.ds}) in {lake.uri}"):
        stream.advance(chunk)
    if stream.state is None:  # no events: the previous state carries forward (or an empty one)
        return advance_state(_empty_events(), state, length, HISTORY_PAYLOAD).collect()
    return stream.state.sort(USER_ID)


def _empty_events() -> pl.LazyFrame:
    schema: dict[str, pl.DataType] = {
        EVENT_ID: pl.Int64(),
        USER_ID: pl.Int64(),
        TS: pl.Datetime("us", "UTC"),
        "item_id": pl.Int64(),
        "surface": pl.String(),
        "click": pl.Int8(),
    }
    return pl.LazyFrame(schema=schema)


def asof_snapshot(lake: Lake, table: str, window: Window, **fixed: str) -> pl.LazyFrame | None:
    """The partition of `table` with the newest ds <= window.prev().ds (never window.ds or later), or None.

    `fixed` pins other partition keys (e.g. ``fm="small"`` for embedding snapshots).
    """
    limit = window.prev().ds
    found = [p for p in lake.partitions(table, **fixed) if p["ds"] <= limit]
    if not found:
        return None
    newest = max(p["ds"] for p in found)
    return lake.scan(table, **{**fixed, "ds": newest})


class HistoryStream:
    """`history_features` for a window read chunk by chunk in time order, with the state carried between chunks.

    `state` is the history at the end of the previous window (as `history_features` takes it, or None).
    Each `features(chunk)` call takes the next chunk of the window's events in (ts, event_id) order, whole
    tie groups only (no ts value is split across two chunks), and returns what `history_features` over the
    whole window returns for those events; the carried state then advances by the chunk, for the chunk's
    users only. Memory: the carried state (users x `length`) plus one chunk, whatever the window's size.
    """

    def __init__(self, state: pl.LazyFrame | None, length: int, payload: Sequence[str]) -> None:
        self.length, self.payload = length, tuple(payload)
        cols = [USER_ID, "hist_ts", *[hist_col(c) for c in payload]]
        self.state = None if state is None else state.select(cols).collect()

    def features(self, chunk: pl.DataFrame) -> pl.DataFrame:
        """history_features of `chunk` (its order), given every earlier chunk; then advance the state."""
        mine = self._mine(chunk)
        out = history_features(chunk.lazy(), None if mine is None else mine.lazy(), self.length, self.payload)
        collected = out.collect()
        self._advance(chunk, mine)
        return collected

    def advance(self, chunk: pl.DataFrame) -> None:
        """Advance the state by `chunk` (the next events, as for `features`) without computing features."""
        self._advance(chunk, self._mine(chunk))

    def _mine(self, chunk: pl.DataFrame) -> pl.DataFrame | None:
        """The carried state of `chunk`'s users (None when none of them has one)."""
        if self.state is None:
            return None
        mine = self.state.join(chunk.select(pl.col(USER_ID).unique()), on=USER_ID, how="semi")
        return mine if mine.height else None

    def _advance(self, chunk: pl.DataFrame, mine: pl.DataFrame | None) -> None:
        advanced = advance_state(chunk.lazy(), None if mine is None else mine.lazy(), self.length, self.payload).collect()
        if self.state is None:
            self.state = advanced
            return
        advanced = advanced.with_columns(pl.col("hist_ts").cast(self.state.schema["hist_ts"]))
        kept = self.state.join(advanced.select(USER_ID), on=USER_ID, how="anti")  # advanced: one row per chunk user
        self.state = pl.concat([kept, advanced.select(kept.columns)], how="vertical_relaxed")
