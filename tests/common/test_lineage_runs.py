"""Lineage runs on a real local MLflow store (issue 13): one run per (preset, surface, variant), metrics stepped
by day with the day as timestamp, running means equal to `fmx compare`'s, idempotent, one value per step after
a re-run, and created once when two processes race."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import mlflow
import pytest

from common.lineage_runs import LINEAGE_TAG, day_ms, lineage_experiment, sync
from common.tracking import EXPERIMENT, experiment_id, stage_run

REPO = Path(__file__).resolve().parents[2]
DAYS = ("2026-01-02", "2026-01-03", "2026-01-04")
ORIGIN = date(2026, 1, 1)


def step_of(ds: str) -> int:
    return (date.fromisoformat(ds) - ORIGIN).days


def _day(ds: str, ne: float, variant: str = "base", pipeline_run: str = "p1", **extra: float) -> None:
    """An evaluated expert_train day run, as experts.stage logs it."""
    tags = {"surface": "feed", "variant": variant, "fm_version": f"small-{ds}", "fm_preset": "small",
            "fmx.stage": "expert_train", "evaluated": "true"}
    with stage_run(f"expert/small/feed/{variant}", pipeline_run=pipeline_run, ds=ds, tags=tags):
        mlflow.log_metrics({"ne": ne, "auc": 0.6 + ne / 10, "calibration": 1.0, "logloss": ne / 2, **extra},
                           step=step_of(ds))


def _lineages(key: str | None = None) -> list:
    flt = f"tags.`{LINEAGE_TAG}` = '{key}'" if key else ""
    return mlflow.MlflowClient().search_runs([experiment_id(lineage_experiment())], flt)


def _history(run_id: str, key: str) -> list[tuple[int, int, float]]:
    return sorted((m.step, m.timestamp, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def test_a_lineage_run_holds_each_day_at_its_step_and_the_running_means() -> None:
    for ds, ne in zip(DAYS, (0.9, 0.8, 0.7), strict=True):
        _day(ds, ne, **({"gap_closure": 0.5} if ds != DAYS[0] else {}))
        run_id = sync("small", "feed", "base", step_of)
    (run,) = _lineages("small/feed/base")
    assert run.info.run_id == run_id and run.info.run_name == "lineage/small/feed/base"
    t = run.data.tags
    assert (t["fmx.stage"], t["surface"], t["variant"], t["fm_preset"]) == ("lineage", "feed", "base", "small")
    assert (t["ds_first"], t["ds_last"], t["fm_version"]) == (DAYS[0], DAYS[-1], f"small-{DAYS[-1]}")
    assert _history(run_id, "ne") == [(1, day_ms(DAYS[0]), 0.9), (2, day_ms(DAYS[1]), 0.8), (3, day_ms(DAYS[2]), 0.7)]
    assert [v for _, _, v in _history(run_id, "mean_ne")] == pytest.approx([0.9, 0.85, 0.8])
    assert [v for _, _, v in _history(run_id, "mean_gap_closure")] == [0.5, 0.5]  # over the days that have it
    assert [v for _, _, v in _history(run_id, "days")] == [1, 2, 3]
    assert run.data.metrics["mean_ne"] == pytest.approx(0.8) and run.info.status == "FINISHED"
    assert "fmx compare" in mlflow.MlflowClient().get_experiment(experiment_id(lineage_experiment())).tags[
        "mlflow.note.content"]  # the experiment list's description
    # the day tree is untouched: no lineage run in the main experiment
    main = mlflow.search_runs([experiment_id(EXPERIMENT)], output_format="list")
    assert all(r.data.tags.get("fmx.kind") in ("day", "stage") for r in main)


def test_a_lineage_mean_is_the_compare_row() -> None:
    from experts.compare import compare_rows

    for ds, ne in zip(DAYS, (0.9, 0.8, 0.7), strict=True):
        _day(ds, ne)
        _day(ds, ne + 0.05, variant="kd")
    _day(DAYS[1], 0.6, pipeline_run="p2")  # a re-run of day 2 (another value): counts once, its newest run
    ids = {v: sync("small", "feed", v, step_of) for v in ("base", "kd")}
    rows = {r["variant"]: r for r in compare_rows("feed")}
    for variant, run_id in ids.items():
        metrics = mlflow.MlflowClient().get_run(str(run_id)).data.metrics
        for col in ("ne", "auc", "calibration"):
            assert metrics[f"mean_{col}"] == pytest.approx(rows[variant][col], abs=1e-12), (variant, col)
        assert metrics["days"] == rows[variant]["days"] == 3
    assert rows["base"]["ne"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)


def test_sync_is_idempotent_and_a_changed_day_rebuilds_the_lineage() -> None:
    for ds, ne in zip(DAYS, (0.9, 0.8, 0.7), strict=True):
        _day(ds, ne)
    first = sync("small", "feed", "base", step_of)
    assert sync("small", "feed", "base", step_of) == first  # nothing new: same run, same points
    assert len(_history(str(first), "ne")) == 3

    _day(DAYS[1], 0.75, pipeline_run="p2")  # re-running day 2 gave another value
    rebuilt = sync("small", "feed", "base", step_of)
    assert rebuilt != first and [r.info.run_id for r in _lineages()] == [rebuilt]  # the old one deleted
    assert [(s, v) for s, _, v in _history(str(rebuilt), "ne")] == [(1, 0.9), (2, 0.75), (3, 0.7)]  # one per step


def test_a_duplicate_lineage_run_is_deleted_and_the_oldest_kept() -> None:
    _day(DAYS[0], 0.9)
    first = sync("small", "feed", "base", step_of)
    exp_id = experiment_id(lineage_experiment())
    mlflow.MlflowClient().create_run(exp_id, run_name="lineage/small/feed/base", tags={LINEAGE_TAG: "small/feed/base"})
    assert len(_lineages()) == 2  # as if another host had created one at the same time
    assert sync("small", "feed", "base", step_of) == first and len(_lineages()) == 1


_RACE = """
import sys, time
from datetime import date
from common.lineage_runs import sync
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
print(sync("small", "feed", "base", lambda ds: (date.fromisoformat(ds) - date(2026, 1, 1)).days))
"""


def test_two_processes_create_one_lineage_run(isolated_home: Path) -> None:
    import time

    _day(DAYS[0], 0.9)
    env = {**os.environ, "FMX_HOME": str(isolated_home), "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = str(time.time() + 8)  # both past their imports, then at once
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, start], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 1 and [r.info.run_id for r in _lineages()] == list(ids)
    assert len(_history(ids.pop(), "ne")) == 1
