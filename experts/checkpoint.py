"""Expert checkpoints in the lake: the `Checkpoint` dataclass, its storage and where to find one.

``<lake>/models/experts/<preset>/<surface>/<variant>/ds=<D>/expert.pt`` holds the model trained THROUGH window
D (config, shapes, weights, optimizer, the FM lineage of experts.lineage). Written atomically (temporary name,
rename) via `Lake.write_bytes`. Tensors and plain values only: loaded with ``torch.load(weights_only=True)``
on every path (warm start, gap closure, compare, promotion), so a crafted file in a shared lake cannot run
code; remote strings naming a checkpoint (the registry tag ``checkpoint``) go through `trusted_ckpt_relpath`
first.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from common.ema import serving_weights
from experts.config import ExpertConfig
from experts.model import Expert
from features.lake import CorruptFile, Lake, UnsafeLake, safe_relpath
from features.windows import Window

CKPT_FILE = "expert.pt"


@dataclass
class Checkpoint:
    """Everything needed to resume or score an expert trained through `trained_through`."""

    config: ExpertConfig
    repr_dim: int
    tae_dim: int
    model: dict[str, Any]
    optim: dict[str, Any] | None
    trained_through: str
    fm_preset: str
    surface: str
    fm_versions: list[tuple[str, str]] = field(default_factory=list)  # (ds, fm_version), oldest first
    ema: dict[str, Any] | None = None  # common.ema.WeightEMA state: the weights the expert serves
    calib_bias: float = 0.0  # added to the serving head's bias (`fit_bias` minus `calib_offset`)
    calib_offset: float = 0.0  # learnt next-day over-prediction (log), beyond the CTR's own move (`next_offset`)
    fm_gate: float = 1.0  # the FM inputs' scale this model trained and serves with (experts.train.fm_gate)
    fm_streak: int = 0  # consecutive windows on which the FM beat base with confidence (experts.train.fm_gate)

    def build(self, serving: bool = True) -> Expert:
        """The expert with its serving weights (the EMA, common.ema, and `calib_bias`), or the raw ones to train on."""
        model = Expert(self.config, self.repr_dim, self.tae_dim)
        model.load_state_dict(serving_weights({"model": self.model, "ema": self.ema}) if serving else self.model)
        model.fm_gate = self.fm_gate
        if serving and self.calib_bias:
            with torch.no_grad():
                model.head.bias.add_(self.calib_bias)
        return model


def ckpt_dir(preset: str, surface: str, variant: str) -> str:
    return f"models/experts/{preset}/{surface}/{variant}"


def ckpt_relpath(preset: str, surface: str, variant: str, ds: str) -> str:
    return f"{ckpt_dir(preset, surface, variant)}/ds={ds}/{CKPT_FILE}"


def save_checkpoint(lake: Lake, ckpt: Checkpoint) -> str:
    """Write `ckpt` as tensors and plain values only (config as a dict), so it loads with weights_only."""
    buf = io.BytesIO()
    payload = {**ckpt.__dict__, "config": ckpt.config.to_dict(), "fm_versions": [list(v) for v in ckpt.fm_versions]}
    torch.save(payload, buf)
    rel = ckpt_relpath(ckpt.fm_preset, ckpt.surface, ckpt.config.variant, ckpt.trained_through)
    lake.write_bytes(rel, buf.getvalue())
    return rel


def load_checkpoint(lake: Lake, relpath: str) -> Checkpoint:
    """The checkpoint at `relpath` (inside the lake). Never unpickles code: torch.load(weights_only=True)
    accepts tensors and plain containers only; anything else, or a truncated file, is CorruptFile naming it."""
    raw = lake.read_bytes(relpath)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        payload["config"] = ExpertConfig.from_dict(payload["config"])
        payload["fm_versions"] = [tuple(v) for v in payload["fm_versions"]]
        return Checkpoint(**payload)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CorruptFile(f"expert checkpoint {lake.path(relpath)} is truncated, corrupt or not a weights-only "
                          f"checkpoint, refused ({type(exc).__name__}: {reason})") from None


def trusted_ckpt_relpath(relpath: str, preset: str, surface: str) -> str:
    """`relpath` (e.g. a registry tag: remote input) if it names an expert checkpoint of (preset, surface)
    inside the lake: ``models/experts/<preset>/<surface>/<variant>/ds=<D>/expert.pt``; UnsafeLake otherwise."""
    rel = safe_relpath(relpath)
    parts = rel.split("/")
    if (len(parts) != 7 or parts[:4] != ["models", "experts", preset, surface] or not parts[5].startswith("ds=")
            or parts[6] != CKPT_FILE):
        raise UnsafeLake(f"checkpoint path {relpath!r} is not an expert checkpoint of {preset}/{surface} in the lake "
                         f"(expected {ckpt_relpath(preset, surface, '<variant>', '<ds>')})")
    return rel


def latest_before(lake: Lake, preset: str, surface: str, variant: str, window: Window) -> str | None:
    """Relpath of the newest checkpoint trained through a window that ends before `window` starts."""
    base = lake.path(ckpt_dir(preset, surface, variant))
    if lake.fs.get_file_info(base).type != pafs.FileType.Directory:
        return None
    days = sorted(
        info.base_name.split("=", 1)[1]
        for info in lake.fs.get_file_info(pafs.FileSelector(base))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("ds=")
    )
    days = [d for d in days if Window.parse(d, window.days).end <= window.start
            and lake.file_exists(ckpt_relpath(preset, surface, variant, d))]
    return ckpt_relpath(preset, surface, variant, days[-1]) if days else None
