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

from common.tracking import PIPELINE_RUN_TAG, REQUIRED_TAGS
from features.lake import Lake
from fmx import servers
from fmx.servers.airflow_api import AirflowAPIError
from tests.e2e.conftest import (
    EXPERTS_DAG,
    FM_DAG,
    Servers,
    experts_run_for,
    fmx,
    mlflow_runs,
    pipeline_conf,
    running_servers,
    task_log_tails,
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
    # a second `fmx up` on the same home (its Airflow DB already has fmx's pool) starts cleanly again
    with running_servers(tmp_path / "home") as again:
        assert again.api.request("GET", "/api/v2/pools/fmx_training").json()["slots"] >= 1


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with running_servers(tmp_path_factory.mktemp("fmx-e2e")) as started:
        for dag_id in (FM_DAG, EXPERTS_DAG):
            started.api.wait_for_dag(dag_id, timeout=180)
            started.api.unpause(dag_id)
        yield started


def test_up_is_idempotent_and_status_reports_health(srv: Servers) -> None:
    out = fmx("up", "--no-schedule", home=srv.home)
    assert srv.state.airflow_url in out.stdout
    assert servers.load_state(srv.home).pids == srv.state.pids  # same processes, nothing restarted
    info = json.loads(fmx("status", "--json", home=srv.home).stdout)
    assert info["running"] and info["healthy"] == {"airflow": True, "mlflow": True}
    assert set(info["processes"]) == {"mlflow", "api-server", "scheduler", "dag-processor", "triggerer", "reaper"}
    assert all(p["healthy"] and p["pid"] == srv.state.pids[n][0] for n, p in info["processes"].items())


def test_api_requires_authentication(srv: Servers) -> None:
    import httpx

    resp = httpx.get(f"{srv.state.airflow_url}/api/v2/dags", timeout=10)
    assert resp.status_code == 401
    bad = httpx.post(f"{srv.state.airflow_url}/auth/token", json={"username": "admin", "password": "wrong"})
    assert bad.status_code == 401


def test_mlflow_requires_authentication_and_state_is_private(srv: Servers) -> None:
    """Issue 11: anonymous MLflow requests (experiment creation, artifact upload) get 401; fmx's credentials
    work; no server process carries a secret in its arguments; metadata and logs are owner-only."""
    import httpx
    import psutil

    url = srv.state.mlflow_url
    create = httpx.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": "anon"}, timeout=10)
    assert create.status_code == 401, create.text
    put = httpx.put(f"{url}/api/2.0/mlflow-artifacts/artifacts/evil.pt", content=b"payload", timeout=10)
    assert put.status_code == 401
    wrong = httpx.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", auth=("admin", "wrong"), timeout=10)
    assert wrong.status_code == 401
    creds = servers.mlflow_credentials(srv.home)
    ok = httpx.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                   auth=(creds["username"], creds["password"]), timeout=10)
    assert ok.status_code == 200, ok.text
    secrets = [creds["password"], servers.airflow_password(srv.home)]
    for pid, _ in srv.state.pids.values():
        leader = psutil.Process(int(pid))
        for proc in [leader, *leader.children(recursive=True)]:
            try:
                argv = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            assert not any(s in argv for s in secrets), f"a secret on the command line of {proc.pid}"
    for path in (srv.home / "mlflow.db", srv.home / "airflow" / "airflow.db", *srv.home.glob("servers/*.json"),
                 *srv.home.glob("servers/logs/*.log")):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others: {oct(path.stat().st_mode)}"
    for folder in ("servers", "airflow", "mlartifacts"):
        assert (srv.home / folder).stat().st_mode & 0o777 == 0o700


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


