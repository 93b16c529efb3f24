"""Point-in-time expert examples: events ⨝ FM outputs ⨝ side features ⨝ the user's FM history.

`build_expert_examples(lake, window, surface, preset)` writes ``expert_examples(fm=preset, ds, surface)``
(schema `EXPERT_EXAMPLES`) from:
- ``events(ds, surface)``: the rows and labels;
- ``fm_outputs(fm=preset, ds, surface)`` on event_id: fm_logit_click, fm_tae, fm_version — the FM that
  scored window ds was trained through the window before ds (FM contract), so these carry no leakage;
- ``users`` / ``items`` snapshots as of the window before ds (`asof_snapshot`); unknown ids -> 0;
- ``counters``: the event's point-in-time counters (features.counters.window_counters over every
  surface's events of the window + the carried counter_state of window.prev(), built on demand) as the
  dense inputs features.counters.DENSE_NAMES: float32 vector, only events strictly before the event's ts;
- LoopFM history: the user's last L FM representations with their click labels, kept compressed as the FM
  exported them (int8 codes ``fm_repr`` and scales ``fm_repr_scale``: loop_hist_code, loop_hist_scale; the
  expert dequantises, experts.data), from fm_outputs of ALL surfaces, with ts strictly before the event's
  ts. Day ds contributes its own earlier rows; older days come from the carried ``loop_state(fm=preset, ds)``.

LOOP_STATE contract: ``loop_state(fm, ds=W)`` is the per-user last-L FM history at the END of window W,
built from fm_outputs(fm, W, every surface) ⨝ events(W) and loop_state(fm, W.prev()). It is built once
per (preset, window) by `build_loop_state`; `build_expert_examples` for window D needs the state of D-1
and builds it (and any missing predecessor) on demand. This module alone writes and deletes loop_state: each
state records in its file metadata (`SOURCE_VERSION`) the fm_version of the fm_outputs it read, and
`loop_state_before` rebuilds a state whose window was re-exported by another FM version since (and deletes
every later state, built on it). The chain
starts at the first window the FM scored: before it the state is empty (None). The history length of
the state is fixed per lake/preset (default 20); a different `history_length` with an existing state
truncates to the shorter one.

Errors: `MissingFMOutputs` (no fm_outputs for the window), `SurfaceNotScored` (the FM scored the
window but not this surface, or left some events unscored), `FMVersionMismatch` (rows of one
window come from several FM versions), `EmptySurface` (no events for the surface).
"""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from features.counters import CounterStream, dense_counters, read_counter_state, window_counters
from features.history import HistoryStream, advance_state, asof_snapshot, history_features
from features.lake import DATA_FILE, Lake, PartitionNotFound, SchemaError, merge_by_time
from features.schemas import (
    CLICK,
    EVENT_ID,
    EVENTS,
    EXPERT_EXAMPLES,
    FM_OUTPUTS,
    FM_VERSION,
    ITEM_FEATURES,
    ITEM_ID,
    ITEMS,
    LOOP_STATE,
    SURFACE,
    TS,
    USER_FEATURES,
    USER_ID,
    USERS,
)
from features.windows import Window

_LOOP_COLUMNS = [pl.col(f"hist_{c}").alias(f"loop_hist_{c}") for c in ("code", "scale", "click")]
LOOP_PAYLOAD = ("code", "scale", CLICK, SURFACE)  # -> LOOP_STATE hist_code, hist_scale, hist_click, hist_surface
SOURCE_VERSION = "fmx.source_fm_version"  # loop_state file metadata: the fm_version of the fm_outputs it read
STREAM_CHUNK = 65_536  # events per chunk of a streamed window (build_expert_examples)


class MissingFMOutputs(PartitionNotFound):
    """The FM has not scored a window that a stage needs."""


class SurfaceNotScored(ValueError):
    """The FM scored the window, but not (all of) this surface."""


class FMVersionMismatch(ValueError):
    """Rows that must come from one FM version come from several."""


class EmptySurface(ValueError):
    """A surface has no events in the window."""


