"""compare_and_promote: score every variant and the champion on the same rows of a day, decide, record.

The stage behind the DAG task ``compare_and_promote`` (re-exported by experts.stage). The rule itself is
the pure function `experts.promote.decide`; this module gathers its inputs and writes its outcome:

- every variant's checkpoint trained through a day before ds is scored on ALL rows of
  expert_examples(ds) (the same rows the progressive evals used), with the FM on those rows, in one pass
  over the partition (`score`: per-row probabilities only, never the partition's feature tensors whole);
- each variant's NE difference to base on those rows with its 95% paired-bootstrap interval
  (`ne_vs_base`), and the best challenger's difference to the champion variant (`vs_champion`),
  optionally pooled with the last `pool_days` - 1 days that compared the same two variants;
- the champion in force is the variant of the newest decision before ds (experts/records.py); it is
  scored as that variant's newest checkpoint trained before ds, so re-running ds — even after later
  days ran — scores the same models and reaches the same decision;
- the decision (promoted / kept) is written to the lake for ds with its figures, replacing a previous
  run's; the champion record names the serving variant's checkpoint trained through ds (the champion
  variant keeps training daily, so "kept" serves its newest model). Registry aliases (``champion``,
  ``challenger``) move only when no later day has a decision (re-running the past does not roll back
  the serving model). Transfer ratios are logged onto the larger-FM expert_train runs when another FM
  preset has results for ds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.jsonsafe import strict_json
from common.metrics import all_metrics
from experts.checkpoint import Checkpoint, ckpt_relpath, latest_before, load_checkpoint, trusted_ckpt_relpath
from experts.config import VARIANTS, ExpertConfig
from experts.data import examples_for
from experts.evaluate import fm_probs, gap_closure, predict, smaller_first, training_ctr, transfer_ratio
from experts.promote import Decision, Interval, decide, ne_diff, pool
from experts.records import champion_before, decided_after, read_champion, read_eval, write_champion
from experts.stream import Rows, chunks, fitting
from features.lake import Lake
from features.schemas import FM_OUTPUTS
from features.windows import Window, assert_after


def compare_and_promote(ds: str, surface: str, lake_uri: str, fm_preset: str = "small", pipeline_run: str = "manual",
                        margin: float = 0.0, pool_days: int = 1) -> dict:
    """Score, decide with confidence, record (module docstring).

    `margin` (NE units, >= 0 asks for a minimum gain) and `pool_days` (days pooled into the challenger's
    interval against the champion) parametrise `experts.promote.decide`. Returns strict JSON: {"ds",
    "surface", "scores" (per variant, with ne_vs_base / _lo / _hi), "fm", "best", "champion_ne",
    "vs_champion", "reason", "promoted", "decision", "champion", "version", "transfer_ratio", "run_id"}
    or {"skipped": reason}.
    """
    lake = Lake(lake_uri)
    window = lake.window(ds)
    cfg = ExpertConfig()
    source = examples_for(lake, window, surface, fm_preset, cfg.history_length, cfg.shuffle_rows)
    if source is None:
        return {"ds": ds, "surface": surface, "skipped": f"FM {fm_preset!r} has scored nothing yet"}
    models = _variant_ckpts(lake, window, surface, fm_preset)
    if not models:
        return {"ds": ds, "surface": surface, "skipped": "no expert trained before this window"}
    previous = _previous_champion(lake, window, surface, fm_preset)
    champ = None if previous is None else previous["variant"]
    if previous is not None and champ not in models:  # the champion's variant is not trained any more
        models["champion"] = (load_checkpoint(lake, previous["checkpoint"]), "champion")
    probs, fm_p = score(models, fitting(source, cfg.shuffle_rows), window)
    champ_probs = probs.pop("champion", None)
    y = source.label.numpy().astype(np.float64)
    base_rate = training_ctr(lake, window, surface)
    scores, fm = _scores(y, probs, fm_p, base_rate)
    best = min(scores, key=lambda v: scores[v]["logloss"])  # = the lowest NE: same rows, same base rate
    champ_ne, vs_champion = None, None
    diffs: dict[str, Interval] = {}  # each variant vs the champion on today's rows (kept for pooling)
    if champ is not None:
        if champ_probs is None:
            champ_probs, champ_ne = probs[champ], scores[champ]["ne"]
        else:  # its recorded model
            champ_ne = all_metrics(y, champ_probs, base_rate)["ne"]
        diffs = {v: ne_diff(y, p, champ_probs, base_rate) for v, p in probs.items()}
        if best != champ:
            earlier = _earlier_diffs(lake, window, surface, fm_preset, best, champ, pool_days - 1)
            vs_champion = pool([diffs[best], *earlier])
    decision = decide(best, champ, vs_champion, margin)
    record = _winner_record(lake, window, surface, fm_preset, decision.variant)
    version = _update_registry(lake, window, surface, fm_preset, best, decision, record)
    record.update(decision="promoted" if decision.promote else "kept", reason=decision.reason,
                  scored_champion=champ, vs_champion={v: d.to_dict() for v, d in diffs.items()},
                  **({"version": version} if version else {}))
    write_champion(lake, fm_preset, surface, ds, record)
    transfers = _log_transfers(lake, window, surface, fm_preset, scores)
    _log_fm_vs_base(lake, window, surface, fm_preset, fm)
    run_id = _log_promotion(lake, window, surface, fm_preset, pipeline_run, source.fm_versions[0], scores[best], best, decision,
                            champ_ne, vs_champion, version, margin)
    return strict_json({"ds": ds, "surface": surface, "scores": scores, "fm": fm, "best": best,
                        "champion_ne": champ_ne, "vs_champion": vs_champion.to_dict() if vs_champion else None,
                        "reason": decision.reason, "promoted": decision.promote, "decision": record["decision"],
                        "champion": record, "version": version, "transfer_ratio": transfers, "run_id": run_id})


def _variant_ckpts(lake: Lake, window: Window, surface: str, preset: str) -> dict[str, tuple[Checkpoint, str]]:
    """Every variant's newest checkpoint trained through a window before `window`, with its name for `score`."""
    out = {}
    for variant in VARIANTS:
        rel = latest_before(lake, preset, surface, variant, window)
        if rel is not None:
            out[variant] = (load_checkpoint(lake, rel), f"expert {surface}/{variant}")
    return out


