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

Idempotent re-runs: checkpoints are kept per day, expert_train(D) always evaluates and warm-starts
from the newest checkpoint trained through a day before D (D-1 in the daily flow) and replaces D's
checkpoint; compare_and_promote(D) scores the champion recorded in the lake for the newest day before D
(experts/records.py). Re-running D, before or after D+1 ran, gives the same scores and decision.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from experts.config import VARIANTS, ExpertConfig
from experts.data import ExpertData, load_examples
from experts.evaluate import (
    fm_probs,
    gap_closure,
    predict,
    smaller_first,
    training_ctr,
    transfer_ratio,
)
from experts.records import champion_before, decided_after, read_eval, strict_json, write_champion, write_eval
from experts.train import (
    Checkpoint,
    check_lineage,
    ckpt_relpath,
    latest_before,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
    train_window,
    trusted_ckpt_relpath,
)
from features.expert_examples import build_expert_examples
from features.lake import Lake
from features.metrics import all_metrics, ne
from features.threads import torch_threads
from features.windows import Window, assert_after

__all__ = ["VARIANTS", "compare_and_promote", "expert_examples", "expert_train"]


def _fm_started(lake: Lake, preset: str, window: Window) -> bool:
    """Whether FM `preset` scored any window up to and including `window`."""
    return any(p["ds"] <= window.ds for p in lake.partitions("fm_outputs", fm=preset))


def expert_examples(ds: str, surface: str, lake_uri: str, preset: str = "small") -> dict:
    """Write expert_examples(fm=preset, ds, surface) (plus any missing loop_state); rows and path."""
    lake = Lake(lake_uri)
    window = lake.window(ds)
    if not _fm_started(lake, preset, window):
        return {"ds": ds, "surface": surface, "skipped": f"FM {preset!r} has scored no window up to {ds}"}
    path = build_expert_examples(lake, window, surface, preset, ExpertConfig().history_length)
    rows = lake.read("expert_examples", columns=["event_id"], fm=preset, ds=ds, surface=surface).num_rows
    return strict_json({"ds": ds, "surface": surface, "fm": preset, "rows": rows, "path": path})


def _score(ckpt: Checkpoint, data: ExpertData, window: Window, what: str) -> np.ndarray:
    assert_after(Window.parse(ckpt.trained_through, window.days), window, what)
    return predict(ckpt.build(), data)


