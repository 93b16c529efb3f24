"""Issue #3 acceptance experiment: progressive NE of FM small vs large over days, beside the Bayes NE.

`python bench/fm_ne_table.py [--days 7] [--scale small] [--events-per-day N] [--presets small,large]`

Generates `days` windows of built-in data; for each preset and each day D: export (progressive metrics
on D with FM_{D-1}), then train on D. Prints one row per (surface, day) and a per-day mean row:

- `NE <preset>`: the FM's progressive NE on D, base rate = that surface's CTR of D-1 (the FM's training
  window; exactly what fm_export logs to MLflow);
- `Bayes`: the generator's true p_click on D, with the SAME base rate (CTR of D-1), so the two are
  directly comparable (the gap is the FM's excess log loss in units of the same entropy);
- `Bayes(D)`: the true p_click with D's own CTR as base rate (features.explain.bayes_metrics), for
  reference: the day-to-day swing of the CTR moves both NE columns, not this one.

The summary gives, per preset, the mean NE over days and surfaces, over the last 3 days, and the mean
gap to Bayes (same base rate) on day 2 and on the last day.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import polars as pl
import torch

from common.metrics import entropy
from features.explain import bayes_metrics_by_surface, explain_window
from features.generate import GeneratorConfig, generate
from features.history import build_user_history
from features.lake import Lake
from features.schemas import EVENTS
from fm.config import lake_config
from fm.export import export_fm
from fm.train import parse_overrides, run_training


def _overrides(items: list[str], preset: str) -> dict:
    """['large:lr=0.001', 'small:emb_lr=0.01'] -> the overrides of `preset` (JSON values, as fm.train's --set)."""
    return parse_overrides([kv for name, _, kv in (item.partition(":") for item in items) if name == preset])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--scale", default="small")
    p.add_argument("--events-per-day", type=int, default=None)
    p.add_argument("--presets", default="small,large")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="preset:key=value override")
    args = p.parse_args()
    lake = Lake(tempfile.mkdtemp(prefix="fm-ne-") + "/lake")
    gen = GeneratorConfig(scale=args.scale, events_per_day=args.events_per_day)
    windows = generate(lake, gen, args.days,
                       progress=None)
    for w in windows:
        build_user_history(lake, w)
    presets = [q for q in args.presets.split(",") if q]  # "": the oracle columns only
    ne: dict[tuple[str, str, str], float] = {}
    for preset in presets:
        cfg = lake_config(preset, lake.meta(), log_every=10**9, threads=args.threads,
                          **_overrides(args.set, preset))
        t0 = time.perf_counter()
        for w in windows:
            res = export_fm(cfg, w, lake)
            ne |= {(preset, s, w.ds): m["ne"] for s, m in res.metrics.items()}
            run_training(cfg, w, lake)
        print(f"{preset}: {len(windows)} days in {time.perf_counter() - t0:.0f}s", flush=True)
    torch.set_num_threads(args.threads)
    print_ne_table(lake, windows, presets, ne, gen)


def _population(f: pl.DataFrame, affinity: str, intent: bool) -> np.ndarray:
    """The true logit with the user's own taste replaced by `affinity` (a population-level stand-in) and
    no user-surface click bias; without the intent term unless `intent`."""
    known = _logit(f) - f["term_affinity"] - f["term_user_surface_bias"] + f[affinity]
    return known if intent else known - f["term_intent"]


ORACLES = {  # name -> the part of the true logit it knows (features.explain.explain_window's terms)
    # per-user taste unknown (the user's segment's centre instead); items, intent and context known
    "Seg": lambda f: _population(f, "segment_affinity", intent=True),
    # ... and the user's current intent unknown as well
    "Seg-int": lambda f: _population(f, "segment_affinity", intent=False),
    # ... and the item's own vector unknown too (its category's centre): only population-level structure
    # (segment x category, brand, region, surface, position, device, item age), all of it in the FM's inputs
    "Cat-int": lambda f: _population(f, "category_affinity", intent=False),
}


def _logit(f: pl.DataFrame) -> np.ndarray:
    return np.sum([f[c].to_numpy() for c in f.columns if c.startswith("term_")], axis=0)


