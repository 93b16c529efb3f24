"""Progressive evaluation of an expert and the MLflow record of its training day.

`progressive_eval`: the checkpoint trained through the newest window before ds is scored on ALL rows of
expert_examples(ds) BEFORE it trains on them, beside base and the FM on the same rows (one scoring pass,
experts.promotion.score); NE's base rate is the CTR of events(ds-1, surface) (experts.evaluate.training_ctr).
Returns {"metrics" (auc, logloss, ne, calibration; with a base expert: gap_closure and ne_vs_base with its
95% paired-bootstrap interval), "fm" (the FM's metrics), "base_rate", "rows", "trained_through", "calib"
(labels, probabilities); for loopfm / fe also "base_ne" and "fm_vs_base_hi", what experts.train.fm_gate reads}.
experts.train writes it without "calib" to ``models/experts/<preset>/<surface>/evals/ds=<D>/<variant>.json``
(experts.records; read by compare_and_promote for the transfer ratio and by the NE-by-day plot).

`train_run` opens the day's expert_train MLflow run (tags surface, variant, fm_version, fm_preset,
fmx.stage=expert_train) and `log_train` fills it: the resolved config as params, the progressive metrics at
step = window index, the calibration and NE-by-day plots, and the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.metrics import all_metrics, ne
from experts.checkpoint import Checkpoint, latest_before, load_checkpoint
from experts.config import ExpertKey
from experts.data import ExpertData
from experts.evaluate import gap_closure, training_ctr
from experts.promote import ne_diff
from experts.promotion import score, vs_base_metrics
from experts.records import read_eval
from experts.stream import Rows
from features.lake import Lake
from features.windows import Window

if TYPE_CHECKING:
    from mlflow.entities import Run

    from experts.train import TrainedDay


def progressive_eval(lake: Lake, window: Window, surface: str, preset: str, ckpt: Checkpoint,
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
    if ckpt.config.uses_loop or ckpt.config.uses_tae:  # what `experts.train.fm_gate` reads
        result["base_ne"] = ne_base
        result["fm_vs_base_hi"] = ne_diff(y, fm, base, base_rate).hi
    result["calib"] = (y, probs)
    return result


@contextmanager
def train_run(key: ExpertKey, pipeline_run: str) -> Iterator[Run]:
    """The expert_train run of `key` under (pipeline_run, ds); a failure inside ends it FAILED with the error
    (common.tracking.stage_run)."""
    from common.tracking import stage_run
    from experts.registry import STAGE_TAG, TRAIN_STAGE

    tags = {"surface": key.surface, "variant": key.variant, "fm_version": "pending", "fm_preset": key.preset,
            STAGE_TAG: TRAIN_STAGE}
    with stage_run(f"expert/{key.name}", pipeline_run=pipeline_run, ds=key.ds, tags=tags) as run:
        yield run


def log_train(lake: Lake, day: TrainedDay, rebaseline: bool) -> None:
    """Into the active expert_train run: the config, tags, progressive metrics, plots and the model of `day`
    (experts.train.train_day)."""
    import mlflow

    from experts.registry import log_model

    key, ckpt, data, evaluation, rel = day.key, day.ckpt, day.data, day.evaluation, day.rel
    mlflow.log_params(ckpt.config.to_dict())  # a warm start's config is the checkpoint's
    mlflow.set_tags({"fm_version": data.fm_versions[0], "checkpoint": rel, "trained_through": key.ds,
                     "evaluated": str(bool(evaluation)).lower(), "rebaseline": str(rebaseline).lower(),
                     "fm_lineage": ",".join(v for _, v in ckpt.fm_versions)[-5000:]})
    if evaluation:
        window = lake.window(key.ds)
        mlflow.log_metrics({k: v for k, v in evaluation["metrics"].items() if math.isfinite(v)}, step=lake.step(window))
        _log_plots(lake, key, window, evaluation["calib"])
    mlflow.set_tag("model_uri", log_model(ckpt.build(), _first_rows(data)))


def _log_plots(lake: Lake, key: ExpertKey, window: Window, calib: tuple[np.ndarray, np.ndarray]) -> None:
    """calibration.png (labels vs probabilities of the progressive eval) and ne_by_day.png (`ne_history`)."""
    import mlflow

    from experts.plots import calibration_curve, close_figure, ne_by_day

    y, p = calib
    series = ne_history(lake, key.preset, key.surface, key.variant, window)
    for fig, name in ((calibration_curve(y, p, f"{key.surface}/{key.variant} {key.ds}"), "calibration.png"),
                      (ne_by_day(series, f"NE by day: {key.surface}/{key.variant}"), "ne_by_day.png")):
        mlflow.log_figure(fig, name)
        close_figure(fig)


def _first_rows(data: Rows, n: int = 4) -> ExpertData:
    """The first `n` rows of `data` in memory (the logged model's input example)."""
    first = data if isinstance(data, ExpertData) else next(data.chunks())
    return first.rows(torch.arange(min(n, len(first))))


def ne_history(lake: Lake, preset: str, surface: str, variant: str, window: Window, days: int = 30
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
