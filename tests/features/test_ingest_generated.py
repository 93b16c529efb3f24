"""ingest on a generated lake uses the lake's own generator settings and leaves complete windows alone."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl

from features.generate import GeneratorConfig, generate
from features.lake import Lake
from features.stage import generator_config, ingest

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
MADE = GeneratorConfig(scale="tiny", seed=3, surfaces=("feed", "video"), events_per_day=700)


def _events(lake: Lake, ds: str) -> pl.DataFrame:
    return lake.scan_many("events", lake.partitions("events", ds=ds)).collect().sort("event_id")


def _files(root: Path, ds: str) -> dict[str, int]:
    """The generator's files of window ds (events, users, items) and when each was written."""
    found = [p for t in ("events", "users", "items") for p in sorted(root.glob(f"{t}/ds={ds}/**/*.parquet"))]
    return {str(p): p.stat().st_mtime_ns for p in found}


def test_the_lakes_generator_wins_over_the_param_defaults(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    generate(lake, MADE, days=2, start=date.fromisoformat(DAYS[0]), progress=None)
    before = {ds: _files(tmp_path / "lake", ds) for ds in DAYS[:2]}
    assert generator_config(lake) == MADE
    assert generator_config(Lake(str(tmp_path / "new")), "tiny", 1) == GeneratorConfig(scale="tiny", seed=1)

    out = ingest(DAYS[1], lake.uri)  # the Params' defaults: scale small, seed 0
    assert out["rows"] == _events(lake, DAYS[1]).height and out["surfaces"] == ["feed", "video"]
    assert {ds: _files(tmp_path / "lake", ds) for ds in DAYS[:2]} == before  # complete windows untouched

    ingest(DAYS[2], lake.uri, scale="small", seed=0)  # a new window: made with the lake's settings
    reference = Lake(str(tmp_path / "reference"))
    generate(reference, MADE, days=3, start=date.fromisoformat(DAYS[0]), progress=None)
    assert _events(lake, DAYS[2]).equals(_events(reference, DAYS[2]))
    assert lake.meta()["generator"] == reference.meta()["generator"]


def test_an_incomplete_window_is_generated_again(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    generate(lake, MADE, days=1, start=date.fromisoformat(DAYS[0]), progress=None)
    expected = _events(lake, DAYS[0])
    (tmp_path / "lake" / "items" / f"ds={DAYS[0]}" / "data.parquet").unlink()  # killed before its last write
    ingest(DAYS[0], lake.uri)
    assert lake.exists("items", ds=DAYS[0]) and _events(lake, DAYS[0]).equals(expected)
