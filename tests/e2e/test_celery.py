"""Scale-out, run for real on one machine: the DAGs on Airflow's CeleryExecutor (Redis broker, PostgreSQL
metadata, two Celery worker processes), the lake on an S3-compatible server (moto), and one day's FM training
under torchrun as two nodes (two launchers, c10d rendezvous on 127.0.0.1) through the `fm_nproc` path.

Redis and PostgreSQL come from Debian's packages (infra/ci-setup.sh); the e2e tests skip, saying so, only
when their binaries are absent. The configuration checks at the end start nothing and run in the default suite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from features.lake import Lake
from fm import checkpoint, launch, versions
from fmx import servers
from fmx.cli import cli
from fmx.servers import free_port
from tests.e2e.conftest import (
    EXPERTS_DAG,
    FM_DAG,
    S3_CREDENTIALS,
    experts_run_for,
    fmx,
    mlflow_runs,
    pipeline_conf,
    redis_server,
    running_servers,
    s3_server,
    task_hostnames,
    wait_success,
)
from tests.e2e.test_postgres import postgres_url  # noqa: F401  (the throw-away PostgreSQL cluster fixture)
from tests.fm.conftest import TINY, make_lake, overrides_args, subprocess_env

BUCKET = "fmx-e2e"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def s3_lake(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A lake URI on moto's S3 server; the credentials and the trusted endpoint go to every server by environment."""
    with s3_server(BUCKET) as endpoint:
        for key, value in {**S3_CREDENTIALS, "FMX_LAKE_ENDPOINTS": endpoint}.items():
            monkeypatch.setenv(key, value)
        yield f"s3://{BUCKET}/lake?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@pytest.mark.e2e
def test_day_on_celery_workers_with_two_torchrun_nodes_and_an_s3_lake(
    postgres_url: str,  # noqa: F811
    redis_url: str,
    s3_lake: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from features.stage import lake_windows

    started = time.monotonic()
    home = tmp_path / "home"
    fmx("generate", "--days", "2", "--scale", "tiny", "--lake", s3_lake, home=home)
    day = lake_windows(s3_lake)[0]
    monkeypatch.setenv("FMX_FM_NNODES", "2")  # fm_train's torchrun: two node launchers on this machine
    up = ("--db", postgres_url, "--executor", "celery", "--broker", redis_url, "--workers", "2", "--lake", s3_lake)
    with running_servers(home, *up) as srv:
        assert srv.state.config["executor"] == "celery"
        workers = {f"fmx-worker-{i}@" for i in (1, 2)}
        for dag_id in (FM_DAG, EXPERTS_DAG):
            srv.api.wait_for_dag(dag_id, timeout=180)
            srv.api.unpause(dag_id)
        conf = pipeline_conf(s3_lake, ds=day, source="lake", variants=["base"], fm_nproc=2)
        fm_run = srv.api.trigger(FM_DAG, conf)
        wait_success(srv, FM_DAG, fm_run)
        experts_run = experts_run_for(srv, day)
        wait_success(srv, EXPERTS_DAG, experts_run)

        # Every task ran on a Celery worker, and both workers ran some.
        hosts = {**task_hostnames(srv, FM_DAG, fm_run),
                 **{f"experts.{k}": v for k, v in task_hostnames(srv, EXPERTS_DAG, experts_run).items()}}  # fmt: skip
        assert hosts and all(h.split("@")[0] + "@" in workers for h in hosts.values()), hosts
        assert {h.split("@")[0] + "@" for h in hosts.values()} == workers, f"tasks did not use both workers: {hosts}"
        procs = servers.status(home)["processes"]
        assert all(procs[f"worker-{i}"]["healthy"] for i in (1, 2)), procs

        # FM_day trained under torchrun as 2 processes on 2 nodes, its checkpoint in the S3 lake.
        runs = {r.info.run_name: r for r in mlflow_runs(srv, day)}
        tags = runs["fm_train"].data.tags
        assert (tags["nproc"], tags["ddp_world_size"], tags["ddp_nodes"]) == ("2", "2", "2"), tags
        lake = Lake(s3_lake)
        assert not lake.is_local
        version = versions.read_versions(lake, "small")[day]["fm_version"]
        assert version == tags["fm_version"] and version.startswith(f"small-{day}-")
        state = checkpoint.load(lake, "small", day, "final")
        assert state["model"], "empty FM checkpoint"
    print(f"celery e2e: {time.monotonic() - started:.0f} s wall; tasks per worker: {sorted(hosts.items())}")


@pytest.mark.e2e
def test_two_torchrun_nodes_match_one_process(tmp_path) -> None:
    """fm.launch with 2 nodes x 1 process: each worker reports world 2 over 2 nodes, and the weights equal the
    single-process run's within float tolerance (as tests/fm/test_ddp.py checks for one node)."""
    lake_uri = str(tmp_path / "lake")
    (w1,) = make_lake(lake_uri, 1, events_per_day=600)
    single = str(tmp_path / "single")
    shutil.copytree(lake_uri, single)
    overrides = {**TINY, "batch_size": 50, "shuffle_rows": 32, "shuffle_buffer": 2}
    args = ["--ds", w1.ds, "--threads", "1", *overrides_args(overrides)]
    env = subprocess_env()
    subprocess.run([sys.executable, "-m", "fm.train", *args, "--lake", single], check=True,
                   capture_output=True, env=env)  # fmt: skip
    ran = launch.run_torchrun([*args, "--lake", lake_uri], nproc=2, nnodes=2, env=env)
    assert [(w["rank"], w["node"], w["world"], w["nodes"]) for w in ran.workers] == [(0, 0, 2, 2), (1, 1, 2, 2)]
    a = checkpoint.load(Lake(lake_uri), "small", w1.ds, "final")["model"]
    b = checkpoint.load(Lake(single), "small", w1.ds, "final")["model"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in b), f"max abs diff {worst}"


def test_nproc_must_split_over_the_nodes() -> None:
    with pytest.raises(ValueError, match="does not split evenly over 2 torchrun node"):
        launch.commands(["--ds", "2026-01-01"], nproc=3, nnodes=2)


CELERY_DB = "postgresql://fmx:NotOnArgv4711@127.0.0.1:5432/fmx"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"executor": "celery", "broker": "redis://127.0.0.1:6379/0"}, "--executor celery needs --db postgresql"),
        ({"executor": "celery", "db": CELERY_DB}, "--executor celery needs --broker redis://"),
        ({"executor": "celery", "db": CELERY_DB, "broker": "http://127.0.0.1:1"}, "--broker must be a redis://"),
        ({"broker": "redis://127.0.0.1:6379/0"}, "--broker is for --executor celery"),
        ({"executor": "kubernetes"}, "--executor must be one of"),
    ],
)
def test_a_bad_executor_choice_is_one_clear_error(isolated_home: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(servers.ServerError, match=message):
        servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port(), **kwargs)


