"""The run tree on a real local MLflow store (issue 13): a failed stage ends FAILED with its error as a tag and
so does its parent (a successful retry clears it), no parent is left without a child, and parents are named
by the day they process and the pipeline (not by Airflow's run id, whose date is the interval's end)."""

from __future__ import annotations

import json

import mlflow
import pytest
from click.testing import CliRunner

from common import tracking
from common.tracking import ERROR_TAG, StageBusy, parent_name, setup, stage_run

TAGS = {"surface": "all", "variant": "fm", "fm_version": "pending", "fm_preset": "small"}


def _runs(flt: str = "") -> list:
    return mlflow.search_runs([setup()], filter_string=flt, output_format="list", max_results=1000)


def _parent(pipeline_run: str, ds: str) -> list:
    return _runs(f"tags.`fmx.pipeline_run` = '{pipeline_run}' and tags.ds = '{ds}' and tags.`fmx.kind` = 'day'")


def test_a_failed_stage_ends_failed_with_its_error_and_so_does_its_parent() -> None:
    with pytest.raises(ValueError):
        with stage_run("fm_train", pipeline_run="p1", ds="2026-01-02", tags=TAGS):
            raise ValueError("no events for window 2026-01-02\n  details the operator does not need")
    (failed,) = _runs("tags.`fmx.kind` = 'stage'")
    assert failed.info.status == "FAILED"
    assert failed.data.tags[ERROR_TAG] == "ValueError: no events for window 2026-01-02"
    (parent,) = _parent("p1", "2026-01-02")
    assert parent.info.status == "FAILED" and parent.info.run_id == failed.data.tags["mlflow.parentRunId"]
    assert parent.data.tags[ERROR_TAG] == "1 stage(s) failed: fm_train: ValueError: no events for window 2026-01-02"

    with stage_run("fm_train", pipeline_run="p1", ds="2026-01-02", tags=TAGS):  # the retry succeeds
        pass
    (parent,) = _parent("p1", "2026-01-02")
    assert parent.info.status == "FINISHED" and ERROR_TAG not in parent.data.tags


def test_a_parent_stays_failed_while_one_of_its_stages_failed() -> None:
    with stage_run("fm_export", pipeline_run="p1", ds="2026-01-02", tags=TAGS):
        pass
    with pytest.raises(RuntimeError):
        with stage_run("fm_train", pipeline_run="p1", ds="2026-01-02", tags=TAGS):
            raise RuntimeError("x" * 2000)
    with stage_run("expert/small/feed/base", pipeline_run="p1", ds="2026-01-02",
                   tags={**TAGS, "surface": "feed", "variant": "base"}):
        pass
    (parent,) = _parent("p1", "2026-01-02")
    assert parent.info.status == "FAILED" and "fm_train: RuntimeError: xxx" in parent.data.tags[ERROR_TAG]
    (failed,) = _runs("attributes.status = 'FAILED' and tags.`fmx.kind` = 'stage'")
    assert len(failed.data.tags[ERROR_TAG]) == tracking.ERROR_CHARS  # one line, truncated


def test_no_parent_without_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(*args: object, **kwargs: object) -> list[str]:
        raise StageBusy("stage fm_train for 2026-01-02 is already running")

    with monkeypatch.context() as patch:
        patch.setattr(tracking, "end_dead_runs", busy)
        with pytest.raises(StageBusy):
            with stage_run("fm_train", pipeline_run="p1", ds="2026-01-02", tags=TAGS):
                pass
    assert _runs() == []  # refused before a parent could exist

    def broken(*args: object, **kwargs: object) -> None:
        raise ConnectionError("tracking store went away")

    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "start_run", broken)
        with pytest.raises(ConnectionError):
            with stage_run("fm_train", pipeline_run="p1", ds="2026-01-02", tags=TAGS):
                pass
    assert _runs() == []  # the parent created for the stage that never started is deleted


