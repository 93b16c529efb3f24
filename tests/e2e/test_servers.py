"""End to end on real servers: `fmx up` (Airflow api-server + scheduler + dag-processor, MLflow server),
the FM DAG and the experts DAG triggered through Airflow's REST API with a conf, MLflow results read
back through the tracking server, a 2-day `airflow backfill create`, and `fmx down`.

Runs with: pytest -m e2e tests/e2e   (a few minutes: tiny generator scale, FM preset small).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from features.tracking import PIPELINE_RUN_TAG, REQUIRED_TAGS
from fmx import servers
from fmx.airflow_api import AirflowAPIError
from tests.e2e.conftest import (
    EXPERTS_DAG,
    FM_DAG,
    Servers,
    experts_run_for,
    fmx,
    mlflow_runs,
    pipeline_conf,
    running_servers,
    wait_success,
)

pytestmark = pytest.mark.e2e

DAY1, DAY2, DAY3 = "2026-01-01", "2026-01-02", "2026-01-03"
QUALITY = {"auc", "logloss", "ne", "calibration"}


def test_down_stops_every_process(tmp_path: Path) -> None:
    """A separate, short-lived set: after `fmx down` no process it started is left, and down is idempotent."""
    import psutil

    with running_servers(tmp_path / "home") as started:
        pids = [int(pid) for pid, _ in started.state.pids.values()]
        children = [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)]
        out = fmx("down", home=started.home)
        assert "stopped" in out.stdout
        alive = [
            p for p in pids + children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
        ]
        assert alive == [], f"still running after fmx down: {alive}"
        assert "no servers running" in fmx("down", home=started.home).stdout


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with running_servers(tmp_path_factory.mktemp("fmx-e2e")) as started:
        for dag_id in (FM_DAG, EXPERTS_DAG):
            started.api.wait_for_dag(dag_id, timeout=180)
            started.api.unpause(dag_id)
        yield started


def _stage_runs(srv: Servers, ds: str) -> list:
    return [r for r in mlflow_runs(srv, ds) if r.data.tags.get("fmx.kind") == "stage"]


def test_up_is_idempotent_and_status_reports_health(srv: Servers) -> None:
    out = fmx("up", "--no-schedule", home=srv.home)
    assert srv.state.airflow_url in out.stdout
    assert servers.load_state(srv.home).pids == srv.state.pids  # same processes, nothing restarted
    info = json.loads(fmx("status", "--json", home=srv.home).stdout)
    assert info["running"] and info["healthy"] == {"airflow": True, "mlflow": True}
    assert set(info["processes"]) == {"mlflow", "api-server", "scheduler", "dag-processor"}


def test_api_requires_authentication(srv: Servers) -> None:
    import httpx

    resp = httpx.get(f"{srv.state.airflow_url}/api/v2/dags", timeout=10)
    assert resp.status_code == 401
    bad = httpx.post(f"{srv.state.airflow_url}/auth/token", json={"username": "admin", "password": "wrong"})
    assert bad.status_code == 401


@pytest.mark.parametrize(
    "bad",
    [{"scale": "huge"}, {"variants": ["base", "no_such_variant"]}, {"fm_presets": []}, {"ds": 20260101}],
    ids=["scale", "variant", "no-presets", "ds-type"],
)
def test_trigger_with_bad_param_is_rejected(srv: Servers, bad: dict) -> None:
    before = len(srv.api.runs(FM_DAG))
    with pytest.raises(AirflowAPIError) as err:
        srv.api.trigger(FM_DAG, pipeline_conf(srv.lake, **{"ds": DAY1, **bad}))
    assert err.value.status == 400, err.value.body
    assert next(iter(bad)) in err.value.body  # the message names the offending Param
    assert len(srv.api.runs(FM_DAG)) == before  # no run was created


def test_day_trigger_experts_rerun_and_backfill(srv: Servers) -> None:
    # Day 1 through the REST API: ingest -> fm_export (first window: nothing to score) -> fm_train,
    # then fmx_fm's last task triggers fmx_experts for the same day and conf.
    fm_run = srv.api.trigger(FM_DAG, pipeline_conf(srv.lake, ds=DAY1))
    wait_success(srv, FM_DAG, fm_run)
    experts_run = experts_run_for(srv, DAY1)
    wait_success(srv, EXPERTS_DAG, experts_run)
    _check_day1_in_mlflow(srv, fm_run, experts_run)

    # The experts DAG alone, triggered directly: re-run day 1's experts without retraining the FM.
    rerun = srv.api.trigger(EXPERTS_DAG, pipeline_conf(srv.lake, ds=DAY1, variants=["base"]))
    wait_success(srv, EXPERTS_DAG, rerun)
    rerun_tags = [
        r.data.tags for r in _stage_runs(srv, DAY1) if r.data.tags.get("orchestrator_run_id") == rerun
    ]
    assert [t["variant"] for t in rerun_tags if t["surface"] == "feed"] == ["base"], rerun_tags

    # Days 2-3 with Airflow's own backfill (logical dates -> ds), same small conf minus ds.
    conf = json.dumps(pipeline_conf(srv.lake))
    fmx("airflow", "backfill", "create", "--dag-id", FM_DAG, "--from-date", DAY2, "--to-date", DAY3,
        "--dag-run-conf", conf, home=srv.home)  # fmt: skip
    backfill = sorted(srv.api.runs(FM_DAG, run_type="backfill"), key=lambda r: r["logical_date"])
    assert [r["logical_date"][:10] for r in backfill] == [DAY2, DAY3]
    for run in backfill:
        wait_success(srv, FM_DAG, run["dag_run_id"])
    for ds in (DAY2, DAY3):
        wait_success(srv, EXPERTS_DAG, experts_run_for(srv, ds))
    _check_progressive_metrics(srv, DAY2)
    _check_progressive_metrics(srv, DAY3)
    assert sorted(p["ds"] for p in _lake_partitions(srv, "events", surface="feed")) == [DAY1, DAY2, DAY3]


def _check_day1_in_mlflow(srv: Servers, fm_run: str, experts_run: str) -> None:
    runs = _stage_runs(srv, DAY1)
    by_name = {r.info.run_name: r for r in runs}
    assert {"fm_export", "fm_train", "expert/small/feed/base", "expert/small/feed/loopfm"} <= set(by_name), (
        sorted(by_name)
    )
    for run in runs:
        missing = [t for t in REQUIRED_TAGS if t not in run.data.tags]
        assert not missing, f"{run.info.run_name} lacks tags {missing}"
    fm_train = by_name["fm_train"].data.tags
    assert fm_train["orchestrator_run_id"] == fm_run and fm_train[PIPELINE_RUN_TAG] == fm_run
    assert fm_train["fm_version"] not in ("", "pending", "none")
    expert = by_name["expert/small/feed/loopfm"].data.tags
    assert expert["orchestrator_run_id"] == experts_run
    assert expert[PIPELINE_RUN_TAG] == fm_run  # the experts run joins the FM run's MLflow run tree
    assert expert["model_uri"], "expert model not logged"


def _check_progressive_metrics(srv: Servers, ds: str) -> None:
    """FM and experts trained through ds-1 were scored on ds before training on it."""
    runs = _stage_runs(srv, ds) + [r for r in mlflow_runs(srv, ds) if r.info.run_name == "fm_export/feed"]
    by_name = {r.info.run_name: r for r in runs}
    fm_feed = by_name.get("fm_export/feed")
    assert fm_feed is not None, f"no FM export metrics for feed on {ds}: {sorted(by_name)}"
    assert QUALITY <= set(fm_feed.data.metrics), fm_feed.data.metrics
    for variant in ("base", "loopfm"):
        expert = by_name[f"expert/small/feed/{variant}"]
        assert expert.data.tags["evaluated"] == "true"
        assert QUALITY <= set(expert.data.metrics), (variant, expert.data.metrics)
        assert 0.0 <= expert.data.metrics["auc"] <= 1.0 and expert.data.metrics["ne"] > 0


def _lake_partitions(srv: Servers, table: str, **fixed: str) -> list[dict[str, str]]:
    from features.lake import Lake

    return Lake(srv.lake).partitions(table, **fixed)
