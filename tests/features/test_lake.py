"""Lake contracts: casting and rejection on write, schema checks on read, exact replacement, kill safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.lake import DATA_FILE, TMP_PREFIX, Lake, PartitionNotFound, SchemaError

REPO = Path(__file__).resolve().parents[2]
DS = "2026-01-01"


def _events(n: int, surface: str = "feed", start: int = 0) -> pl.DataFrame:
    """Events rows with loose types the writer must cast (int32 ids, bool click, all-null like, extra column)."""
    return pl.DataFrame({
        "event_id": pl.Series(range(start, start + n), dtype=pl.Int32),
        "ts": pl.Series([1_767_225_600_000_000 + i for i in range(n)]).cast(pl.Datetime("us", "UTC")),
        "user_id": pl.Series([i % 7 for i in range(n)], dtype=pl.Int32),
        "item_id": list(range(n)),
        "surface": [surface] * n,
        "click": [i % 2 == 0 for i in range(n)],
        "like": [None] * n,
        "position": [0] * n,
        "device": [1] * n,
        "p_click": [0.5] * n,
        "extra": ["dropped"] * n,
    })


def _files(lake: Lake, **keys: str) -> list[str]:
    return sorted(os.listdir(lake.partition_dir("events", **keys)))


def test_write_casts_to_declared_schema(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    lake.write("events", _events(10), ds=DS, surface="feed")
    table = lake.read("events", ds=DS, surface="feed")
    assert table.column_names == [c for c in _events(1).columns if c != "extra"]
    assert table.schema.field("event_id").type == pa.int64() and table.schema.field("click").type == pa.int8()
    assert table.schema.field("position").type == pa.int16() and table.schema.field("like").nullable
    assert table["click"].to_pylist()[:3] == [1, 0, 1]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda df: df.drop("item_id"), "column 'item_id' is missing"),
        (lambda df: df.with_columns(pl.lit(None, pl.Int64).alias("user_id")), "column 'user_id' has 3 null values"),
        (lambda df: df.with_columns(pl.lit("abc").alias("position")), "column 'position' cannot be cast"),
        (lambda df: df.with_columns(pl.lit("search").alias("surface")), "column 'surface' holds \\['search'\\]"),
    ],
)
def test_write_rejects_bad_input_naming_table_partition_column(lake_uri: str, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    lake = Lake(lake_uri)
    with pytest.raises(SchemaError, match=f"table 'events' partition ds={DS}/surface=feed: {message}"):
        lake.write("events", mutate(_events(3)), ds=DS, surface="feed")
    assert not lake.exists("events", ds=DS, surface="feed")


def test_write_rejects_unknown_table_and_keys(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    with pytest.raises(ValueError, match="unknown table 'evnts'"):
        lake.write("evnts", _events(3), ds=DS)
    with pytest.raises(ValueError, match="partitioned by \\('ds', 'surface'\\)"):
        lake.write("events", _events(3), ds=DS)


def test_read_checks_schema_of_foreign_files(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    directory = Path(lake.partition_dir("events", ds=DS, surface="feed"))
    directory.mkdir(parents=True)
    bad = _events(3).drop("extra").with_columns(pl.col("event_id", "user_id").cast(pl.Int64), pl.col("item_id").cast(pl.String))
    pq.write_table(bad.to_arrow(), directory / DATA_FILE)
    with pytest.raises(SchemaError, match=f"partition ds={DS}/surface=feed: column 'item_id' has type"):
        lake.read("events", ds=DS, surface="feed")
    with pytest.raises(SchemaError, match="column 'item_id'"):
        lake.scan("events", ds=DS, surface="feed")
    with pytest.raises(PartitionNotFound, match=f"surface=live does not exist in lake {lake_uri}"):
        lake.read("events", ds=DS, surface="live")


def test_rerun_replaces_partition_exactly(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    lake.write("events", _events(100), ds=DS, surface="feed")
    lake.write("events", _events(40, start=1000), ds=DS, surface="feed")
    lake.write("events", _events(5, surface="live"), ds=DS, surface="live")
    lake.write("events", _events(40, start=1000), ds=DS, surface="feed")  # the same re-run, again
    got = lake.scan("events", ds=DS, surface="feed").collect()
    assert got.height == 40 and got["event_id"].to_list() == list(range(1000, 1040))
    assert _files(lake, ds=DS, surface="feed") == [DATA_FILE]
    assert lake.partitions("events") == [{"ds": DS, "surface": "feed"}, {"ds": DS, "surface": "live"}]
    assert lake.scan("events", ds=DS, surface="live").collect().height == 5


_BIG_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, pyarrow as pa
    from features.lake import Lake
    n = 3_000_000  # ~100 MB of incompressible columns: the write takes long enough to be killed midway
    rng = np.random.default_rng(0)
    ids = pa.array(rng.integers(0, 2**62, n))
    table = pa.table({
        "event_id": ids, "ts": pa.array(rng.integers(0, 2**50, n)).cast(pa.timestamp("us", tz="UTC")),
        "user_id": pa.array(rng.integers(0, 2**62, n)), "item_id": pa.array(rng.integers(0, 2**62, n)),
        "surface": pa.array(["feed"] * n), "click": pa.array(rng.integers(0, 2, n).astype(np.int8)),
        "like": pa.nulls(n, pa.int8()), "position": pa.array(rng.integers(0, 50, n).astype(np.int16)),
        "device": pa.array(rng.integers(0, 4, n).astype(np.int8)),
        "p_click": pa.array(rng.random(n).astype(np.float32)),
    })
    print("writing", flush=True)
    Lake(sys.argv[1]).write("events", table, ds=sys.argv[2], surface="feed")
    print("finished", flush=True)
    """
)


def _tmp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_sigkill_during_write_leaves_previous_partition(lake_uri: str, tmp_path: Path) -> None:
    lake = Lake(lake_uri)
    lake.write("events", _events(50), ds=DS, surface="feed")
    before = lake.scan("events", ds=DS, surface="feed").collect()
    directory = Path(lake.partition_dir("events", ds=DS, surface="feed"))
    script = tmp_path / "writer.py"
    script.write_text(_BIG_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), lake_uri, DS], env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not _tmp_files(directory):
            assert proc.poll() is None, "the writer finished before its temporary file was seen"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert b"finished" not in (proc.stdout.read() if proc.stdout else b"")
    assert _tmp_files(directory), "the killed write left no temporary file (so nothing was tested)"
    assert lake.scan("events", ds=DS, surface="feed").collect().equals(before)  # readers ignore the stray file
    assert lake.partitions("events") == [{"ds": DS, "surface": "feed"}]
    lake.write("events", _events(7), ds=DS, surface="feed")
    assert _files(lake, ds=DS, surface="feed") == [DATA_FILE]  # the next write cleaned the stray file
    assert lake.scan("events", ds=DS, surface="feed").collect().height == 7


def test_meta_round_trip(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    assert lake.meta() == {}
    lake.update_meta(window_days=1, surfaces=["feed"])
    assert lake.update_meta(source="generator") == {"window_days": 1, "surfaces": ["feed"], "source": "generator"}
    assert Lake(lake_uri).meta()["source"] == "generator"
