"""Writing validated events into the lake: windows, deterministic event ids, snapshots, meta, history.

Windows are aligned to the first event's UTC day (the lake's `origin`): window k starts at
origin + k * days. event_id = (k << 32) | rank of the event within its window after sorting by
(ts, user_id, item_id), so ids are deterministic and unique across windows.
Every window from the first to the last gets its users/items snapshots and its user_history state,
including windows without events (gaps), so that the day-to-day chain of states is never broken.
Partitions of an earlier import that this one does not write are removed afterwards (`replace.py`).
"""

from __future__ import annotations

from datetime import date, timedelta

import polars as pl

from features.history import build_user_history
from features.lake import Lake
from features.schemas import EVENTS, ITEMS, USERS
from features.windows import Window


def assign_windows(good: pl.DataFrame, days: int) -> tuple[date, pl.DataFrame]:
    """(origin day, events with `event_id` and the window ordinal `__w`), sorted by (ts, user_id, item_id)."""
    origin = good["ts"].min().date()  # type: ignore[union-attr]
    epoch_day = pl.col("ts").dt.date().cast(pl.Int64) - pl.lit(origin).cast(pl.Int64)
    out = good.sort("ts", "user_id", "item_id").with_columns((epoch_day // days).alias("__w"))
    rank = pl.int_range(pl.len(), dtype=pl.Int64).over("__w")
    return origin, out.with_columns((pl.col("__w") * (1 << 32) + rank).alias("event_id"))  # (k << 32) | rank


def window_of(origin: date, days: int, k: int) -> Window:
    return Window(origin + timedelta(days=k * days), days)


def snapshot(
    seen: pl.DataFrame,
    features: pl.DataFrame | None,
    id_col: str,
    names: tuple[str, ...],
    origin: date,
    days: int,
    k: int,
) -> pl.DataFrame:
    """The ids first seen in windows <= k with first_ds and their side features (0 when unknown)."""
    rows = seen.filter(pl.col("__first_w") <= k).with_columns(
        (pl.lit(origin) + pl.duration(days=pl.col("__first_w") * days)).cast(pl.Date).alias("first_ds")
    )
    if features is not None:
        rows = rows.join(features.select(id_col, *names), on=id_col, how="left")
    else:
        rows = rows.with_columns(pl.lit(None, pl.Int32).alias(n) for n in names)
    return (
        rows.with_columns(pl.col(n).fill_null(0) for n in names)
        .select(id_col, *names, "first_ds")
        .sort(id_col)
    )


def write_windows(
    lake: Lake,
    events: pl.DataFrame,
    origin: date,
    days: int,
    users: pl.DataFrame | None,
    items: pl.DataFrame | None,
    history_length: int = 50,
) -> tuple[list[Window], set[tuple[str, str]]]:
    """Write events(ds, surface), users(ds), items(ds) and user_history(ds) for every window, in order.

    Returns the windows and the (ds, surface) of every events partition written (`replace.py` removes
    the others).
    """
    last = int(events["__w"].max())  # type: ignore[arg-type]
    first_user = events.group_by("user_id").agg(pl.col("__w").min().alias("__first_w"))
    first_item = events.group_by("item_id").agg(pl.col("__w").min().alias("__first_w"))
    by_window = events.partition_by("__w", as_dict=True)
    windows, written = [], set()
    for k in range(last + 1):
        window = window_of(origin, days, k)
        chunk = by_window.get((k,), events.clear())
        for (surface,), part in chunk.partition_by("surface", as_dict=True).items():
            # a log has no true click probability (the generator's ceiling): null
            part = part.drop("__w").with_columns(pl.lit(None, pl.Float32).alias("p_click"))
            lake.write(EVENTS.name, part, ds=window.ds, surface=str(surface))
            written.add((window.ds, str(surface)))
        lake.write(
            USERS.name,
            snapshot(first_user, users, "user_id", ("segment", "region"), origin, days, k),
            ds=window.ds,
        )
        lake.write(
            ITEMS.name,
            snapshot(first_item, items, "item_id", ("category", "brand"), origin, days, k),
            ds=window.ds,
        )
        build_user_history(lake, window, length=history_length)
        windows.append(window)
    return windows, written
