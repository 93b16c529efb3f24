"""One window's FM examples as in-memory tensors, features joined point in time.

`load_window(lake, window, cfg)` reads ``events(ds=window.ds, every surface)`` (schemas.EVENTS), sorted by
event_id, and joins
- each event's last ``cfg.hist_len`` cross-surface interactions strictly before its ts
  (features.history.history_features over ``read_user_history(lake, window)`` — the state at the end
  of window.prev() — and this window's own events; payload item_id, surface, click);
- user side features (segment, region) and item side features (category, brand) from the newest
  ``users`` / ``items`` snapshot with ds <= window.prev() (features.history.asof_snapshot): a snapshot
  written for day D may describe day D, so it is never used for day D itself. Ids absent from the
  snapshot (new today) get -1, which hashes to its own "unknown" row;
- each event's point-in-time counters (features.counters.window_counters: item / user / per-surface
  impressions and clicks over every earlier window, from the carried ``counter_state`` of window.prev(),
  and over this window's events strictly before its ts), as the dense inputs features.counters.DENSE_NAMES.

Batch tensors (`BATCH_KEYS`), N rows, L = cfg.hist_len:
  user_id, item_id, segment, region, category, brand, position, device: (N,) int64 raw values
  surface: (N,) int64 index into cfg.surfaces
  hist_item (N, L) int64, hist_category / hist_brand (N, L) int64 (the history items' side features
  from the same items snapshot, -1 if unknown), hist_surface (N, L) int64, hist_click (N, L) int64 (0/1),
  hist_mask (N, L) bool — right-aligned (newest interaction in the last column), padding False
  counters (N, C) float32, C = len(DENSE_NAMES) (all-zero counts where the frame has no counter columns:
  the same inputs as an event with no earlier impressions at prior 1/2)
  click (N,) float32; like (N,) float32 with like_mask (N,) float32 (0 where the log has no like label)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch import Tensor

from features.counters import dense_counters, window_counters
from features.history import asof_snapshot, history_features, read_user_history
from features.lake import Lake, PartitionNotFound
from features.schemas import CLICK, EVENT_ID, EVENTS, ITEM_ID, ITEMS, LIKE, SURFACE, TS, USER_ID, USERS
from features.windows import Window
from fm.config import FMConfig

PAYLOAD = (ITEM_ID, SURFACE, CLICK)
SIDE = {USERS.name: (USER_ID, ("segment", "region")), ITEMS.name: (ITEM_ID, ("category", "brand"))}
BATCH_KEYS = (
    "user_id", "item_id", "segment", "region", "category", "brand", "position", "device", "surface",
    "hist_item", "hist_category", "hist_brand", "hist_surface", "hist_click", "hist_mask", "counters", "click",
    "like", "like_mask",
)


@dataclass
class WindowData:
    """All examples of one window: `tensors` (BATCH_KEYS, N rows) plus the ids the exporter writes back."""

    tensors: dict[str, Tensor]
    event_id: np.ndarray  # (N,) int64, ascending
    ts: pa.Array  # (N,) timestamp[us, UTC]
    surface_names: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return len(self.event_id)

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        """Rows `idx` of every tensor (a contiguous copy per key)."""
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}


def read_events(lake: Lake, window: Window) -> pl.LazyFrame:
    parts = lake.partitions(EVENTS.name, ds=window.ds)
    if not parts:
        raise PartitionNotFound(f"no events partitions for window {window} in lake {lake.uri}; ingest it first")
    return lake.scan_many(EVENTS.name, parts)


def load_window(lake: Lake, window: Window, cfg: FMConfig) -> WindowData:
    """Every event of `window` with point-in-time features (see module docstring)."""
    events = read_events(lake, window).sort(EVENT_ID)
    hist = history_features(
        events.select(EVENT_ID, USER_ID, TS, *PAYLOAD), read_user_history(lake, window), cfg.hist_len, PAYLOAD
    )
    frame = events.join(hist.select(pl.exclude("hist_ts")), on=EVENT_ID, how="left", maintain_order="left")
    frame = frame.join(window_counters(lake, window).lazy(), on=EVENT_ID, how="left", maintain_order="left")
    item_side = None
    for table, (key, cols) in SIDE.items():
        snap = asof_snapshot(lake, table, window)
        if snap is None:
            frame = frame.with_columns(pl.lit(-1, pl.Int64).alias(c) for c in cols)
            continue
        side = snap.select(key, *cols).sort(key).collect()
        frame = frame.join(side.lazy(), on=key, how="left", maintain_order="left")
        item_side = side if table == ITEMS.name else item_side
    return to_window_data(frame.collect(), cfg, item_side)


def _lookup(ids: np.ndarray, side: pl.DataFrame | None, cols: tuple[str, ...]) -> dict[str, np.ndarray]:
    """side[col] for each id and col (side sorted by its first column, the id); -1 where absent.

    Dense ids (the usual case: 1..n) index a lookup array directly; others take one binary search."""
    if side is None or side.height == 0:
        return {c: np.full(len(ids), -1, dtype=np.int64) for c in cols}
    keys = side[side.columns[0]].cast(pl.Int64).to_numpy()
    values = {c: side[c].cast(pl.Int64).to_numpy() for c in cols}
    if keys[0] >= 0 and keys[-1] < 4 * len(keys) + 2**16:
        inside = (ids >= 0) & (ids <= keys[-1])
        at = np.where(inside, ids, 0)
        out = {}
        for c, v in values.items():
            table = np.full(keys[-1] + 1, -1, dtype=np.int64)
            table[keys] = v
            out[c] = np.where(inside, table[at], -1)
        return out
    pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
    found = keys[pos] == ids
    return {c: np.where(found, v[pos], -1) for c, v in values.items()}


def _surface_index(names: pl.Series, surfaces: tuple[str, ...], what: str) -> np.ndarray:
    unknown = sorted(set(names.unique().drop_nulls().to_list()) - set(surfaces))
    if unknown:
        raise ValueError(f"{what}: surfaces {unknown} are not among the FM's heads {list(surfaces)}; "
                         "the lake's meta must list every surface it holds (fm.config.lake_config builds the heads from it); "
                         "a new surface needs a new FM, not a warm start")
    lookup = {s: i for i, s in enumerate(surfaces)}
    return names.replace_strict(lookup, default=len(surfaces), return_dtype=pl.Int64).to_numpy()


def _flat(column: pl.Series) -> pa.Array:
    arr = column.to_arrow()
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _layout(lists: pa.Array, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scatter plan for right-aligning the last `length` elements of each list into (N, length).

    Returns (rows, cols, src, mask): out[rows, cols] = values[src]. All hist_* columns of an event share
    their list lengths (one history), so the plan is computed once and reused for every column.
    """
    offsets = lists.offsets.to_numpy().astype(np.int64)
    n = len(offsets) - 1
    lens = np.minimum(np.diff(offsets), length)
    rows = np.repeat(np.arange(n), lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)  # 0..len-1 per row
    cols = length - np.repeat(lens, lens) + within
    src = np.repeat(offsets[1:] - lens, lens) + within  # the last `lens` values of each list
    mask = np.zeros((n, length), dtype=bool)
    mask[rows, cols] = True
    return rows, cols, src, mask


