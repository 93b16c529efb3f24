"""`fmx status` reports PID, port, state and health per process; the reaper ends only runs a pause stranded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmx import servers
from fmx.servers import health, reaper
from fmx.servers.env import commands
from fmx.servers.state import ServerState, save_state


class FakeAPI:
    """The REST calls fmx.servers.reaper makes, on an in-memory Airflow."""

    def __init__(self, paused: set[str], runs: dict[str, list[dict]], tasks: dict[str, dict[str, str]]) -> None:
        self.paused, self.runs, self.tasks, self.ended = paused, runs, tasks, []

    def paused_dags(self) -> list[str]:
        return sorted(self.paused)

    def is_paused(self, dag_id: str) -> bool:
        return dag_id in self.paused

    def active_runs(self, dag_id: str) -> list[dict]:
        return [r for r in self.runs.get(dag_id, []) if r["state"] in ("queued", "running")]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return self.tasks.get(run_id, {})

    def end_run(self, dag_id: str, run_id: str, note: str) -> None:
        self.ended.append((dag_id, run_id, note))


def test_reaper_ends_stranded_runs_of_paused_dags_only(capsys: pytest.CaptureFixture) -> None:
    runs = {
        "fmx_fm": [{"dag_run_id": "d5", "state": "running"}, {"dag_run_id": "d6", "state": "queued"},
                   {"dag_run_id": "d4", "state": "success"}, {"dag_run_id": "d7", "state": "running"}],
        "fmx_experts": [{"dag_run_id": "e5", "state": "running"}],
    }  # fmt: skip
    tasks = {"d5": {"ingest": "success", "fm_train": "scheduled"}, "d7": {"fm_train": "running"},
             "e5": {"plan": "success", "expert_train": None}}  # fmt: skip
    api = FakeAPI({"fmx_fm"}, runs, tasks)
    assert reaper.sweep(api) == ["d5", "d6"]  # d7 has a task in flight: it is let finish first
    assert all(dag == "fmx_fm" and "was paused" in note for dag, _, note in api.ended)  # experts: not paused
    assert "ended fmx_fm/d5 (running): the DAG is paused" in capsys.readouterr().out
    api.paused.clear()
    assert reaper.sweep(api) == []


def test_status_reports_pid_port_state_and_health(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    home = tmp_path / "home"
    (home / "servers").mkdir(parents=True)
    me = psutil.Process(os.getpid())
    from fmx.servers.config import ServerConfig

    cfg = ServerConfig(home=home, dags_folder=tmp_path, airflow_port=18080, mlflow_port=15000)
    names = list(commands(cfg))
    assert {"triggerer", "reaper"} <= set(names)
    state = ServerState("http://127.0.0.1:18080", "http://127.0.0.1:15000", "pw", {}, 
                        {"db": None, "airflow_port": 18080, "mlflow_port": 15000},
                        {n: [os.getpid(), me.create_time()] for n in names})  # fmt: skip
    state.pids["triggerer"] = [2**22 + 1, 0.0]  # gone
    save_state(home, state)
    up = {n: n != "scheduler" for n in health.AIRFLOW_PARTS}
    monkeypatch.setattr(health, "airflow_health", lambda url: up)
    monkeypatch.setattr(health, "mlflow_healthy", lambda url: True)
    info = servers.status(home)
    procs = info["processes"]
    assert procs["mlflow"] == {"pid": os.getpid(), "port": 15000, "state": "running", "healthy": True}
    assert procs["api-server"]["port"] == 18080 and procs["scheduler"]["port"] is None
    assert procs["scheduler"]["healthy"] is False and procs["triggerer"]["state"] == "stopped"
    assert procs["reaper"]["healthy"] is True  # alive is its health
    assert not info["running"] and info["healthy"] == {"airflow": False, "mlflow": True}

    from click.testing import CliRunner

    from fmx.cli import cli

    monkeypatch.setenv("FMX_HOME", str(home))
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 1
    assert f"  mlflow         {os.getpid():>8}  15000  running  healthy" in out.output
    assert "  triggerer      " in out.output and "stopped  UNHEALTHY" in out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start-date", "lake"], "holds no windows yet (import or generate first)"),
        (["--start-date", "2026-01-01", "--end-date", "soon"], "--end-date 'soon' is not a date YYYY-MM-DD"),
        (["--start-date", "monday"], "--start-date 'monday' is not a date YYYY-MM-DD"),
    ],
)
def test_up_with_a_bad_schedule_is_one_line_and_starts_nothing(args: list[str], message: str, lake_uri: str,
                                                               isolated_home: Path) -> None:  # fmt: skip
    from click.testing import CliRunner

    from fmx.cli import cli

    out = CliRunner().invoke(cli, ["up", "--lake", lake_uri, *args])
    assert out.exit_code == 1 and message in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output
    assert servers.load_state(isolated_home) is None  # nothing started
