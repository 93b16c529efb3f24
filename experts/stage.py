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
"""

from __future__ import annotations

import json
import math
from datetime import date
from typing import Any

import numpy as np

from experts.config import VARIANTS, ExpertConfig
from experts.data import ExpertData, load_examples
from experts.evaluate import (
    fm_probs,
    gap_closure,
    metric_dict,
    predict,
    smaller_first,
    training_ctr,
    transfer_ratio,
)
from experts.train import (
    Checkpoint,
    check_lineage,
    latest_before,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
    train_window,
)
from features.expert_examples import build_expert_examples
from features.lake import Lake
from features.windows import Window, assert_after

__all__ = ["VARIANTS", "compare_and_promote", "expert_examples", "expert_train"]


def _window(lake: Lake, ds: str) -> Window:
    return Window.parse(ds, int(lake.meta().get("window_days", 1)))


def _step(lake: Lake, window: Window) -> int:
    origin = lake.meta().get("origin")
    return window.index(date.fromisoformat(origin)) if origin else 0


def _fm_started(lake: Lake, preset: str, window: Window) -> bool:
    """Whether FM `preset` scored any window up to and including `window`."""
    return any(p["ds"] <= window.ds for p in lake.partitions("fm_outputs", fm=preset))


def _eval_rel(preset: str, surface: str, ds: str, variant: str) -> str:
    return f"models/experts/{preset}/{surface}/evals/ds={ds}/{variant}.json"


def _read_eval(lake: Lake, preset: str, surface: str, ds: str, variant: str) -> dict[str, Any] | None:
    rel = _eval_rel(preset, surface, ds, variant)
    return json.loads(lake.read_bytes(rel)) if lake.file_exists(rel) else None


def expert_examples(ds: str, surface: str, lake_uri: str, preset: str = "small") -> dict:
    """Write expert_examples(fm=preset, ds, surface) (plus any missing loop_state); rows and path."""
    lake = Lake(lake_uri)
    window = _window(lake, ds)
    if not _fm_started(lake, preset, window):
        return {"ds": ds, "surface": surface, "skipped": f"FM {preset!r} has scored no window up to {ds}"}
    path = build_expert_examples(lake, window, surface, preset, ExpertConfig().history_length)
    rows = lake.read("expert_examples", columns=["event_id"], fm=preset, ds=ds, surface=surface).num_rows
    return {"ds": ds, "surface": surface, "fm": preset, "rows": rows, "path": path}


def _score(ckpt: Checkpoint, data: ExpertData, window: Window, what: str) -> np.ndarray:
    assert_after(Window.parse(ckpt.trained_through, window.days), window, what)
    return predict(ckpt.build(), data)


def _progressive_eval(lake: Lake, window: Window, surface: str, preset: str, ckpt: Checkpoint,
                      data: ExpertData) -> dict[str, Any]:
    """Metrics of `ckpt` (trained through < window) on every row of `data`, with the FM and gap closure."""
    y = data.label.numpy().astype(np.float64)
    base_rate = training_ctr(lake, window, surface)
    probs = _score(ckpt, data, window, f"expert {surface}/{ckpt.config.variant}")
    result: dict[str, Any] = {"metrics": metric_dict(y, probs, base_rate), "base_rate": base_rate,
                              "fm": metric_dict(y, fm_probs(data), base_rate), "rows": len(y),
                              "trained_through": ckpt.trained_through}
    base_rel = latest_before(lake, preset, surface, "base", window)
    if base_rel is not None:
        base = load_checkpoint(lake, base_rel)
        ne_base = metric_dict(y, _score(base, data, window, f"expert {surface}/base"), base_rate)["ne"]
        result["metrics"]["gap_closure"] = gap_closure(ne_base, result["metrics"]["ne"], result["fm"]["ne"])
    result["calib"] = (y, probs)
    return result


def _examples(lake: Lake, window: Window, surface: str, preset: str, cfg: ExpertConfig) -> ExpertData | None:
    if not lake.exists("expert_examples", fm=preset, ds=window.ds, surface=surface):
        if not _fm_started(lake, preset, window):
            return None
        build_expert_examples(lake, window, surface, preset, cfg.history_length)
    return load_examples(lake, preset, window.ds, surface, cfg.history_length)


def expert_train(ds: str, surface: str, variant: str, lake_uri: str, preset: str = "small",
                 pipeline_run: str = "manual", rebaseline: bool = False,
                 overrides: dict[str, Any] | None = None) -> dict:
    """Progressive eval on ds (model trained through < ds), then warm-start training on ds.

    Returns {"ds", "surface", "variant", "fm_version", "metrics" (empty on a cold start), "loss",
    "checkpoint", "run_id"} or {"skipped": reason}. A warm start keeps the checkpoint's config
    (`overrides` apply to a cold start only).
    """
    lake = Lake(lake_uri)
    window = _window(lake, ds)
    cfg = ExpertConfig(variant=variant).with_overrides(**(overrides or {}))
    data = _examples(lake, window, surface, preset, cfg)
    if data is None:
        return {"ds": ds, "surface": surface, "variant": variant, "skipped": f"FM {preset!r} has scored nothing yet"}
    prev_rel = latest_before(lake, preset, surface, variant, window)
    evaluation: dict[str, Any] = {}
    if prev_rel is None:
        ckpt = new_checkpoint(cfg, data, preset, surface)
        lineage = check_lineage(ckpt, preset, data.fm_versions, ds, rebaseline=True)
    else:
        ckpt = load_checkpoint(lake, prev_rel)
        lineage = check_lineage(ckpt, preset, data.fm_versions, ds, rebaseline)
        evaluation = _progressive_eval(lake, window, surface, preset, ckpt, data)
    new, loss = train_window(ckpt, data, window, lineage)
    rel = save_checkpoint(lake, new)
    if evaluation:
        record = {k: v for k, v in evaluation.items() if k != "calib"}
        lake.write_bytes(_eval_rel(preset, surface, ds, variant), json.dumps(record).encode())
    run_id = _log_train(lake, window, surface, new, data, evaluation, rel, pipeline_run, rebaseline)
    return {"ds": ds, "surface": surface, "variant": variant, "fm_version": data.fm_versions[0],
            "metrics": evaluation.get("metrics", {}), "loss": loss, "checkpoint": rel, "run_id": run_id}


def _log_train(lake: Lake, window: Window, surface: str, ckpt: Checkpoint, data: ExpertData,
               evaluation: dict[str, Any], rel: str, pipeline_run: str, rebaseline: bool) -> str:
    import mlflow

    from experts.plots import calibration_curve, close_figure, ne_by_day
    from experts.registry import STAGE_TAG, TRAIN_STAGE, log_model
    from features.tracking import stage_run

    variant, preset, step = ckpt.config.variant, ckpt.fm_preset, _step(lake, window)
    tags = {"surface": surface, "variant": variant, "fm_version": data.fm_versions[0], "fm_preset": preset,
            STAGE_TAG: TRAIN_STAGE, "checkpoint": rel, "trained_through": window.ds,
            "evaluated": str(bool(evaluation)).lower(), "rebaseline": str(rebaseline).lower(),
            "fm_lineage": ",".join(v for _, v in ckpt.fm_versions)[-5000:]}
    with stage_run(f"expert/{preset}/{surface}/{variant}", pipeline_run=pipeline_run, ds=window.ds, tags=tags,
                   params=ckpt.config.to_dict()) as run:
        if evaluation:
            mlflow.log_metrics({k: v for k, v in evaluation["metrics"].items() if math.isfinite(v)}, step=step)
            y, p = evaluation["calib"]
            days, series = _ne_history(lake, preset, surface, variant, window)
            for fig, name in ((calibration_curve(y, p, f"{surface}/{variant} {window.ds}"), "calibration.png"),
                              (ne_by_day(days, series, f"NE by day: {surface}/{variant}"), "ne_by_day.png")):
                mlflow.log_figure(fig, name)
                close_figure(fig)
        model_uri = log_model(ckpt.build(), data)
        mlflow.set_tag("model_uri", model_uri)
        return str(run.info.run_id)


def _ne_history(lake: Lake, preset: str, surface: str, variant: str, window: Window, days: int = 30
                ) -> tuple[list[str], dict[str, list[float]]]:
    found, ours, fm = [], [], []
    w = window
    for _ in range(days):
        rec = _read_eval(lake, preset, surface, w.ds, variant)
        if rec is not None:
            found.append(w.ds)
            ours.append(rec["metrics"]["ne"])
            fm.append(rec["fm"]["ne"])
        w = w.prev()
    return found[::-1], {variant: ours[::-1], f"FM {preset}": fm[::-1]}


def _score_variants(lake: Lake, window: Window, surface: str, preset: str, data: ExpertData
                    ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """NE & co. of every variant's checkpoint trained through < window, and of the FM, on the same rows."""
    y = data.label.numpy().astype(np.float64)
    base_rate = training_ctr(lake, window, surface)
    scores = {}
    for variant in VARIANTS:
        rel = latest_before(lake, preset, surface, variant, window)
        if rel is not None:
            probs = _score(load_checkpoint(lake, rel), data, window, f"expert {surface}/{variant}")
            scores[variant] = metric_dict(y, probs, base_rate)
    fm = metric_dict(y, fm_probs(data), base_rate)
    if "base" in scores:
        for m in scores.values():
            m["gap_closure"] = gap_closure(scores["base"]["ne"], m["ne"], fm["ne"])
    return scores, fm


