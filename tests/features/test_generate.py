"""The synthetic generator: determinism, day-by-day == all-at-once, structure, learnable signal, schemas."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.explain import bayes_metrics, bayes_metrics_by_surface, explain_window
from features.generate import GeneratorConfig, generate, generate_window
from features.lake import Lake
from features.schemas import TABLES
from features.windows import Window, window_series

DAY1 = date(2026, 1, 1)


def _table(lake: Lake, table: str) -> pl.DataFrame:
    return lake.scan_many(table, lake.partitions(table)).collect()


def _everything(lake: Lake) -> dict[str, pl.DataFrame]:
    return {t: _table(lake, t) for t in ("events", "users", "items")}


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    """2 days at scale "small" (~100k events): enough rows for the statistical checks."""
    lake = Lake(str(tmp_path_factory.mktemp("small") / "lake"))
    generate(lake, GeneratorConfig(scale="small", seed=3), days=2, progress=None)
    return lake


@pytest.fixture(scope="module")
def small_events(small_lake: Lake) -> pl.DataFrame:
    events = _table(small_lake, "events")
    users = small_lake.scan("users", ds="2026-01-02").collect()
    items = small_lake.scan("items", ds="2026-01-02").collect()
    return events.join(users, on="user_id").join(items, on="item_id", suffix="_item").sort("ts")


def test_deterministic_by_seed(tiny_lake: str, tmp_path: Path) -> None:
    again, other = Lake(str(tmp_path / "again")), Lake(str(tmp_path / "other"))
    generate(again, GeneratorConfig(scale="tiny", seed=0), days=3, progress=None)
    generate(other, GeneratorConfig(scale="tiny", seed=1), days=1, progress=None)
    expected = _everything(Lake(tiny_lake))
    for table, frame in _everything(again).items():
        assert frame.equals(expected[table]), table
    day1 = expected["events"].filter(pl.col("ts").dt.date() == DAY1)
    assert not _table(other, "events").equals(day1)


def test_day_by_day_equals_all_at_once(tiny_lake: str, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "daily"))
    windows = window_series(DAY1, 3)
    for w in windows:  # a fresh config object each day, as a daily DAG task would build it
        generate_window(lake, GeneratorConfig(scale="tiny", seed=0), w)
    generate_window(lake, GeneratorConfig(scale="tiny", seed=0), windows[1])  # a re-run changes nothing
    expected = _everything(Lake(tiny_lake))
    for table, frame in _everything(lake).items():
        assert frame.equals(expected[table]), table
    assert lake.meta()["origin"] == "2026-01-01" and lake.meta()["source"] == "generator"


def test_every_partition_passes_schema_checks(tiny_lake: str) -> None:
    lake = Lake(tiny_lake)
    meta = lake.meta()
    assert meta["window_days"] == 1 and meta["scale"] == "tiny" and meta["seed"] == 0
    assert meta["surfaces"] == ["feed", "search", "video", "live"]
    for table in ("events", "users", "items"):
        parts = lake.partitions(table)
        assert len(parts) == (12 if table == "events" else 3)
        for part in parts:
            data = lake.read(table, **part)
            assert data.column_names == TABLES[table].columns and data.num_rows > 0


def test_event_ids_unique_and_keyed_by_day(tiny_lake: str) -> None:
    events = _table(Lake(tiny_lake), "events")
    assert events["event_id"].n_unique() == events.height
    day = events.select((pl.col("event_id") // 2**32).alias("ord"), pl.col("ts").dt.date().alias("d"))
    assert (day["ord"].to_numpy() == np.array([d.toordinal() for d in day["d"]])).all()
    assert events.filter(pl.col("click") == 0)["like"].sum() == 0  # like only when clicked


def test_new_users_and_items_every_day(tiny_lake: str) -> None:
    lake = Lake(tiny_lake)
    events = _table(lake, "events").with_columns(pl.col("ts").dt.date().alias("day"))
    for w in window_series(DAY1, 3)[1:]:
        users, items = lake.scan("users", ds=w.ds).collect(), lake.scan("items", ds=w.ds).collect()
        prev_users = lake.scan("users", ds=w.prev().ds).collect()
        assert users.height > prev_users.height
        new_users = users.filter(pl.col("first_ds") == w.start)["user_id"]
        new_items = items.filter(pl.col("first_ds") == w.start)["item_id"]
        today = events.filter(pl.col("day") == w.start)
        assert today["user_id"].is_in(new_users.implode()).any() and today["item_id"].is_in(new_items.implode()).any()
        assert today["user_id"].max() <= users["user_id"].max()  # no event from an unknown user


def test_sparse_surface_and_ctr_ranges(small_lake: Lake, small_events: pl.DataFrame) -> None:
    per_user = small_events.group_by("surface").agg((pl.len() / pl.col("user_id").n_unique()).alias("per_user"))
    per = dict(per_user.iter_rows())
    assert per["live"] < 0.5 * min(per["feed"], per["search"], per["video"])
    for surface, m in bayes_metrics_by_surface(small_events).items():
        assert 0.03 <= m["base_rate"] <= 0.15, (surface, m)
        assert 0.75 <= m["auc"] <= 0.86, (surface, m)
        # p_click is the true rate: the clicks' mean lies within 4 binomial standard errors of it
        p = m["mean_p_click"]
        assert abs(m["base_rate"] - p) < 4 * (p * (1 - p) / m["rows"]) ** 0.5, (surface, m)
        assert m["ne"] < 0.9


def test_sequential_signal(small_events: pl.DataFrame) -> None:
    """The category of the user's last click (on any surface, any earlier day) predicts the next click."""
    clicks = small_events.filter(pl.col("click") == 1).select("user_id", "ts", pl.col("category").alias("last"))
    joined = small_events.join_asof(clicks, on="ts", by="user_id", strategy="backward",
                                    allow_exact_matches=False, check_sortedness=False).drop_nulls("last")
    ctr = dict(joined.group_by(pl.col("last") == pl.col("category")).agg(pl.col("click").mean()).iter_rows())
    assert ctr[True] > 1.8 * ctr[False]


