"""Importer and the lake as a whole: far-off rows quarantined, re-import replaces completely (derived
tables and models included), a SIGKILLed import leaves a lake `require_complete_import` refuses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.importers import ImportFailed, import_source, require_complete_import
from features.lake import DATA_FILE, Lake

REPO = Path(__file__).resolve().parents[2]
START = date(2026, 3, 1)
MAPPING = """name = "shop"
[events]
files = ["*.csv"]
[fields]
user_id = "uid"
item_id = "iid"
ts = "ts"
ts_format = "%Y-%m-%d %H:%M:%S"
click = "clicked"
[surface]
column = "where"
"""
DERIVED = {
    "fm_outputs": {"fm": "small", "surface": "app"},
    "user_embeddings": {"fm": "small"},
    "item_embeddings": {"fm": "small"},
    "loop_state": {"fm": "small"},
    "expert_examples": {"fm": "small", "surface": "app"},
}


def _log(folder: Path, days: int, web_days: tuple[int, ...] = (), extra: tuple[str, ...] = ()) -> Path:
    """`days` days of 3 'app' events each (+ one 'web' event on `web_days`), then `extra` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["uid,iid,ts,clicked,where"]
    for d in range(days):
        day = START + timedelta(days=d)
        lines += [f"{u},{10 + u},{day} 1{u}:00:00,{'true' if u % 2 else 'false'},app" for u in range(1, 4)]
        lines += [f"9,19,{day} 20:00:00,true,web"] if d in web_days else []
    (folder / "log.csv").write_text("\n".join([*lines, *extra]) + "\n")
    (folder.parent / "m.toml").write_text(MAPPING)
    return folder


def _ds(lake: Lake, table: str) -> list[str]:
    return sorted({p["ds"] for p in lake.partitions(table)})


def test_far_off_rows_are_quarantined_not_years_of_windows(tmp_path: Path, lake_uri: str) -> None:
    src = _log(
        tmp_path / "src", 3, extra=("4,40,2036-03-02 10:00:00,true,app", "5,50,2016-03-01 10:00:00,true,app")
    )
    result = import_source("custom", str(src), lake_uri, str(tmp_path / "m.toml"), max_bad_share=0.2)
    assert result["windows"] == 3 and result["events"] == 9 and result["quarantined"] == 2
    bad = Lake(lake_uri).read("quarantine", import_id=result["import_id"]).to_pylist()
    rule = "(rule: rows cut off from the bulk by a gap of more than max_gap_days=60 days)"
    assert [(r["source_line"], r["reason"]) for r in bad] == [
        (10, f"timestamp 2036-03-02 lies 3652 days after the log's bulk 2026-03-01..2026-03-03 {rule}"),
        (11, f"timestamp 2016-03-01 lies 3652 days before the log's bulk 2026-03-01..2026-03-03 {rule}"),
    ]
    assert _ds(Lake(lake_uri), "users") == ["2026-03-01", "2026-03-02", "2026-03-03"]


def _fake_derived(lake: Lake) -> None:
    for table, keys in DERIVED.items():
        directory = lake.partition_dir(table, ds="2026-03-02", **keys)
        os.makedirs(directory)
        pq.write_table(pa.table({"x": [1]}), f"{directory}/{DATA_FILE}")
    lake.write_bytes("models/fm/small/ds=2026-03-02/final.pt", b"weights")
    lake.write_bytes("models/experts/small/app/champion", b"{}")


def test_reimport_replaces_the_previous_import_completely(tmp_path: Path, lake_uri: str) -> None:
    mapping, lake = str(tmp_path / "m.toml"), Lake(lake_uri)
    first = import_source("custom", str(_log(tmp_path / "v1", 5, web_days=(1, 3, 4))), lake_uri, mapping)
    _fake_derived(lake)
    same = import_source("custom", str(tmp_path / "v1"), lake_uri, mapping)  # same data: nothing is stale
    assert same["import_id"] == first["import_id"] and same["replaced"] == {}
    assert len(lake.partitions("fm_outputs")) == 1 and lake.file_exists(
        "models/fm/small/ds=2026-03-02/final.pt"
    )

    shorter = import_source("custom", str(_log(tmp_path / "v2", 3)), lake_uri, mapping)  # no 'web' at all
    three = ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert shorter["windows"] == 3 and all(
        _ds(lake, t) == three for t in ("events", "users", "items", "user_history")
    )
    assert [p["surface"] for p in lake.partitions("events")] == ["app"] * 3
    assert all(lake.partitions(t) == [] for t in DERIVED) and not os.path.exists(lake.path("models"))
    assert shorter["replaced"] == {
        "events": 5,
        "users": 2,
        "items": 2,
        "user_history": 2,
        **dict.fromkeys(DERIVED, 1),
        "models": 2,
    }
    events = lake.scan_many("events", lake.partitions("events")).collect()
    assert events.height == 9 and lake.meta()["last_ds"] == "2026-03-03"
    assert lake.meta()["import_id"] == shorter["import_id"] and lake.meta()["import_state"] == "complete"
    later = tmp_path / "v3"  # another origin (first day) is another lake
    later.mkdir()
    (later / "log.csv").write_text("uid,iid,ts,clicked,where\n1,10,2026-03-02 10:00:00,true,app\n")
    with pytest.raises(
        ImportFailed, match="origin=2026-03-01; this import is source='shop' window_days=1 origin=2026-03-02"
    ):
        import_source("custom", str(later), lake_uri, mapping)


def test_killed_import_leaves_a_lake_no_stage_accepts(tmp_path: Path, lake_uri: str) -> None:
    src, mapping = _log(tmp_path / "big", 1500), str(tmp_path / "m.toml")  # 1,500 windows: seconds to write
    code = f"from features.importers import import_source; import_source('custom', {str(src)!r}, {lake_uri!r}, {mapping!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    lake = Lake(lake_uri)
    try:
        deadline = time.monotonic() + 60
        while len(lake.partitions("users")) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the import ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    meta, written = lake.meta(), len(lake.partitions("users"))
    assert meta["import_state"] == "running" and "source" not in meta and 3 <= written < 1500
    with pytest.raises(
        ValueError,
        match=rf"the import {meta['import_id']} started at .* did not complete; re-run `fmx import custom ",
    ):
        require_complete_import(lake)
    # a complete import (here a shorter log) clears it and removes the killed import's windows
    done = import_source("custom", str(_log(tmp_path / "small", 2)), lake_uri, mapping)
    require_complete_import(lake)
    assert _ds(lake, "users") == ["2026-03-01", "2026-03-02"] and done["replaced"]["users"] == written - 2


def test_require_complete_import_accepts_generated_and_imported_lakes(tmp_path: Path, tiny_lake: str) -> None:
    require_complete_import(Lake(tiny_lake))  # generated: no import_state
    require_complete_import(Lake(str(tmp_path / "empty")))
    lake = Lake(str(tmp_path / "lake"))
    import_source("custom", str(_log(tmp_path / "src", 2)), lake.uri, str(tmp_path / "m.toml"))
    require_complete_import(lake)
    assert pl.from_arrow(lake.read("users", ds="2026-03-02")).height == 3  # type: ignore[union-attr]
