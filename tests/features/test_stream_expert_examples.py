"""Streamed expert_examples (chunked, carried states) equal the in-memory ones."""

from __future__ import annotations

import polars as pl
import pytest

from features.expert_examples import build_expert_examples, expert_frame, stream_expert_frames
from features.lake import Lake
from fm.export import export_fm
from fm.train import train_fm
from tests.fm.conftest import make_lake, tiny_cfg


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Lake, list]:
    uri = str(tmp_path_factory.mktemp("lake"))
    windows = make_lake(uri, 3, events_per_day=600)
    lake = Lake(uri)
    cfg = tiny_cfg()
    for w in windows[:2]:
        train_fm(cfg, w, lake)
    for w in windows[1:]:
        export_fm(cfg, w, lake)
    return lake, windows


@pytest.mark.parametrize("day", [1, 2])
def test_streamed_expert_examples_equal_the_in_memory_frame(scored, day: int) -> None:
    lake, windows = scored
    w = windows[day]
    for surface in [p["surface"] for p in lake.partitions("fm_outputs", fm="small", ds=w.ds)]:
        whole = expert_frame(lake, w, surface, "small")
        chunks = list(stream_expert_frames(lake, w, surface, "small", chunk_rows=48))
        assert len(chunks) > 2 and max(c.height for c in chunks) <= 2 * 48 + 8
        streamed = pl.concat(chunks, how="diagonal_relaxed").select(whole.columns)
        assert streamed.equals(whole), surface
        build_expert_examples(lake, w, surface, "small", chunk_rows=48)
        written = pl.from_arrow(lake.read("expert_examples", fm="small", ds=w.ds, surface=surface))
        build_expert_examples(lake, w, surface, "small", chunk_rows=None)
        assert written.equals(pl.from_arrow(lake.read("expert_examples", fm="small", ds=w.ds, surface=surface)))
