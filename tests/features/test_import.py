"""Importer: MovieLens-100K end to end, KuaiRand fixture with bad rows, and a custom mapping file."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from features.importers import ImportFailed, import_source
from features.lake import Lake
from features.schemas import TABLES
from fmx.cli import cli
from tests.conftest import require_ml100k

KUAIRAND = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand"


def _all_partitions_pass_schema(lake: Lake) -> int:
    checked = 0
    for table in ("events", "users", "items", "user_history", "quarantine"):
        for keys in lake.partitions(table):
            assert lake.read(table, **keys).schema.names == TABLES[table].columns
            checked += 1
    return checked


def _events(lake: Lake) -> pl.DataFrame:
    return lake.scan_many("events", lake.partitions("events")).collect().sort("event_id")


def test_movielens_100k_import(lake_uri: str) -> None:
    source = require_ml100k()
    result = import_source("movielens", str(source), lake_uri)
    lake = Lake(lake_uri)
    events = _events(lake)
    assert result["rows"] == 100_000 and result["events"] + result["quarantined"] == 100_000
    assert events.height == result["events"] and events["event_id"].n_unique() == events.height
    assert 0.5 < events["click"].mean() < 0.6  # ratings >= 4 are 55.4% of ML-100K  # type: ignore[operator]
    assert set(events["surface"].unique()) == {"action", "comedy", "drama", "family", "thriller"}
    days = sorted(p["ds"] for p in lake.partitions("users"))
    assert all(
        date.fromisoformat(b) - date.fromisoformat(a) == timedelta(days=7)
        for a, b in zip(days, days[1:], strict=False)
    )
    for keys in lake.partitions("events"):  # every event lies inside its partition's 7-day window
        part = lake.read("events", **keys).to_pydict()
        start = date.fromisoformat(keys["ds"])
        assert all(start <= ts.date() < start + timedelta(days=7) for ts in part["ts"])
    assert _all_partitions_pass_schema(lake) > 100
    meta = lake.meta()
    assert meta["window_days"] == 7 and meta["source"] == "movielens" and meta["origin"] == days[0]
    last_users = lake.read("users", ds=days[-1]).to_pydict()
    assert (
        len(last_users["user_id"]) == 943 and min(last_users["segment"]) >= 1
    )  # every user has side features
    again = import_source("movielens", str(source), lake_uri)  # idempotent: same ids, same partitions
    assert again["import_id"] == result["import_id"]
    assert _events(lake).equals(events)


def test_kuairand_fixture_quarantines_bad_rows(lake_uri: str) -> None:
    result = import_source("kuairand", str(KUAIRAND), lake_uri, max_bad_share=0.05)
    lake = Lake(lake_uri)
    bad = pl.from_arrow(lake.read("quarantine", import_id=result["import_id"]))
    assert isinstance(bad, pl.DataFrame)
    reasons = dict(zip(bad["source_line"].to_list(), bad["reason"].to_list(), strict=True))
    assert reasons == {
        41: "duplicate event (same user_id, item_id, ts)",
        78: "bad type: user_id is not an integer",
        121: "missing item_id (column video_id)",
        151: "timestamp out of range [1990-01-01, 2100-01-01)",
        181: "wrong number of fields: 4 (expected 19)",
    }
    assert bad.filter(pl.col("source_line") == 181)["raw"].item() == "5,12,20220405,1200"
    assert result["rows"] == 201 and result["events"] == 196
    events = _events(lake)
    assert set(events["surface"].unique()) <= {"tab0", "tab1", "tab2", "tab3", "tab4", "tab_other"}
    assert events["click"].sum() > 0 and events["like"].null_count() == 0
    _all_partitions_pass_schema(lake)


def test_too_many_bad_rows_fails_clearly_and_writes_no_events(lake_uri: str) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["import", "kuairand", str(KUAIRAND), "--lake", lake_uri])
    assert out.exit_code != 0
    assert "5 of 201 rows are bad (2.49%, threshold 1.00%)" in out.output
    assert "timestamp out of range" in out.output and "quarantine/import_id=kuairand-" in out.output
    lake = Lake(lake_uri)
    assert lake.partitions("events") == [] and lake.partitions("user_history") == [] and lake.meta() == {}
    assert len(lake.partitions("quarantine")) == 1  # the evidence is kept


def test_custom_csv_with_a_mapping_file_needs_no_code(tmp_path: Path, lake_uri: str) -> None:
    log = tmp_path / "clicks.csv"
    log.write_text(
        "who;what;when;action;where\n"
        "1;10;2026-03-01 10:00:00;clicked;app\n"
        "1;11;2026-03-01 11:00:00;viewed;web\n"
        "2;10;2026-03-02 09:30:00;clicked;app\n"
        "2;12;2026-03-04 23:59:59;viewed;app\n"
    )
    mapping = tmp_path / "clicks.toml"
    mapping.write_text(
        'name = "shop"\nwindow = "2d"\n'
        '[events]\nfiles = ["*.csv"]\ndelimiter = ";"\n'
        '[fields]\nuser_id = "who"\nitem_id = "what"\nts = "when"\nts_format = "%Y-%m-%d %H:%M:%S"\n'
        "click = \"action = 'clicked'\"\n"
        '[surface]\ncolumn = "where"\nvalues = { app = "mobile", web = "desktop" }\n'
    )
    out = CliRunner().invoke(
        cli, ["import", "custom", str(tmp_path), "--mapping", str(mapping), "--lake", lake_uri]
    )
    assert out.exit_code == 0, out.output
    lake = Lake(lake_uri)
    assert [p["ds"] for p in lake.partitions("users")] == ["2026-03-01", "2026-03-03"]
    events = _events(lake)
    assert events["click"].to_list() == [1, 0, 1, 0]
    assert events["surface"].to_list() == ["mobile", "desktop", "mobile", "mobile"]
    assert events["event_id"].to_list() == [0, 1, 2, 1 << 32]  # (window ordinal << 32) | rank
    with pytest.raises(ImportFailed, match="already holds source='shop' window_days=2"):
        import_source("custom", str(tmp_path), lake_uri, str(mapping), window="1d")
