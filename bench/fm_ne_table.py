"""Issue #3 acceptance experiment: progressive NE of FM small vs large over days, beside the Bayes NE.

`python bench/fm_ne_table.py [--days 7] [--scale small] [--events-per-day N] [--presets small,large]`

Generates `days` windows of built-in data; for each preset and each day D: export (progressive metrics
on D with FM_{D-1}), then train on D. Prints one row per (surface, day) and a per-day mean row:

- `NE <preset>`: the FM's progressive NE on D, base rate = that surface's CTR of D-1 (the FM's training
  window; exactly what fm_export logs to MLflow);
- `Bayes`: the generator's true p_click on D, with the SAME base rate (CTR of D-1), so the two are
  directly comparable (the gap is the FM's excess log loss in units of the same entropy);
- `Bayes(D)`: the true p_click with D's own CTR as base rate (features.generate.bayes_metrics), for
  reference: the day-to-day swing of the CTR moves both NE columns, not this one.

The summary gives, per preset, the mean NE over days and surfaces, over the last 3 days, and the mean
gap to Bayes (same base rate) on day 2 and on the last day.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from features.generate import GeneratorConfig, bayes_metrics_by_surface, generate
from features.history import build_user_history
from features.lake import Lake
from features.metrics import entropy
from fm.config import FMConfig, lake_config
from fm.export import export_fm
from fm.train import run_training


def _overrides(items: list[str], preset: str) -> dict:
    over = {}
    for item in items:
        name, _, kv = item.partition(":")
        if name == preset:
            key, _, value = kv.partition("=")
            over[key] = type(getattr(FMConfig(), key))(value)
    return over


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
    windows = generate(lake, GeneratorConfig(scale=args.scale, events_per_day=args.events_per_day), args.days,
                       progress=None)
    for w in windows:
        build_user_history(lake, w)
    presets = args.presets.split(",")
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
    print_ne_table(lake, windows, presets, ne)


def print_ne_table(lake: Lake, windows: list, presets: list[str], ne: dict[tuple[str, str, str], float]) -> None:
    """The per (surface, day) table of progressive NE by FM preset beside Bayes, and the summary lines.

    `ne` maps (preset, surface, ds) -> the FM's progressive NE (fm_export's metrics); `windows` in order.
    """
    head = f"{'surface':8}{'day':>12}" + "".join(f"{'NE ' + q:>12}" for q in presets)
    print(head + f"{'Bayes':>9}{'Bayes(D)':>10}")
    gaps: dict[tuple[str, str], list[float]] = {}
    for prev, w in zip(windows, windows[1:], strict=False):
        events = lake.scan_many("events", lake.partitions("events", ds=w.ds)).collect()
        before = lake.scan_many("events", lake.partitions("events", ds=prev.ds)).collect()
        ctr = {str(s[0]): float(g["click"].mean()) for s, g in before.group_by("surface")}  # type: ignore[arg-type]
        rows = []
        for s, b in sorted(bayes_metrics_by_surface(events).items()):
            rate = ctr.get(s, 0.0)
            same = b["logloss"] / entropy(rate) if 0 < rate < 1 else float("nan")  # as fm_export: nan
            rows.append([ne.get((q, s, w.ds), float("nan")) for q in presets] + [same, b["ne"]])
            for q in presets:
                gaps.setdefault((q, w.ds), []).append(ne.get((q, s, w.ds), float("nan")) - same)
            print(f"{s:8}{w.ds:>12}" + "".join(f"{v:>12.4f}" for v in rows[-1][:-2]) +
                  f"{same:>9.4f}{b['ne']:>10.4f}")
        mean = np.nanmean(np.array(rows), axis=0)
        print(f"{'mean':8}{w.ds:>12}" + "".join(f"{v:>12.4f}" for v in mean[:-2]) + f"{mean[-2]:>9.4f}{mean[-1]:>10.4f}")
    days = [w.ds for w in windows[1:]]
    for q in presets:
        vals = np.array([v for (pp, _, _), v in ne.items() if pp == q])
        last3 = [v for (pp, _, d), v in ne.items() if pp == q and d in days[-3:]]
        print(f"{q}: mean NE {np.nanmean(vals):.4f}, last 3 days {np.nanmean(last3):.4f}; mean gap to Bayes (same base "
              f"rate) day {days[0]} {np.nanmean(gaps[(q, days[0])]):+.4f} -> day {days[-1]} "
              f"{np.nanmean(gaps[(q, days[-1])]):+.4f}, last 3 days "
              f"{np.nanmean([g for d in days[-3:] for g in gaps[(q, d)]]):+.4f}")


if __name__ == "__main__":
    main()
