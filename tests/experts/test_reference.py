"""The counting reference (experts.reference): point-in-time features, a deterministic fit, MLflow + compare."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from common.tracking import setup
from experts import reference as ref
from experts.compare import compare_rows, format_table
from features.lake import Lake
from features.schemas import CLICK

DAYS = ("2026-01-01", "2026-01-02", "2026-01-03")
SURFACE = "feed"


@pytest.fixture
def lake(tiny_lake: str, tmp_path: Path) -> Lake:
    """A private, writable copy of the session's 3-day tiny lake."""
    dst = tmp_path / "lake-copy"
    shutil.copytree(tiny_lake, dst)
    return Lake(str(dst))


def _flip_clicks(lake: Lake, ds: str, surface: str) -> None:
    events = pl.from_arrow(lake.read("events", ds=ds, surface=surface))
    assert isinstance(events, pl.DataFrame)
    lake.write("events", events.with_columns((1 - pl.col(CLICK)).cast(pl.Int8).alias(CLICK)), ds=ds, surface=surface)


def test_features_of_a_window_use_only_earlier_windows(lake: Lake) -> None:
    day = lake.window(DAYS[2])
    x, y = ref.counter_features(lake, day, SURFACE, prior=0.1)
    assert x.shape == (len(y), len(ref.FEATURES)) and np.isfinite(x).all()
    _flip_clicks(lake, DAYS[2], SURFACE)  # D's own labels: D's features must not move
    x_flipped, y_flipped = ref.counter_features(lake, day, SURFACE, prior=0.1)
    np.testing.assert_array_equal(x, x_flipped)
    assert (y_flipped != y).all()
    _flip_clicks(lake, DAYS[1], SURFACE)  # D-1's labels: D's rate features must move, the counts not
    x_past, _ = ref.counter_features(lake, day, SURFACE, prior=0.1)
    assert not np.array_equal(x[:, :2], x_past[:, :2])
    np.testing.assert_array_equal(x[:, 2:], x_past[:, 2:])


def test_other_surfaces_do_not_enter_the_counts(lake: Lake) -> None:
    day = lake.window(DAYS[2])
    x, _ = ref.counter_features(lake, day, SURFACE, prior=0.1)
    for surface in {p["surface"] for p in lake.partitions("events")} - {SURFACE}:
        _flip_clicks(lake, DAYS[1], surface)
    np.testing.assert_array_equal(x, ref.counter_features(lake, day, SURFACE, prior=0.1)[0])


def test_first_window_has_no_history_and_is_not_evaluated(lake: Lake) -> None:
    x, _ = ref.counter_features(lake, lake.window(DAYS[0]), SURFACE, prior=0.2)
    np.testing.assert_allclose(x[:, 0], np.log(0.2 / 0.8))  # every rate is the prior, every count zero
    np.testing.assert_array_equal(x[:, 2:], 0.0)
    out = ref.reference_eval(DAYS[0], SURFACE, lake.uri, pipeline_run="t")
    assert out["evaluated"] is False and "reason" in out


def test_fit_is_deterministic_and_recovers_a_known_model() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 4))
    logits = 0.3 + x @ np.array([1.0, -0.5, 0.25, 0.0])
    y = (rng.random(20_000) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    first, second = ref.fit(x, y), ref.fit(x.copy(), y.copy())
    np.testing.assert_array_equal(first.weights, second.weights)
    raw = np.r_[first.weights[0] - first.weights[1:] @ (first.mean / first.std), first.weights[1:] / first.std]
    np.testing.assert_allclose(raw, [0.3, 1.0, -0.5, 0.25, 0.0], atol=0.06)
    constant = ref.fit(np.zeros((100, 4)), np.r_[np.ones(30), np.zeros(70)])  # window 2: no history yet
    np.testing.assert_allclose(ref.predict(constant, np.zeros((1, 4))), [0.3], atol=1e-6)


def test_base_rate_is_the_experts_training_ctr(lake: Lake) -> None:
    from experts.evaluate import training_ctr

    day = lake.window(DAYS[2])
    assert ref.evaluate(lake, day, SURFACE)["base_rate"] == pytest.approx(training_ctr(lake, day, SURFACE))


def test_reference_eval_logs_a_ref_run_that_compare_shows(lake: Lake) -> None:
    out = {ds: ref.reference_eval(ds, SURFACE, lake.uri, pipeline_run="t", fm_preset="small") for ds in DAYS}
    assert not out[DAYS[0]]["evaluated"] and out[DAYS[2]]["evaluated"]
    assert out[DAYS[2]]["rows"] == lake.read("events", ds=DAYS[2], surface=SURFACE).num_rows
    assert out[DAYS[2]] == ref.reference_eval(DAYS[2], SURFACE, lake.uri, pipeline_run="t2")  # deterministic
    runs = mlflow.search_runs([setup()], filter_string=f"tags.variant = 'ref' and tags.ds = '{DAYS[2]}'",
                              output_format="list")
    tags = runs[0].data.tags
    assert {"surface": SURFACE, "fm_preset": "small", "fm_version": "none", "evaluated": "true"}.items() <= tags.items()
    assert {"auc", "logloss", "ne", "calibration", "base_rate"} <= set(runs[0].data.metrics)
    with mlflow.start_run(tags={"variant": "fm", "surface": SURFACE, "ds": DAYS[2], "fm_preset": "small"}):
        mlflow.log_metric("ne", 0.9)  # stands in for an fm_export child run: fm comes before ref
    rows = compare_rows(surface=SURFACE, ds_from=DAYS[2], ds_to=DAYS[2])
    assert [r["variant"] for r in rows] == ["fm", "ref"]
    assert rows[1]["ne"] == pytest.approx(out[DAYS[2]]["ne"]) and rows[1]["days"] == 1
    assert rows[1]["auc"] == pytest.approx(out[DAYS[2]]["auc"])
    assert " ref " in format_table(rows)
    assert compare_rows(surface=SURFACE)[1]["days"] == 2  # DAYS[1] (prior-only fit) and DAYS[2]; not DAYS[0]
