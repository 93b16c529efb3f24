"""Helpers for the end-to-end tests: real `fmx up` servers in a temporary FMX_HOME, the REST client,
bounded waits that explain failures (task states + task log tails), MLflow read-back.

Every test module starts its own servers and stops every process it started in a finalizer, even
when the test fails. The servers run with --no-schedule: the FM DAG catches up from its start_date,
which would otherwise queue one scheduled run per past day; triggered runs and backfills still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fmx import servers
from fmx.airflow_api import AirflowAPI

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
        "lake": lake,
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