def score(models: Mapping[str, tuple[Checkpoint, str]], rows: Rows, window: Window
          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Serving probabilities (N,) of each named checkpoint on every row of `rows` (rows of `window`) and the FM's
    (its fm_logit_click), in one pass over the rows. Each (checkpoint, what) must be trained through a window
    before `window` (leakage guard, as experts.evaluate.score_before)."""
    built = {}
    for name, (ckpt, what) in models.items():
        assert_after(Window.parse(ckpt.trained_through, window.days), window, what)
        built[name] = ckpt.build()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in built}
    fm = []
    for chunk in chunks(rows):
        for name, model in built.items():
            parts[name].append(predict(model, chunk))
        fm.append(fm_probs(chunk))
    return {name: np.concatenate(p) for name, p in parts.items()}, np.concatenate(fm)


def _scores(y: np.ndarray, probs: dict[str, np.ndarray], fm: np.ndarray, base_rate: float
            ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """all_metrics per variant and for the FM; gap closure and ne_vs_base (with interval) against base."""
    scores = {v: all_metrics(y, p, base_rate) for v, p in probs.items()}
    fm_scores = all_metrics(y, fm, base_rate)
    if "base" in probs:
        for v, m in scores.items():
            m["gap_closure"] = gap_closure(scores["base"]["ne"], m["ne"], fm_scores["ne"])
            m.update(vs_base_metrics(ne_diff(y, probs[v], probs["base"], base_rate)))
        fm_scores.update(vs_base_metrics(ne_diff(y, fm, probs["base"], base_rate)))
    return scores, fm_scores


def vs_base_metrics(diff: Interval) -> dict[str, float]:
    """The MLflow metrics of an NE difference to base: ne_vs_base, ne_vs_base_lo, ne_vs_base_hi."""
    return {"ne_vs_base": diff.mean, "ne_vs_base_lo": diff.lo, "ne_vs_base_hi": diff.hi}


def _earlier_diffs(lake: Lake, window: Window, surface: str, preset: str, challenger: str, champ: str,
                   days: int) -> list[Interval]:
    """`challenger` vs `champ` intervals of up to `days` earlier decisions that scored the same champion."""
    found, w = [], window.prev()
    for _ in range(max(days, 0)):
        rec = read_champion(lake, preset, surface, w.ds)
        if rec is None or rec.get("scored_champion") != champ or challenger not in rec.get("vs_champion", {}):
            break
        found.append(Interval.from_dict(rec["vs_champion"][challenger]))
        w = w.prev()
    return found


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


def _winner_record(lake: Lake, window: Window, surface: str, preset: str, variant: str) -> dict[str, Any]:
    """The model serving `variant` after ds: trained through ds if expert_train ran, else the newest before."""
    rel = ckpt_relpath(preset, surface, variant, window.ds)
    if not lake.file_exists(rel):
        rel = str(latest_before(lake, preset, surface, variant, window))
    return {"variant": variant, "checkpoint": rel, "trained_through": rel.split("ds=")[-1].split("/")[0]}


def _update_registry(lake: Lake, window: Window, surface: str, preset: str, best: str, decision: Decision,
                     record: dict[str, Any]) -> str | None:
    """Register the best challenger (alias challenger) and the serving model (alias champion) when ds is the
    newest decided day; the champion's version (None for a re-run of the past or without runs)."""
    if decided_after(lake, preset, surface, window):
        return None
    serving = record if decision.variant == best else _winner_record(lake, window, surface, preset, best)
    version = _register(serving, surface, preset, ["challenger", "champion"] if decision.variant == best
                        else ["challenger"])
    if decision.variant != best:
        version = _register(record, surface, preset, ["champion"])
    return version


def _register(record: dict[str, Any], surface: str, preset: str, aliases: list[str]) -> str | None:
    """Register the expert_train run model of `record`, set `aliases`; the version (None without a run)."""
    from experts.registry import find_train_run, register

    run = find_train_run(record["trained_through"], surface, record["variant"], preset)
    if run is None:
        return None
    vtags = {"variant": record["variant"], "fm_preset": preset, "trained_through": record["trained_through"],
             "fm_version": run.data.tags["fm_version"], "checkpoint": record["checkpoint"]}
    return register(run.data.tags["model_uri"], surface, preset, vtags, aliases)


def _log_promotion(lake: Lake, window: Window, surface: str, preset: str, pipeline_run: str, fm_version: str,
                   best_scores: dict[str, float], best: str, decision: Decision, champ_ne: float | None,
                   vs_champion: Interval | None, version: str | None, margin: float) -> str:
    """The promotion run: the decision, its reason and figures (the best challenger's metrics, vs champion)."""
    import mlflow

    from common.tracking import stage_run
    from experts.registry import PROMOTE_STAGE, STAGE_TAG

    tags = {"surface": surface, "variant": best, "fm_version": fm_version, "fm_preset": preset,
            STAGE_TAG: PROMOTE_STAGE, "decision": "promoted" if decision.promote else "kept",
            "reason": decision.reason[:5000], "champion_after": decision.variant,
            "champion_ne": "none" if champ_ne is None else f"{champ_ne:.6f}",
            "challenger_ne": f"{best_scores['ne']:.6f}", "margin": str(margin), "registered_version": str(version),
            "registry_updated": str(version is not None).lower()}
    metrics = dict(best_scores)
    if vs_champion is not None:
        metrics.update(ne_vs_champion=vs_champion.mean, ne_vs_champion_lo=vs_champion.lo,
                       ne_vs_champion_hi=vs_champion.hi)
    with stage_run(f"promote/{preset}/{surface}", pipeline_run=pipeline_run, ds=window.ds, tags=tags) as run:
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=lake.step(window))
        return str(run.info.run_id)


