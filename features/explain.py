"""What the generator knows about its own data: each event's true click-logit terms and the Bayes ceiling.

`explain_window` re-simulates a generated window (features.simulate) and returns every event with the
additive terms of its true click logit (bench/fm_ne_table.py, bench/fm_missing_terms.py); `bayes_metrics`
scores the stored `p_click` against the clicks: the ceiling no model can beat. Bayes AUC of p_click is
~0.79-0.85 per surface (NE ~0.83-0.86 with the day's own CTR as base rate), CTR ~4 % (feed, video, live)
to ~7.5 % (search), stationary from day one ("tiny" is noisier).
"""

from __future__ import annotations

from datetime import date

import numpy as np
import polars as pl

from common.metrics import auc, logloss, ne
from features.lake import Lake
from features.schemas import CLICK, EVENTS, P_CLICK, SURFACE
from features.simulate import day_inputs, events_frame, simulate_day
from features.windows import Window
from features.world import GeneratorConfig


def explain_window(lake: Lake, cfg: GeneratorConfig, window: Window) -> pl.DataFrame:
    """Every event of a generated `window` with the terms of its true click logit (for bench/fm_ne_table.py).

    Re-simulates the day (deterministic from cfg, the day index and the previous window's events) and
    checks that it reproduces the lake's p_click. Columns: event_id, surface, click, p_click, one
    ``term_<name>`` per additive logit term (they sum to logit(p_click)), and two population-level
    stand-ins for the personal affinity term: ``segment_affinity`` (the user's taste replaced by their
    segment's centre: what no per-user data is needed to know) and ``category_affinity`` (the item's
    vector replaced by its category's centre as well).
    """
    meta = lake.meta()
    if meta.get("source") != "generator" or (meta.get("scale"), meta.get("seed")) != (cfg.scale, cfg.seed):
        raise ValueError(f"lake {lake.uri} was not generated with scale={cfg.scale!r}, seed={cfg.seed} "
                         f"(its meta: source={meta.get('source')!r}, scale={meta.get('scale')!r}, seed={meta.get('seed')})")
    origin = date.fromisoformat(meta["origin"])
    day = day_inputs(lake, cfg, window, origin)
    world, users, items = day.world, day.users, day.items
    ev, terms, _ = simulate_day(cfg, world, users, items, day.carry, day.day)
    seg_u = 0.9 * world["segment_centre"][users["segment"][ev["user"]]]
    v, centre = items["v"][ev["item"]], world["category_centre"][items["category"][ev["item"]]]
    extra = {f"term_{k}": t for k, t in terms.items()} | {
        "segment_affinity": 0.8 * (seg_u * v).sum(1) / np.sqrt(cfg.preset.dim),
        "category_affinity": 0.8 * (seg_u * centre).sum(1) / np.sqrt(cfg.preset.dim),
    }
    frame = events_frame(ev, window, extra).select("event_id", SURFACE, CLICK, P_CLICK, *extra)
    stored = lake.scan_many(EVENTS.name, lake.partitions(EVENTS.name, ds=window.ds)).select("event_id", P_CLICK)
    check = frame.lazy().join(stored, on="event_id", how="full").collect()
    if check.height != frame.height or not check[P_CLICK].equals(check[P_CLICK + "_right"], check_names=False):
        raise ValueError(f"re-simulating {window} does not reproduce lake {lake.uri}'s events: it was written by "
                         "another generator version or edited")
    return frame


def bayes_metrics(events: pl.DataFrame) -> dict[str, float]:
    """AUC, log loss and NE of the true `p_click` against `click`: the ceiling no model can beat.

    NE = log loss / entropy of the base rate, where the base rate is the CTR of these same events
    (recorded as "base_rate"). Returns {"rows", "base_rate", "mean_p_click", "auc", "logloss", "ne"}.
    """
    y = events[CLICK].to_numpy().astype(np.float64)
    p = events[P_CLICK].to_numpy().astype(np.float64)
    ctr = float(y.mean()) if len(y) else float("nan")
    return {"rows": float(len(y)), "base_rate": ctr, "mean_p_click": float(p.mean()), "auc": auc(y, p),
            "logloss": logloss(y, p), "ne": ne(y, p, ctr)}


def bayes_metrics_by_surface(events: pl.DataFrame) -> dict[str, dict[str, float]]:
    """`bayes_metrics` per surface (each with its own base rate)."""
    return {str(s): bayes_metrics(events.filter(pl.col(SURFACE) == s)) for s in sorted(events[SURFACE].unique())}

