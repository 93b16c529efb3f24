"""Helpers for the end-to-end tests: real `fmx up` servers in a temporary FMX_HOME, the REST client,
bounded waits that explain failures (task states + task log tails), MLflow read-back.

Every test module starts its own servers and stops every process it started in a finalizer, even
when the test fails. The servers run with --no-schedule, so only the runs a test triggers or backfills
run (`fmx up` schedules nothing without a start date anyway; --no-schedule also keeps an FMX_START_DATE
of the caller's environment from starting runs). For the scale-out test: `redis_server` (a throw-away
Redis on loopback) and `s3_server` (moto's S3-compatible server on loopback, with one bucket).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fmx import servers
from fmx.servers.airflow_api import AirflowAPI

FM_DAG, EXPERTS_DAG = "fmx_fm", "fmx_experts"
RUN_TIMEOUT_S = 900.0  # one day of the tiny pipeline takes ~1-3 min here; slack for a shared CPU
UP_TIMEOUT_S = 300


@dataclass
class Servers:
    home: Path
    state: servers.ServerState
    api: AirflowAPI

    @property
    def lake(self) -> str:
        return str(self.home / "lake")


def fmx(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `fmx` command (as a user would) with FMX_HOME = home; fail the test with its output."""
    env = {**os.environ, "FMX_HOME": str(home)}
    cmd = [sys.executable, "-c", "from fmx.cli import cli; cli()", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        pytest.fail(
            f"`fmx {' '.join(args)}` exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
        )
    return out


@contextmanager
def running_servers(home: Path, *up_args: str) -> Iterator[Servers]:
    """`fmx up --no-schedule ...` in `home`; always `fmx down` (and an in-process sweep) afterwards."""
    try:
        fmx(
            "up",
            "--no-schedule",
            "--timeout",
            str(UP_TIMEOUT_S),
            *up_args,
            home=home,
            timeout=UP_TIMEOUT_S + 120,
        )
        state = servers.load_state(home)
        assert state is not None, "fmx up returned but wrote no state.json"
        # the MLflow server requires authentication: this process's clients (MlflowClient) use fmx's credentials
        creds = servers.mlflow_credentials(home)
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update(MLFLOW_TRACKING_USERNAME=creds["username"], MLFLOW_TRACKING_PASSWORD=creds["password"])
        try:
            yield Servers(home, state, AirflowAPI(state.airflow_url, servers.airflow_password(home)))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        subprocess.run(
            [sys.executable, "-c", "from fmx.cli import cli; cli()", "down"],
            env={**os.environ, "FMX_HOME": str(home)},
            capture_output=True,
            timeout=120,
        )
        servers.down(home)  # no-op when `fmx down` worked; stops leftovers if it did not


def pipeline_conf(lake: str, **overrides: Any) -> dict[str, Any]:
    """A small, fast conf: tiny generator scale, FM preset small, one surface, two variants."""
    conf = {
        "scale": "tiny",
        "source": "generator",
        "fm_presets": ["small"],
        "surfaces": ["feed"],
        "variants": ["base", "loopfm"],
        "lake_uri": lake,
    }
    return {**conf, **overrides}


def task_log_tails(home: Path, dag_id: str, run_id: str, lines: int = 40) -> str:
    """The last lines of every task log of one run (for failure messages)."""
    root = home / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    chunks = []
    for log in sorted(root.rglob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        chunks.append(f"--- {log.relative_to(root)}\n" + "\n".join(text))
    return "\n".join(chunks) or f"(no task logs under {root})"


def wait_success(srv: Servers, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT_S) -> None:
    """Wait for a run to finish and assert it succeeded, showing task states and logs otherwise."""
    try:
        state = srv.api.wait_run(dag_id, run_id, timeout=timeout)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{task_log_tails(srv.home, dag_id, run_id)}")
    if state != "success":
        states = srv.api.task_states(dag_id, run_id)
        pytest.fail(f"{dag_id}/{run_id} ended {state}: {states}\n{task_log_tails(srv.home, dag_id, run_id)}")


def experts_run_for(srv: Servers, ds: str, exclude: set[str] | None = None) -> str:
    """The id of the fmx_experts run whose conf names day `ds` (started by fmx_fm's trigger_experts)."""
    found = [
        r["dag_run_id"]
        for r in srv.api.runs(EXPERTS_DAG)
        if (r.get("conf") or {}).get("ds") == ds and r["dag_run_id"] not in (exclude or set())
    ]
    assert len(found) == 1, f"expected one {EXPERTS_DAG} run for ds={ds}, got {found}"
    return found[0]


def mlflow_runs(srv: Servers, ds: str) -> list[Any]:
    """Every MLflow run of experiment `fmx` tagged with day `ds`, read through the tracking server."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=srv.state.mlflow_url)
    experiment = client.get_experiment_by_name("fmx")
    assert experiment is not None, f"no MLflow experiment 'fmx' on {srv.state.mlflow_url}"
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.ds = '{ds}'", max_results=1000)


def task_hostnames(srv: Servers, dag_id: str, run_id: str) -> dict[str, str]:
    """{task_id (with map index when mapped): the hostname its task instance recorded} for one run."""
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
    out = {}
    for ti in srv.api.request("GET", path, params={"limit": 1000}).json()["task_instances"]:
        key = ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"
        if ti.get("hostname"):
            out[key] = ti["hostname"]
    return out


@contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away redis-server on 127.0.0.1:<free port> (no persistence); yields its redis:// URL.

    Skips when redis-server is not installed (infra/ci-setup.sh installs it from Debian's packages)."""
    from fmx.servers import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found: run infra/ci-setup.sh (apt-get install redis-server)")
    root, port = Path(tempfile.mkdtemp(prefix="fmx-redis-")), free_port()
    log = root / "redis.log"
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
           "--dir", str(root), "--logfile", str(log)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_redis(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_redis(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"redis-server did not answer on {url} (exit {proc.poll()}):\n{text}")
        time.sleep(0.2)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1:<free port> (a thread of this process) with `bucket`; yields
    its http endpoint. Clients authenticate with S3_CREDENTIALS (fake keys moto accepts)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from fmx.servers import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        creds = {
            "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        }
        boto3.client("s3", endpoint_url=endpoint, **creds).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