def fm_surfaces(lake: Lake, window: Window, preset: str) -> list[str]:
    """Surfaces the FM `preset` scored for `window` (may be empty)."""
    return [p["surface"] for p in lake.partitions(FM_OUTPUTS.name, fm=preset, ds=window.ds)]


def _events(lake: Lake, window: Window, surface: str) -> pl.LazyFrame:
    if not lake.exists(EVENTS.name, ds=window.ds, surface=surface):
        raise EmptySurface(f"surface {surface!r} has no events partition for window {window} in {lake.uri}")
    return lake.scan(EVENTS.name, ds=window.ds, surface=surface)


def _fm(lake: Lake, window: Window, preset: str, surface: str) -> pl.LazyFrame:
    scored = fm_surfaces(lake, window, preset)
    if not scored:
        raise MissingFMOutputs(
            f"no fm_outputs for fm={preset} window {window} in {lake.uri}: run `fmx fm export --ds {window.ds} "
            f"--preset {preset}` first (the FM trained through {window.prev()} scores it)"
        )
    if surface not in scored:
        raise SurfaceNotScored(f"FM {preset!r} scored window {window} for surfaces {scored}, not for {surface!r}")
    return lake.scan(FM_OUTPUTS.name, fm=preset, ds=window.ds, surface=surface)


def _one_version(frame: pl.DataFrame, what: str) -> str:
    versions = frame[FM_VERSION].unique().sort().to_list()
    if len(versions) != 1:
        raise FMVersionMismatch(f"{what}: rows come from {len(versions)} FM versions {versions[:5]}, expected one")
    return str(versions[0])


def _loop_rows(lake: Lake, window: Window, preset: str) -> tuple[pl.DataFrame, str]:
    """Every FM-scored event of the window (all surfaces): event_id, user_id, ts, code, scale, click, surface; and
    the fm_version that scored them."""
    frames = []
    for surface in fm_surfaces(lake, window, preset):
        fm = lake.scan(FM_OUTPUTS.name, fm=preset, ds=window.ds, surface=surface).select(
            EVENT_ID, USER_ID, TS, SURFACE, FM_VERSION, "fm_repr", "fm_repr_scale"
        )
        labels = _events(lake, window, surface).select(EVENT_ID, CLICK)
        frames.append(fm.join(labels, on=EVENT_ID, how="inner"))
    if not frames:
        raise MissingFMOutputs(f"no fm_outputs for fm={preset} window {window} in {lake.uri}")
    rows = pl.concat(frames).collect()
    version = _one_version(rows, f"fm_outputs fm={preset} ds={window.ds} (all surfaces)")
    return _loop_payload(rows), version


def build_loop_state(lake: Lake, window: Window, preset: str, length: int = 20) -> str:
    """Write loop_state(fm=preset, ds=window) = the FM history at the end of `window`; return its path."""
    return _advance_loop_state(lake, window, preset, loop_state_before(lake, window, preset, length), length)


def _advance_loop_state(lake: Lake, window: Window, preset: str, state: pl.LazyFrame | None, length: int) -> str:
    """Write the state of `window` from the state before it; it records the fm_version of the rows it read."""
    rows, version = _loop_rows(lake, window, preset)
    new = advance_state(rows.lazy(), state, length, LOOP_PAYLOAD).collect()
    return lake.write(LOOP_STATE.name, new, metadata={SOURCE_VERSION: version}, fm=preset, ds=window.ds)


def _scored_version(lake: Lake, window: Window, preset: str, scored: list[str]) -> str:
    """The fm_version of fm_outputs(fm=preset, window) ("" for no rows); `scored`: its surfaces."""
    column = lake.read(FM_OUTPUTS.name, columns=[FM_VERSION], fm=preset, ds=window.ds, surface=scored[0])[FM_VERSION]
    return str(column[0].as_py()) if len(column) else ""


