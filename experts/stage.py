"""Stage wrappers for the experts (called by DAG tasks, CLI commands and tests).

Each takes plain references (ds, lake URI, preset and variant names, pipeline run id) and returns a
small JSON-able dict. Documented skips (``{"skipped": reason}``): the FM has not scored any window up
to ds yet (its first window: nothing to join), and, for training, no expert_examples can exist yet.
Errors: missing FM outputs for a day the FM should have scored, an FM version mismatch or lineage
break, an empty surface, a surface the FM did not score — see features.expert_examples / experts.train.

Progressive evaluation (expert_train): the checkpoint trained through the newest window before ds is
scored on ALL rows of expert_examples(ds) BEFORE it trains on them; NE's base rate is the CTR of
events(ds-1, surface). Results also go to ``models/experts/<preset>/<surface>/evals/ds=<D>/<variant>.json``
in the lake (read by compare_and_promote for the transfer ratio and by the NE-by-day plot).

Memory (issue 12): expert_examples(ds) is an experts.data.ExpertSource; a partition of at most
``ExpertConfig.shuffle_rows`` rows is read once, whole, and a larger one is streamed by every pass (the
evaluation's one scoring pass for the model, base and the FM; training through a shuffle buffer,
experts.stream), holding per-row outputs (labels, scores) only.

Idempotent re-runs: checkpoints are kept per day, expert_train(D) always evaluates and warm-starts
from the newest checkpoint trained through a day before D (D-1 in the daily flow) and replaces D's
checkpoint. Re-running D, before or after D+1 ran, gives the same scores.

Distillation (kd variants) is weighted per window by the FM's measured advantage over the student on that
window's rows before training (experts.distill.kd_scale; logged as metric ``kd_scale``), and the FM inputs
(loopfm, fe) by its advantage over base (`_fm_gate`, metric ``fm_gate``; off on a cold start). Each
model's intercept is re-centred on the window it trained on, minus the learnt next-day over-prediction
(experts.train.fit_bias / next_offset).
compare_and_promote lives in experts.promotion (re-exported here for the DAG and the CLI).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from common.metrics import all_metrics, ne
from common.threads import torch_threads
from experts.config import VARIANTS, ExpertConfig
from experts.data import ExpertData, examples_for, fm_started
from experts.distill import kd_scale
from experts.evaluate import gap_closure, training_ctr
from experts.promote import ne_diff
from experts.promotion import compare_and_promote, score, vs_base_metrics
from experts.records import read_eval, strict_json, write_eval
from experts.stream import Rows, fitting
from experts.train import (
    Checkpoint,
    check_lineage,
    latest_before,
    load_checkpoint,
    new_checkpoint,
    next_offset,
    save_checkpoint,
    train_window,
)
from features.expert_examples import build_expert_examples
from features.lake import Lake
from features.windows import Window

__all__ = ["VARIANTS", "compare_and_promote", "expert_examples", "expert_train"]


def expert_examples(ds: str, surface: str, lake_uri: str, preset: str = "small") -> dict:
    """Write expert_examples(fm=preset, ds, surface) (plus any missing loop_state); rows and path."""
    lake = Lake(lake_uri)
    window = lake.window(ds)
    if not fm_started(lake, preset, window):
        return {"ds": ds, "surface": surface, "skipped": f"FM {preset!r} has scored no window up to {ds}"}
    path = build_expert_examples(lake, window, surface, preset, ExpertConfig().history_length)
    rows = lake.read("expert_examples", columns=["event_id"], fm=preset, ds=ds, surface=surface).num_rows
    return strict_json({"ds": ds, "surface": surface, "fm": preset, "rows": rows, "path": path})


def _progressive_eval(lake: Lake, window: Window, surface: str, preset: str, ckpt: Checkpoint,
                      data: Rows) -> dict[str, Any]:
    """Metrics of `ckpt` (trained through < window) on every row of `data`, with the FM, gap closure and
    NE - NE(base) on the same rows with its 95% paired-bootstrap interval (ne_vs_base, _lo, _hi). One pass
    over the rows scores the model, base and the FM (experts.promotion.score)."""
    y = data.label.numpy().astype(np.float64)
    base_rate = training_ctr(lake, window, surface)
    models = {"model": (ckpt, f"expert {surface}/{ckpt.config.variant}")}
    base_rel = latest_before(lake, preset, surface, "base", window)
    if base_rel is not None and ckpt.config.variant != "base":
        models["base"] = (load_checkpoint(lake, base_rel), f"expert {surface}/base")
    scored, fm = score(models, data, window)
    probs = scored["model"]
    result: dict[str, Any] = {"metrics": all_metrics(y, probs, base_rate), "base_rate": base_rate,
                              "fm": all_metrics(y, fm, base_rate), "rows": len(y),
                              "trained_through": ckpt.trained_through}
    base = scored.get("base", probs)  # without a base expert, the variant itself stands in for the FM gate's comparison
    ne_base = ne(y, base, base_rate)
    if base_rel is not None:
        result["metrics"]["gap_closure"] = gap_closure(ne_base, result["metrics"]["ne"], result["fm"]["ne"])
        result["metrics"].update(vs_base_metrics(ne_diff(y, probs, base, base_rate)))
    if ckpt.config.uses_loop or ckpt.config.uses_tae:  # what `_fm_gate` reads
        result["base_ne"] = ne_base
        result["fm_vs_base_hi"] = ne_diff(y, fm, base, base_rate).hi
    result["calib"] = (y, probs)
    return result


def _kd_scale(cfg: ExpertConfig, evaluation: dict[str, Any]) -> float:
    """Distillation weight of this window: the FM's NE advantage over the student on rows neither trained on
    (the progressive eval); 0 on a cold start (no evidence yet: measured on MovieLens, distilling from the
    FM's first window cost kd 0.006-0.012 NE against base on the next)."""
    if not cfg.uses_kd or not evaluation:
        return 0.0
    return kd_scale(evaluation["metrics"]["ne"], evaluation["fm"]["ne"], cfg.kd_tau)


def _fm_gate(ckpt: Checkpoint, evaluation: dict[str, Any]) -> tuple[float, int]:
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


def expert_train(ds: str, surface: str, variant: str, lake_uri: str, preset: str = "small",
                 pipeline_run: str = "manual", rebaseline: bool = False,
                 overrides: dict[str, Any] | None = None) -> dict:
    """Progressive eval on ds (model trained through < ds), then warm-start training on ds.

    Returns {"ds", "surface", "variant", "fm_version", "metrics" (empty on a cold start), "loss",
    "checkpoint", "run_id"} or {"skipped": reason}. A warm start keeps the checkpoint's config
    (`overrides` apply to a cold start only). Trains with one torch thread (restored after).
    """
    with torch_threads(1):  # the expert's layers are too small to gain from more
        return _expert_train(ds, surface, variant, lake_uri, preset, pipeline_run, rebaseline, overrides)


def _expert_train(ds: str, surface: str, variant: str, lake_uri: str, preset: str, pipeline_run: str,
                  rebaseline: bool, overrides: dict[str, Any] | None) -> dict:
    from common.lineage_runs import sync as sync_lineage
    from common.tracking import stage_run
    from experts.registry import STAGE_TAG, TRAIN_STAGE

    lake = Lake(lake_uri)
    window = lake.window(ds)
    if not fm_started(lake, preset, window):
        return {"ds": ds, "surface": surface, "variant": variant, "skipped": f"FM {preset!r} has scored nothing yet"}
    cfg = ExpertConfig(variant=variant).with_overrides(**(overrides or {}))
    tags = {"surface": surface, "variant": variant, "fm_version": "pending", "fm_preset": preset,
            STAGE_TAG: TRAIN_STAGE}
    # the work runs inside the run: a failure ends it FAILED with the error (common.tracking.stage_run)
    with stage_run(f"expert/{preset}/{surface}/{variant}", pipeline_run=pipeline_run, ds=ds, tags=tags) as run:
        out = _train_and_log(lake, window, surface, cfg, preset, rebaseline)
    sync_lineage(preset, surface, variant, lake.steps())  # the day run is FINISHED: add it to the trend
    return strict_json({**out, "run_id": str(run.info.run_id)})


def _train_and_log(lake: Lake, window: Window, surface: str, cfg: ExpertConfig, preset: str, rebaseline: bool
                   ) -> dict[str, Any]:
    source = examples_for(lake, window, surface, preset, cfg.history_length, cfg.shuffle_rows)
    if source is None:
        raise RuntimeError(f"expert_examples({window.ds}, {surface}) cannot be built: FM {preset!r} scored nothing")
    data = fitting(source, cfg.shuffle_rows)  # a partition within the shuffle buffer is read once, whole
    ds, variant = window.ds, cfg.variant
    prev_rel = latest_before(lake, preset, surface, variant, window)
    evaluation: dict[str, Any] = {}
    if prev_rel is None:
        ckpt = new_checkpoint(cfg, data, preset, surface)
        lineage = check_lineage(ckpt, preset, data.fm_versions, ds, rebaseline=True)
    else:
        ckpt = load_checkpoint(lake, prev_rel)
        lineage = check_lineage(ckpt, preset, data.fm_versions, ds, rebaseline)
        evaluation = _progressive_eval(lake, window, surface, preset, ckpt, data)
    kd = _kd_scale(ckpt.config, evaluation)
    gate, streak = _fm_gate(ckpt, evaluation)
    if evaluation and ckpt.config.uses_kd:
        evaluation["metrics"]["kd_scale"] = kd
    if evaluation and (ckpt.config.uses_loop or ckpt.config.uses_tae):
        evaluation["metrics"]["fm_gate"] = gate
    offset = ckpt.calib_offset
    if evaluation:  # how much more than the CTR's own move the served model over-predicted on this window
        offset = next_offset(offset, evaluation["metrics"]["calibration"], evaluation["base_rate"],
                             float(data.label.mean()), ckpt.config.calib_gain)
    new, loss = train_window(ckpt, data, window, lineage, kd, offset, gate)
    new.fm_streak = streak
    rel = save_checkpoint(lake, new)
    if evaluation:
        write_eval(lake, preset, surface, ds, variant, {k: v for k, v in evaluation.items() if k != "calib"})
    _log_train(lake, window, surface, new, data, evaluation, rel, rebaseline)
    return {"ds": ds, "surface": surface, "variant": variant, "fm_version": data.fm_versions[0],
            "metrics": evaluation.get("metrics", {}), "loss": loss, "checkpoint": rel}


def _log_train(lake: Lake, window: Window, surface: str, ckpt: Checkpoint, data: Rows,
               evaluation: dict[str, Any], rel: str, rebaseline: bool) -> None:
    """Into the active expert_train run: its config, tags, progressive metrics, plots and the model."""
    import mlflow

    from experts.plots import calibration_curve, close_figure, ne_by_day
    from experts.registry import log_model

    variant, preset, step = ckpt.config.variant, ckpt.fm_preset, lake.step(window)
    mlflow.log_params(ckpt.config.to_dict())  # a warm start's config is the checkpoint's
    mlflow.set_tags({"fm_version": data.fm_versions[0], "checkpoint": rel, "trained_through": window.ds,
                     "evaluated": str(bool(evaluation)).lower(), "rebaseline": str(rebaseline).lower(),
                     "fm_lineage": ",".join(v for _, v in ckpt.fm_versions)[-5000:]})
    if evaluation:
        mlflow.log_metrics({k: v for k, v in evaluation["metrics"].items() if math.isfinite(v)}, step=step)
        y, p = evaluation["calib"]
        series = _ne_history(lake, preset, surface, variant, window)
        for fig, name in ((calibration_curve(y, p, f"{surface}/{variant} {window.ds}"), "calibration.png"),
                          (ne_by_day(series, f"NE by day: {surface}/{variant}"), "ne_by_day.png")):
            mlflow.log_figure(fig, name)
            close_figure(fig)
    mlflow.set_tag("model_uri", log_model(ckpt.build(), _first_rows(data)))


def _first_rows(data: Rows, n: int = 4) -> ExpertData:
    """The first `n` rows of `data` in memory (the logged model's input example)."""
    first = data if isinstance(data, ExpertData) else next(data.chunks())
    return first.rows(torch.arange(min(n, len(first))))


def _ne_history(lake: Lake, preset: str, surface: str, variant: str, window: Window, days: int = 30
                ) -> dict[str, dict[str, float]]:
    """{series: {ds: NE}} over the `days` windows up to `window`: the variant, base (for another variant) and
    FM `preset` (on the same rows), from the lake's eval records (a variant not yet evaluated on a day is absent)."""
    names = [variant] if variant == "base" else [variant, "base"]
    series: dict[str, dict[str, float]] = {name: {} for name in [*names, f"FM {preset}"]}
    w = window
    for _ in range(days):
        for name in names:
            rec = read_eval(lake, preset, surface, w.ds, name)
            if rec is not None:
                series[name][w.ds] = rec["metrics"]["ne"]
                series[f"FM {preset}"][w.ds] = rec["fm"]["ne"]
        w = w.prev()
    return series