def test_context_and_side_features_matter(small_events: pl.DataFrame) -> None:
    feed = small_events.filter(pl.col("surface") == "feed")
    top = feed.filter(pl.col("position") == 0)["click"].mean()
    low = feed.filter(pl.col("position") >= 10)["click"].mean()
    assert top > 1.5 * low  # type: ignore[operator]
    video = small_events.filter(pl.col("surface") == "video")
    assert video.filter(pl.col("device") == 3)["click"].mean() > 1.3 * video.filter(pl.col("device") == 2)["click"].mean()  # type: ignore[operator]
    # segment x category: the segment's taste for a category moves its CTR well beyond sampling noise
    cells = small_events.group_by("segment", "category").agg(pl.col("click").mean(), pl.len()).filter(pl.len() > 0)
    big = cells.filter(pl.col("len") >= 2000)
    assert big["click"].max() > 2 * big["click"].min()  # type: ignore[operator]


def test_bayes_metrics_known_values() -> None:
    y = np.array([0, 0, 1, 1, 0, 1], dtype=np.int8)
    perfect = bayes_metrics(pl.DataFrame({"click": y, "p_click": y * 0.98 + 0.01}))
    assert perfect["auc"] == 1.0 and perfect["ne"] < 0.1
    constant = bayes_metrics(pl.DataFrame({"click": y, "p_click": np.full(6, 0.5, np.float32)}))
    assert constant["auc"] == 0.5 and constant["ne"] == pytest.approx(1.0) and constant["base_rate"] == 0.5


def test_refuses_gaps_and_mixed_configs(tiny_lake: str, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    generate_window(lake, GeneratorConfig(scale="tiny"), Window(DAY1))
    with pytest.raises(ValueError, match="needs the events of 2026-01-02"):
        generate_window(lake, GeneratorConfig(scale="tiny"), Window(date(2026, 1, 3)))
    with pytest.raises(ValueError, match="was generated with"):
        generate_window(lake, GeneratorConfig(scale="tiny", seed=9), Window(date(2026, 1, 2)))
    with pytest.raises(ValueError, match="before the lake's origin"):
        generate_window(lake, GeneratorConfig(scale="tiny"), Window(date(2025, 12, 31)))
    with pytest.raises(ValueError, match="unknown generator scale"):
        GeneratorConfig(scale="huge")
    with pytest.raises(ValueError, match="bad surfaces"):
        GeneratorConfig(surfaces=("feed", "radio"))


def test_surface_subset_and_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    generate(lake, GeneratorConfig(scale="tiny", surfaces=("feed", "live"), events_per_day=500), days=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generated")]
    assert len(lines) == 2 and "events" in lines[0] and lines[0].endswith("s")
    assert {p["surface"] for p in lake.partitions("events")} == {"feed", "live"}
    assert 350 < _table(lake, "events").height / 2 < 650


def test_explain_window_terms_sum_to_the_true_logit(small_lake: Lake) -> None:
    w = Window(date(2026, 1, 2))
    f = explain_window(small_lake, GeneratorConfig(scale="small", seed=3), w)
    events = small_lake.scan_many("events", small_lake.partitions("events", ds=w.ds)).collect().sort("event_id")
    assert f["event_id"].to_list() == events["event_id"].to_list()
    logit = np.sum([f[c].to_numpy() for c in f.columns if c.startswith("term_")], axis=0)
    assert np.abs(1 / (1 + np.exp(-logit)) - events["p_click"].to_numpy()).max() < 1e-6  # p_click is float32
    assert (f["term_intent"] > 0).mean() > 0.5  # most impressions are of the user's current intent
    # the population-level stand-in keeps the user's segment: it still tracks the true affinity
    assert np.corrcoef(f["segment_affinity"], f["term_affinity"])[0, 1] > 0.5


def test_explain_window_refuses_another_config(tiny_lake: str) -> None:
    with pytest.raises(ValueError, match="not generated with scale='tiny', seed=1"):
        explain_window(Lake(tiny_lake), GeneratorConfig(scale="tiny", seed=1), Window(date(2026, 1, 2)))
    with pytest.raises(ValueError, match="does not reproduce"):  # same scale and seed, other events per day
        explain_window(Lake(tiny_lake), GeneratorConfig(scale="tiny", events_per_day=500), Window(date(2026, 1, 2)))
