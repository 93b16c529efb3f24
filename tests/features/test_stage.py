"""The ingest stage wrapper and the data CLI commands (`fmx generate`, `fmx ingest`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from features.generate import GeneratorConfig, generate
from features.history import HISTORY_PAYLOAD, advance_state
from features.lake import Lake, PartitionNotFound, SchemaError
from features.schemas import TABLES
from features.stage import ingest, lake_windows
from fmx.cli import cli

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def _copy(tiny_lake: str, tmp_path: Path) -> str:
    """A private, writable copy of the session's tiny lake."""
    target = tmp_path / "lake"
    shutil.copytree(tiny_lake, target)
    return str(target)


def _events(lake: Lake, ds: str) -> pl.DataFrame:
    return lake.scan_many("events", lake.partitions("events", ds=ds)).collect().sort("event_id")


def test_ingest_generator_on_a_new_lake(lake_uri: str) -> None:
    out = ingest(DAYS[0], lake_uri, source="generator", scale="tiny", seed=0)
    lake = Lake(lake_uri)
    assert out == {"ds": DAYS[0], "surfaces": ["feed", "live", "search", "video"],
                   "rows": _events(lake, DAYS[0]).height, "source": "generator"}
    json.dumps(out)
    assert lake.meta()["origin"] == DAYS[0]
    history = lake.scan("user_history", ds=DAYS[0]).collect()
    assert history["user_id"].n_unique() == _events(lake, DAYS[0])["user_id"].n_unique() == history.height


def test_ingest_generator_fills_gaps_and_matches_generate(tiny_lake: str, lake_uri: str) -> None:
    ingest(DAYS[0], lake_uri, scale="tiny")
    out = ingest(DAYS[2], lake_uri, scale="tiny")  # day 2 is generated first: day 3 carries over from it
    lake, reference = Lake(lake_uri), Lake(tiny_lake)
    assert lake_windows(lake_uri) == DAYS and out["rows"] == _events(reference, DAYS[2]).height
    for ds in DAYS:
        assert _events(lake, ds).equals(_events(reference, ds))
        assert lake.exists("user_history", ds=ds)
    # the state after 3 windows equals the state built from all 3 days at once
    all_events = pl.concat([_events(reference, ds) for ds in DAYS]).lazy()
    direct = advance_state(all_events, None, 50, HISTORY_PAYLOAD).collect().sort("user_id")
    chained = lake.scan("user_history", ds=DAYS[2]).collect().sort("user_id")
    assert chained.select(direct.columns).equals(direct.with_columns(pl.col("hist_ts").list.eval(
        pl.element().cast(chained.schema["hist_ts"].inner))))  # type: ignore[union-attr]


def test_ingest_lake_source_validates_and_builds_history(tiny_lake: str, tmp_path: Path) -> None:
    uri = _copy(tiny_lake, tmp_path)
    out = ingest(DAYS[1], uri, source="lake")
    lake = Lake(uri)
    assert out["rows"] == _events(lake, DAYS[1]).height and out["source"] == "lake"
    assert lake.exists("user_history", ds=DAYS[0]) and lake.exists("user_history", ds=DAYS[1])
    assert not lake.exists("user_history", ds=DAYS[2])


def test_ingest_lake_source_missing_window(tiny_lake: str, tmp_path: Path) -> None:
    uri = _copy(tiny_lake, tmp_path)
    with pytest.raises(PartitionNotFound, match=f"no events for window ds=2026-02-01 in lake {uri}"):
        ingest("2026-02-01", uri, source="lake")


def test_ingest_lake_source_rejects_bad_schema(tiny_lake: str, tmp_path: Path) -> None:
    uri = _copy(tiny_lake, tmp_path)
    lake = Lake(uri)
    path = Path(lake.partition_dir("events", ds=DAYS[1], surface="video")) / "data.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("click"), "click", table["click"].cast("float64")),
                   path)
    with pytest.raises(SchemaError, match=f"partition ds={DAYS[1]}/surface=video: column 'click' has type double"):
        ingest(DAYS[1], uri, source="lake")


def test_ingest_rejects_bad_source_and_day(lake_uri: str) -> None:
    with pytest.raises(ValueError, match="unknown source 'kafka'"):
        ingest(DAYS[0], lake_uri, source="kafka")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        ingest("01/02/2026", lake_uri)


def test_source_auto_is_what_the_lake_holds(tiny_lake: str, lake_uri: str) -> None:
    from features.lake import Lake
    from features.stage import resolve_source

    assert resolve_source(lake_uri) == "generator"  # a new lake
    assert resolve_source(tiny_lake) == "generator" and resolve_source(tiny_lake, "lake") == "lake"
    Lake(lake_uri).update_meta(source="movielens", window_days=7, origin="1997-09-20")
    assert resolve_source(lake_uri) == "lake"
    with pytest.raises(ValueError, match="holds imported 'movielens' windows"):
        resolve_source(lake_uri, "generator")


def test_no_stage_accepts_a_lake_whose_import_did_not_complete(tiny_lake: str, tmp_path: Path) -> None:
    import shutil

    from features.lake import Lake
    from features.stage import plan_surfaces

    uri = str(tmp_path / "killed")
    shutil.copytree(tiny_lake, uri)
    Lake(uri).update_meta(import_state="running", import_id="log-0123", import_command="fmx import custom x")
    for stage in (lambda: ingest(DAYS[0], uri, source="lake"), lambda: plan_surfaces(DAYS[0], uri)):
        with pytest.raises(ValueError, match="the import log-0123 started .* did not complete; re-run `fmx import"):
            stage()


def test_lake_windows(tiny_lake: str, lake_uri: str) -> None:
    assert lake_windows(tiny_lake) == DAYS
    assert lake_windows(lake_uri) == []


def test_cli_generate_and_ingest(tmp_path: Path) -> None:
    uri = str(tmp_path / "cli-lake")
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", "--days", "3", "--scale", "tiny", "--seed", "2", "--lake", uri])
    assert result.exit_code == 0, result.output
    assert result.output.count("generated 2026-01-0") == 3 and "bayes auc" in result.output
    lake = Lake(uri)
    for table in ("events", "users", "items"):
        for part in lake.partitions(table):
            assert lake.read(table, **part).column_names == TABLES[table].columns
    assert lake_windows(uri) == DAYS
    reference = Lake(str(tmp_path / "ref"))
    generate(reference, GeneratorConfig(scale="tiny", seed=2), days=3, progress=None)
    assert _events(lake, DAYS[2]).equals(_events(reference, DAYS[2]))

    result = runner.invoke(cli, ["ingest", "--ds", DAYS[2], "--source", "lake", "--lake", uri])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ds"] == DAYS[2]
    bad = runner.invoke(cli, ["ingest", "--ds", "2030-01-01", "--source", "lake", "--lake", uri])
    assert bad.exit_code == 1 and "no events for window ds=2030-01-01" in bad.output
    clash = runner.invoke(cli, ["generate", "--days", "1", "--scale", "small", "--lake", uri])
    assert clash.exit_code == 1 and "was generated with" in clash.output
