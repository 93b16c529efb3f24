"""Where the schedule starts and ends: `fmx up --start-date/--end-date` (dates, or the lake's next unprocessed
window and its last window) and the window length; what `fmx up` says unpausing will run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fmx.servers.config import ServerConfig, ServerError
from fmx.servers.env import server_env
from fmx.servers.schedule import describe_schedule, schedule_from


def _lake(lake_uri: str, monkeypatch: pytest.MonkeyPatch, windows: list[str], days: int = 7) -> None:
    from features.lake import Lake

    Lake(lake_uri).update_meta(source="movielens", window_days=days, origin=windows[0] if windows else "1997-09-20")
    monkeypatch.setattr("fmx.servers.schedule._lake_windows", lambda uri: windows)


def _train(lake_uri: str, ds: str, preset: str = "small") -> None:
    from features.lake import Lake
    from fm.versions import record_version

    record_version(Lake(lake_uri), preset, ds, {"fm_version": f"{preset}-{ds}-abc", "parent": None})


def test_lake_start_is_the_next_unprocessed_window_and_end_its_last(lake_uri: str, monkeypatch) -> None:
    windows = ["1997-09-20", "1997-09-27", "1997-10-04"]
    _lake(lake_uri, monkeypatch, [])
    with pytest.raises(ServerError, match="holds no windows yet"):
        schedule_from(lake_uri, "lake")
    _lake(lake_uri, monkeypatch, windows)
    assert schedule_from(lake_uri, "lake") == {"start_date": "1997-09-20", "end_date": "1997-10-04", "window_days": 7}
    _train(lake_uri, "1997-09-20")
    assert schedule_from(lake_uri, "lake")["start_date"] == "1997-09-27"  # the first window without its FM
    assert schedule_from(lake_uri, "lake", "none")["end_date"] == ""  # explicitly open-ended
    _train(lake_uri, "1997-09-27")
    _train(lake_uri, "1997-10-04")
    done = schedule_from(lake_uri, "lake")
    assert done == {"start_date": "1997-10-11", "end_date": "1997-10-04", "window_days": 7}  # nothing left


def test_dates_and_env(lake_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _lake(lake_uri, monkeypatch, ["1997-09-20", "1997-09-27"])
    assert schedule_from(lake_uri, "1997-10-04") == {"start_date": "1997-10-04", "end_date": "", "window_days": 7}
    assert schedule_from(lake_uri, None) == {"start_date": "", "end_date": "", "window_days": 7}  # no catch-up
    assert schedule_from(lake_uri, "1997-09-20", "lake")["end_date"] == "1997-09-27"
    monkeypatch.setenv("FMX_START_DATE", "lake")
    assert schedule_from(lake_uri, None)["end_date"] == "1997-09-27"
    with pytest.raises(ServerError, match="'yesterday' is not a date"):
        schedule_from(lake_uri, "yesterday")
    with pytest.raises(ServerError, match="--end-date 'soon' is not a date"):
        schedule_from(lake_uri, "1997-09-20", "soon")


def test_server_env_passes_the_schedule_to_airflow(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FMX_START_DATE", "2026-01-01")  # a stale value of the caller's shell never leaks
    monkeypatch.setenv("FMX_END_DATE", "2026-01-09")
    cfg = ServerConfig(home=tmp_path, dags_folder=tmp_path, airflow_port=1, mlflow_port=2, window_days=7)
    env = server_env(cfg)
    assert "FMX_START_DATE" not in env and "FMX_END_DATE" not in env and env["FMX_WINDOW_DAYS"] == "7"
    assert env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "False"  # no start date chosen: nothing scheduled
    env = server_env(ServerConfig(home=tmp_path, dags_folder=tmp_path, airflow_port=1, mlflow_port=2,
                                  start_date="2022-03-01", end_date="2022-03-04", lake="s3://bucket/lake"))  # fmt: skip
    assert env["FMX_START_DATE"] == "2022-03-01" and env["FMX_END_DATE"] == "2022-03-04"
    assert env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "True"
    assert env["FMX_LAKE"] == "s3://bucket/lake"


def test_up_says_which_runs_unpausing_starts(tmp_path) -> None:
    now = datetime(2026, 12, 5, 3, tzinfo=UTC)

    def cfg(**kw: object) -> ServerConfig:
        return ServerConfig(home=tmp_path, dags_folder=tmp_path, airflow_port=1, mlflow_port=2, **kw)  # type: ignore[arg-type]

    assert describe_schedule(cfg(schedule=False), now).startswith("off")
    assert describe_schedule(cfg(), now) == "off (no --start-date): only triggered runs and backfills run"
    assert describe_schedule(cfg(start_date="2026-01-01", end_date="2026-01-03"), now) == (
        "fmx_fm: one run per 1-day window from 2026-01-01 through 2026-01-03 (3 runs, 3 of them at once)"
    )
    assert "(338 past windows run at once" in describe_schedule(cfg(start_date="2026-01-01"), now)
    assert "nothing to run" in describe_schedule(cfg(start_date="2026-01-04", end_date="2026-01-03"), now)
    weekly = describe_schedule(cfg(start_date="1997-09-20", end_date="1997-10-04", window_days=7), now)
    assert "(3 runs, 3 of them at once)" in weekly


def test_a_bounded_dag_serializes_and_schedules_exactly_its_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """start + end: the DAG round-trips through Airflow's serialization (what the dag-processor writes and the
    scheduler reads) and its timetable yields exactly the windows start..end."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    from tests.dags.conftest import DAGS_FOLDER

    monkeypatch.setenv("FMX_START_DATE", "1997-09-20")
    monkeypatch.setenv("FMX_END_DATE", "1997-10-04")
    monkeypatch.setenv("FMX_WINDOW_DAYS", "7")
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = DagSerialization.from_dict(DagSerialization.to_dict(bag.dags["fmx_fm"]))
    assert dag.end_date.date().isoformat() == "1997-10-04"
    runs, info = [], dag.next_dagrun_info(last_automated_run_info=None)  # what the scheduler creates, in turn
    while info is not None and len(runs) < 10:
        runs.append(info.logical_date.date().isoformat())
        info = dag.next_dagrun_info(last_automated_run_info=info)
    assert runs == ["1997-09-20", "1997-09-27", "1997-10-04"]
