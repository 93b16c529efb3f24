"""Streaming windows for the FM: features chunk by chunk, an example cache, and a bounded, sharded shuffle.

Used when ``FMConfig.stream`` is set (issue 12: windows larger than memory).

- `window_frames(lake, window, cfg)`: the frames `fm.data.load_window` builds, in chunks of about
  ``cfg.stream_chunk`` events, in (ts, event_id) order: the events partitions of every surface are read
  as record batches and merged by time (features.lake.merge_by_time; whole ts tie groups per chunk), and
  history and counters come from states carried across chunks (features.history.HistoryStream,
  features.counters.CounterStream), so each row equals load_window's row for the same event_id.
  `iter_window_data` gives the same as `fm.data.WindowData` chunks.
- Example cache (training): `build_cache` writes every example's tensors (fm.data.BATCH_KEYS) to one Arrow
  IPC file (lz4) under ``models/fm/<preset>/ds=<ds>/examples-<key>.arrow`` in record batches ("groups") of
  ``cfg.shuffle_rows`` rows, in stream order, plus a JSON sidecar (rows, groups, per-surface label sums for
  the head-bias init and train_ctr). The sidecar is written last: it marks the cache complete. A resumed
  run reuses it; training removes both at the end.
- Shuffle (`ExampleStream`): groups are dealt to ``cfg.stream_shards`` virtual shards (group g -> shard
  g % V). Within a shard the groups are permuted (seeded by seed, ds, shard) and taken ``cfg.shuffle_buffer``
  at a time; the rows of one buffer are permuted (seeded by seed, ds, shard, buffer). Step s of the global
  batch takes from shard v its rows [off_v(s), off_v(s+1)) with off_v(s) = min(n_v, s * B * n_v // N)
  (N rows in all, n_v in shard v, B = cfg.batch_size): every shard is consumed in proportion, the batch
  holds about B rows and the pass has ceil(N / B) steps. The batch is a pure function of s, so the
  checkpoint's step is the stream position (resume reads no earlier rows). Memory: at most two buffers
  (shuffle_buffer x shuffle_rows rows) per shard read, held with
  the cache's narrow int8 columns (widened per batch).
- Sharded DDP: with W ranks (V % W == 0) rank r reads only shards [r V/W, (r+1) V/W): a disjoint set of
  groups; the global batch is the shards' parts in shard order, so rank r holds the r-th contiguous slice,
  as fm.train's global batch semantics require. A 1-process run reads every shard and sees the same
  global batches.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch import Tensor

from features.counters import CounterStream, read_counter_state
from features.history import HistoryStream, asof_snapshot, read_user_history
from features.lake import Lake, PartitionNotFound, merge_by_time
from features.schemas import CLICK, EVENT_ID, EVENTS, ITEM_ID, ITEMS, SURFACE, TS, USER_ID
from features.windows import Window
from fm.config import FMConfig
from fm.data import BATCH_KEYS, PAYLOAD, SIDE, WindowData, to_window_data

COUNTER_INPUTS = (EVENT_ID, TS, USER_ID, ITEM_ID, SURFACE, CLICK)
_NARROW = {"surface": pa.int8(), "hist_surface": pa.int8(), "hist_click": pa.int8()}  # bounded values


def _sides(lake: Lake, window: Window) -> dict[str, pl.DataFrame | None]:
    out: dict[str, pl.DataFrame | None] = {}
    for table, (key, cols) in SIDE.items():
        snap = asof_snapshot(lake, table, window)
        out[table] = None if snap is None else snap.select(key, *cols).sort(key).collect()
    return out


def window_frames(lake: Lake, window: Window, cfg: FMConfig,
                  sides: dict[str, pl.DataFrame | None] | None = None) -> Iterator[pl.DataFrame]:
    """load_window's frame, chunk by chunk in (ts, event_id) order (see module docstring)."""
    parts = lake.partitions(EVENTS.name, ds=window.ds)
    if not parts:
        raise PartitionNotFound(f"no events partitions for window {window} in lake {lake.uri}; ingest it first")
    per_part = max(1, cfg.stream_chunk // len(parts))
    sources = [lake.iter_batches(EVENTS.name, None, per_part, **p) for p in parts]
    hist = HistoryStream(read_user_history(lake, window), cfg.hist_len, PAYLOAD)
    counts = CounterStream(read_counter_state(lake, window))
    sides = _sides(lake, window) if sides is None else sides
    for chunk in merge_by_time(sources, TS, EVENT_ID, f"events(ds={window.ds}) in {lake.uri}"):
        h = hist.features(chunk.select(EVENT_ID, USER_ID, TS, *PAYLOAD))
        frame = chunk.join(h.select(pl.exclude("hist_ts")), on=EVENT_ID, how="left", maintain_order="left")
        frame = frame.join(counts.features(chunk.select(COUNTER_INPUTS)), on=EVENT_ID, how="left",
                           maintain_order="left")
        for table, (key, cols) in SIDE.items():
            side = sides[table]
            if side is None:
                frame = frame.with_columns(pl.lit(-1, pl.Int64).alias(c) for c in cols)
            else:
                frame = frame.join(side, on=key, how="left", maintain_order="left")
        yield frame


def iter_window_data(lake: Lake, window: Window, cfg: FMConfig) -> Iterator[WindowData]:
    """WindowData per chunk of `window_frames` (each row as load_window's row of the same event)."""
    sides = _sides(lake, window)
    for frame in window_frames(lake, window, cfg, sides):
        yield to_window_data(frame, cfg, sides[ITEMS.name])


# ---- the example cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInfo:
    path: str
    rows: int
    group_rows: tuple[int, ...]  # rows of each record batch, in file order
    sums: dict[str, list[float]]  # surface name -> [rows, click, like, like_mask]


def cache_paths(cfg: FMConfig, window: Window) -> tuple[str, str]:
    """(cache, sidecar) paths relative to the lake root; the key covers every setting the tensors depend on."""
    key = json.dumps([cfg.hist_len, list(cfg.surfaces), cfg.shuffle_rows, cfg.stream_chunk, cfg.counters, 1])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = f"models/fm/{cfg.preset}/ds={window.ds}/examples-{digest}"
    return f"{base}.arrow", f"{base}.json"


def _to_batch(t: dict[str, Tensor]) -> pa.RecordBatch:
    cols = {}
    for k in BATCH_KEYS:
        v = t[k].numpy()
        typ = _NARROW.get(k)
        if v.ndim == 2:
            flat = pa.array(np.ascontiguousarray(v).ravel(), type=typ)
            cols[k] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
        else:
            cols[k] = pa.array(v, type=typ)
    return pa.RecordBatch.from_pydict(cols)


def _column(batch: pa.RecordBatch, key: str) -> np.ndarray:
    """One cache column as numpy, (rows,) or (rows, width); a view of the record batch where arrow allows."""
    col = batch.column(key)
    if isinstance(col, pa.FixedSizeListArray):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def _from_batch(batch: pa.RecordBatch) -> dict[str, Tensor]:
    """A cache record batch as tensors, the narrow columns (_NARROW) widened."""
    out = {}
    for k in BATCH_KEYS:
        arr = torch.from_numpy(_column(batch, k).copy())
        out[k] = arr.long() if k in _NARROW else arr
    return out


def _add_sums(sums: dict[str, list[float]], data: WindowData, surfaces: tuple[str, ...]) -> None:
    t = data.tensors
    for i, name in enumerate(surfaces):
        rows = t[SURFACE] == i
        if bool(rows.any()):
            got = [float(rows.sum()), float(t["click"][rows].double().sum()), float(t["like"][rows].double().sum()),
                   float(t["like_mask"][rows].double().sum())]
            sums[name] = [a + b for a, b in zip(sums.get(name, [0.0] * 4), got, strict=True)]


def _regroup(chunks: Iterator[WindowData], rows: int) -> Iterator[dict[str, Tensor]]:
    """Re-cut the chunks' tensors into groups of exactly `rows` rows (the last one shorter)."""
    pending: list[dict[str, Tensor]] = []
    have = 0
    for data in chunks:
        pending.append(data.tensors)
        have += len(data)
        while have >= rows:
            merged = {k: torch.cat([p[k] for p in pending]) for k in BATCH_KEYS}
            yield {k: v[:rows] for k, v in merged.items()}
            rest = {k: v[rows:] for k, v in merged.items()}
            pending, have = [rest], have - rows
    if have:
        yield {k: torch.cat([p[k] for p in pending]) for k in BATCH_KEYS}


def load_cache(lake: Lake, cfg: FMConfig, window: Window) -> CacheInfo | None:
    path, side = cache_paths(cfg, window)
    if not (lake.file_exists(side) and lake.file_exists(path)):
        return None
    meta = json.loads(lake.read_bytes(side))
    return CacheInfo(lake.path(path), int(meta["rows"]), tuple(meta["group_rows"]), meta["sums"])


def build_cache(lake: Lake, cfg: FMConfig, window: Window) -> CacheInfo:
    """Write the window's example cache (module docstring) unless a complete one exists; return its info."""
    found = load_cache(lake, cfg, window)
    if found is not None:
        return found
    path, side = cache_paths(cfg, window)
    sums: dict[str, list[float]] = {}

    def counted() -> Iterator[WindowData]:
        for data in iter_window_data(lake, window, cfg):
            _add_sums(sums, data, cfg.surfaces)
            yield data

    group_rows: list[int] = []
    target = lake.path(path)
    tmp = f"{target}.tmp"
    lake.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    writer = None
    with lake.fs.open_output_stream(tmp) as sink:
        for group in _regroup(counted(), cfg.shuffle_rows):
            batch = _to_batch(group)
            writer = writer or pa.ipc.new_file(sink, batch.schema, options=options)
            writer.write_batch(batch)
            group_rows.append(batch.num_rows)
        if writer is None:
            raise ValueError(f"window {window} has no events in lake {lake.uri}")
        writer.close()
    lake.fs.move(tmp, target)
    meta = {"rows": sum(group_rows), "group_rows": group_rows, "sums": sums}
    lake.write_bytes(side, json.dumps(meta).encode())
    return CacheInfo(target, meta["rows"], tuple(group_rows), sums)  # type: ignore[arg-type]


def remove_cache(lake: Lake, cfg: FMConfig, window: Window) -> None:
    for rel in cache_paths(cfg, window)[::-1]:
        if lake.file_exists(rel):
            lake.fs.delete_file(lake.path(rel))


# ---- the shuffled, sharded stream --------------------------------------------------------------------


def _generator(*parts: Any) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


# A shuffle buffer holds the columns of one dtype and row shape stacked along a leading axis, rows on the
# second: a batch's rows are then one slice per stack (not per column) and one cat per stack (issue 12: the
# per-column slices, cats and widening cost the stream ~0.5 ms a step, ~3 % of a small-preset step).
_STACKS: tuple[tuple[tuple[str, ...], torch.dtype], ...] = (
    (("user_id", "item_id", "segment", "region", "category", "brand", "position", "device", SURFACE),
     torch.int64),  # (9, N); surface widened on load (8 bytes a row more: nothing beside the history)
    (("hist_item", "hist_category", "hist_brand"), torch.int64),  # (3, N, L)
    (("hist_surface", "hist_click"), torch.int8),  # (2, N, L), kept narrow: widened per batch
    (("hist_mask",), torch.bool),  # (1, N, L)
    (("counters",), torch.float32),  # (1, N, C)
    (("click", "like", "like_mask"), torch.float32),  # (3, N)
)


class ExampleStream:
    """Global batches of the cached window, read as this rank's shards only (module docstring)."""

    def __init__(self, lake: Lake, info: CacheInfo, cfg: FMConfig, ds: str, rank: int = 0, world: int = 1) -> None:
        V = cfg.stream_shards
        if V % world:
            raise ValueError(f"stream_shards={V} must be a multiple of the DDP world size {world}")
        self.cfg, self.info = cfg, info
        self.rows, self.batch = info.rows, cfg.batch_size
        self.source = lake.fs.open_input_file(info.path)
        self.reader = pa.ipc.open_file(self.source)
        groups = [[g for g in range(len(info.group_rows)) if g % V == v] for v in range(V)]
        self.order = [[gs[i] for i in torch.randperm(len(gs), generator=_generator(cfg.seed, ds, v)).tolist()]
                      for v, gs in enumerate(groups)]
        self.sizes = [sum(info.group_rows[g] for g in gs) for gs in groups]
        K = cfg.shuffle_buffer
        self.starts = [np.cumsum([0] + [sum(info.group_rows[g] for g in order[j:j + K])
                                        for j in range(0, len(order), K)]).tolist() for order in self.order]
        self.mine = list(range(rank * V // world, (rank + 1) * V // world))
        self.ds = ds
        self.loaded: dict[tuple[int, int], list[Tensor]] = {}  # (shard, buffer) -> permuted rows, one per _STACKS
        self.max_rows_held = 0  # most rows held in loaded buffers at once (tests check the bound)

    @property
    def n_steps(self) -> int:
        return -(-self.rows // self.batch)

    def offset(self, v: int, step: int) -> int:
        return min(self.sizes[v], step * self.batch * self.sizes[v] // max(self.rows, 1))

    def global_count(self, step: int) -> int:
        return sum(self.offset(v, step + 1) - self.offset(v, step) for v in range(len(self.sizes)))

    def _buffer(self, v: int, j: int) -> list[Tensor]:
        """Buffer j of shard v: its groups' rows in file order, permuted (row i = row perm[i] of the groups)."""
        if (v, j) not in self.loaded:
            for key in [k for k in self.loaded if k[0] == v and k[1] < j]:  # passed: never read again
                del self.loaded[key]
            K = self.cfg.shuffle_buffer
            batches = [self.reader.get_batch(g) for g in self.order[v][j * K:(j + 1) * K]]
            n = sum(b.num_rows for b in batches)
            perm = torch.randperm(n, generator=_generator(self.cfg.seed, self.ds, v, j))
            where = torch.empty_like(perm)
            where[perm] = torch.arange(n)  # row r of the groups goes to where[r]: scatter, not cat + gather
            stacks = []
            for keys, dtype in _STACKS:
                stack = torch.empty((len(keys), n, *_column(batches[0], keys[0]).shape[1:]), dtype=dtype)
                dst = stack.numpy()  # shares stack's memory
                lo = 0
                for b in batches:
                    at = where[lo:lo + b.num_rows].numpy()
                    for i, k in enumerate(keys):
                        dst[i][at] = _column(b, k)
                    lo += b.num_rows
                stacks.append(stack)
            self.loaded[(v, j)] = stacks
            self.max_rows_held = max(self.max_rows_held, sum(b[0].shape[1] for b in self.loaded.values()))
        return self.loaded[(v, j)]

    def _shard_rows(self, v: int, lo: int, hi: int) -> Iterator[list[Tensor]]:
        """Rows [lo, hi) of shard v's shuffled stream, as slices of its buffers (one per _STACKS)."""
        starts = self.starts[v]
        while lo < hi:
            j = bisect.bisect_right(starts, lo) - 1
            at, take = lo - starts[j], min(hi, starts[j + 1]) - lo
            yield [t[:, at:at + take] for t in self._buffer(v, j)]
            lo += take

    def local_batch(self, step: int) -> dict[str, Tensor]:
        """This rank's part of global batch `step` (its shards' rows, in shard order)."""
        parts = [p for v in self.mine for p in self._shard_rows(v, self.offset(v, step), self.offset(v, step + 1))]
        if not parts:
            return _from_batch(self.reader.get_batch(0).slice(0, 0))
        cols: dict[str, Tensor] = {}
        for i, (keys, dtype) in enumerate(_STACKS):
            stack = torch.cat([p[i] for p in parts], dim=1)  # contiguous: each column below is too
            cols.update(zip(keys, (stack.long() if dtype == torch.int8 else stack).unbind(0), strict=True))
        return {k: cols[k] for k in BATCH_KEYS}

    def close(self) -> None:
        self.source.close()