def _is_current(lake: Lake, window: Window, preset: str, scored: list[str]) -> bool:
    """Whether loop_state(fm=preset, window) exists, has today's schema and was built from the fm_outputs there now
    (`scored`: their surfaces). A state of another schema (e.g. written before the history kept int8 codes) is
    derived data: it is rebuilt like a stale one."""
    if not lake.exists(LOOP_STATE.name, fm=preset, ds=window.ds):
        return False
    try:
        built_from = lake.file_metadata(LOOP_STATE.name, fm=preset, ds=window.ds).get(SOURCE_VERSION)
    except SchemaError:
        return False
    return built_from == _scored_version(lake, window, preset, scored)


def _drop_states_from(lake: Lake, preset: str, ds: str) -> list[str]:
    """Delete loop_state(fm=preset, ds >= `ds`); return the deleted ds."""
    stale = [p["ds"] for p in lake.partitions(LOOP_STATE.name, fm=preset) if p["ds"] >= ds]
    for day in stale:
        lake.delete(LOOP_STATE.name, fm=preset, ds=day)
    return stale


def invalidate_loop_state(lake: Lake, preset: str, window: Window, new_version: str) -> list[str]:
    """If fm_outputs(fm=preset, window) come from another FM version than `new_version`, delete loop_state(fm=preset,
    ds >= window) now; returns the deleted ds. Not needed before a re-export: `loop_state_before` finds and
    rebuilds such states itself (each records the version of the rows it read)."""
    scored = fm_surfaces(lake, window, preset)
    if not scored or _scored_version(lake, window, preset, scored) == new_version:
        return []
    return _drop_states_from(lake, preset, window.ds)


def loop_state_before(lake: Lake, window: Window, preset: str, length: int = 20) -> pl.LazyFrame | None:
    """The LOOP_STATE at the end of window.prev(), building missing states back to the FM's first window.

    A state whose fm_outputs were re-exported by another FM version since it was built is stale: it and every
    later state are deleted and rebuilt from the rows there now."""
    scored: dict[str, list[str]] = {}  # ds -> the surfaces the FM scored (one listing of fm_outputs)
    for p in lake.partitions(FM_OUTPUTS.name, fm=preset):
        scored.setdefault(p["ds"], []).append(p["surface"])
    chain: list[Window] = []  # the windows the FM scored up to window.prev(), oldest first
    w = window.prev()
    while w.ds in scored:
        chain.insert(0, w)
        w = w.prev()
    first = next((i for i, w in enumerate(chain) if not _is_current(lake, w, preset, scored[w.ds])), len(chain))
    if first < len(chain):
        _drop_states_from(lake, preset, chain[first].ds)
    state = _state(lake, chain[first - 1], preset) if first else None
    for todo in chain[first:]:
        _advance_loop_state(lake, todo, preset, state, length)
        state = _state(lake, todo, preset)
    return state


def _state(lake: Lake, window: Window, preset: str) -> pl.LazyFrame:
    return lake.scan(LOOP_STATE.name, fm=preset, ds=window.ds)


def _side(lake: Lake, window: Window, table: str, key: str, columns: tuple[str, ...]) -> pl.LazyFrame | None:
    snap = asof_snapshot(lake, table, window)
    return None if snap is None else snap.select(key, *columns).unique(key, keep="last")


def _with_side(frame: pl.LazyFrame, side: pl.LazyFrame | None, key: str, columns: tuple[str, ...]) -> pl.LazyFrame:
    if side is None:
        return frame.with_columns(pl.lit(0, pl.Int32).alias(c) for c in columns)
    return frame.join(side, on=key, how="left").with_columns(pl.col(c).fill_null(0).cast(pl.Int32) for c in columns)


def _counters(lake: Lake, window: Window) -> pl.LazyFrame:
    """event_id + counters (Array(Float32, C)) of every event of the window (all surfaces)."""
    counts = window_counters(lake, window)
    return pl.DataFrame({EVENT_ID: counts[EVENT_ID], "counters": dense_counters(counts)}).lazy()