def _transfer(lake: Lake, preset: str, surface: str, ds: str, variant: str) -> tuple[str, float] | None:
    """Transfer ratio of `variant` between `preset` and another FM preset with eval results on ds."""
    mine = read_eval(lake, preset, surface, ds, variant)
    if mine is None:
        return None
    for other in sorted(p["fm"] for p in lake.partitions(FM_OUTPUTS.name, ds=ds, surface=surface)):
        theirs = read_eval(lake, other, surface, ds, variant) if other != preset else None
        if theirs is None or theirs["rows"] != mine["rows"]:
            continue
        small, large = smaller_first(preset, other)
        ev = {preset: mine, other: theirs}
        ratio = transfer_ratio(ev[small]["metrics"]["ne"], ev[large]["metrics"]["ne"],
                               ev[small]["fm"]["ne"], ev[large]["fm"]["ne"])
        return large, ratio
    return None


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


def _log_fm_vs_base(lake: Lake, window: Window, surface: str, preset: str, fm: dict[str, float]) -> None:
    """The FM's NE difference to base on these rows, onto the FM's per-surface export run of ds (if any)."""
    import mlflow

    from common.tracking import setup

    if "ne_vs_base" not in fm:
        return
    flt = (f"tags.variant = 'fm' and tags.surface = '{surface}' and tags.ds = '{window.ds}' "
           f"and tags.fm_preset = '{preset}' and attributes.status = 'FINISHED'")
    runs = mlflow.search_runs([setup()], filter_string=flt, output_format="list", max_results=1,
                              order_by=["attributes.start_time DESC"])
    client = mlflow.MlflowClient()
    for key in ("ne_vs_base", "ne_vs_base_lo", "ne_vs_base_hi"):
        if runs and math.isfinite(fm[key]):
            client.log_metric(runs[0].info.run_id, key, fm[key], step=lake.step(window))
