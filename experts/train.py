"""Warm-started daily expert training, checkpoints and the FM-lineage rule.

Checkpoints: ``<lake>/models/experts/<preset>/<surface>/<variant>/ds=<D>/expert.pt`` holds the model
trained THROUGH window D (config, shapes, weights, optimizer, the FM lineage). Written atomically
(temporary name, rename) via `Lake.write_bytes`. Tensors and plain values only: loaded with
``torch.load(weights_only=True)`` on every path (warm start, gap closure, compare, promotion), so a
crafted file in a shared lake cannot run code; remote strings naming a checkpoint (the registry tag
``checkpoint``) go through `trusted_ckpt_relpath` first.

FM lineage rule (`check_lineage`): a checkpoint records its FM preset and the ordered list of
(ds, fm_version) it consumed. Features for a new window are refused (`FMLineageError`) when
  - they come from another FM preset (a foreign FM), or
  - their fm_version is one the expert consumed before but not the last one (an older, stale FM —
    e.g. fm_outputs left over from a rolled-back FM),
unless `rebaseline=True`, which keeps the weights and restarts the recorded lineage. The same
version as last time is accepted (the FM may skip training a day); a new version is the normal case
(the FM trains every day). FM versions named ``<preset>-<trained-through ds>-<hash>`` (fm/checkpoint.py)
are also checked, rebaseline or not, to come from that preset and to be trained through a window
before the one they scored (leakage guard), and — without rebaseline — not through an earlier day than
the last consumed version.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from common.ema import WeightEMA, serving_weights
from experts.config import ExpertConfig
from experts.distill import expert_loss
from experts.model import Expert
from experts.stream import Rows, fitting, serving_logits, shuffled_batches
from features.lake import CorruptFile, Lake, UnsafeLake, safe_relpath
from features.windows import Window

CKPT_FILE = "expert.pt"


class FMLineageError(ValueError):
    """Features come from an FM preset/version the expert was not trained with."""


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
    fm_gate: float = 1.0  # the FM inputs' scale this model trained and serves with (experts.stage._fm_gate)
    fm_streak: int = 0  # consecutive windows on which the FM beat base with confidence (experts.stage._fm_gate)

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


def check_lineage(ckpt: Checkpoint, preset: str, versions: list[str], ds: str, rebaseline: bool = False) -> list[tuple[str, str]]:
    """The lineage after consuming `versions` at `ds`, or FMLineageError (see module docstring)."""
    if len(versions) != 1:
        raise FMLineageError(f"window {ds}: expert features come from {len(versions)} FM versions {versions}")
    version = versions[0]
    _check_version_name(version, preset, ds)
    if rebaseline:
        return [(ds, version)]
    if preset != ckpt.fm_preset:
        raise FMLineageError(
            f"expert {ckpt.surface}/{ckpt.config.variant} was trained with FM preset {ckpt.fm_preset!r}; features "
            f"for {ds} come from FM preset {preset!r}. Pass rebaseline=True (--rebaseline) to start a new lineage."
        )
    seen = [v for _, v in ckpt.fm_versions]
    if seen and version in seen and version != seen[-1]:
        raise FMLineageError(
            f"expert {ckpt.surface}/{ckpt.config.variant} last consumed fm_version {seen[-1]!r}; features for {ds} "
            f"come from the older version {version!r} (stale FM outputs?). Re-export the FM for {ds} or pass "
            "rebaseline=True (--rebaseline)."
        )
    last_day = version_day(seen[-1]) if seen else None
    day = version_day(version)
    if last_day and day and day < last_day:
        raise FMLineageError(f"fm_version {version!r} for {ds} was trained through {day}, before the last consumed "
                             f"version {seen[-1]!r}: stale FM outputs. Pass rebaseline=True to accept them.")
    return [*ckpt.fm_versions, (ds, version)]


_VERSION = re.compile(r"^(?P<preset>.+)-(?P<day>\d{4}-\d{2}-\d{2})-(?P<hash>[0-9a-f]+)$")


def version_day(version: str) -> str | None:
    """The trained-through day of a ``<preset>-<ds>-<hash>`` FM version, or None for other names."""
    m = _VERSION.match(version)
    return m.group("day") if m else None


def _check_version_name(version: str, preset: str, ds: str) -> None:
    m = _VERSION.match(version)
    if m is None:
        return
    if m.group("preset") != preset:
        raise FMLineageError(f"fm_version {version!r} names FM preset {m.group('preset')!r}, features were read "
                             f"as preset {preset!r}")
    if m.group("day") >= ds:
        raise FMLineageError(f"leakage guard: fm_version {version!r} was trained through {m.group('day')}, so it "
                             f"cannot supply features for window {ds}")


def new_checkpoint(cfg: ExpertConfig, data: Rows, preset: str, surface: str) -> Checkpoint:
    torch.manual_seed(cfg.seed)
    model = Expert(cfg, data.repr_dim, data.tae_dim)
    # start the heads at the training window's CTR: with CTRs of a few percent, a head starting at
    # p = 0.5 spends the first window unlearning the bias and is badly calibrated after one pass
    ctr = float(data.label.mean().clamp(1e-4, 1 - 1e-4))
    with torch.no_grad():
        for head in (model.head, getattr(model, "aux_head", None)):
            if head is not None:
                head.bias.fill_(math.log(ctr / (1 - ctr)))
    # FM inputs off until the FM has shown an advantage on a window the expert did not train on
    return Checkpoint(cfg, data.repr_dim, data.tae_dim, model.state_dict(), None, "", preset, surface, [],
                      fm_gate=0.0)


def make_optimizer(model: Expert, cfg: ExpertConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: the hashed embeddings (lr * emb_lr_scale, no decay: rows absent from a batch
    must not shrink) and the dense layers (lr, weight_decay)."""
    emb = list(model.emb.parameters())
    emb_ids = {id(p) for p in emb}
    dense = [p for p in model.parameters() if id(p) not in emb_ids]
    return torch.optim.AdamW([{"params": emb, "lr": cfg.lr * cfg.emb_lr_scale, "weight_decay": 0.0},
                              {"params": dense, "lr": cfg.lr, "weight_decay": cfg.weight_decay}])