def test_a_failed_fm_train_command_leaves_a_failed_run_and_a_failed_parent(lake_uri: str) -> None:
    from fmx.cli import cli
    from tests.fm.conftest import make_lake

    (w1,) = make_lake(lake_uri, 1, events_per_day=200)
    missing = w1.next().ds  # a window the lake does not hold
    out = CliRunner().invoke(cli, ["fm", "train", "--ds", missing, "--lake", lake_uri, "--pipeline-run", "p-bad"])
    assert out.exit_code != 0
    runs = {r.info.run_name: r for r in _runs()}
    assert set(runs) == {"fm_train", f"{missing} · p-bad"}, sorted(runs)
    assert runs["fm_train"].info.status == "FAILED" and runs["fm_train"].data.tags[ERROR_TAG]
    parent = runs[f"{missing} · p-bad"]
    assert parent.info.status == "FAILED" and parent.data.tags[ERROR_TAG].startswith("1 stage(s) failed: fm_train: ")
    assert "\n" not in parent.data.tags[ERROR_TAG]
    json.dumps(parent.data.tags)

    from fm.stage import fm_export

    with pytest.raises(ValueError):
        fm_export("2026-13-01", lake_uri, pipeline_run="p-bad")  # the export runs inside its run: FAILED too
    (export,) = _runs("attributes.run_name = 'fm_export'")
    assert export.info.status == "FAILED" and export.data.tags[ERROR_TAG].startswith("ValueError: ")
    (parent,) = _parent("p-bad", "2026-13-01")
    assert parent.info.status == "FAILED" and parent.info.run_name == "2026-13-01 · p-bad"


@pytest.mark.parametrize(("run_id", "dag", "name"), [
    # Airflow 3 names a scheduled run by its run_after, the END of the day's interval: the ds is a day earlier
    ("scheduled__2026-01-05T00:00:00+00:00", "fmx_fm", "2026-01-04 · fmx_fm scheduled"),
    ("backfill__2026-01-05T00:00:00+00:00", "fmx_fm", "2026-01-04 · fmx_fm backfill"),
    ("manual__2026-11-30T12:04:05.123456+00:00", "fmx_fm", "2026-01-04 · fmx_fm manual 2026-11-30 12:04"),
    ("fmx-run-20261130T120405", None, "2026-01-04 · fmx-run-20261130T120405"),
    ("manual", None, "2026-01-04 · manual"),
])
def test_parents_are_named_by_day_and_pipeline(run_id: str, dag: str | None, name: str) -> None:
    assert parent_name(run_id, "2026-01-04", dag) == name


def test_a_parent_carries_the_ds_of_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "fmx_fm")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-01-05T00:00:00+00:00")
    with stage_run("fm_train", pipeline_run="scheduled__2026-01-05T00:00:00+00:00", ds="2026-01-04", tags=TAGS) as run:
        pass
    (parent,) = _parent("scheduled__2026-01-05T00:00:00+00:00", "2026-01-04")
    assert parent.info.run_name == "2026-01-04 · fmx_fm scheduled"
    assert parent.data.tags["fmx.pipeline"] == "fmx_fm" and parent.data.tags["ds"] == run.data.tags["ds"]
    assert parent.info.status == "FINISHED"


def _stage_in_process(name: str) -> str:
    with stage_run(name, pipeline_run="race", ds="2026-01-02", tags={**TAGS, "surface": name}) as run:
        return str(mlflow.get_run(run.info.run_id).data.tags["mlflow.parentRunId"])


def test_stages_starting_at_once_share_one_parent() -> None:
    """fmx run's workers start a day's stages concurrently: they must find-or-create one parent, not several."""
    import multiprocessing as mp

    setup()  # the store exists before the processes race
    with mp.get_context("fork").Pool(4) as pool:
        parents = pool.map(_stage_in_process, [f"s{i}" for i in range(4)])
    assert len(set(parents)) == 1
    assert len(_parent("race", "2026-01-02")) == 1
