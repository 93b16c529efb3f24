"""The FM's category-match fields and the checkpoint's parameter-layout guard."""

from __future__ import annotations

import io

import pytest
import torch

from features.lake import Lake
from fm import checkpoint
from fm.model import ARCH, FoundationModel
from tests.fm.conftest import tiny_cfg


def test_category_match_recency_and_count() -> None:
    model = FoundationModel(tiny_cfg(hist_len=4))
    b = {
        "category": torch.tensor([7, 7, -1, 3]),
        # right-aligned histories, newest in the last column; -1 = an item of unknown category
        "hist_category": torch.tensor([[7, 2, 7, 5], [0, 0, 0, 7], [-1, -1, -1, -1], [3, 3, 3, 3]]),
        "hist_mask": torch.tensor([[True] * 4, [True] * 4, [False, False, True, True], [False, True, True, True]]),
    }
    recency, count = model.category_match(b)
    assert recency.tolist() == [1, 0, 4, 0]  # 4 = L: no match (an unknown category matches nothing)
    assert count.tolist() == [2, 1, 0, 3]  # padding never counts


def test_checkpoint_of_another_layout_is_refused(tmp_path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    checkpoint.save(lake, "small", "2026-01-01", "final", {"step": 1})
    assert checkpoint.load(lake, "small", "2026-01-01", "final")["arch"] == ARCH
    buf = io.BytesIO()
    torch.save({"step": 1, "arch": ARCH - 1}, buf)  # written by an fmx whose FM had another parameter layout
    lake.write_bytes(checkpoint.relpath("small", "2026-01-01", "final"), buf.getvalue())
    with pytest.raises(ValueError, match="train the 'small' FM again from its first window"):
        checkpoint.load(lake, "small", "2026-01-01", "final")


def test_window_data_carries_the_point_in_time_counters(tmp_path) -> None:
    """load_window builds the missing counter states on demand and joins each event's own counters."""
    import numpy as np
    import polars as pl

    from features.counters import DENSE_NAMES, dense_counters, window_counters
    from fm.data import load_window
    from tests.fm.conftest import make_lake

    lake = Lake(str(tmp_path / "lake"))
    ws = make_lake(lake.uri, days=3, events_per_day=300)
    data = load_window(lake, ws[2], tiny_cfg())
    assert lake.exists("counter_state", ds=ws[1].ds) and lake.exists("counter_state", ds=ws[0].ds)
    counts = window_counters(lake, ws[2])
    want = dense_counters(pl.DataFrame({"event_id": data.event_id}).join(counts, on="event_id", how="left"))
    assert data.tensors["counters"].shape == (len(data), len(DENSE_NAMES))
    np.testing.assert_array_equal(data.tensors["counters"].numpy(), want)
    out = FoundationModel(tiny_cfg())(data.batch(torch.arange(8)))
    assert out.logits.shape == (8, 2) and torch.isfinite(out.logits).all()


def test_the_fm_without_counters_has_no_counter_parameters() -> None:
    with_counters, without = FoundationModel(tiny_cfg()), FoundationModel(tiny_cfg(counters=False))
    assert {n for n, _ in with_counters.named_parameters()} - {n for n, _ in without.named_parameters()} == {
        "counter_field.0.weight", "counter_field.0.bias", "counter_field.2.weight", "counter_field.2.bias"}
    assert tiny_cfg().model_key() != tiny_cfg(counters=False).model_key()  # a warm start across them is refused
