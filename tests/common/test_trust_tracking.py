"""MLflow as a shared store (issue 11): store creation safe under concurrency and private, runs of killed
processes end KILLED the next time their stage runs, and a live duplicate of a stage is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from common.tracking import OWNER_TAG, StageBusy, setup, stage_run

REPO = Path(__file__).resolve().parents[2]
TAGS = {"surface": "all", "variant": "fm", "fm_version": "pending", "fm_preset": "small"}

_STAGE = """
import os, signal, sys, time
from common.tracking import stage_run
with stage_run("fm_train", pipeline_run="p1", ds="2026-01-02",
               tags={"surface": "all", "variant": "fm", "fm_version": "pending", "fm_preset": "small"}) as run:
    print(run.info.run_id, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "FMX_HOME": str(home), "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_two_commands_on_a_fresh_home_create_the_store_once(tmp_path: Path) -> None:
    code = "from common.tracking import setup; print(setup())"
    for round_ in range(3):
        home = tmp_path / f"home{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(home), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        for proc, (_, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, err[-3000:]
        assert outs[0][0].strip() == outs[1][0].strip()  # one experiment, same id
        assert (home / "mlflow.db").stat().st_mode & 0o777 == 0o600


def test_a_sigkilled_run_ends_killed_when_the_stage_runs_again(isolated_home: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _STAGE, "kill"], env=_env(isolated_home), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    dead = proc.stdout.split()[0]
    setup()
    client = mlflow.MlflowClient()
    assert client.get_run(dead).info.status == "RUNNING"  # what the probe saw
    with stage_run("fm_train", pipeline_run="p2", ds="2026-01-02", tags=TAGS) as run:
        assert run.data.tags[OWNER_TAG].split(":")[1] == str(os.getpid())
    assert client.get_run(dead).info.status == "KILLED"
    assert "is gone" in client.get_run(dead).data.tags["fmx.ended_by"]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_live_duplicate_of_a_stage_is_refused(isolated_home: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _STAGE, "sleep"], env=_env(isolated_home),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        live = proc.stdout.readline().strip()
        with pytest.raises(StageBusy, match=f"pid {proc.pid}"):
            with stage_run("fm_train", pipeline_run="p2", ds="2026-01-02", tags=TAGS):
                pass
        with stage_run("fm_train", pipeline_run="p2", ds="2026-01-03", tags=TAGS):  # another window: fine
            pass
        setup()
        assert mlflow.MlflowClient().get_run(live).info.status == "RUNNING"  # never ended a live run
    finally:
        proc.kill()
        proc.wait()


def test_artifacts_land_in_fmx_home_whatever_the_cwd(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One artifact root: $FMX_HOME/mlartifacts, never ./mlruns of the caller's (or a task's) cwd."""
    import mlflow

    from common.tracking import setup

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp_id = setup()
    with mlflow.start_run(experiment_id=exp_id):
        mlflow.log_text("hello", "note.txt")
    assert mlflow.get_experiment(exp_id).artifact_location == (isolated_home / "mlartifacts").as_uri()
    assert list((isolated_home / "mlartifacts").rglob("note.txt")) and not (elsewhere / "mlruns").exists()