def train_window(ckpt: Checkpoint, rows: Rows, window: Window, lineage: list[tuple[str, str]],
                 kd: float = 1.0, calib_offset: float | None = None, fm_gate: float | None = None
                 ) -> tuple[Checkpoint, float]:
    """One warm-started pass (cfg.epochs) over `rows` in the order of experts.stream.shuffled_batches (a
    partition of more than cfg.shuffle_rows rows streamed through a shuffle buffer of that many), distillation
    weighted by `kd` (experts.distill.kd_scale); returns the checkpoint trained through `window`, its intercept
    re-centred on `rows` minus `calib_offset` (default: the checkpoint's), its FM inputs scaled by `fm_gate`
    (default: the checkpoint's)."""
    cfg = ckpt.config
    model = ckpt.build(serving=False)
    model.fm_gate = ckpt.fm_gate if fm_gate is None else fm_gate
    ema = WeightEMA(model, cfg.ema_decay, ckpt.ema)
    opt = make_optimizer(model, cfg)
    if ckpt.optim is not None:
        opt.load_state_dict(ckpt.optim)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + window.start.toordinal())
    data = fitting(rows, cfg.shuffle_rows)  # read once when it fits the buffer
    model.train()
    total, steps = 0.0, 0
    # a sparse surface (a few hundred rows a day) would otherwise get a handful of steps per window
    batch_size = max(16, min(cfg.batch_size, math.ceil(len(data) / max(cfg.min_steps, 1))))
    for _ in range(cfg.epochs):
        for batch, label in shuffled_batches(data, gen, batch_size, cfg.shuffle_rows):
            loss = expert_loss(model(batch), label, batch["fm_logit"], cfg, kd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update()
            total, steps = total + loss.item(), steps + 1
    out = Checkpoint(cfg, ckpt.repr_dim, ckpt.tae_dim, model.state_dict(), opt.state_dict(), window.ds,
                     ckpt.fm_preset, ckpt.surface, lineage, ema.state(), fm_gate=model.fm_gate)
    out.calib_offset = ckpt.calib_offset if calib_offset is None else calib_offset
    out.calib_bias = fit_bias(serving_logits(out.build(), data), float(data.label.mean())) - out.calib_offset
    return out, total / max(steps, 1)


def fit_bias(logits: torch.Tensor, ctr: float, steps: int = 30) -> float:
    """The shift b with mean(sigmoid(logits + b)) = ctr (Newton's method; 0 when ctr is 0 or 1).

    The expert serves an EMA of its weights after one pass: with a moving trunk (distillation pulls it
    hardest) the averaged head's intercept lags, and the kd variants over-predicted by 2-4% more than base
    every day (measured on the built-in stream's video surface: +0.4, +1.8, +4.8, +7.4 points of
    calibration on four successive days). Re-centring the intercept on the window just trained on (its
    own rows: no leakage) leaves each model's next-day calibration to the CTR's own day-to-day move.
    """
    if not 0 < ctr < 1 or logits.numel() == 0:
        return 0.0
    z, b = logits.double(), 0.0
    for _ in range(steps):
        p = torch.sigmoid(z + b)
        gap, slope = float(p.mean()) - ctr, float((p * (1 - p)).mean())
        if abs(gap) < 1e-9 or slope <= 0:
            break
        b -= gap / slope
    return b


def next_offset(offset: float, calibration: float, train_ctr: float, ctr: float, gain: float) -> float:
    """`offset` plus `gain` x the log over-prediction of the last out-of-sample window beyond the CTR's move.

    A model re-centred on window D-1 (`fit_bias`) and scored on D should predict CTR(D-1) on average, i.e.
    score calibration CTR(D-1)/CTR(D); measured, it over-predicts by 1-7% more (the features of a newer
    window — longer histories, larger counts — raise its predictions). That residual is persistent while
    the CTR's own move is not, so an integral controller on it (gain 0.5) brings the mean calibration to
    the CTR's move without chasing it. Non-finite inputs leave `offset` unchanged.
    """
    if not (calibration > 0 and train_ctr > 0 and ctr > 0):
        return offset
    residual = math.log(calibration * ctr / train_ctr)
    return offset + gain * residual if math.isfinite(residual) else offset