def expert_frame(lake: Lake, window: Window, surface: str, preset: str, history_length: int = 20) -> pl.DataFrame:
    """The expert_examples rows for (window, surface) as a DataFrame (not written)."""
    events = _events(lake, window, surface).collect()
    if events.height == 0:
        raise EmptySurface(f"surface {surface!r} has no events in window {window}")
    fm = _fm(lake, window, preset, surface).select(EVENT_ID, FM_VERSION, "fm_logit_click", "fm_tae").collect()
    joined = events.join(fm, on=EVENT_ID, how="left")
    unscored = joined[FM_VERSION].null_count()
    if unscored:
        raise SurfaceNotScored(f"fm_outputs fm={preset} ds={window.ds} surface={surface} miss {unscored} of "
                               f"{events.height} events: re-run the FM export for this window")
    _one_version(joined, f"fm_outputs fm={preset} ds={window.ds} surface={surface}")
    state = loop_state_before(lake, window, preset, history_length)
    hist = history_features(_loop_rows(lake, window, preset)[0].lazy(), state, history_length, LOOP_PAYLOAD)
    hist = hist.select(EVENT_ID, *_LOOP_COLUMNS)
    out = _with_side(joined.lazy(), _side(lake, window, USERS.name, USER_ID, USER_FEATURES), USER_ID, USER_FEATURES)
    out = _with_side(out, _side(lake, window, ITEMS.name, ITEM_ID, ITEM_FEATURES), ITEM_ID, ITEM_FEATURES)
    out = out.join(_counters(lake, window), on=EVENT_ID, how="left")
    out = out.join(hist, on=EVENT_ID, how="left").with_columns(
        pl.col("loop_hist_click").fill_null(pl.lit([], pl.List(pl.Int8))),
        pl.col("loop_hist_click").list.len().fill_null(0).cast(pl.Int16).alias("loop_hist_len"),
    )
    return out.sort(TS, EVENT_ID).collect()


def build_expert_examples(lake: Lake, window: Window, surface: str, preset: str, history_length: int = 20,
                          chunk_rows: int | None = STREAM_CHUNK) -> str:
    """Write expert_examples(fm=preset, ds=window.ds, surface) (EXPERT_EXAMPLES); return its path.

    With `chunk_rows` (default) the window is streamed (`stream_expert_frames`) and written in chunks;
    None builds the whole frame in memory (`expert_frame`). Both write the same rows."""
    if chunk_rows is None:
        frame = expert_frame(lake, window, surface, preset, history_length)
        return lake.write(EXPERT_EXAMPLES.name, frame, fm=preset, ds=window.ds, surface=surface)
    frames = stream_expert_frames(lake, window, surface, preset, history_length, chunk_rows)
    with lake.chunked_writer(EXPERT_EXAMPLES.name, fm=preset, ds=window.ds, surface=surface) as writer:
        for frame in frames:
            writer.write(frame)
    return f"{lake.partition_dir(EXPERT_EXAMPLES.name, fm=preset, ds=window.ds, surface=surface)}/{DATA_FILE}"


# ---- streaming (issue 12: windows larger than memory) ---------------------------------------------------


def _scored_batches(lake: Lake, window: Window, preset: str, event_surface: str, batch_rows: int,
                    scored: list[str]) -> Iterator[pl.DataFrame]:
    """events(ds, surface) batches with their fm_outputs columns alongside (null where the surface is not
    scored). fm_outputs are written in the events' order, one row per event; rows that do not line up raise."""
    events = lake.iter_batches(EVENTS.name, None, batch_rows, ds=window.ds, surface=event_surface)
    if event_surface not in scored:
        for batch in events:
            yield batch.with_columns(pl.lit(None, pl.String).alias(FM_VERSION))
        return
    fm = lake.iter_batches(FM_OUTPUTS.name, [EVENT_ID, FM_VERSION, "fm_logit_click", "fm_tae", "fm_repr", "fm_repr_scale"],
                           batch_rows, fm=preset, ds=window.ds, surface=event_surface)
    for batch in events:
        got = next(fm, None)
        if got is None or got.height != batch.height or not got[EVENT_ID].equals(batch[EVENT_ID]):
            raise SurfaceNotScored(f"fm_outputs fm={preset} ds={window.ds} surface={event_surface} do not line up "
                                   "with its events (one row per event, same order): re-run the FM export")
        yield pl.concat([batch, got.drop(EVENT_ID)], how="horizontal")


