"""The FM's per-surface progressive metrics join a lineage run per (preset, surface) (issue 13), variant ``fm``."""

from __future__ import annotations

import math

import mlflow

from common.lineage_runs import LINEAGE_TAG, lineage_experiment
from common.tracking import experiment_id
from features.lake import Lake
from fm.stage import fm_export, fm_train
from tests.fm.conftest import make_lake


def test_fm_exports_make_one_lineage_per_surface(lake_uri: str) -> None:
    ws = make_lake(lake_uri, 3, events_per_day=200)
    fm_train(ws[0].ds, lake_uri, pipeline_run="p1")
    exported = [fm_export(ws[1].ds, lake_uri, pipeline_run="p1")]
    fm_train(ws[1].ds, lake_uri, pipeline_run="p1")
    exported.append(fm_export(ws[2].ds, lake_uri, pipeline_run="p1"))
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id(lineage_experiment())], "tags.variant = 'fm'")
    lake = Lake(lake_uri)
    expected = {s: [(lake.step(w), e["metrics"][s]["ne"]) for w, e in zip(ws[1:], exported, strict=True)
                    if math.isfinite(e["metrics"][s]["ne"])] for s in exported[-1]["metrics"]}
    expected = {s: points for s, points in expected.items() if points}  # NE undefined (no click): not a day of the lineage
    assert len(expected) >= 2 and {r.data.tags[LINEAGE_TAG] for r in runs} == {f"small/{s}/fm" for s in expected}
    for run in runs:
        surface = run.data.tags["surface"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "ne"))
        assert history == expected[surface]
        assert "base_rate" in run.data.metrics and run.data.metrics["days"] == len(expected[surface])
