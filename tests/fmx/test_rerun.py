"""A day is done once: fmx_fm skips a day whose FM checkpoints exist unless rerun is true (dagkit.unless_done),
and the DAG wires the skip so that nothing trains and no experts run is triggered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmx import dagkit


def _train(lake_uri: str, ds: str, preset: str = "small") -> None:
    from features.lake import Lake
    from fm.versions import record_version

    record_version(Lake(lake_uri), preset, ds, {"fm_version": f"{preset}-{ds}-abc", "parent": None})


def _run(lake_uri: str, ds: str, presets: list[str]) -> dict:
    return {"ds": ds, "lake_uri": lake_uri, "fm_presets": presets}


def test_unless_done_skips_only_a_done_day_without_rerun(lake_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    run = _run(lake_uri, "2026-01-02", ["small", "large"])
    assert dagkit.unless_done(run, rerun=False) == run  # nothing trained yet
    _train(lake_uri, "2026-01-02")
    assert dagkit.unless_done(run, rerun=False) == run  # "large" is not trained for that day
    _train(lake_uri, "2026-01-02", "large")
    with caplog.at_level("INFO", logger="fmx.dagkit"):
        assert dagkit.unless_done(run, rerun=False) is False
        assert dagkit.unless_done(run, rerun=True) == run
    assert "ds=2026-01-02 is already done (FM small-2026-01-02-abc, large-2026-01-02-abc)" in caplog.text
    assert '"rerun": true' in caplog.text
    assert dagkit.unless_done(_run(lake_uri, "2026-01-03", ["small"]), rerun=False)  # another day


def test_rerun_param_is_a_boolean_of_fmx_fm_only() -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(dagkit.params(rerun=True))
    assert params.validate()["rerun"] is False
    params.update({"rerun": True})
    with pytest.raises(ParamValidationError):
        params.update({"rerun": "yes"})
    assert "rerun" not in dagkit.params()


DAG_TEST = """
import json, sys
from datetime import UTC, datetime
from pathlib import Path
from fmx.run import runner
runner.configure_airflow(Path(sys.argv[1]))
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=str(runner.DAGS_FOLDER)).dags["fmx_fm"]
conf = {"ds": "2026-01-02", "lake_uri": sys.argv[2], "source": "generator", "scale": "tiny"}
run = dag.test(logical_date=datetime(2026, 1, 2, tzinfo=UTC), run_conf=conf)
print(json.dumps({"state": str(run.state), "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}}))
"""


def test_a_done_day_runs_no_task_but_plan(tmp_path: Path, lake_uri: str) -> None:
    """Through Airflow (DAG.test): plan short-circuits; ingest, FM, experts_conf and trigger_experts skip; the
    run succeeds and logs no error line."""
    _train(lake_uri, "2026-01-02")
    env = {**os.environ, "FMX_AIRFLOW_LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", DAG_TEST, str(tmp_path / "home"), lake_uri],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "success", result
    tasks = result["tasks"]
    assert tasks.pop("plan") == "success"
    assert set(tasks.values()) == {"skipped"}, tasks  # ingest, fm_presets, the FM group, experts_conf, trigger_experts
    assert {"ingest", "experts_conf", "trigger_experts"} <= set(tasks)
    assert "XCom" not in out.stdout + out.stderr  # no task resolves a skipped task's result
    assert "ds=2026-01-02 is already done (FM small-2026-01-02-abc)" in out.stdout + out.stderr  # plan's log line
