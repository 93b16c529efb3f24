"""int8 storage of LoopFM representations: per-row symmetric scale = max|x| / 127.

`quantize_int8(x (N, W) float) -> (q (N, W) int8, scale (N,) float32)`; x ≈ q * scale[:, None], with
|x - q*scale| <= scale / 2 per element (round to nearest). A row of zeros gets scale 0 and q = 0.
`dequantize_int8(q, scale)` inverts it. The codes are tanh outputs in (-1, 1), so scale <= 1/127 and
the absolute error is below 0.004 per element.
"""

from __future__ import annotations

import numpy as np


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_int8 expects (rows, width), got shape {x.shape}")
    scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32) if x.shape[1] else np.zeros(len(x), np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]
