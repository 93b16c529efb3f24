"""`fmx run` on a day that is already done: fmx_fm's plan skips it and the runner triggers no experts run;
`--rerun` hands the Param rerun=true to fmx_fm. Also the work/orchestration split with concurrent stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fmx.cli import cli
from fmx.run import runner

BIN = Path(sys.executable).parent


def test_rerun_flag_reaches_fmx_fms_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[runner.JobConfig] = []

    def fake_job(cfg: runner.JobConfig, echo: object = None, closing: object = None) -> runner.JobReport:
        seen.append(cfg)
        raise runner.JobFailed("stop here")

    monkeypatch.setattr(runner, "configure_airflow", lambda home, when_configured=None: home)
    monkeypatch.setattr(runner, "run_job", fake_job)
    monkeypatch.setenv("FMX_HOME", str(tmp_path))
    for args, rerun in ((["run"], False), (["run", "--rerun", "--workers", "1"], True)):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Error: stop here" in result.output
        assert seen[-1].rerun is rerun
        assert runner.fm_conf(seen[-1], "2026-01-02", "p")["rerun"] is rerun
    assert seen[-1].workers == 1


def test_stage_work_counts_concurrent_stages_once() -> None:
    report = runner.JobReport(days=[], pipeline_run="p", wall_s=10.0)
    report.tasks = [
        runner.TaskTiming("d", "x", "a", "success", 4.0, 3.0, 100.0),  # 100-103
        runner.TaskTiming("d", "x", "b", "success", 4.0, 3.0, 101.0),  # 101-104, overlaps a
        runner.TaskTiming("d", "x", "c", "success", 1.0, 1.0, 106.0),  # 106-107
        runner.TaskTiming("d", "x", "wiring", "success", 0.2, 0.0, 0.0),
    ]
    assert report.stage_s == pytest.approx(5.0) and report.stage_sum_s == pytest.approx(7.0)
    assert report.overhead_s == pytest.approx(5.0)


def test_a_done_day_trains_no_experts(tmp_path: Path) -> None:
    """Through Airflow: fmx_fm's plan finds the day's FM checkpoint, so nothing is ingested or trained,
    and the runner starts no fmx_experts run for that day (it would retrain every expert)."""
    from features.lake import Lake
    from fm.versions import record_version

    lake = Lake(str(tmp_path / "lake"))
    record_version(lake, "small", "2026-01-02", {"fm_version": "small-2026-01-02-abc", "parent": None})
    env = {**os.environ, "FMX_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [str(BIN / "fmx"), "run", "--days", "1", "--start", "2026-01-02", "--lake", lake.uri,
            "--scale", "tiny", "--no-retries", "--workers", "1"]  # fmt: skip
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ds=2026-01-02 is already done (fmx_fm plan): no experts run" in out.stdout
    assert "fmx_fm.ingest" in out.stdout and "fmx_experts." not in out.stdout
    assert not lake.partitions("events") and not lake.partitions("expert_examples")
