"""Point-in-time expert examples: schema, no leakage, carried LoopFM state, bad input."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest

from features.expert_examples import (
    EmptySurface,
    FMVersionMismatch,
    MissingFMOutputs,
    SurfaceNotScored,
    build_expert_examples,
    expert_frame,
    invalidate_loop_state,
)
from features.lake import Lake
from features.schemas import EXPERT_EXAMPLES
from tests.experts.synth import make_lake, write_day, write_fm

LABELS_AND_OWN_FM = ("click", "like", "fm_logit_click", "fm_tae", "fm_version")


def _perturb_from(lake: Lake, ds: str, t, preset: str = "small") -> None:
    """Flip every label and scramble every FM output with ts >= t, on every surface of ds."""
    for p in lake.partitions("events", ds=ds):
        ev = pl.from_arrow(lake.read("events", **p))
        flipped = pl.when(pl.col("ts") >= t).then(1 - pl.col("click")).otherwise(pl.col("click"))
        lake.write("events", ev.with_columns(flipped.alias("click")), **p)
    for p in lake.partitions("fm_outputs", fm=preset, ds=ds):
        fm = pl.from_arrow(lake.read("fm_outputs", **p))
        late = pl.col("ts") >= t
        fm = fm.with_columns(
            pl.when(late).then(-pl.col("fm_logit_click") + 3.0).otherwise(pl.col("fm_logit_click")).alias("fm_logit_click"),
            pl.when(late).then(pl.col("fm_repr_scale") * 7).otherwise(pl.col("fm_repr_scale")).alias("fm_repr_scale"),
        )
        lake.write("fm_outputs", fm, **p)


def test_schema_and_history_from_all_surfaces(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=3)
    build_expert_examples(lake, ws[2], "live", "small")
    table = lake.read("expert_examples", fm="small", ds=ws[2].ds, surface="live")
    assert table.column_names == EXPERT_EXAMPLES.columns
    frame = pl.from_arrow(table)
    assert frame.height == lake.read("events", ds=ws[2].ds, surface="live").num_rows
    # the sparse surface's history is mostly made of the dense surface's rows (all surfaces feed it)
    assert frame["loop_hist_len"].mean() > 5
    assert (frame["loop_hist_len"] == frame["loop_hist_click"].list.len()).all()
    # the chain of loop states was built for the FM's first scored window and the one before ds
    assert lake.exists("loop_state", fm="small", ds=ws[1].ds)
    assert not lake.exists("loop_state", fm="small", ds=ws[0].ds)  # the FM scored nothing on day 0


def test_no_leakage_from_labels_or_fm_outputs_at_or_after_the_event(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=3)
    day = ws[2]
    before = expert_frame(lake, day, "feed", "small")
    probe = before.row(before.height // 2, named=True)
    t = probe["ts"]
    _perturb_from(lake, day.ds, t)
    # a future snapshot of side features must not be read either
    users = pl.from_arrow(lake.read("users", ds=day.ds)).with_columns(pl.col("segment") + 100)
    lake.write("users", users, ds=day.ds)
    for p in lake.partitions("loop_state", fm="small"):
        lake.delete("loop_state", **p)  # rebuild the carried state from the perturbed lake too
    after = expert_frame(lake, day, "feed", "small")
    earlier = before.filter(pl.col("ts") <= t)["event_id"]
    cols = [c for c in EXPERT_EXAMPLES.columns if c not in LABELS_AND_OWN_FM]
    b = before.filter(pl.col("event_id").is_in(earlier.implode())).select(cols)
    a = after.filter(pl.col("event_id").is_in(earlier.implode())).select(cols)
    assert b.equals(a), "features of events at or before t changed when data at/after t changed"
    # ... while later events do see the changed past (the perturbation reached the join at all)
    later = before.filter(pl.col("ts") > t + timedelta(seconds=1))["event_id"]
    assert not before.filter(pl.col("event_id").is_in(later.implode())).select("loop_hist_click").equals(
        after.filter(pl.col("event_id").is_in(later.implode())).select("loop_hist_click"))
    assert not before.filter(pl.col("event_id").is_in(later.implode())).select("counters").equals(
        after.filter(pl.col("event_id").is_in(later.implode())).select("counters"))  # point-in-time counters too
    # the event's own FM output comes from the FM trained through the previous day
    assert probe["fm_version"].startswith(f"small-{ws[1].ds}-")


def test_history_excludes_ties_and_future(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2)
    frame = expert_frame(lake, ws[1], "feed", "small")
    fm = pl.concat([pl.from_arrow(lake.read("fm_outputs", **p)) for p in lake.partitions("fm_outputs", fm="small")])
    for row in frame.sample(20, seed=1).iter_rows(named=True):
        strictly_before = fm.filter((pl.col("user_id") == row["user_id"]) & (pl.col("ts") < row["ts"]))
        assert row["loop_hist_len"] == min(20, strictly_before.height)
        if row["loop_hist_len"]:
            newest = strictly_before.sort("ts", "event_id")[-1]
            assert row["loop_hist_code"][-1] == newest["fm_repr"][0].to_list()  # as the FM exported it
            assert row["loop_hist_scale"][-1] == newest["fm_repr_scale"][0]


def test_missing_fm_outputs_fail_clearly(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2, fm_from=5)
    with pytest.raises(MissingFMOutputs, match="fm export"):
        build_expert_examples(lake, ws[1], "feed", "small")


def test_surface_absent_from_fm(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2, fm_from=5)
    write_fm(lake, ws[1], surfaces=("feed",))
    with pytest.raises(SurfaceNotScored, match="not for 'live'"):
        build_expert_examples(lake, ws[1], "live", "small")


def test_fm_version_mismatch(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2)
    fm = pl.from_arrow(lake.read("fm_outputs", fm="small", ds=ws[1].ds, surface="feed"))
    fm = fm.with_columns(pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("small-x")).otherwise("fm_version")
                         .alias("fm_version"))
    lake.write("fm_outputs", fm, fm="small", ds=ws[1].ds, surface="feed")
    with pytest.raises(FMVersionMismatch, match="2 FM versions"):
        build_expert_examples(lake, ws[1], "feed", "small")


def test_empty_surface(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2)
    with pytest.raises(EmptySurface, match="'video'"):
        build_expert_examples(lake, ws[1], "video", "small")
    ev = pl.from_arrow(lake.read("events", ds=ws[1].ds, surface="live")).head(0)
    lake.write("events", ev, ds=ws[1].ds, surface="live")
    with pytest.raises(EmptySurface, match="no events"):
        build_expert_examples(lake, ws[1], "live", "small")


def test_unknown_side_ids_are_zero(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=2)
    write_day(lake, ws[1], users=80)  # users 40..79 are unknown to the ds-1 snapshot (users table of ds=0)
    write_fm(lake, ws[1])
    frame = expert_frame(lake, ws[1], "feed", "small")
    unknown = frame.filter(pl.col("user_id") >= 40)
    assert unknown.height and (unknown["segment"] == 0).all() and (unknown["region"] == 0).all()


def test_a_re_export_by_another_fm_version_drops_the_loop_state_built_from_the_old_rows(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=4)
    build_expert_examples(lake, ws[3], "feed", "small")  # builds loop_state for ws[1] and ws[2]
    built = [p["ds"] for p in lake.partitions("loop_state", fm="small")]
    assert built == [ws[1].ds, ws[2].ds]
    old = lake.read("fm_outputs", columns=["fm_version"], fm="small", ds=ws[2].ds, surface="feed")["fm_version"][0]
    assert invalidate_loop_state(lake, "small", ws[2], old.as_py()) == []  # same FM: a deterministic re-run
    assert [p["ds"] for p in lake.partitions("loop_state", fm="small")] == built
    assert invalidate_loop_state(lake, "small", ws[1], "small-other") == built  # ws[1] and every later state
    assert lake.partitions("loop_state", fm="small") == []
    write_fm(lake, ws[1], "small", version="small-2026-01-01-other")
    again = build_expert_examples(lake, ws[3], "feed", "small")  # rebuilt on demand from the new rows
    assert [p["ds"] for p in lake.partitions("loop_state", fm="small")] == built and again
