"""Point-in-time counters: brute-force recount, no leakage (later data never moves them), the carried state."""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from features.counters import (
    ALL,
    COUNT_COLUMNS,
    DENSE_NAMES,
    KINDS,
    advance_counters,
    build_counter_state,
    count_col,
    counter_features,
    dense_counters,
    read_counter_state,
    window_counters,
)
from features.lake import Lake
from features.schemas import COUNTER_STATE
from features.windows import Window

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SURFACES = ("feed", "live")
SETTINGS = settings(max_examples=40, deadline=None)

# (user, second, item, surface index, click): few users, items and seconds, so ties on ts are common.
row = st.tuples(st.integers(1, 3), st.integers(0, 9), st.integers(1, 4), st.integers(0, 1), st.integers(0, 1))
rows_strategy = st.lists(row, min_size=1, max_size=30)


def frame(rows: list[tuple[int, int, int, int, int]], start: datetime = T0, first_id: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "event_id": [first_id + i for i in range(len(rows))],
            "ts": [start + timedelta(seconds=r[1]) for r in rows],
            "user_id": [r[0] for r in rows],
            "item_id": [r[2] for r in rows],
            "surface": [SURFACES[r[3]] for r in rows],
            "click": [r[4] for r in rows],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC"), "click": pl.Int8},
    )


def _group(e: dict, kind: str) -> tuple:
    col, per_surface = KINDS[kind]
    return (e[col] if col else 0, e["surface"] if per_surface else ALL)


def brute_force(events: pl.DataFrame, old: pl.DataFrame) -> dict[int, dict[str, int]]:
    """Per event and kind: past = every `old` event of the group, now = events of the group strictly earlier."""
    olds, evs = old.to_dicts(), events.to_dicts()
    out = {}
    for e in evs:
        counts = {}
        for kind in KINDS:
            g = _group(e, kind)
            past = [x for x in olds if _group(x, kind) == g]
            now = [x for x in evs if _group(x, kind) == g and x["ts"] < e["ts"]]
            for horizon, xs in (("past", past), ("now", now)):
                counts[count_col(kind, horizon, "imps")] = len(xs)
                counts[count_col(kind, horizon, "clicks")] = sum(x["click"] for x in xs)
        out[e["event_id"]] = counts
    return out


@SETTINGS
@given(rows=rows_strategy, old_rows=st.lists(row, max_size=20))
def test_matches_brute_force(rows, old_rows) -> None:
    events, old = frame(rows), frame(old_rows, T0 - timedelta(days=1), first_id=1000)
    state = advance_counters(old.lazy(), None) if old_rows else None
    out = counter_features(events.lazy(), state).collect()
    assert out["event_id"].to_list() == events["event_id"].to_list()  # one row per event, input order
    expected = brute_force(events, old)
    assert {r.pop("event_id"): r for r in out.to_dicts()} == expected


@SETTINGS
@given(rows=rows_strategy, split=st.integers(0, 10))
def test_split_across_windows_adds_up(rows, split) -> None:
    """past + now of a window that carries the state of an earlier part = now of the whole, per event."""
    events = frame(rows)
    cut = T0 + timedelta(seconds=split)
    first, second = events.filter(pl.col("ts") < cut), events.filter(pl.col("ts") >= cut)
    whole = counter_features(events.lazy(), None).collect()
    part = counter_features(second.lazy(), advance_counters(first.lazy(), None)).collect()
    whole = whole.filter(pl.col("event_id").is_in(second["event_id"].to_list()))
    for kind in KINDS:
        for what in ("imps", "clicks"):
            got = part[count_col(kind, "past", what)] + part[count_col(kind, "now", what)]
            assert got.to_list() == whole[count_col(kind, "now", what)].to_list()
    state_both = advance_counters(second.lazy(), advance_counters(first.lazy(), None)).collect()
    assert state_both.to_dicts() == advance_counters(events.lazy(), None).collect().to_dicts()


def _write(lake: Lake, windows: list[list[tuple]]) -> list[Window]:
    out = []
    for i, rows in enumerate(windows):
        w = Window(date(2026, 1, 1) + timedelta(days=i))
        ev = frame(rows, w.start_ts, first_id=10_000 * i).with_columns(
            pl.lit(0, pl.Int8).alias("like"), pl.lit(0, pl.Int16).alias("position"),
            pl.lit(0, pl.Int8).alias("device"), pl.lit(None, pl.Float32).alias("p_click"))
        for s in SURFACES:
            part = ev.filter(pl.col("surface") == s)
            if part.height:
                lake.write("events", part, ds=w.ds, surface=s)
        out.append(w)
    return out


def _events(lake: Lake, w: Window) -> pl.DataFrame:
    parts = [pl.from_arrow(lake.read("events", **p)) for p in lake.partitions("events", ds=w.ds)]
    return pl.concat([p for p in parts if isinstance(p, pl.DataFrame)]).sort("event_id")


@settings(max_examples=15, deadline=None)
@given(windows=st.lists(rows_strategy, min_size=3, max_size=3), later=rows_strategy, cut=st.integers(0, 10))
def test_lake_counters_never_see_later_data(windows, later, cut) -> None:
    """Window 1's counters equal a brute-force recount over the lake, whether or not the states were built
    first, and do not move when window 2 or window 1's events at or after an event's ts change."""
    windows[1] = sorted(windows[1], key=lambda r: r[1])  # the events before `cut` come first (same ids)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        lake_a, lake_b = Lake(a), Lake(b)
        ws = _write(lake_a, windows)
        got = window_counters(lake_a, ws[1])  # builds counter_state(ws[0]) on demand
        assert lake_a.exists(COUNTER_STATE.name, ds=ws[0].ds) and not lake_a.exists(COUNTER_STATE.name, ds=ws[1].ds)
        expected = brute_force(_events(lake_a, ws[1]), _events(lake_a, ws[0]))
        assert {r.pop("event_id"): r for r in got.to_dicts()} == expected
        # lake b: the same window 0, window 1 with every event at or after `cut` changed, another window 2,
        # and every state built first this time (window 2's too)
        kept = [r for r in windows[1] if r[1] < cut]
        changed = [(u, sec, i, 1 - sf, 1 - c) for u, sec, i, sf, c in windows[1] if sec >= cut]
        _write(lake_b, [windows[0], kept + changed, later])
        for w in ws:
            build_counter_state(lake_b, w)
        other = window_counters(lake_b, ws[1])
        early = pl.col("event_id") < 10_000 + len(kept)
        assert got.filter(early).to_dicts() == other.filter(early).to_dicts()
        assert got.filter(early).height == len(kept)
        assert (read_counter_state(lake_b, ws[1]).collect().to_dicts()
                == read_counter_state(lake_a, ws[1]).collect().to_dicts())


def test_dense_inputs_without_counts_are_the_no_history_inputs() -> None:
    none = dense_counters(pl.DataFrame({"event_id": [1, 2]}))
    zeros = dense_counters(pl.DataFrame({c: [0, 0] for c in COUNT_COLUMNS}))
    assert none.shape == (2, len(DENSE_NAMES)) and np.array_equal(none, zeros)
    assert np.allclose(zeros, 0.0)  # log1p(0) = 0 and every rate logit is logit(prior 1/2) = 0


def test_first_window_has_no_state() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp)
        ws = _write(lake, [[(1, 0, 1, 0, 1)], [(1, 0, 1, 0, 0)]])
        assert read_counter_state(lake, ws[0]) is None
        got = window_counters(lake, ws[1])
        assert got[count_col("user", "past", "clicks")].to_list() == [1]