def _scatter(values: np.ndarray, plan: tuple, length: int, fill: int) -> Tensor:
    return _place(values[plan[2]], plan, fill)


def _place(used: np.ndarray, plan: tuple, fill: int) -> Tensor:
    """(N, L) tensor with the plan's used slot values (values[src], in plan order) in place, `fill` elsewhere."""
    rows, cols, _, mask = plan
    out = np.full(mask.shape, fill, dtype=np.int64)
    out[rows, cols] = used
    return torch.from_numpy(out)


def to_window_data(df: pl.DataFrame, cfg: FMConfig, item_side: pl.DataFrame | None = None) -> WindowData:
    """Frame with events + hist_* lists + side columns -> WindowData (no I/O; used by tests and bench).

    `item_side` (item_id, category, brand; sorted by item_id) gives the history items' side features.
    """
    def long(col: str) -> Tensor:
        return torch.from_numpy(df[col].fill_null(-1).cast(pl.Int64).to_numpy().copy())

    L, S = cfg.hist_len, len(cfg.surfaces)
    items = _flat(df["hist_item_id"])
    plan = _layout(items, L)
    # values of the lists, flat; offsets are absolute into .values, so no per-list slicing is needed
    surf_values = pl.Series(_flat(df["hist_surface"]).values).replace_strict(
        {s: i for i, s in enumerate(cfg.surfaces)}, default=S, return_dtype=pl.Int64).to_numpy()
    like = df[LIKE]
    t = {c: long(c) for c in (USER_ID, ITEM_ID, "segment", "region", "category", "brand", "position", "device")}
    t[SURFACE] = torch.from_numpy(_surface_index(df[SURFACE], cfg.surfaces, "events").copy())
    item_values = items.values.to_numpy(zero_copy_only=False)
    t["hist_item"] = _scatter(item_values, plan, L, 0)
    for col, found in _lookup(item_values[plan[2]], item_side, ("category", "brand")).items():  # used slots only
        t[f"hist_{col}"] = _place(found, plan, -1)
    t["hist_surface"] = _scatter(surf_values, plan, L, S)
    t["hist_click"] = _scatter(_flat(df["hist_click"]).values.to_numpy(zero_copy_only=False), plan, L, 0).clamp(0, 1)
    t["hist_mask"] = torch.from_numpy(plan[3])
    t["counters"] = torch.from_numpy(dense_counters(df))  # (N, C); zero counts where df has no counter columns
    t["click"] = torch.from_numpy(df[CLICK].cast(pl.Float32).to_numpy().copy())
    t["like"] = torch.from_numpy(like.fill_null(0).cast(pl.Float32).to_numpy().copy())
    t["like_mask"] = torch.from_numpy(like.is_not_null().cast(pl.Float32).to_numpy().copy())
    ts = df[TS].to_arrow()
    return WindowData(
        tensors=t,
        event_id=df[EVENT_ID].to_numpy().copy(),
        ts=ts.combine_chunks() if isinstance(ts, pa.ChunkedArray) else ts,
        surface_names=df[SURFACE].to_numpy(),
    )


def surface_ctr(data: WindowData, surfaces: tuple[str, ...], label: str = CLICK) -> dict[str, float]:
    """Rate of `label` (CTR by default) per surface present in `data` (the base rate the next window's NE uses)."""
    s, y = data.tensors[SURFACE], data.tensors[label]
    return {name: float(y[s == i].mean()) for i, name in enumerate(surfaces) if bool((s == i).any())}
