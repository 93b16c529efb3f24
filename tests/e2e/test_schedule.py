"""The operator's day on real servers (issue 13): `fmx up --start-date lake` on a small imported lake, then
unpausing fmx_fm runs exactly the lake's windows (no catch-up to today); a manual trigger of a done day
trains nothing; pausing fmx_fm with a run in progress leaves no run queued or running; the triggerer and
the reaper run and `fmx status` reports PID, port and health of every process.

The lake: the first two days of tests/fixtures/tsv2022's log, one surface ("home", ~200 events a day),
imported with `fmx import custom`. Scheduled runs use the DAGs' default Params (all five variants).
Runs with: pytest -m e2e tests/e2e/test_schedule.py  (~5 min on a shared 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmx import servers
from fmx.servers.airflow_api import AirflowAPI
from tests.e2e.conftest import EXPERTS_DAG, FM_DAG, UP_TIMEOUT_S, Servers, fmx, task_log_tails, wait_success

pytestmark = pytest.mark.e2e

TSV2022 = Path(__file__).resolve().parents[1] / "fixtures" / "tsv2022"
DAYS = ("2022-03-01", "2022-03-02")
ACTIVE = ("queued", "running")


def _tiny_lake(tmp: Path, home: Path) -> str:
    """Two windows of one surface, imported (so scheduled runs use the lake's windows, never a generator)."""
    rows = (TSV2022 / "log.tsv").read_text().splitlines()
    keep = [rows[0]] + [r for r in rows[1:] if r.split("\t")[3] == "0" and r.split("\t")[2][:10] in DAYS]
    (tmp / "log.tsv").write_text("\n".join(keep) + "\n")
    mapping = re.sub(r"(?m)^values = .*$", 'values = { "0" = "home" }', (TSV2022 / "mapping.toml").read_text())
    (tmp / "mapping.toml").write_text(mapping)
    lake = str(tmp / "lake")
    fmx("import", "custom", str(tmp / "log.tsv"), "--mapping", str(tmp / "mapping.toml"), "--lake", lake, home=home)
    return lake


def _wait(what: str, check, timeout: float, poll: float = 3.0):  # noqa: ANN001, ANN202 (a small test helper)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(poll)
    pytest.fail(f"not after {timeout:.0f} s: {what}")


def _scheduled(api: AirflowAPI) -> list[str]:
    return sorted(r["logical_date"][:10] for r in api.runs(FM_DAG) if r["run_type"] == "scheduled")


def test_unpaused_schedule_runs_the_lakes_windows_once_and_pause_strands_nothing(tmp_path: Path) -> None:
    started = time.monotonic()
    home = tmp_path / "home"
    lake = _tiny_lake(tmp_path, home)
    try:
        up = fmx("up", "--start-date", "lake", "--lake", lake, "--timeout", str(UP_TIMEOUT_S), home=home,
                 timeout=UP_TIMEOUT_S + 120)  # fmt: skip
        assert f"from {DAYS[0]} through {DAYS[1]} (2 runs, 2 of them at once)" in up.stdout, up.stdout
        state = servers.load_state(home)
        assert state is not None
        srv = Servers(home, state, AirflowAPI(state.airflow_url, servers.airflow_password(home)))
        _status_reports_every_process(srv)
        _schedule_runs_exactly_the_lakes_windows(srv)
        _a_manual_run_of_a_done_day_trains_nothing(srv, lake)
        _pausing_leaves_no_run_queued_or_running(srv, lake)
    finally:
        subprocess.run([sys.executable, "-c", "from fmx.cli import cli; cli()", "down"],
                       env={**os.environ, "FMX_HOME": str(home)}, capture_output=True, timeout=120)  # fmt: skip
        servers.down(home)
    print(f"wall time of the schedule test: {time.monotonic() - started:.0f} s")


def _status_reports_every_process(srv: Servers) -> None:
    info = json.loads(fmx("status", "--json", home=srv.home).stdout)
    procs = info["processes"]
    assert set(procs) == {"mlflow", "api-server", "scheduler", "dag-processor", "triggerer", "reaper"}
    assert all(p["state"] == "running" and p["healthy"] and p["pid"] > 0 for p in procs.values()), procs
    assert procs["api-server"]["port"] == srv.state.config["airflow_port"]
    assert procs["mlflow"]["port"] == srv.state.config["mlflow_port"]
    text = fmx("status", home=srv.home).stdout
    assert f"triggerer      {procs['triggerer']['pid']:>8}      -  running  healthy" in text, text


def _schedule_runs_exactly_the_lakes_windows(srv: Servers) -> None:
    srv.api.wait_for_dag(FM_DAG, timeout=180)
    srv.api.wait_for_dag(EXPERTS_DAG, timeout=180)
    assert not srv.api.is_paused(EXPERTS_DAG)  # created unpaused: fmx_fm's triggers run
    assert srv.api.runs(FM_DAG) == []  # paused at creation: nothing ran before the user unpaused it
    srv.api.unpause(FM_DAG)
    _wait("two scheduled fmx_fm runs", lambda: len(_scheduled(srv.api)) >= 2, timeout=300)
    for run in srv.api.runs(FM_DAG):
        wait_success(srv, FM_DAG, run["dag_run_id"])
    _wait("two fmx_experts runs", lambda: len(srv.api.runs(EXPERTS_DAG)) >= 2, timeout=120)
    experts = srv.api.runs(EXPERTS_DAG)
    for run in experts:
        wait_success(srv, EXPERTS_DAG, run["dag_run_id"])
    time.sleep(15)  # a few scheduler loops: no further window may appear
    assert _scheduled(srv.api) == list(DAYS) and len(srv.api.runs(FM_DAG)) == 2
    assert sorted(r["conf"]["ds"] for r in srv.api.runs(EXPERTS_DAG)) == list(DAYS)
    trained = srv.api.task_states(EXPERTS_DAG, next(r["dag_run_id"] for r in experts if r["conf"]["ds"] == DAYS[1]))
    assert len([k for k, s in trained.items() if k.startswith("expert_train") and s == "success"]) == 5


def _a_manual_run_of_a_done_day_trains_nothing(srv: Servers, lake: str) -> None:
    run = srv.api.trigger(FM_DAG, {"ds": DAYS[1], "lake_uri": lake})
    wait_success(srv, FM_DAG, run)
    states = srv.api.task_states(FM_DAG, run)
    assert states.pop("plan") == "success", states
    assert set(states.values()) == {"skipped"} and {"fm_preset.fm_train", "experts_conf"} <= set(states), states
    assert f"ds={DAYS[1]} is already done (FM small-{DAYS[1]}-" in task_log_tails(srv.home, FM_DAG, run)
    time.sleep(5)
    assert len(srv.api.runs(EXPERTS_DAG)) == 2  # no experts run triggered either


def _pausing_leaves_no_run_queued_or_running(srv: Servers, lake: str) -> None:
    run = srv.api.trigger(FM_DAG, {"ds": DAYS[1], "lake_uri": lake, "rerun": True})
    _wait("the rerun's ingest to start", lambda: srv.api.task_states(FM_DAG, run).get("ingest")
          in ("queued", "running", "success"), timeout=180, poll=1.0)  # fmt: skip
    srv.api.pause(FM_DAG)
    _wait("no fmx_fm/fmx_experts run queued or running",
          lambda: not any(r["state"] in ACTIVE for d in (FM_DAG, EXPERTS_DAG) for r in srv.api.runs(d)), 180)  # fmt: skip
    ended = next(r for r in srv.api.runs(FM_DAG) if r["dag_run_id"] == run)
    assert ended["state"] == "failed" and "was paused" in (ended.get("note") or ""), ended
    assert "ended fmx_fm/" in Path(srv.state.logs["reaper"]).read_text()