def _progressive_eval(lake: Lake, window: Window, surface: str, preset: str, ckpt: Checkpoint,
                      data: ExpertData) -> dict[str, Any]:
    """Metrics of `ckpt` (trained through < window) on every row of `data`, with the FM and gap closure."""
    y = data.label.numpy().astype(np.float64)
    base_rate = training_ctr(lake, window, surface)
    probs = _score(ckpt, data, window, f"expert {surface}/{ckpt.config.variant}")
    result: dict[str, Any] = {"metrics": all_metrics(y, probs, base_rate), "base_rate": base_rate,
                              "fm": all_metrics(y, fm_probs(data), base_rate), "rows": len(y),
                              "trained_through": ckpt.trained_through}
    base_rel = latest_before(lake, preset, surface, "base", window)
    if base_rel is not None:
        base = load_checkpoint(lake, base_rel)
        ne_base = ne(y, _score(base, data, window, f"expert {surface}/base"), base_rate)
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
    (`overrides` apply to a cold start only). Trains with one torch thread (restored after).
    """
    with torch_threads(1):  # the expert's layers are too small to gain from more
        return _expert_train(ds, surface, variant, lake_uri, preset, pipeline_run, rebaseline, overrides)


def _expert_train(ds: str, surface: str, variant: str, lake_uri: str, preset: str, pipeline_run: str,
                  rebaseline: bool, overrides: dict[str, Any] | None) -> dict:
    lake = Lake(lake_uri)
    window = lake.window(ds)
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
        write_eval(lake, preset, surface, ds, variant, {k: v for k, v in evaluation.items() if k != "calib"})
    run_id = _log_train(lake, window, surface, new, data, evaluation, rel, pipeline_run, rebaseline)
    return strict_json({"ds": ds, "surface": surface, "variant": variant, "fm_version": data.fm_versions[0],
                        "metrics": evaluation.get("metrics", {}), "loss": loss, "checkpoint": rel, "run_id": run_id})


def _log_train(lake: Lake, window: Window, surface: str, ckpt: Checkpoint, data: ExpertData,
               evaluation: dict[str, Any], rel: str, pipeline_run: str, rebaseline: bool) -> str:
    import mlflow

    from experts.plots import calibration_curve, close_figure, ne_by_day
    from experts.registry import STAGE_TAG, TRAIN_STAGE, log_model
    from features.tracking import stage_run

    variant, preset, step = ckpt.config.variant, ckpt.fm_preset, lake.step(window)
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
        rec = read_eval(lake, preset, surface, w.ds, variant)
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
            scores[variant] = all_metrics(y, probs, base_rate)
    fm = all_metrics(y, fm_probs(data), base_rate)
    if "base" in scores:
        for m in scores.values():
            m["gap_closure"] = gap_closure(scores["base"]["ne"], m["ne"], fm["ne"])
    return scores, fm


def _transfer(lake: Lake, preset: str, surface: str, ds: str, variant: str) -> tuple[str, float] | None:
    """Transfer ratio of `variant` between `preset` and another FM preset with eval results on ds."""
    mine = read_eval(lake, preset, surface, ds, variant)
    if mine is None:
        return None
    for other in sorted(p["fm"] for p in lake.partitions("fm_outputs", ds=ds, surface=surface)):
        theirs = read_eval(lake, other, surface, ds, variant) if other != preset else None
        if theirs is None or theirs["rows"] != mine["rows"]:
            continue
        small, large = smaller_first(preset, other)
        ev = {preset: mine, other: theirs}
        ratio = transfer_ratio(ev[small]["metrics"]["ne"], ev[large]["metrics"]["ne"],
                               ev[small]["fm"]["ne"], ev[large]["fm"]["ne"])
        return large, ratio
    return None


def _previous_champion(lake: Lake, window: Window, surface: str, preset: str) -> dict[str, Any] | None:
    """The champion in force when `window` starts: the lake's decision of the newest earlier day.

    Lakes without decisions (older runs) fall back to the registry's champion, resolved to its
    variant's checkpoint trained through a day before `window` (never a model trained on `window`).
    """
    from experts.registry import champion

    found = champion_before(lake, preset, surface, window)
    if found is not None:
        return {**found, "checkpoint": trusted_ckpt_relpath(found["checkpoint"], preset, surface)}
    current = champion(surface, preset)
    if current is None:
        return None
    variant = current.tags["variant"]
    # the registry tag is remote input: only an expert checkpoint of (preset, surface) inside the lake
    rel = trusted_ckpt_relpath(current.tags["checkpoint"], preset, surface) if current.tags.get(
        "trained_through", window.ds) < window.ds else latest_before(lake, preset, surface, variant, window)
    return None if rel is None else {"variant": variant, "checkpoint": rel, "version": current.version}


def _winner_record(lake: Lake, window: Window, surface: str, preset: str, best: str) -> dict[str, Any]:
    """The model a promotion of `best` installs: trained through window if expert_train ran, else the scored one."""
    rel = ckpt_relpath(preset, surface, best, window.ds)
    if not lake.file_exists(rel):
        rel = str(latest_before(lake, preset, surface, best, window))
    return {"variant": best, "checkpoint": rel, "trained_through": rel.split("ds=")[-1].split("/")[0]}


def _register(record: dict[str, Any], surface: str, preset: str, aliases: list[str]) -> str | None:
    """Register the expert_train run model of `record`, set `aliases`; the version (None without a run)."""
    from experts.registry import find_train_run, register

    run = find_train_run(record["trained_through"], surface, record["variant"], preset)
    if run is None:
        return None
    vtags = {"variant": record["variant"], "fm_preset": preset, "trained_through": record["trained_through"],
             "fm_version": run.data.tags["fm_version"], "checkpoint": record["checkpoint"]}
    return register(run.data.tags["model_uri"], surface, preset, vtags, aliases)


def compare_and_promote(ds: str, surface: str, lake_uri: str, preset: str = "small", pipeline_run: str = "manual",
                        margin: float = 0.001) -> dict:
    """Score every variant (trained through < ds) and the champion on the same rows of ds; promote.

    The champion scored is the one in force when ds starts (the decision of the newest earlier day,
    experts/records.py), so re-running ds — even after later days ran — scores the same models. The
    best challenger (lowest NE) becomes champion when there is none yet or when it beats the
    champion's NE by more than `margin`; the model installed is the winner's checkpoint trained through
    ds (or the scored one if ds was not trained yet). The decision is written to the lake for ds
    (replacing a previous run's); registry aliases (``champion``, ``challenger``) move only when no
    later day has a decision (re-running the past does not roll back the serving model). Transfer
    ratios are logged onto the larger-FM expert_train runs when another FM preset has results for ds.
    Returns strict JSON: {"ds", "surface", "scores", "fm", "best", "champion_ne", "promoted",
    "decision", "champion", "version", "transfer_ratio", "run_id"} or {"skipped": reason}.
    """
    import mlflow

    from experts.registry import PROMOTE_STAGE, STAGE_TAG
    from features.tracking import setup, stage_run

    lake = Lake(lake_uri)
    window = lake.window(ds)
    data = _examples(lake, window, surface, preset, ExpertConfig())
    if data is None:
        return {"ds": ds, "surface": surface, "skipped": f"FM {preset!r} has scored nothing yet"}
    scores, fm = _score_variants(lake, window, surface, preset, data)
    if not scores:
        return {"ds": ds, "surface": surface, "skipped": "no expert trained before this window"}
    setup()
    best = min(scores, key=lambda v: scores[v]["ne"])
    previous = _previous_champion(lake, window, surface, preset)
    champ_ne = None
    if previous is not None:
        probs = _score(load_checkpoint(lake, previous["checkpoint"]), data, window, "champion")
        champ_ne = ne(data.label.numpy().astype(np.float64), probs, training_ctr(lake, window, surface))
    promote = champ_ne is None or champ_ne - scores[best]["ne"] > margin
    record = _winner_record(lake, window, surface, preset, best) if promote else dict(previous or {})
    latest = not decided_after(lake, preset, surface, window)
    version = None
    if latest:
        version = _register(_winner_record(lake, window, surface, preset, best), surface, preset,
                            ["challenger", "champion"] if promote else ["challenger"])
    record.update(decision="promoted" if promote else "kept", **({"version": version} if promote else {}))
    write_champion(lake, preset, surface, ds, record)
    transfers = _log_transfers(lake, window, surface, preset, scores)
    old = previous["variant"] if previous is not None else "none"
    tags = {"surface": surface, "variant": best, "fm_version": data.fm_versions[0], "fm_preset": preset,
            STAGE_TAG: PROMOTE_STAGE, "decision": record["decision"], "previous_champion": old,
            "champion_ne": "none" if champ_ne is None else f"{champ_ne:.6f}",
            "challenger_ne": f"{scores[best]['ne']:.6f}", "margin": str(margin), "registered_version": str(version),
            "registry_updated": str(latest).lower()}
    with stage_run(f"promote/{preset}/{surface}", pipeline_run=pipeline_run, ds=ds, tags=tags) as prun:
        mlflow.log_metrics({k: v for k, v in scores[best].items() if math.isfinite(v)}, step=lake.step(window))
    return strict_json({"ds": ds, "surface": surface, "scores": scores, "fm": fm, "best": best,
                        "champion_ne": champ_ne, "promoted": promote, "decision": record["decision"],
                        "champion": record, "version": version, "transfer_ratio": transfers,
                        "run_id": prun.info.run_id})


def _log_transfers(lake: Lake, window: Window, surface: str, preset: str, scores: dict[str, Any]) -> dict[str, float]:
    """Transfer ratio per variant against another FM preset; logged on the larger FM's expert_train run."""
    import mlflow

    from experts.registry import find_train_run

    transfers = {}
    for variant in scores:
        found = _transfer(lake, preset, surface, window.ds, variant)
        if found is not None:
            transfers[variant] = found[1]
            target = find_train_run(window.ds, surface, variant, found[0])
            if target is not None and math.isfinite(found[1]):
                mlflow.MlflowClient().log_metric(target.info.run_id, "transfer_ratio", found[1],
                                                 step=lake.step(window))
    return transfers
