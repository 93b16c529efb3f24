"""Point-in-time history: brute-force reference, no leakage, window splits, as-of snapshots."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.history import (
    HISTORY_PAYLOAD,
    advance_state,
    asof_snapshot,
    build_user_history,
    history_age_seconds,
    history_features,
    read_user_history,
)
from features.lake import Lake
from features.stage import ingest
from features.windows import Window

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PAYLOAD = ["item_id", "click"]
SETTINGS = settings(max_examples=50, deadline=None)

# (user, second, item, click): few users and few distinct seconds, so ties on ts are common.
rows_strategy = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 12), st.integers(1, 50), st.integers(0, 1)),
    min_size=1,
    max_size=40,
)


def events_frame(rows: list[tuple[int, int, int, int]], first_id: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "event_id": [first_id + i for i in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "ts": [T0 + timedelta(seconds=r[1]) for r in rows],
            "item_id": [r[2] for r in rows],
            "click": [r[3] for r in rows],
            "repr": [[float(r[2]), float(r[1])] for r in rows],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC"), "click": pl.Int8, "repr": pl.Array(pl.Float32, 2)},
    )


def reference(events: pl.DataFrame, state_rows: list[dict], length: int) -> dict[int, list[tuple]]:
    """Brute force: per event, the last `length` of (older state rows + earlier events), ordered like the spec."""
    out = {}
    evs = events.to_dicts()
    for e in evs:
        older = [
            (s["ts"], 0, s["pos"], s["item_id"], s["click"])
            for s in state_rows
            if s["user_id"] == e["user_id"]
        ]
        older += [
            (x["ts"], 1, x["event_id"], x["item_id"], x["click"])
            for x in evs
            if x["user_id"] == e["user_id"] and x["ts"] < e["ts"]
        ]
        older = [o for o in older if o[0] < e["ts"]]
        out[e["event_id"]] = [(o[0], o[3], o[4]) for o in sorted(older)[-length:]] if older else []
    return out


def as_tuples(frame: pl.DataFrame) -> dict[int, list[tuple]]:
    return {
        r["event_id"]: list(zip(r["hist_ts"], r["hist_item_id"], r["hist_click"], strict=True))
        for r in frame.to_dicts()
    }


@SETTINGS
@given(
    rows=rows_strategy,
    old=st.lists(st.tuples(st.integers(1, 4), st.integers(-9, -1), st.integers(1, 50))),
    length=st.integers(1, 6),
)
def test_matches_brute_force_and_never_leaks(rows, old, length) -> None:
    events = events_frame(rows)
    state_rows = [
        {"user_id": u, "ts": T0 + timedelta(seconds=s), "pos": 0, "item_id": i, "click": 1}
        for u, s, i in sorted(old, key=lambda r: r[1])
    ]
    state = None
    if state_rows:
        st_df = pl.DataFrame(state_rows, schema_overrides={"ts": pl.Datetime("us", "UTC"), "click": pl.Int8})
        st_df = st_df.with_columns(pl.int_range(pl.len()).over("user_id").alias("pos"))
        state_rows = st_df.to_dicts()
        state = st_df.group_by("user_id").agg(
            pl.col("ts").alias("hist_ts"),
            pl.col("item_id").alias("hist_item_id"),
            pl.col("click").alias("hist_click"),
        )
    out = history_features(
        events.lazy(), state.lazy() if state is not None else None, length, PAYLOAD
    ).collect()
    assert out["event_id"].to_list() == events["event_id"].to_list()  # one row per event, input order
    assert as_tuples(out) == reference(events, state_rows, length)
    joined = out.join(events.select("event_id", "ts"), on="event_id").with_columns(history_age_seconds())
    for r in joined.to_dicts():
        assert all(t < r["ts"] for t in r["hist_ts"])  # strictly before: no same-instant or later data
        assert all(a > 0 for a in r["hist_age_s"])


@SETTINGS
@given(rows=rows_strategy, split=st.integers(0, 13), length=st.integers(1, 5))
def test_split_across_windows_equals_one_window(rows, split, length) -> None:
    events = events_frame(sorted(rows, key=lambda r: r[1]))
    payload = [*PAYLOAD, "repr"]  # vector payloads (LoopFM representations) travel the same way
    whole = history_features(events.lazy(), None, length, payload).collect()
    first = events.filter(pl.col("ts") < T0 + timedelta(seconds=split))
    second = events.filter(pl.col("ts") >= T0 + timedelta(seconds=split))
    state = advance_state(first.lazy(), None, length, payload)
    part = history_features(second.lazy(), state, length, payload).collect()
    expected = whole.filter(pl.col("event_id").is_in(second["event_id"].to_list()))
    assert part.to_dicts() == expected.to_dicts()
    assert part.schema["hist_repr"] == pl.List(pl.Array(pl.Float32, 2))
    # the state after both windows is the same as the state after one
    both = advance_state(second.lazy(), state, length, payload).collect()
    assert both.to_dicts() == advance_state(events.lazy(), None, length, payload).collect().to_dicts()


def _users(ds: str) -> pl.DataFrame:
    return pl.DataFrame({"user_id": [1], "segment": [0], "region": [0], "first_ds": [date.fromisoformat(ds)]})


@SETTINGS
@given(offsets=st.sets(st.integers(0, 30), max_size=6), at=st.integers(0, 35), days=st.sampled_from([1, 7]))
def test_asof_snapshot_picks_newest_before_window(offsets, at, days) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp)
        written = sorted((date(2026, 1, 1) + timedelta(days=o)).isoformat() for o in offsets)
        for ds in written:
            lake.write("users", _users(ds), ds=ds)
        window = Window(date(2026, 1, 1) + timedelta(days=at), days)
        got = asof_snapshot(lake, "users", window)
        allowed = [ds for ds in written if ds <= window.prev().ds]
        if not allowed:
            assert got is None
        else:
            snap_ds = got.collect()["first_ds"][0].isoformat()
            assert snap_ds == allowed[-1] and snap_ds < window.ds  # never same-day or future


def _lake_events(rows: list[tuple[int, int, int, int]], window: Window, first_id: int) -> pl.DataFrame:
    base = (window.start_ts - T0).total_seconds()
    shifted = [(u, int(base) + s, i, c) for u, s, i, c in rows]
    return events_frame(shifted, first_id).with_columns(
        surface=pl.lit("feed"),
        like=pl.lit(None, pl.Int8),
        position=pl.lit(0, pl.Int16),
        device=pl.lit(0, pl.Int8),
        p_click=pl.lit(None, pl.Float32),
    )


def test_build_user_history_chains_windows_and_carries_gaps(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    w1, w2, w3 = Window(date(2026, 1, 1)), Window(date(2026, 1, 2)), Window(date(2026, 1, 3))
    e1 = _lake_events([(1, 5, 10, 1), (1, 9, 11, 0), (2, 5, 12, 1)], w1, 0)
    e3 = _lake_events([(1, 1, 13, 1)], w3, 100)
    lake.write("events", e1, ds=w1.ds, surface="feed")
    lake.write("events", e3, ds=w3.ds, surface="feed")
    assert read_user_history(lake, w1) is None
    for w in (w1, w2, w3):  # w2 has no events: the state is carried forward
        build_user_history(lake, w, length=2)
    s2 = lake.read("user_history", ds=w2.ds).to_pylist()
    assert [r["hist_item_id"] for r in s2] == [[10, 11], [12]]
    s3 = read_user_history(lake, Window(date(2026, 1, 4))).collect().sort("user_id")
    assert s3["hist_item_id"].to_list() == [[11, 13], [12]]
    assert s3["hist_surface"].to_list() == [["feed", "feed"], ["feed"]]


def _window3_history(uri: str) -> pl.DataFrame:
    lake, w3 = Lake(uri), Window(date(2026, 1, 3))
    events = lake.scan_many("events", lake.partitions("events", ds=w3.ds)).sort("event_id")
    state = read_user_history(lake, w3)
    return history_features(
        events.select("event_id", "user_id", "ts", *HISTORY_PAYLOAD), state, 8, HISTORY_PAYLOAD
    ).collect()


def test_missing_user_history_is_rebuilt_never_read_as_no_history(tiny_lake: str, tmp_path: Path) -> None:
    generated, ingested = str(tmp_path / "generated"), str(tmp_path / "ingested")
    shutil.copytree(tiny_lake, generated)  # `fmx generate` writes no user_history
    shutil.copytree(tiny_lake, ingested)
    ingest("2026-01-03", ingested, source="lake")  # writes user_history for 01-01 .. 01-03
    assert Lake(generated).partitions("user_history") == []
    built = _window3_history(generated)
    assert built.equals(_window3_history(ingested)) and built["hist_item_id"].list.len().sum() > built.height
    assert [p["ds"] for p in Lake(generated).partitions("user_history")] == ["2026-01-01", "2026-01-02"]

    Lake(ingested).delete("user_history", ds="2026-01-02")  # a hole in the chain is rebuilt too
    assert _window3_history(ingested).equals(built)
    assert read_user_history(Lake(ingested), Window(date(2026, 1, 1))) is None  # the lake's first window
    with pytest.raises(ValueError, match="not aligned"):
        read_user_history(Lake(generated), Window(date(2026, 1, 6), days=2))


def test_fm_window_data_is_the_same_with_or_without_stored_history(tiny_lake: str, tmp_path: Path) -> None:
    from fm.config import FMConfig
    from fm.data import load_window

    generated, ingested = str(tmp_path / "generated"), str(tmp_path / "ingested")
    shutil.copytree(tiny_lake, generated)
    shutil.copytree(tiny_lake, ingested)
    ingest("2026-01-03", ingested, source="lake")
    cfg, w3 = FMConfig.from_preset("small", hist_len=8), Window(date(2026, 1, 3))
    a, b = load_window(Lake(generated), w3, cfg), load_window(Lake(ingested), w3, cfg)
    assert a.tensors.keys() == b.tensors.keys() and int(a.tensors["hist_mask"].sum()) > 0
    assert all(bool((a.tensors[k] == b.tensors[k]).all()) for k in a.tensors)
