"""Stage wrappers against a real MLflow store (sqlite under the test's FMX_HOME) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from common.tracking import METRIC_KEYS, setup
from experts.config import VARIANTS
from experts.data import ExamplesMissing
from experts.lineage import FMLineageError
from experts.registry import champion, registered_name
from experts.stage import compare_and_promote, expert_examples, expert_train
from fmx.cli import cli
from tests.experts.synth import make_lake, write_fm


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _day(uri: str, ds: str, preset: str = "small", surface: str = "feed", margin: float = 0.001) -> dict:
    expert_examples(ds, surface, uri, preset)  # the table's only writer, as the DAG's expert_examples task
    out = {v: expert_train(ds, surface, v, uri, preset, pipeline_run="t1") for v in VARIANTS}
    out["promote"] = compare_and_promote(ds, surface, uri, preset, pipeline_run="t1", margin=margin)
    return out


def _runs(flt: str) -> list:
    return mlflow.search_runs([setup()], filter_string=flt, output_format="list", max_results=1000)


def test_daily_flow_mlflow_promotion_and_compare(lake_uri: str, isolated_home: Path) -> None:
    lake, ws = make_lake(lake_uri, days=4, presets=("small", "large"))
    first = _day(lake_uri, ws[0].ds)
    assert all("skipped" in r for r in first.values())  # the FM's first window: documented skip
    assert expert_examples(ws[0].ds, "feed", lake_uri)["skipped"]
    cold = _day(lake_uri, ws[1].ds)
    assert cold["base"]["metrics"] == {} and cold["promote"]["skipped"]  # nothing trained before ds 1
    d2 = _day(lake_uri, ws[2].ds)
    assert d2["promote"]["decision"] == "promoted"  # no champion yet
    assert d2["promote"]["best"] == min(d2["promote"]["scores"], key=lambda v: d2["promote"]["scores"][v]["ne"])
    assert d2["base"]["metrics"]["gap_closure"] == 0.0
    # the progressive scores of expert_train equal the promotion's scores on the same rows
    for v in VARIANTS:
        assert d2[v]["metrics"]["ne"] == pytest.approx(d2["promote"]["scores"][v]["ne"])

    assert str(isolated_home) in mlflow.get_tracking_uri()
    runs = _runs(f"tags.`fmx.stage` = 'expert_train' and tags.ds = '{ws[2].ds}'")
    assert {r.data.tags["variant"] for r in runs} == set(VARIANTS)
    for r in runs:
        t = r.data.tags
        assert {"ds", "surface", "variant", "fm_version", "fm_preset", "orchestrator_run_id", "git_sha"} <= set(t)
        assert t["fm_version"].startswith(f"small-{ws[1].ds}-")
        assert set(r.data.metrics) <= set(METRIC_KEYS) and {"auc", "logloss", "ne", "calibration"} <= set(r.data.metrics)
        m = r.data.metrics  # NE - NE(base) on the same rows with its paired-bootstrap interval
        assert m["ne_vs_base_lo"] <= m["ne_vs_base"] <= m["ne_vs_base_hi"]
        assert ("kd_scale" in m) == ("kd" in t["variant"]) and 0 <= m.get("kd_scale", 0) <= 1
        assert r.data.params["variant"] == t["variant"] and "kd_beta" in r.data.params
        history = mlflow.MlflowClient().get_metric_history(r.info.run_id, "ne")
        assert [m.step for m in history] == [2]  # window index from the lake's origin
        names = {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
        assert {"calibration.png", "ne_by_day.png"} <= names
    model = mlflow.pytorch.load_model(runs[0].data.tags["model_uri"])
    assert isinstance(model, torch.nn.Module)

    champ = champion("feed", "small")
    assert champ is not None and champ.tags["variant"] == d2["promote"]["best"]
    assert champ.tags["trained_through"] == ws[2].ds
    # day 3: a huge margin keeps the champion; the decision is logged on the promotion run
    expert_examples(ws[3].ds, "feed", lake_uri)
    for v in VARIANTS:
        expert_train(ws[3].ds, "feed", v, lake_uri, "small", pipeline_run="t1")
    kept = compare_and_promote(ws[3].ds, "feed", lake_uri, "small", pipeline_run="t1", margin=10.0)
    assert kept["decision"] == "kept" and kept["champion"]["variant"] == champ.tags["variant"]
    # the champion variant keeps serving, updated to its model trained through ds
    after = champion("feed", "small")
    assert after.tags["variant"] == champ.tags["variant"] and after.tags["trained_through"] == ws[3].ds
    prun = _runs(f"tags.`fmx.stage` = 'expert_promote' and tags.ds = '{ws[3].ds}'")[0]
    assert prun.data.tags["decision"] == "kept" and float(prun.data.tags["champion_ne"]) > 0
    assert prun.data.tags["reason"] == kept["reason"] and prun.data.tags["champion_after"] == champ.tags["variant"]
    if kept["best"] != champ.tags["variant"]:  # the challenger's figures against the champion are logged
        assert {"ne_vs_champion", "ne_vs_champion_lo", "ne_vs_champion_hi"} <= set(prun.data.metrics)
    for m in kept["scores"].values():  # every variant against base on the same rows, with its interval
        assert m["ne_vs_base_lo"] <= m["ne_vs_base"] <= m["ne_vs_base_hi"]
        assert m["ne_vs_base"] == pytest.approx(m["ne"] - kept["scores"]["base"]["ne"])
    promoted = compare_and_promote(ws[3].ds, "feed", lake_uri, "small", pipeline_run="t1", margin=-10.0)
    assert promoted["champion"]["variant"] == promoted["best"]  # any challenger wins with a margin of -10
    assert promoted["decision"] == ("kept" if promoted["best"] == champ.tags["variant"] else "promoted")
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(registered_name("feed", "small"), "challenger")

    # a second FM preset on the same rows -> transfer ratio on the larger FM's runs
    for ds in (ws[1].ds, ws[2].ds):
        expert_examples(ds, "feed", lake_uri, "large")
        for v in ("base", "loopfm"):
            expert_train(ds, "feed", v, lake_uri, "large", pipeline_run="t1")
    tr = compare_and_promote(ws[2].ds, "feed", lake_uri, "large", pipeline_run="t1")["transfer_ratio"]
    assert set(tr) == {"base", "loopfm"}
    large_runs = _runs(f"tags.`fmx.stage` = 'expert_train' and tags.ds = '{ws[2].ds}' and tags.fm_preset = 'large'")
    assert any("transfer_ratio" in r.data.metrics for r in large_runs)

    out = CliRunner().invoke(cli, ["compare", "--surface", "feed", "--from", ws[2].ds, "--to", ws[3].ds])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("feed")]
    assert len(lines) == len(VARIANTS) + 2 and sum("*" in line for line in lines) == 2  # a champion per FM preset
    assert "gap_closure" in out.output and "transfer_ratio" in out.output


def test_stage_refuses_an_older_fm_version(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=4)
    for w in ws[1:3]:
        expert_examples(w.ds, "feed", lake_uri)
        expert_train(w.ds, "feed", "base", lake_uri)
    old = lake.read("fm_outputs", fm="small", ds=ws[1].ds, surface="feed")["fm_version"][0].as_py()
    for s in ("feed", "live"):  # day 3 re-exported with yesterday's FM version: stale
        write_fm(lake, ws[3], version=old.replace(ws[0].ds, ws[0].ds), surfaces=(s,))
    expert_examples(ws[3].ds, "feed", lake_uri)
    with pytest.raises(FMLineageError, match="older version"):
        expert_train(ws[3].ds, "feed", "base", lake_uri)
    # the refused day left its expert_train run FAILED with the error, under a FAILED parent
    failed = _runs(f"tags.`fmx.stage` = 'expert_train' and tags.ds = '{ws[3].ds}'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert failed[0].data.tags["fmx.error"].startswith("FMLineageError: ") and "older version" in failed[0].data.tags[
        "fmx.error"]
    parent = mlflow.get_run(failed[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert expert_train(ws[3].ds, "feed", "base", lake_uri, rebaseline=True)["metrics"]


def test_cli_examples_train_and_clean_errors(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=3)
    run = CliRunner()
    out = run.invoke(cli, ["experts", "examples", "--ds", ws[1].ds, "--surface", "live", "--lake", lake_uri])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["rows"] == lake.read("events", ds=ws[1].ds, surface="live").num_rows
    out = run.invoke(cli, ["experts", "train", "--ds", ws[1].ds, "--surface", "live", "--variant", "kd",
                           "--lake", lake_uri])
    assert out.exit_code == 0, out.output
    bad = run.invoke(cli, ["experts", "examples", "--ds", ws[2].ds, "--surface", "video", "--lake", lake_uri])
    assert bad.exit_code != 0 and "'video'" in bad.output
    lake.delete("fm_outputs", fm="small", ds=ws[2].ds, surface="feed")
    lake.delete("fm_outputs", fm="small", ds=ws[2].ds, surface="live")
    bad = run.invoke(cli, ["experts", "examples", "--ds", ws[2].ds, "--surface", "live", "--lake", lake_uri])
    assert bad.exit_code != 0 and "fm export" in bad.output  # the examples stage names the missing FM export
    bad = run.invoke(cli, ["experts", "train", "--ds", ws[2].ds, "--surface", "live", "--variant", "kd",
                           "--lake", lake_uri])
    # expert_train never builds expert_examples: it names the partition and the command that builds it (or, when
    # the command runs the examples stage first, that stage names the missing FM export)
    assert bad.exit_code != 0 and ("fmx experts examples --ds" in bad.output or "fm export" in bad.output)


def test_expert_train_never_writes_expert_examples(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=3)
    assert expert_train(ws[0].ds, "feed", "base", lake_uri)["skipped"]  # before the FM's first scores: a skip
    with pytest.raises(ExamplesMissing) as missing:
        expert_train(ws[1].ds, "feed", "base", lake_uri)
    message = str(missing.value)
    assert "\n" not in message and f"expert_examples(fm=small, ds={ws[1].ds}, surface=feed)" in message
    assert f"fmx experts examples --ds {ws[1].ds} --surface feed --preset small" in message
    assert not lake.exists("expert_examples", fm="small", ds=ws[1].ds, surface="feed")
    with pytest.raises(ExamplesMissing):
        compare_and_promote(ws[1].ds, "feed", lake_uri)


def _train_promote(uri: str, ds: str, variants: tuple[str, ...] = ("base", "loopfm")) -> dict:
    expert_examples(ds, "feed", uri)
    out = {v: expert_train(ds, "feed", v, uri, "small", pipeline_run="rr") for v in variants}
    out["promote"] = compare_and_promote(ds, "feed", uri, "small", pipeline_run="rr")
    for result in out.values():  # every stage returns strict JSON (NaN/inf -> null)
        json.dumps(result, allow_nan=False)
    return out


def _weights(lake, ds: str) -> dict:  # type: ignore[no-untyped-def]
    from experts.checkpoint import ckpt_relpath, load_checkpoint

    return load_checkpoint(lake, ckpt_relpath("small", "feed", "base", ds)).model


def test_rerunning_a_day_replaces_it_exactly_and_scores_models_of_the_day_before(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=5)
    _train_promote(lake_uri, ws[1].ds)  # cold start
    first2 = _train_promote(lake_uri, ws[2].ds)
    assert first2["promote"]["champion_ne"] is None  # no champion before ws[2]: null, not inf
    first3 = _train_promote(lake_uri, ws[3].ds)
    weights3 = _weights(lake, ws[3].ds)
    again3 = _train_promote(lake_uri, ws[3].ds)  # re-run at once: same models scored, same decision
    assert again3["promote"]["champion_ne"] == first3["promote"]["champion_ne"] is not None
    for key in ("base", "loopfm"):
        assert again3[key]["metrics"] == first3[key]["metrics"]
    assert again3["promote"]["scores"] == first3["promote"]["scores"]
    assert all(torch.equal(weights3[k], v) for k, v in _weights(lake, ws[3].ds).items())  # D's checkpoint replaced exactly
    _train_promote(lake_uri, ws[4].ds)
    serving = champion("feed", "small").version
    late3 = _train_promote(lake_uri, ws[3].ds)  # re-run of the past, after ws[4] ran: still the D-1 models
    assert late3["promote"]["champion_ne"] == first3["promote"]["champion_ne"]
    assert late3["promote"]["scores"] == first3["promote"]["scores"]
    assert late3["base"]["metrics"] == first3["base"]["metrics"]
    assert late3["promote"]["version"] is None and champion("feed", "small").version == serving  # no roll back
