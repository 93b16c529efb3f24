"""Warm-started daily expert training: one expert's day (`train_day`) and the training loop (`train_window`).

`train_day(lake, key, cfg, rebaseline)`: reads expert_examples(key.ds) (experts.data.examples_for; written by
the expert_examples stage only), warm-starts from the newest checkpoint trained through a day before key.ds
(experts.checkpoint.latest_before; none: a cold start, `new_checkpoint`), checks the FM lineage
(experts.lineage), scores that checkpoint on the day's rows BEFORE training on them
(experts.progressive.progressive_eval), trains one window and writes D's checkpoint and eval record to the lake,
replacing a previous run's: re-running D, before or after D+1 ran, gives the same scores.

What the evaluation decides for the window's training: the distillation weight (`kd_weight`, the FM's
measured advantage over the student: experts.distill.kd_scale), the scale of the FM inputs of loopfm / fe
(`fm_gate`, its advantage over base) and the intercept's next-day offset (`next_offset`; the intercept is
re-centred on the window trained on by `fit_bias`). No MLflow here: the stage (experts.stage) logs the result
(experts.progressive.log_train).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from common.ema import WeightEMA
from experts.checkpoint import Checkpoint, latest_before, load_checkpoint, save_checkpoint
from experts.config import ExpertConfig, ExpertKey
from experts.data import examples_for
from experts.distill import expert_loss, kd_scale
from experts.lineage import check_lineage
from experts.model import Expert
from experts.progressive import progressive_eval
from experts.records import write_eval
from experts.stream import Rows, fitting, serving_logits, shuffled_batches
from features.lake import Lake
from features.windows import Window


@dataclass
class TrainedDay:
    """The outcome of `train_day`: the checkpoint trained through key.ds (saved at `rel`), the rows it trained
    on, the progressive evaluation before training (empty on a cold start) and the mean training loss."""

    key: ExpertKey
    ckpt: Checkpoint
    rel: str
    data: Rows
    evaluation: dict[str, Any]
    loss: float

    def summary(self) -> dict[str, Any]:
        """The stage's result: {"ds", "surface", "variant", "fm_version", "metrics", "loss", "checkpoint"}."""
        return {"ds": self.key.ds, "surface": self.key.surface, "variant": self.key.variant,
                "fm_version": self.data.fm_versions[0], "metrics": self.evaluation.get("metrics", {}),
                "loss": self.loss, "checkpoint": self.rel}


def train_day(lake: Lake, key: ExpertKey, cfg: ExpertConfig, rebaseline: bool) -> TrainedDay:
    """Progressive eval on key.ds, then warm-start training on it (module docstring). A warm start keeps the
    checkpoint's config; `cfg` applies to a cold start."""
    window = lake.window(key.ds)
    source = examples_for(lake, window, key.surface, key.preset, cfg.history_length, cfg.shuffle_rows)
    if source is None:
        raise RuntimeError(f"expert_examples({key.ds}, {key.surface}) cannot exist: FM {key.preset!r} scored nothing")
    data = fitting(source, cfg.shuffle_rows)  # a partition within the shuffle buffer is read once, whole
    ckpt, lineage, evaluation = _warm_start(lake, key, window, cfg, data, rebaseline)
    kd, (gate, streak) = kd_weight(ckpt.config, evaluation), fm_gate(ckpt, evaluation)
    if evaluation and ckpt.config.uses_kd:
        evaluation["metrics"]["kd_scale"] = kd
    if evaluation and (ckpt.config.uses_loop or ckpt.config.uses_tae):
        evaluation["metrics"]["fm_gate"] = gate
    new, loss = train_window(ckpt, data, window, lineage, kd, _offset(ckpt, evaluation, data), gate)
    new.fm_streak = streak
    rel = save_checkpoint(lake, new)
    if evaluation:
        write_eval(lake, key.preset, key.surface, key.ds, key.variant,
                   {k: v for k, v in evaluation.items() if k != "calib"})
    return TrainedDay(key, new, rel, data, evaluation, loss)