def _transfer(lake: Lake, preset: str, surface: str, ds: str, variant: str) -> tuple[str, float] | None:
    """Transfer ratio of `variant` between `preset` and another FM preset with eval results on ds."""
    mine = _read_eval(lake, preset, surface, ds, variant)
    if mine is None:
        return None
    for other in sorted(p["fm"] for p in lake.partitions("fm_outputs", ds=ds, surface=surface)):
        theirs = _read_eval(lake, other, surface, ds, variant) if other != preset else None
        if theirs is None or theirs["rows"] != mine["rows"]:
            continue
        small, large = smaller_first(preset, other)
        ev = {preset: mine, other: theirs}
        ratio = transfer_ratio(ev[small]["metrics"]["ne"], ev[large]["metrics"]["ne"],
                               ev[small]["fm"]["ne"], ev[large]["fm"]["ne"])
        return large, ratio
    return None


def compare_and_promote(ds: str, surface: str, lake_uri: str, preset: str = "small", pipeline_run: str = "manual",
                        margin: float = 0.001) -> dict:
    """Score every variant (trained through < ds) and the champion on the same rows of ds; promote.

    The best challenger (lowest NE) becomes champion when there is none yet or when it beats the
    champion's NE by more than `margin`; the version registered is the winner's model trained through
    ds (its expert_train run of ds), or the scored one if ds was not trained yet. Transfer ratios are
    logged onto the larger-FM expert_train runs when another FM preset has results for ds.
    Returns {"ds", "surface", "scores", "champion", "promoted", "decision"} or {"skipped": reason}.
    """
    import mlflow

    from experts.registry import PROMOTE_STAGE, STAGE_TAG, champion, find_train_run, register
    from features.tracking import setup, stage_run

    lake = Lake(lake_uri)
    window = _window(lake, ds)
    data = _examples(lake, window, surface, preset, ExpertConfig())
    if data is None:
        return {"ds": ds, "surface": surface, "skipped": f"FM {preset!r} has scored nothing yet"}
    scores, fm = _score_variants(lake, window, surface, preset, data)
    if not scores:
        return {"ds": ds, "surface": surface, "skipped": "no expert trained before this window"}
    setup()
    best = min(scores, key=lambda v: scores[v]["ne"])
    current = champion(surface, preset)
    champ_ne = math.inf
    if current is not None:
        ckpt = load_checkpoint(lake, current.tags["checkpoint"])
        y = data.label.numpy().astype(np.float64)
        champ_ne = metric_dict(y, _score(ckpt, data, window, "champion"), training_ctr(lake, window, surface))["ne"]
    promote = current is None or champ_ne - scores[best]["ne"] > margin
    scored = load_checkpoint(lake, str(latest_before(lake, preset, surface, best, window)))
    run = find_train_run(ds, surface, best, preset) or find_train_run(scored.trained_through, surface, best, preset)
    version = None
    if run is not None:
        vtags = {"variant": best, "fm_preset": preset, "trained_through": run.data.tags["trained_through"],
                 "fm_version": run.data.tags["fm_version"], "checkpoint": run.data.tags["checkpoint"]}
        version = register(run.data.tags["model_uri"], surface, preset, vtags,
                           ["challenger", "champion"] if promote else ["challenger"])
    transfers = {}
    for variant in scores:
        found = _transfer(lake, preset, surface, ds, variant)
        if found is not None:
            transfers[variant] = found[1]
            target = find_train_run(ds, surface, variant, found[0])
            if target is not None and math.isfinite(found[1]):
                mlflow.MlflowClient().log_metric(target.info.run_id, "transfer_ratio", found[1], step=_step(lake, window))
    decision = "promoted" if promote else "kept"
    old = current.tags.get("variant", "?") if current is not None else "none"
    tags = {"surface": surface, "variant": best, "fm_version": data.fm_versions[0], "fm_preset": preset,
            STAGE_TAG: PROMOTE_STAGE, "decision": decision, "previous_champion": old,
            "champion_ne": f"{champ_ne:.6f}", "challenger_ne": f"{scores[best]['ne']:.6f}", "margin": str(margin),
            "registered_version": str(version)}
    with stage_run(f"promote/{preset}/{surface}", pipeline_run=pipeline_run, ds=ds, tags=tags) as prun:
        mlflow.log_metrics({k: v for k, v in scores[best].items() if math.isfinite(v)}, step=_step(lake, window))
    return {"ds": ds, "surface": surface, "scores": scores, "fm": fm, "best": best, "champion_ne": champ_ne,
            "promoted": promote, "decision": decision, "version": version, "transfer_ratio": transfers,
            "run_id": prun.info.run_id}
