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
