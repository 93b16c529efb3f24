"""Issue #3 acceptance experiment: progressive NE of FM small vs large over days, beside the Bayes NE.

`python bench/fm_ne_table.py [--days 7] [--scale small] [--events-per-day N] [--presets small,large]`

Generates `days` windows of built-in data; for each preset and each day D: export (progressive metrics
on D with FM_{D-1}), then train on D. Prints one row per (surface, day) with each preset's NE and the
generator's Bayes-optimal NE (features.generate.bayes_metrics: true p_click, base rate = that day's
CTR; the FM's NE uses the CTR of its training window D-1, so the columns are close but not identical
in definition).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import polars as pl
import torch

from features.generate import GeneratorConfig, bayes_metrics_by_surface, generate
from features.history import build_user_history
from features.lake import Lake
from fm.config import FMConfig
from fm.export import export_fm
from fm.train import run_training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--scale", default="small")
    p.add_argument("--events-per-day", type=int, default=None)
    p.add_argument("--presets", default="small,large")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="preset:key=value override")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lake = Lake(tempfile.mkdtemp(prefix="fm-ne-") + "/lake")
    windows = generate(lake, GeneratorConfig(scale=args.scale, events_per_day=args.events_per_day), args.days,
                       progress=None)
    for w in windows:
        build_user_history(lake, w)
    ne: dict[tuple[str, str, str], float] = {}
    for preset in args.presets.split(","):
        over = {}
        for item in args.set:
            name, _, kv = item.partition(":")
            if name == preset:
                key, _, value = kv.partition("=")
                over[key] = type(getattr(FMConfig(), key))(value)
        cfg = FMConfig.from_preset(preset, log_every=10**9, **over)
        t0 = time.perf_counter()
        for w in windows:
            res = export_fm(cfg, w, lake)
            for s, m in res.metrics.items():
                ne[(preset, s, w.ds)] = m["ne"]
            run_training(cfg, w, lake)
        print(f"{preset}: {len(windows)} days in {time.perf_counter() - t0:.0f}s", flush=True)
    presets = args.presets.split(",")
    print(f"{'surface':8}{'day':>12}" + "".join(f"{'NE ' + q:>12}" for q in presets) + f"{'Bayes NE':>10}")
    for w in windows[1:]:
        events = lake.scan_many("events", lake.partitions("events", ds=w.ds)).collect()
        bayes = bayes_metrics_by_surface(events)
        for s in sorted(bayes):
            row = "".join(f"{ne.get((q, s, w.ds), float('nan')):>12.4f}" for q in presets)
            print(f"{s:8}{w.ds:>12}{row}{bayes[s]['ne']:>10.4f}")
    means = {q: pl.Series([v for (pp, _, _), v in ne.items() if pp == q]).mean() for q in presets}
    print("mean NE over surfaces and days:", {q: round(float(v), 4) for q, v in means.items()})  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