def test_day_trigger_then_backfill(srv: Servers) -> None:
    # Day 1 through the REST API: ingest -> fm_export (first window: no FM yet, documented skip) ->
    # fm_train; fmx_fm's last task triggers fmx_experts for the same day and conf (experts skip: the FM
    # has scored nothing yet).
    fm_run = srv.api.trigger(FM_DAG, pipeline_conf(srv.lake, ds=DAY1))
    wait_success(srv, FM_DAG, fm_run)
    wait_success(srv, EXPERTS_DAG, experts_run_for(srv, DAY1))
    _check_fm_day(srv, DAY1, fm_run)

    # Days 2-3 with Airflow's own backfill (logical dates -> ds), same small conf minus ds. fmx_fm has
    # depends_on_past tasks, for which Airflow requires an explicit reprocess behaviour. One run at a
    # time: a backfill ignores the DAG's max_active_runs, and day D's fm_export needs day D-1's fm_train.
    conf = json.dumps(pipeline_conf(srv.lake))
    fmx("airflow", "backfill", "create", "--dag-id", FM_DAG, "--from-date", DAY2, "--to-date", DAY3,
        "--reprocess-behavior", "failed", "--max-active-runs", "1", "--dag-run-conf", conf,
        home=srv.home)  # fmt: skip
    backfill = sorted(srv.api.runs(FM_DAG, run_type="backfill"), key=lambda r: r["logical_date"])
    assert [r["logical_date"][:10] for r in backfill] == [DAY2, DAY3]
    experts = {}
    for ds, run in zip((DAY2, DAY3), backfill, strict=True):
        wait_success(srv, FM_DAG, run["dag_run_id"])
        experts[ds] = experts_run_for(srv, ds)
        wait_success(srv, EXPERTS_DAG, experts[ds])
        _check_fm_day(srv, ds, run["dag_run_id"])
    assert sorted(p["ds"] for p in Lake(srv.lake).partitions("events", surface="feed")) == [DAY1, DAY2, DAY3]

    # Day 2: FM_1 scored day 2 (progressive FM metrics); experts cold-start on day 2 (nothing to evaluate).
    fm_feed = _runs_named(srv, DAY2)["fm_export/feed"]
    assert QUALITY <= set(fm_feed.data.metrics), fm_feed.data.metrics
    for variant in ("base", "loopfm"):
        tags = _runs_named(srv, DAY2)[f"expert/small/feed/{variant}"].data.tags
        assert tags["orchestrator_run_id"] == experts[DAY2] and tags["evaluated"] == "false"
        assert tags[PIPELINE_RUN_TAG] == backfill[0]["dag_run_id"]  # joins the FM run's MLflow tree
        assert tags["model_uri"], "expert model not logged"
    # Day 3: experts trained through day 2 scored on day 3 before training on it.
    _check_evaluated_experts(srv, DAY3, experts[DAY3])


def test_experts_dag_alone_reruns_a_day(srv: Servers) -> None:
    """The experts DAG triggered directly re-runs day 3's experts without retraining the FM (fmx_experts'
    documented use). It scores the same checkpoint (trained through day 2) on the same rows, so the
    progressive metrics equal the first run's. Needs the days of the test above (same servers)."""
    first = _runs_named(srv, DAY3).get("expert/small/feed/base")
    if first is None:
        pytest.skip("needs the pipeline days of test_day_trigger_then_backfill (run the module)")
    rerun = srv.api.trigger(EXPERTS_DAG, pipeline_conf(srv.lake, ds=DAY3, variants=["base"]))
    wait_success(srv, EXPERTS_DAG, rerun)
    again = _check_evaluated_experts(srv, DAY3, rerun, variants=("base",))
    assert again["base"] == pytest.approx({k: first.data.metrics[k] for k in QUALITY}, rel=1e-6)


def test_a_trigger_with_an_http_lake_sends_no_request(srv: Servers) -> None:
    """Last in the module (a failed fmx_fm run must not precede the pipeline days). Issue 11's SSRF probe through the REST API: a `lake` Param of http://127.0.0.1:PORT fails the run
    (refused by the scheme allow-list before any I/O), and nothing connects to that port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        lake = f"http://127.0.0.1:{sock.getsockname()[1]}/x"
        run = srv.api.trigger(FM_DAG, pipeline_conf(lake, ds=DAY1))
        assert srv.api.wait_run(FM_DAG, run, timeout=600) == "failed"
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.accept()  # nobody connected
    assert "not allowed" in task_log_tails(srv.home, FM_DAG, run)


def _runs_named(srv: Servers, ds: str, orchestrator_run: str | None = None) -> dict:
    """{run name: run} of day ds (optionally of one Airflow run); the newest run wins on a name clash."""
    runs = sorted(mlflow_runs(srv, ds), key=lambda r: r.info.start_time)
    return {
        r.info.run_name: r for r in runs if orchestrator_run in (None, r.data.tags.get("orchestrator_run_id"))
    }


def _check_fm_day(srv: Servers, ds: str, fm_run: str) -> None:
    runs = _runs_named(srv, ds, fm_run)
    assert {"fm_export", "fm_train"} <= set(runs), sorted(runs)
    for run in runs.values():
        if run.data.tags.get("fmx.kind") == "stage":
            missing = [t for t in REQUIRED_TAGS if t not in run.data.tags]
            assert not missing, f"{run.info.run_name} lacks tags {missing}"
    tags = runs["fm_train"].data.tags
    assert tags[PIPELINE_RUN_TAG] == fm_run and tags["ds"] == ds
    assert tags["fm_version"].startswith(f"small-{ds}-"), tags["fm_version"]


def _check_evaluated_experts(
    srv: Servers, ds: str, experts_run: str, variants: tuple[str, ...] = ("base", "loopfm")
) -> dict[str, dict[str, float]]:
    runs = _runs_named(srv, ds, experts_run)
    out = {}
    for variant in variants:
        run = runs[f"expert/small/feed/{variant}"]
        assert run.data.tags["evaluated"] == "true", run.data.tags
        metrics = run.data.metrics
        assert QUALITY <= set(metrics), (variant, metrics)
        assert 0.0 <= metrics["auc"] <= 1.0 and metrics["ne"] > 0 and metrics["logloss"] > 0
        out[variant] = {k: metrics[k] for k in QUALITY}
    return out
