"""The main job end to end: `fmx run` drives the real DAGs with Airflow in-process on tiny data.

Runs in a subprocess because Airflow reads its configuration (AIRFLOW_HOME under FMX_HOME) once per
process. Three days: day 1 has no FM yet, day 2 trains the first experts, day 3 is the first day
whose experts are scored progressively (before training on it), so the comparison table has rows.
About 60 s of CPU (2-3 min wall on a shared 2-core machine): marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
SURFACES = ["feed", "video"]
VARIANTS = ["base", "kd"]

pytestmark = pytest.mark.slow

BAD_CONF_SCRIPT = """
import json
from fmx.run import runner
from common.tracking import fmx_home
runner.configure_airflow(fmx_home())
from airflow.dag_processing.dagbag import DagBag
from airflow.models.dagrun import DagRun
from airflow.sdk.exceptions import ParamValidationError
from airflow.utils.session import create_session
dag = DagBag(dag_folder=str(runner.DAGS_FOLDER)).dags["fmx_experts"]
count = lambda: len(create_session().__enter__().query(DagRun).filter(DagRun.dag_id == "fmx_experts").all())
before = count()
try:
    dag.test(run_conf={"ds": "2026-01-03", "variants": ["base", "nope"]})
    print(json.dumps({"rejected": False}))
except ParamValidationError as exc:
    print(json.dumps({"rejected": True, "message": str(exc), "new_runs": count() - before}))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("fmx-run")
    env = {**os.environ, "FMX_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [str(BIN / "fmx"), "run", "--days", "3", "--scale", "tiny", "--no-retries"]
    args += [a for s in SURFACES for a in ("--surfaces", s)] + [
        a for v in VARIANTS for a in ("--variants", v)
    ]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return home, out.stdout


def test_run_writes_every_days_partitions(job: tuple[Path, str]) -> None:
    from features.lake import Lake

    lake = Lake(str(job[0] / "lake"))
    assert [p["ds"] for p in lake.partitions("events", surface="feed")] == DAYS
    for ds in DAYS[1:]:  # day 1 has no FM trained before it: nothing to export
        for surface in SURFACES:
            assert lake.exists("fm_outputs", fm="small", ds=ds, surface=surface)
            assert lake.exists("expert_examples", fm="small", ds=ds, surface=surface)
    assert not lake.partitions("expert_examples", surface="search")  # not asked for


def test_run_logs_tagged_mlflow_runs(job: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("FMX_HOME", str(job[0]))
    from common.tracking import setup

    exp_id = setup()
    runs = mlflow.search_runs([exp_id], output_format="list", max_results=1000)
    trained = [
        r for r in runs if r.data.tags.get("variant") in VARIANTS and r.data.tags.get("ds") == DAYS[-1]
    ]
    assert {(r.data.tags["surface"], r.data.tags["variant"]) for r in trained} >= {
        (s, v) for s in SURFACES for v in VARIANTS
    }
    pipeline_runs = {r.data.tags.get("fmx.pipeline_run") for r in runs} - {None}
    assert len(pipeline_runs) == 1 and next(iter(pipeline_runs)).startswith("fmx-run-")
    scored = [r for r in trained if "ne" in r.data.metrics]
    assert scored and all(0 < r.data.metrics["auc"] <= 1 and r.data.tags.get("fm_version") for r in scored)


def test_run_prints_progress_table_and_split(job: tuple[Path, str]) -> None:
    stdout = job[1]
    for ds in DAYS:
        assert f"== day {ds}" in stdout
    assert (
        "fmx_fm.fm_preset.fm_train[small]" in stdout and "fmx_experts.expert_train[video/kd/small]" in stdout
    )
    table = [line for line in stdout.splitlines() if line.startswith(("feed ", "video "))]
    assert {line.split()[2].rstrip("*") for line in table} >= set(VARIANTS)
    assert "stage work" in stdout and "orchestration" in stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{job[0]}/mlflow.db" in stdout


def test_bad_trigger_conf_is_rejected_before_any_run(job: tuple[Path, str]) -> None:
    env = {**os.environ, "FMX_HOME": str(job[0])}
    out = subprocess.run(
        [sys.executable, "-c", BAD_CONF_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rejected"] and "nope" in result["message"] and result["new_runs"] == 0