def oracle_logloss(z: np.ndarray, y: np.ndarray) -> float:
    """Log loss of sigmoid(X beta) with beta (one weight per column of z, plus a bias) fit on (z, y) by
    Newton's method: the best calibrated model that knows z, (n,) or (n, k)."""
    X = np.column_stack([z, np.ones(len(y))])
    beta = np.zeros(X.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-(X @ beta)))
        step = np.linalg.solve((X * (p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(len(beta)), X.T @ (p - y))
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    p = np.clip(1 / (1 + np.exp(-(X @ beta))), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def print_ne_table(lake: Lake, windows: list, presets: list[str], ne: dict[tuple[str, str, str], float],
                   gen: GeneratorConfig | None = None) -> None:
    """The per (surface, day) table of progressive NE by FM preset beside Bayes, and the summary lines.

    `ne` maps (preset, surface, ds) -> the FM's progressive NE (fm_export's metrics); `windows` in order.
    With `gen` (the lake's generator config) it adds the ORACLES columns: the NE of the best calibrated
    model that knows only part of the generator's click logit, with the same base rate.
    """
    cols = [f"NE {q}" for q in presets] + (list(ORACLES) if gen else []) + ["Bayes"]
    print(f"{'surface':8}{'day':>12}" + "".join(f"{c:>12}" for c in cols) + f"{'Bayes(D)':>10}")
    gaps: dict[tuple[str, str], list[float]] = {}
    for prev, w in zip(windows, windows[1:], strict=False):
        events = lake.scan_many(EVENTS.name, lake.partitions(EVENTS.name, ds=w.ds)).collect()
        before = lake.scan_many(EVENTS.name, lake.partitions(EVENTS.name, ds=prev.ds)).collect()
        ctr = {str(s[0]): float(g["click"].mean()) for s, g in before.group_by("surface")}  # type: ignore[arg-type]
        explained = explain_window(lake, gen, w) if gen else None
        rows = []
        for s, b in sorted(bayes_metrics_by_surface(events).items()):
            rate = ctr.get(s, 0.0)
            h = entropy(rate) if 0 < rate < 1 else float("nan")  # as fm_export: nan
            row = {f"NE {q}": ne.get((q, s, w.ds), float("nan")) for q in presets}
            if explained is not None:
                f = explained.filter(pl.col("surface") == s)
                y = f["click"].to_numpy().astype(np.float64)
                row |= {name: oracle_logloss(known(f), y) / h for name, known in ORACLES.items()}
            row["Bayes"] = b["logloss"] / h
            rows.append([row[c] for c in cols] + [b["ne"]])
            for c in cols[:-1]:
                gaps.setdefault((c, w.ds), []).append(row[c] - row["Bayes"])
            print(f"{s:8}{w.ds:>12}" + "".join(f"{v:>12.4f}" for v in rows[-1][:-1]) + f"{b['ne']:>10.4f}")
        mean = np.nanmean(np.array(rows), axis=0)
        print(f"{'mean':8}{w.ds:>12}" + "".join(f"{v:>12.4f}" for v in mean[:-1]) + f"{mean[-1]:>10.4f}")
    days = [w.ds for w in windows[1:]]
    for q in presets:
        vals = np.array([v for (pp, _, _), v in ne.items() if pp == q])
        last3 = [v for (pp, _, d), v in ne.items() if pp == q and d in days[-3:]]
        print(f"{q}: mean NE {np.nanmean(vals):.4f}, last 3 days {np.nanmean(last3):.4f}; mean gap to Bayes (same base "
              f"rate) day {days[0]} {np.nanmean(gaps[(f'NE {q}', days[0])]):+.4f} -> day {days[-1]} "
              f"{np.nanmean(gaps[(f'NE {q}', days[-1])]):+.4f}, last 3 days "
              f"{np.nanmean([g for d in days[-3:] for g in gaps[(f'NE {q}', d)]]):+.4f}")
    for name in ORACLES if gen else ():
        print(f"oracle {name}: mean gap to Bayes (same base rate), last 3 days "
              f"{np.nanmean([g for d in days[-3:] for g in gaps[(name, d)]]):+.4f}")


if __name__ == "__main__":
    main()