def stream_expert_frames(lake: Lake, window: Window, surface: str, preset: str, history_length: int = 20,
                         chunk_rows: int = STREAM_CHUNK) -> Iterator[pl.DataFrame]:
    """`expert_frame`'s rows in chunks, in (ts, event_id) order, from the window's events (every surface)
    merged by time with their fm_outputs; counters and LoopFM history from states carried across chunks
    (features.counters.CounterStream, features.history.HistoryStream). Memory: the states plus a chunk."""
    if not lake.exists(EVENTS.name, ds=window.ds, surface=surface):
        raise EmptySurface(f"surface {surface!r} has no events partition for window {window} in {lake.uri}")
    _fm(lake, window, preset, surface)  # MissingFMOutputs / SurfaceNotScored before any work
    scored = fm_surfaces(lake, window, preset)
    parts = [p["surface"] for p in lake.partitions(EVENTS.name, ds=window.ds)]
    per_part = max(1, chunk_rows // len(parts))
    sources = [_scored_batches(lake, window, preset, s, per_part, scored) for s in parts]
    counts = CounterStream(read_counter_state(lake, window))
    hist = HistoryStream(loop_state_before(lake, window, preset, history_length), history_length, LOOP_PAYLOAD)
    users = _side(lake, window, USERS.name, USER_ID, USER_FEATURES)
    items = _side(lake, window, ITEMS.name, ITEM_ID, ITEM_FEATURES)
    sides = [(None if f is None else f.collect().lazy(), k, c)
             for f, k, c in ((users, USER_ID, USER_FEATURES), (items, ITEM_ID, ITEM_FEATURES))]
    versions: set[str] = set()
    rows = 0
    for chunk in merge_by_time(sources, TS, EVENT_ID, f"events(ds={window.ds}) in {lake.uri}"):
        counters = counts.features(chunk.select(EVENT_ID, TS, USER_ID, ITEM_ID, SURFACE, CLICK))
        loop = chunk.filter(pl.col(FM_VERSION).is_not_null())
        versions |= set(loop[FM_VERSION].unique().to_list())
        if len(versions) > 1:
            raise FMVersionMismatch(f"fm_outputs fm={preset} ds={window.ds} (all surfaces): rows come from "
                                    f"{len(versions)} FM versions {sorted(versions)[:5]}, expected one")
        mine = chunk.filter(pl.col(SURFACE) == surface)
        if mine.height == 0:
            if loop.height:
                hist.features(_loop_payload(loop))
            continue
        h = hist.features(_loop_payload(loop)).select(EVENT_ID, *_LOOP_COLUMNS)
        out = mine.drop("fm_repr", "fm_repr_scale").lazy()
        for side, key, cols in sides:
            out = _with_side(out, side, key, cols)
        dense = pl.DataFrame({EVENT_ID: counters[EVENT_ID], "counters": dense_counters(counters)}).lazy()
        out = out.join(dense, on=EVENT_ID, how="left").join(h.lazy(), on=EVENT_ID, how="left").with_columns(
            pl.col("loop_hist_click").fill_null(pl.lit([], pl.List(pl.Int8))),
            pl.col("loop_hist_click").list.len().fill_null(0).cast(pl.Int16).alias("loop_hist_len"),
        )
        rows += mine.height
        yield out.sort(TS, EVENT_ID).collect()
    if rows == 0:
        raise EmptySurface(f"surface {surface!r} has no events in window {window}")


def _loop_payload(rows: pl.DataFrame) -> pl.DataFrame:
    """_loop_rows' columns (event_id, user_id, ts, code, scale, click, surface) of FM-scored event rows: the
    representation as exported, int8 codes and their scale (a quarter of the float32 vector's bytes in the
    carried state, the examples table and the expert's tensor cache)."""
    return rows.select(EVENT_ID, USER_ID, TS, pl.col("fm_repr").alias("code"), pl.col("fm_repr_scale").alias("scale"),
                       CLICK, SURFACE)
