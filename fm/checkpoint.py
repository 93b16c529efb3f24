"""FM checkpoints, stored through the Lake's filesystem (local, s3://, ...); the versions index beside them
is read and written by fm.versions.

Layout under the lake root (all writes atomic: temporary file, then rename — `Lake.write_bytes`):
  models/fm/<preset>/ds=<ds>/progress.pt   mid-window state (model, optimizers, step, RNG); removed at the end
  models/fm/<preset>/ds=<ds>/final.pt      the FM trained through window ds (the next window warm-starts here)
  models/fm/<preset>/versions.json         {ds: {"fm_version", "parent", "path", "steps"}} (fm.versions)

A checkpoint is a dict (torch.save): cfg (FMConfig.to_dict()), model (FMBundle state_dict), opt_fm, opt_ae,
step, n_steps, ds, window_days, parent (fm_version warm-started from, or None), rng (torch CPU state),
and for final ones fm_version, trained_through (= ds) and train_ctr {surface: CTR of window ds}.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from typing import Any

import torch
from torch import nn

from features.fm_version import format_fm_version
from features.lake import CorruptFile, Lake
from fm.model import ARCH
from fm.versions import ROOT


def relpath(preset: str, ds: str, kind: str) -> str:
    if kind not in ("progress", "final"):
        raise ValueError(f"checkpoint kind must be 'progress' or 'final', got {kind!r}")
    return "/".join([*ROOT, preset, f"ds={ds}", f"{kind}.pt"])


def save(lake: Lake, preset: str, ds: str, kind: str, state: dict[str, Any]) -> str:
    buf = io.BytesIO()
    torch.save({**state, "arch": ARCH}, buf)
    return lake.write_bytes(relpath(preset, ds, kind), buf.getvalue())


def load(lake: Lake, preset: str, ds: str, kind: str) -> dict[str, Any] | None:
    """The checkpoint, or None if it does not exist."""
    path = relpath(preset, ds, kind)
    if not lake.file_exists(path):
        return None
    try:
        state = torch.load(io.BytesIO(lake.read_bytes(path)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # truncated, corrupt, or not tensors only
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CorruptFile(f"FM checkpoint {lake.path(path)} is truncated, corrupt or not a weights-only checkpoint, "
                          f"refused ({type(exc).__name__}: {reason})") from None
    if state.get("arch", 1) != ARCH:
        raise ValueError(f"FM checkpoint {lake.path(path)} has parameter layout {state.get('arch', 1)}, this fmx "
                         f"builds layout {ARCH}: train the {preset!r} FM again from its first window (--cold-start)")
    return state


def remove(lake: Lake, preset: str, ds: str, kind: str) -> None:
    path = lake.path(relpath(preset, ds, kind))
    if lake.file_exists(relpath(preset, ds, kind)):
        lake.fs.delete_file(path)


def weights_hash(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fm_version(preset: str, ds: str, model: nn.Module) -> str:
    """`<preset>-<ds>-<first 10 hex of the weights hash>` (the format: features.fm_version)."""
    return format_fm_version(preset, ds, weights_hash(model)[:10])
