"""Stage wrappers and CLI: JSON-able results, MLflow runs with the required tags and metric keys."""

from __future__ import annotations

import json

import mlflow
from click.testing import CliRunner

from common import tracking
from fm.stage import fm_export, fm_train
from fmx.cli import cli
from tests.fm.conftest import make_lake


def test_stages_log_to_mlflow_and_cli(lake_uri: str) -> None:
    w1, w2 = make_lake(lake_uri, 2, events_per_day=300)
    skipped = fm_export(w1.ds, lake_uri)
    assert skipped["fm_version"] is None and skipped["skipped"]
    runner = CliRunner()
    out = runner.invoke(cli, ["fm", "train", "--ds", w1.ds, "--lake", lake_uri])
    assert out.exit_code == 0, out.output
    trained = json.loads(out.output.strip().splitlines()[-1])
    assert trained["fm_version"].startswith("small-") and trained["parent"] is None
    exported = fm_export(w2.ds, lake_uri, pipeline_run="p1")
    json.dumps(exported)  # JSON-able
    assert exported["fm_version"] == trained["fm_version"]
    runs = mlflow.search_runs([tracking.setup()], output_format="list")
    per_surface = [r for r in runs if r.data.tags.get("surface") not in (None, "all")]
    assert {r.data.tags["surface"] for r in per_surface} == set(exported["metrics"])
    for r in per_surface:
        assert all(r.data.tags.get(t) for t in tracking.REQUIRED_TAGS)
        assert r.data.tags["variant"] == "fm" and r.data.tags["fm_version"] == trained["fm_version"]
        finite = {k for k, v in exported["metrics"][r.data.tags["surface"]].items() if v == v}  # NaN dropped
        assert finite <= set(r.data.metrics) and "logloss" in finite
    assert {"auc", "logloss", "ne", "calibration"} <= set(next(r for r in per_surface
                                                               if r.data.tags["surface"] == "feed").data.metrics)
    train_run = next(r for r in runs if r.info.run_name == "fm_train")
    assert train_run.data.tags["fm_version"] == trained["fm_version"] and train_run.data.params["preset"] == "small"
    assert mlflow.MlflowClient().list_artifacts(train_run.info.run_id, "checkpoint")


def test_fm_train_stage_can_launch_under_torchrun(lake_uri: str) -> None:
    """nproc=2: the stage runs `python -m fm.train` under torchrun (gloo) and records FM_ds like in-process."""
    (w1,) = make_lake(lake_uri, 1, events_per_day=300)
    out = fm_train(w1.ds, lake_uri, pipeline_run="p-ddp", nproc=2)
    json.dumps(out)
    assert out["fm_version"].startswith(f"small-{w1.ds}-") and out["steps"] > 0 and out["examples"] > 0
    run = next(r for r in mlflow.search_runs([tracking.setup()], output_format="list") if r.info.run_name == "fm_train")
    assert run.data.tags["nproc"] == "2" and run.data.tags["fm_version"] == out["fm_version"]
    assert {"examples_per_s", "train_loss"} <= set(run.data.metrics)  # one kind of result, DDP or not