def _warm_start(lake: Lake, key: ExpertKey, window: Window, cfg: ExpertConfig, data: Rows, rebaseline: bool
                ) -> tuple[Checkpoint, list[tuple[str, str]], dict[str, Any]]:
    """(checkpoint to train from, the lineage after this window, its progressive eval: {} on a cold start)."""
    prev_rel = latest_before(lake, key.preset, key.surface, key.variant, window)
    if prev_rel is None:
        ckpt = new_checkpoint(cfg, data, key.preset, key.surface)
        return ckpt, check_lineage(ckpt, key.preset, data.fm_versions, key.ds, rebaseline=True), {}
    ckpt = load_checkpoint(lake, prev_rel)
    lineage = check_lineage(ckpt, key.preset, data.fm_versions, key.ds, rebaseline)
    return ckpt, lineage, progressive_eval(lake, window, key.surface, key.preset, ckpt, data)


def _offset(ckpt: Checkpoint, evaluation: dict[str, Any], data: Rows) -> float:
    """The calibration offset to train with: how much more than the CTR's own move the served model
    over-predicted on this window (`next_offset`); the checkpoint's on a cold start."""
    if not evaluation:
        return ckpt.calib_offset
    return next_offset(ckpt.calib_offset, evaluation["metrics"]["calibration"], evaluation["base_rate"],
                       float(data.label.mean()), ckpt.config.calib_gain)


def kd_weight(cfg: ExpertConfig, evaluation: dict[str, Any]) -> float:
    """Distillation weight of this window: the FM's NE advantage over the student on rows neither trained on
    (the progressive eval); 0 on a cold start (no evidence yet: measured on MovieLens, distilling from the
    FM's first window cost kd 0.006-0.012 NE against base on the next)."""
    if not cfg.uses_kd or not evaluation:
        return 0.0
    return kd_scale(evaluation["metrics"]["ne"], evaluation["fm"]["ne"], cfg.kd_tau)


def fm_gate(ckpt: Checkpoint, evaluation: dict[str, Any]) -> tuple[float, int]:
    """(scale of the FM inputs for this window, FM streak). loopfm / fe read the FM only once it has been
    ahead of the FM-free expert (base; without base, the variant itself) with 95% confidence on the rows of
    `fm_gate_windows` consecutive windows before training on them; from then on the scale rises by
    `fm_gate_step` a window while the FM's NE is below base's, and falls by a step whenever the variant
    itself scored worse than base with confidence. 0 on a cold start (no evidence).

    FM inputs only help an expert when the FM knows what the expert does not, and a newly opened input
    learnt from one small window is mostly noise. Measured on the MovieLens genres (a few hundred rows a
    week; the FM level with base): loopfm with the inputs always on lost 0.016 / 0.013 NE to base on comedy /
    thriller (0.065 on the first scored day); opened by a single window's advantage, fe still lost 0.004 on
    family the day after; with two confident windows the inputs never open there, while on the built-in
    stream (FM 0.02-0.07 NE ahead of base) they open from the fourth window. Closing the inputs outright
    when the FM's lead was not confident on one day cost loopfm 0.002 on live the next day (its trunk had
    learnt with them): only the variant's own confident loss closes them, a step at a time.
    """
    cfg = ckpt.config
    if not (cfg.uses_loop or cfg.uses_tae):
        return ckpt.fm_gate, 0
    if not evaluation or "fm_vs_base_hi" not in evaluation:
        return 0.0, 0
    streak = ckpt.fm_streak + 1 if evaluation["fm_vs_base_hi"] < 0 else 0
    if evaluation["metrics"].get("ne_vs_base_lo", 0.0) > 0:  # the variant hurt with confidence: back off
        return max(0.0, ckpt.fm_gate - cfg.fm_gate_step), streak
    if ckpt.fm_gate > 0 or streak >= cfg.fm_gate_windows:
        fm_ahead = evaluation["fm"]["ne"] < evaluation["base_ne"]
        return (min(1.0, ckpt.fm_gate + cfg.fm_gate_step) if fm_ahead else ckpt.fm_gate), streak
    return 0.0, streak


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
