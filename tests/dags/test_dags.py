"""DAG hygiene: the DAG files parse, stay light, pass ruff's AIR rules, wire the stages as designed,
and Airflow rejects bad trigger Params before any task runs."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmx import dagkit
from tests.dags.conftest import DAGS_FOLDER

HEAVY = ("torch", "polars", "mlflow", "pyarrow", "sklearn", "features.lake")


@pytest.fixture(scope="module")
def dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags


def test_dagbag_has_both_dags_and_file_names_are_dag_ids(dags: dict) -> None:
    assert set(dags) == {"fmx_fm", "fmx_experts"}
    for dag_id, dag in dags.items():
        assert Path(dag.fileloc).name == f"{dag_id}.py"
        assert len(Path(dag.fileloc).read_text().splitlines()) <= 100  # wiring only


def test_dag_files_import_light_and_fast() -> None:
    """Parsing a DAG file loads no heavy library; its own import (after airflow.sdk) takes well under 2 s.

    Measured in CPU seconds: wall time on a shared 2-core machine varies several-fold with the load.
    """
    script = f"""
import importlib.util, json, sys, time
import airflow.sdk
t0 = time.process_time()
for path in sorted(__import__("pathlib").Path({str(DAGS_FOLDER)!r}).glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps({{"s": time.process_time() - t0, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["s"] < 0.8, result


def test_ruff_air_rules_pass_on_dags() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run(
        [str(ruff), "check", "--select", "AIR", str(DAGS_FOLDER)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_fmx_fm_structure(dags: dict) -> None:
    dag = dags["fmx_fm"]
    up = {t.task_id: t.upstream_task_ids for t in dag.tasks}
    assert set(up) == {
        "plan", "ingest", "fm_presets", "fm_preset.fm_export", "fm_preset.fm_train", "experts_conf",
        "trigger_experts",
    }  # fmt: skip
    assert up["ingest"] == {"plan"} and type(dag.task_dict["plan"]).__name__ == "_ShortCircuitDecoratedOperator"
    assert up["fm_preset.fm_export"] >= {"ingest", "fm_presets"}
    assert "fm_preset.fm_export" in up["fm_preset.fm_train"]
    assert "fm_preset.fm_train" in up["experts_conf"] and up["trigger_experts"] == {"plan", "experts_conf"}
    assert dag.task_dict["experts_conf"].trigger_rule == "all_success"  # skips with ingest on a done day
    assert (
        type(dag.task_group_dict["fm_preset"]).__name__ == "MappedTaskGroup"
    )  # one export->train per preset
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"  # 1-day windows unless FMX_WINDOW_DAYS
    assert dag.start_date is None and not dag.catchup  # no date is assumed: FMX_START_DATE sets the schedule
    assert dag.max_active_runs == 1 and all(t.depends_on_past for t in dag.tasks)
    assert dag.task_dict["fm_preset.fm_train"].pool == dagkit.TRAINING_POOL
    assert dag.task_dict["trigger_experts"].trigger_dag_id == "fmx_experts"


def test_fmx_experts_structure(dags: dict) -> None:
    dag = dags["fmx_experts"]
    up = {t.task_id: t.upstream_task_ids for t in dag.tasks}
    assert up["expert_examples"] == {"plan", "per_surface"}
    assert up["expert_train"] == {"plan", "per_model", "expert_examples"}
    assert up["reference"] == {"plan", "per_surface"}  # the counting baseline, beside the experts
    assert up["compare_and_promote"] == {"plan", "per_surface", "expert_train", "reference"}
    mapped = {t.task_id for t in dag.tasks if type(t).__name__ == "DecoratedMappedOperator"}
    assert mapped == {"expert_examples", "expert_train", "reference", "compare_and_promote"}
    assert dag.timetable.can_be_scheduled is False and dag.max_active_runs == 1  # started by fmx_fm's trigger
    assert dag.task_dict["expert_train"].pool == dagkit.TRAINING_POOL


def test_retries_back_off_exponentially_with_timeouts(dags: dict) -> None:
    for dag in dags.values():
        for t in dag.tasks:
            assert t.retries >= 1 and t.retry_exponential_backoff > 1 and t.execution_timeout is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"ds": "2026-02-30"},
        {"ds": "yesterday"},
        {"surfaces": ["feed", "../etc"]},
        {"surfaces": ["a/b"]},
        {"surfaces": ["feed", "feed"]},
        {"variants": ["base", "nope"]},
        {"variants": []},
        {"fm_presets": ["huge"]},
        {"source": "kafka"},
        {"scale": "enormous"},
        {"lake_uri": 3},
    ],
)
def test_bad_params_are_rejected(dags: dict, bad: dict) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    for dag in dags.values():
        params = copy.deepcopy(dag.params)
        with pytest.raises(ParamValidationError):
            params.update(bad)
            params.validate()


def test_good_params_are_accepted(dags: dict) -> None:
    good = {"ds": "2026-01-03", "surfaces": ["feed"], "variants": ["base", "kd"], "fm_presets": ["small", "large"],
            "source": "lake", "scale": "tiny", "lake_uri": "s3://bucket/lake"}  # fmt: skip
    for dag in dags.values():
        params = copy.deepcopy(dag.params)
        params.update(good)
        assert params.validate()["fm_presets"] == ["small", "large"]
        assert copy.deepcopy(dag.params).validate()["ds"] is None  # defaults alone are valid


def test_run_day_comes_from_param_or_logical_date_never_the_clock() -> None:
    from datetime import UTC, datetime

    assert dagkit.run_day({"ds": "2026-01-05"}, None) == "2026-01-05"
    assert dagkit.run_day({"ds": None}, datetime(2026, 1, 7, tzinfo=UTC)) == "2026-01-07"
    with pytest.raises(ValueError, match="ds=YYYY-MM-DD"):
        dagkit.run_day({"ds": None}, None)


def test_grid_is_the_cross_product_of_the_days_lists() -> None:
    day = {"surfaces": ["feed", "video"], "variants": ["base", "kd", "fe"], "fm_presets": ["small"]}
    combos = dagkit.grid(day, ["surface", "variant", "fm_preset"])
    assert len(combos) == 6 and {"surface": "video", "variant": "fe", "fm_preset": "small"} in combos
    with pytest.raises(ValueError, match="unknown grid axes"):
        dagkit.grid(day, ["colour"])


def test_enums_agree_with_the_libraries() -> None:
    """dagkit repeats a few constants to keep DAG parsing light; they must match the source of truth."""
    experts_stage = pytest.importorskip("experts.stage")
    generate = pytest.importorskip("features.generate")
    assert tuple(experts_stage.VARIANTS) == dagkit.VARIANTS
    assert all(re.fullmatch(dagkit.SURFACE_PATTERN, s) for s in generate.GeneratorConfig().surfaces)


def test_surfaces_are_data_any_safe_name_passes_the_param(dags: dict) -> None:
    for dag in dags.values():
        params = copy.deepcopy(dag.params)
        params.update({"surfaces": ["comedy", "tab_3", "Live.v2"]})
        assert params.validate()["surfaces"] == ["comedy", "tab_3", "Live.v2"]


def test_schedule_follows_the_deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime, timedelta

    monkeypatch.setenv("FMX_START_DATE", "1997-09-20")
    monkeypatch.setenv("FMX_WINDOW_DAYS", "7")
    assert dagkit.schedule_start() == datetime(1997, 9, 20, tzinfo=UTC)
    assert type(dagkit.schedule()).__name__ == "DeltaDataIntervalTimetable"
    assert dagkit.schedule().delta == timedelta(days=7)
    monkeypatch.setenv("FMX_START_DATE", "the 20th")
    with pytest.raises(ValueError, match="FMX_START_DATE='the 20th' is not a date"):
        dagkit.schedule_start()
    monkeypatch.setenv("FMX_WINDOW_DAYS", "0")
    with pytest.raises(ValueError, match="FMX_WINDOW_DAYS='0'"):
        dagkit.window_days()


def test_dag_parses_with_a_start_date_from_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FMX_START_DATE the DAG catches up from that window, at the lake's window length."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("FMX_START_DATE", "1997-09-20")
    monkeypatch.setenv("FMX_WINDOW_DAYS", "7")
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["fmx_fm"]
    assert dag.start_date.date().isoformat() == "1997-09-20" and dag.catchup
    assert type(dag.timetable).__name__ == "DeltaDataIntervalTimetable"


def test_resolve_run_gives_the_childs_conf_with_an_absolute_lake(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    params = {"ds": None, "surfaces": [], "variants": ["base"], "fm_presets": ["small"], "source": "generator",
              "scale": "tiny", "lake_uri": "", "pipeline_run": ""}  # fmt: skip
    run = dagkit.resolve_run(params, datetime(2026, 1, 2, tzinfo=UTC), "scheduled__2026-01-02")
    assert set(run) == set(dagkit.RUN_KEYS)
    assert run["ds"] == "2026-01-02" and run["pipeline_run"] == "scheduled__2026-01-02"
    assert Path(run["lake_uri"]).is_absolute()
    assert dagkit.lake_uri({"lake_uri": "s3://bucket/lake"}) == "s3://bucket/lake"


def test_timed_adds_stage_seconds_and_makes_metrics_strict_json() -> None:
    out = dagkit.timed(lambda ds: {"ds": ds, "metrics": {"feed": {"auc": float("nan")}}}, ds="2026-01-02")
    assert out["metrics"] == {"feed": {"auc": None}} and out["stage_s"] >= 0
    json.dumps(out, allow_nan=False)
