"""loop_state is written and deleted by its owner alone (features.expert_examples): a state records the fm_version
of the fm_outputs it read, and one whose window was re-exported by another FM version is rebuilt, with every
later state, when an expert window next needs it (fm.export no longer deletes anything)."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq

from features.expert_examples import SOURCE_VERSION, build_expert_examples, expert_frame
from features.lake import DATA_FILE, Lake
from features.schemas import FM_OUTPUTS, LOOP_STATE
from tests.experts.synth import make_lake, write_fm


def _states(lake: Lake) -> list[str]:
    return [p["ds"] for p in lake.partitions(LOOP_STATE.name, fm="small")]


def _version(lake: Lake, ds: str) -> str:
    return lake.read(FM_OUTPUTS.name, columns=["fm_version"], fm="small", ds=ds, surface="feed")["fm_version"][0].as_py()


def test_each_state_records_the_fm_version_it_was_built_from(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=4)
    build_expert_examples(lake, ws[3], "feed", "small")
    assert _states(lake) == [ws[1].ds, ws[2].ds]
    for w in ws[1:3]:
        assert lake.file_metadata(LOOP_STATE.name, fm="small", ds=w.ds) == {SOURCE_VERSION: _version(lake, w.ds)}


def test_a_re_export_by_another_fm_version_rebuilds_that_state_and_every_later_one(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=4)
    build_expert_examples(lake, ws[3], "feed", "small")
    same = expert_frame(lake, ws[3], "feed", "small")  # every state current: nothing rebuilt, same rows
    write_fm(lake, ws[1], "small", version="small-2026-01-01-other")  # a re-export by another FM
    again = expert_frame(lake, ws[3], "feed", "small")
    assert _states(lake) == [ws[1].ds, ws[2].ds]
    for w in ws[1:3]:
        assert lake.file_metadata(LOOP_STATE.name, fm="small", ds=w.ds) == {SOURCE_VERSION: _version(lake, w.ds)}
    fresh_uri = lake_uri + "-fresh"
    fresh, _ = make_lake(fresh_uri, days=4)
    write_fm(fresh, ws[1], "small", version="small-2026-01-01-other")
    expected = expert_frame(fresh, ws[3], "feed", "small")  # built from scratch on the re-exported rows
    assert again.equals(expected) and same.height == again.height


def test_a_state_without_a_recorded_version_is_rebuilt(lake_uri: str) -> None:
    lake, ws = make_lake(lake_uri, days=3)
    build_expert_examples(lake, ws[2], "feed", "small")
    old = pl.from_arrow(lake.read(LOOP_STATE.name, fm="small", ds=ws[1].ds))
    lake.write(LOOP_STATE.name, old.head(1), fm="small", ds=ws[1].ds)  # as written before states recorded one
    build_expert_examples(lake, ws[2], "feed", "small")
    assert lake.read(LOOP_STATE.name, fm="small", ds=ws[1].ds).num_rows == old.height


def test_a_state_of_the_float32_history_schema_is_rebuilt(lake_uri: str) -> None:
    """A lake written before the history kept the FM's int8 codes holds states with float32 ``hist_repr``:
    derived data, rebuilt from fm_outputs when a window needs it, with the same rows as a fresh lake's."""
    lake, ws = make_lake(lake_uri, days=3)
    expected = expert_frame(lake, ws[2], "feed", "small")
    new = pl.from_arrow(lake.read(LOOP_STATE.name, fm="small", ds=ws[1].ds))
    width = new.schema["hist_code"].inner.size  # type: ignore[attr-defined]
    old = new.with_columns(pl.col("hist_code").cast(pl.List(pl.Array(pl.Float32, width))).alias("hist_repr"))
    path = f"{lake.partition_dir(LOOP_STATE.name, fm='small', ds=ws[1].ds)}/{DATA_FILE}"
    pq.write_table(old.drop("hist_code", "hist_scale").to_arrow(), path, filesystem=lake.fs)
    assert expert_frame(lake, ws[2], "feed", "small").equals(expected)
    assert lake.read(LOOP_STATE.name, fm="small", ds=ws[1].ds).column_names == LOOP_STATE.columns
