"""Streaming windows (fm.stream): the same examples as the in-memory path, in bounded pieces."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from features.lake import Lake
from fm import stream
from fm.data import BATCH_KEYS, load_window
from tests.fm.conftest import make_lake, tiny_cfg


@pytest.fixture(scope="module")
def lake2(tmp_path_factory) -> tuple[Lake, list]:
    uri = str(tmp_path_factory.mktemp("lake"))
    windows = make_lake(uri, 2, events_per_day=700)
    return Lake(uri), windows


def _by_event(event_id: np.ndarray, tensors: dict) -> dict:
    order = np.argsort(event_id, kind="stable")
    return {k: v[torch.from_numpy(order)] for k, v in tensors.items()}


def test_streamed_chunks_equal_the_in_memory_window(lake2) -> None:
    lake, windows = lake2
    cfg = tiny_cfg(stream_chunk=64)  # ~11 chunks per window
    for w in windows:
        whole = load_window(lake, w, cfg)
        chunks = list(stream.iter_window_data(lake, w, cfg))
        assert len(chunks) > 5
        ids = np.concatenate([c.event_id for c in chunks])
        assert sorted(ids.tolist()) == whole.event_id.tolist()
        got = _by_event(ids, {k: torch.cat([c.tensors[k] for c in chunks]) for k in BATCH_KEYS})
        for k in BATCH_KEYS:
            assert torch.equal(got[k], whole.tensors[k]), k


def test_chunks_are_bounded_by_the_chunk_size(lake2) -> None:
    lake, windows = lake2
    cfg = tiny_cfg(stream_chunk=64)
    sizes = [len(c) for c in stream.iter_window_data(lake, windows[1], cfg)]
    # each source buffers at most two batches of chunk/parts rows (plus one tie group, a few rows here)
    assert max(sizes) <= 2 * cfg.stream_chunk + 8, sizes
    assert sum(sizes) == len(load_window(lake, windows[1], cfg))


def test_shuffled_stream_covers_every_row_once_and_holds_bounded_rows(lake2) -> None:
    lake, windows = lake2
    cfg = tiny_cfg(stream_chunk=64, shuffle_rows=32, shuffle_buffer=2, stream_shards=4, batch_size=40)
    info = stream.build_cache(lake, cfg, windows[1])
    assert info.rows == len(load_window(lake, windows[1], cfg))
    whole = stream.ExampleStream(lake, info, cfg, windows[1].ds)
    seen = torch.cat([whole.local_batch(s)["user_id"] for s in range(whole.n_steps)])
    assert len(seen) == info.rows
    assert whole.max_rows_held <= 4 * 2 * 2 * 32  # shards x two buffers x buffer groups x group rows
    # two ranks: disjoint shards, and their parts make the single-process global batch
    ranks = [stream.ExampleStream(lake, info, cfg, windows[1].ds, rank=r, world=2) for r in range(2)]
    for s in range(whole.n_steps):
        glob = whole.local_batch(s)
        parts = [r.local_batch(s) for r in ranks]
        assert len(glob["item_id"]) == whole.global_count(s)
        for k in BATCH_KEYS:
            assert torch.equal(torch.cat([p[k] for p in parts]), glob[k])
    again = stream.ExampleStream(lake, info, cfg, windows[1].ds)
    assert torch.equal(again.local_batch(3)["item_id"], whole.local_batch(3)["item_id"])
    other = stream.ExampleStream(lake, info, replace(cfg, seed=1), windows[1].ds)
    assert not torch.equal(other.local_batch(0)["item_id"], whole.local_batch(0)["item_id"])
    stream.remove_cache(lake, cfg, windows[1])
    assert stream.load_cache(lake, cfg, windows[1]) is None


def test_streamed_export_equals_the_in_memory_export(tmp_path, lake2) -> None:
    import shutil

    import polars as pl

    from fm.export import export_fm
    from fm.train import train_fm

    lake, windows = lake2
    cfg = tiny_cfg(stream_chunk=64)
    train_fm(replace(cfg, stream=False), windows[0], lake)
    other = Lake(str(tmp_path / "copy"))
    shutil.copytree(lake.uri, other.uri)
    mem = export_fm(replace(cfg, stream=False), windows[1], lake)
    got = export_fm(cfg, windows[1], other)
    assert got.rows == mem.rows and got.fm_version == mem.fm_version
    for s in mem.rows:
        a = pl.from_arrow(lake.read("fm_outputs", fm="small", ds=windows[1].ds, surface=s)).sort("event_id")
        b = pl.from_arrow(other.read("fm_outputs", fm="small", ds=windows[1].ds, surface=s)).sort("event_id")
        assert a.select("event_id", "ts", "user_id", "item_id", "fm_version").equals(
            b.select("event_id", "ts", "user_id", "item_id", "fm_version"))
        for col in ("fm_logit_click", "fm_logit_like", "fm_repr_scale"):
            assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-5), col
        assert np.abs(np.stack(a["fm_repr"].to_numpy()).astype(int) - np.stack(b["fm_repr"].to_numpy())).max() <= 1
        assert np.allclose(np.stack(a["fm_tae"].to_numpy()), np.stack(b["fm_tae"].to_numpy()), atol=1e-5)
        for k, v in mem.metrics[s].items():
            assert np.isclose(got.metrics[s][k], v, atol=1e-6, equal_nan=True), (s, k)
    for table in ("user_embeddings", "item_embeddings"):
        assert lake.read(table, fm="small", ds=windows[1].ds).equals(other.read(table, fm="small", ds=windows[1].ds))
    for k, v in mem.compression.items():
        assert np.isclose(got.compression[k], v, rtol=1e-4, atol=1e-7), k
