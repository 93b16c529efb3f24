"""Where the schedule starts: `fmx up --start-date` (a date, or the lake's first window) and its window length."""

from __future__ import annotations

import pytest

from fmx.server_config import ServerConfig, ServerError, schedule_from, server_env


def test_start_date_from_the_lake_and_its_window_length(lake_uri: str) -> None:
    from features.lake import Lake

    with pytest.raises(ServerError, match="holds no windows yet"):
        schedule_from(lake_uri, "lake")
    Lake(lake_uri).update_meta(source="movielens", window_days=7, origin="1997-09-20")
    assert schedule_from(lake_uri, "lake") == {"start_date": "1997-09-20", "window_days": 7}
    assert schedule_from(lake_uri, "1997-10-04") == {"start_date": "1997-10-04", "window_days": 7}
    assert schedule_from(lake_uri, None) == {"start_date": "", "window_days": 7}  # no date: no catch-up
    with pytest.raises(ServerError, match="'yesterday' is not a date"):
        schedule_from(lake_uri, "yesterday")


def test_server_env_passes_the_schedule_to_airflow(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FMX_START_DATE", "2026-01-01")  # a stale value of the caller's shell never leaks
    cfg = ServerConfig(home=tmp_path, dags_folder=tmp_path, airflow_port=1, mlflow_port=2, window_days=7)
    env = server_env(cfg)
    assert "FMX_START_DATE" not in env and env["FMX_WINDOW_DAYS"] == "7"
    env = server_env(ServerConfig(home=tmp_path, dags_folder=tmp_path, airflow_port=1, mlflow_port=2,
                                  start_date="2022-03-01", lake="s3://bucket/lake"))  # fmt: skip
    assert env["FMX_START_DATE"] == "2022-03-01" and env["FMX_LAKE"] == "s3://bucket/lake"
