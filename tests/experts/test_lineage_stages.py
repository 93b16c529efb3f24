"""The stages feed the lineage runs (issue 13): expert_train, the counting reference and the FM's export each
leave one lineage run per (preset, surface, variant) stepped by day, whose running means are `fmx compare`'s
figures; the NE-by-day plot of a variant has base and the FM beside it."""

from __future__ import annotations

import json

import mlflow
import pytest
from click.testing import CliRunner

from common.lineage_runs import LINEAGE_TAG, lineage_experiment
from common.tracking import experiment_id
from experts.progressive import ne_history
from experts.reference import reference_eval
from experts.stage import expert_examples, expert_train
from features.lake import Lake
from tests.experts.synth import make_lake


def _lineage(key: str) -> mlflow.entities.Run:
    (run,) = mlflow.MlflowClient().search_runs([experiment_id(lineage_experiment())], f"tags.`{LINEAGE_TAG}` = '{key}'")
    return run


def test_expert_and_reference_days_make_lineages_that_match_compare(lake_uri: str) -> None:
    from fmx.cli import cli

    lake, ws = make_lake(lake_uri, days=4)
    for w in ws[1:]:
        expert_examples(w.ds, "feed", lake_uri)
        for variant in ("base", "kd"):
            expert_train(w.ds, "feed", variant, lake_uri, pipeline_run="t1")
        reference_eval(w.ds, "feed", lake_uri, pipeline_run="t1")
    out = CliRunner().invoke(cli, ["compare", "--surface", "feed", "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = {r["variant"]: r for r in json.loads(out.output)}
    client = mlflow.MlflowClient()
    for variant in ("base", "kd", "ref"):
        run = _lineage(f"small/feed/{variant}")
        evaluated = [w for w in ws[1:] if variant == "ref" or w != ws[1]]  # experts: day 1 is a cold start
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "ne"))
        assert [s for s, _ in history] == [Lake(lake_uri).step(w) for w in evaluated]
        for col in ("ne", "auc", "calibration"):
            assert run.data.metrics[f"mean_{col}"] == pytest.approx(rows[variant][col], rel=1e-9), (variant, col)
        assert run.data.metrics["days"] == rows[variant]["days"] == len(evaluated)
    kd = _lineage("small/feed/kd").data.metrics
    assert kd["mean_gap_closure"] == pytest.approx(rows["kd"]["gap_closure"], rel=1e-9)

    series = ne_history(lake, "small", "feed", "kd", ws[-1])
    assert list(series) == ["kd", "base", "FM small"]
    assert set(series["base"]) == set(series["kd"]) == {w.ds for w in ws[2:]}
