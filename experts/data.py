"""expert_examples partitions -> tensors the expert reads (see experts/model.py for shapes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from experts.config import OWN_FEATURES
from features.expert_examples import build_expert_examples
from features.lake import Lake
from features.schemas import CLICK, FM_VERSION
from features.windows import Window


@dataclass
class ExpertData:
    """One window of one surface, as tensors; `fm_versions` are the distinct FM versions of its rows."""

    tensors: dict[str, torch.Tensor]
    label: torch.Tensor  # (N,) float32
    fm_versions: list[str]

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def repr_dim(self) -> int:
        return int(self.tensors["loop_repr"].shape[-1])

    @property
    def tae_dim(self) -> int:
        return int(self.tensors["tae"].shape[-1])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float>[W] column -> (N, W) float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), width)


def _history(column: pa.ChunkedArray, length: int, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """list<fixed_size_list<float>[R]> -> (N, L, R) (list<scalar> with width None -> (N, L)), zero padded
    after the entries, and the (N, L) mask."""
    arr = column.combine_chunks()
    n = len(arr)
    lengths = np.minimum(arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), length)
    out = np.zeros((n, length) if width is None else (n, length, width), dtype=np.float32)
    mask = np.arange(length)[None, :] < lengths[:, None]  # (N, L)
    inner = arr.flatten()
    if len(inner):
        flat = inner if width is None else inner.flatten()
        values = flat.to_numpy(zero_copy_only=False).astype(np.float32)
        values = values if width is None else values.reshape(len(inner), width)
        offsets = arr.offsets.to_numpy()[:-1]
        full = np.asarray(arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
        # keep the newest `length` entries of longer lists (they are ordered oldest -> newest)
        starts = offsets + (full - lengths)
        rows = np.repeat(np.arange(n), lengths)
        slots = np.concatenate([np.arange(k) for k in lengths]) if n else np.zeros(0, int)
        src = np.repeat(starts, lengths) + slots
        out[rows, slots] = values[src]
    return out, mask


def standardize(x: np.ndarray) -> np.ndarray:
    """Each column of (N, W) `x` centred and scaled by its mean and std over these rows (std floored at 1e-3).

    Applied per partition, i.e. per (day, surface, FM version), to the FM's target-aware embedding and to the
    LoopFM codes of the history entries: the expert trained on day D-1 read FM_{D-2}'s outputs and is scored
    on D with FM_{D-1}'s, and the raw outputs' location and scale move from one FM version to the next
    (measured: fe over-/under-predicted by up to 19% on days when base was calibrated, loopfm by 10% more
    than base on the first scored day; bench/calibration_hypotheses.py). Label-free: serving computes the
    same statistics on the FM version's recent traffic.
    """
    mean = x.mean(axis=0, keepdims=True)
    std = np.maximum(x.std(axis=0, keepdims=True), 1e-3)
    return ((x - mean) / std).astype(np.float32)


def to_tensors(table: pa.Table, history_length: int) -> ExpertData:
    """An EXPERT_EXAMPLES table -> ExpertData. Fails on an empty table."""
    if table.num_rows == 0:
        raise ValueError("expert_examples partition has no rows")
    cats = np.stack([table[c].to_numpy().astype(np.int64) for c in OWN_FEATURES], axis=1)  # (N, F)
    tae = standardize(_vectors(table["fm_tae"]))
    width = table["loop_hist_repr"].type.value_type.list_size
    hist, mask = _history(table["loop_hist_repr"], history_length, width)
    if mask.any():  # the real entries only; padding stays 0 (and masked)
        hist[mask] = standardize(hist[mask])
    clicks, _ = _history(table["loop_hist_click"], history_length, None)  # aligned with hist's slots
    tensors = {
        "cats": torch.from_numpy(cats),
        "loop_repr": torch.from_numpy(hist),
        "loop_mask": torch.from_numpy(mask),
        "loop_click": torch.from_numpy(clicks),
        "tae": torch.from_numpy(tae),
        "fm_logit": torch.from_numpy(table["fm_logit_click"].to_numpy().astype(np.float32)),
        "counters": torch.from_numpy(_vectors(table["counters"])),
    }
    label = torch.from_numpy(table[CLICK].to_numpy().astype(np.float32))
    versions = sorted(set(table[FM_VERSION].to_pylist()))
    return ExpertData(tensors, label, versions)


def load_examples(lake: Lake, preset: str, ds: str, surface: str, history_length: int) -> ExpertData:
    """Read expert_examples(fm=preset, ds, surface) as tensors (raises PartitionNotFound when absent)."""
    return to_tensors(lake.read("expert_examples", fm=preset, ds=ds, surface=surface), history_length)


def fm_started(lake: Lake, preset: str, window: Window) -> bool:
    """Whether FM `preset` scored any window up to and including `window`."""
    return any(p["ds"] <= window.ds for p in lake.partitions("fm_outputs", fm=preset))


def examples_for(lake: Lake, window: Window, surface: str, preset: str, history_length: int) -> ExpertData | None:
    """expert_examples(window, surface) as tensors, built first if missing; None before the FM's first scores."""
    if not lake.exists("expert_examples", fm=preset, ds=window.ds, surface=surface):
        if not fm_started(lake, preset, window):
            return None
        build_expert_examples(lake, window, surface, preset, history_length)
    return load_examples(lake, preset, window.ds, surface, history_length)