def test_fmx_up_celery_without_a_database_is_one_line_and_starts_nothing(isolated_home: Path) -> None:
    out = CliRunner().invoke(cli, ["up", "--executor", "celery", "--broker", "redis://127.0.0.1:1/0"])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and out.output.startswith("Error: --executor celery")
    assert servers.load_state(isolated_home) is None


def test_celery_config_reaches_every_process_by_environment_only(isolated_home: Path) -> None:
    broker = "redis://:BrokerSecret42@127.0.0.1:6379/0"
    cfg = servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port(), db=CELERY_DB,
                                 executor="celery", broker=broker, workers=3, worker_concurrency=2)  # fmt: skip
    env = servers.server_env(cfg)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and env["AIRFLOW__CELERY__BROKER_URL"] == broker
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + cfg.airflow_db_url()
    cmds = servers.commands(cfg)
    names = cfg.worker_names()
    assert [n for n in cmds if n.startswith("worker-")] == ["worker-1", "worker-2", "worker-3"]
    assert len(set(names)) == 3 and all(n.startswith(f"fmx-worker-{i}@") for i, n in enumerate(names, start=1))
    assert cmds["worker-2"][-5:] == ["--celery-hostname", names[1], "--concurrency", "2", "--skip-serve-logs"]
    for argv in cmds.values():
        assert "BrokerSecret42" not in " ".join(argv) and "NotOnArgv4711" not in " ".join(argv)
    worker_env = servers.process_env(cfg, "worker-2")
    assert worker_env["FMX_WORKER_HOSTNAME"] == names[1]
    assert worker_env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "fmx.servers.env.worker_hostname"
    assert "FMX_WORKER_HOSTNAME" not in servers.process_env(cfg, "scheduler")
    local = servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port())
    assert servers.server_env(local)["AIRFLOW__CORE__EXECUTOR"] == servers.LOCAL_EXECUTOR and not local.worker_names()
    assert not any(n.startswith("worker-") for n in servers.commands(local))
