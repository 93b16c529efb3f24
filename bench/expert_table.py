"""Acceptance run for the experts: N days, FM presets small and large, every variant on every surface.

Daily flow per window D (as the DAG runs it): for each FM preset fm_export(D) then fm_train(D); then per
surface expert_examples(D), expert_train(D, variant) for every variant, compare_and_promote(D). At the
end it prints `fmx compare` (from MLflow alone) and per surface whether every FM-fed variant beat
base on NE (averaged over the evaluated days).

  .venv/bin/python bench/expert_table.py --home /tmp/fmx-bench --days 7 --events-per-day 20000
  .venv/bin/python bench/expert_table.py --home /tmp/fmx-ml --lake /tmp/ml-lake   # an imported lake
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict


def _pipeline(lake_uri: str, presets: list[str], variants: list[str], max_windows: int, log: bool = True,
              only: list[str] | None = None, overrides: dict | None = None,
              fm_overrides: dict | None = None) -> dict[tuple[str, str, str], float]:
    """Run the daily flow; returns the FMs' progressive NE by (preset, surface, ds).

    `fm_overrides` (FMConfig fields) bypass fm.stage (which takes no overrides), as for an imported lake."""
    from experts.stage import compare_and_promote, expert_examples, expert_train
    from features.lake import Lake
    from features.schemas import EVENTS, EXPERT_EXAMPLES
    from features.stage import ingest, lake_windows
    from fm.config import FMConfig
    from fm.export import export_fm
    from fm.stage import fm_export, fm_train
    from fm.train import run_training

    lake = Lake(lake_uri)
    surfaces = list(lake.meta()["surfaces"])
    experts_on = [s for s in surfaces if not only or s in only]
    fm_ne: dict[tuple[str, str, str], float] = {}
    for ds in lake_windows(lake_uri)[:max_windows]:
        t0 = time.time()
        ingest(ds, lake_uri, source="lake")  # validate the window, build its user_history state
        for preset in presets:
            if tuple(surfaces) == FMConfig().surfaces and not fm_overrides:
                metrics = fm_export(ds, lake_uri, preset, pipeline_run="bench").get("metrics") or {}
                fm_train(ds, lake_uri, preset, pipeline_run="bench")
            else:  # fm.stage fixes the FM's heads to the preset's surfaces: build the FM for this lake's
                cfg = FMConfig.from_preset(preset, surfaces=tuple(surfaces), **(fm_overrides or {}))
                metrics = export_fm(cfg, lake.window(ds), lake).metrics
                run_training(cfg, lake.window(ds), lake)
            fm_ne |= {(preset, s, ds): m["ne"] for s, m in metrics.items()}
        t1 = time.time()
        for preset in presets:
            for surface in experts_on:
                if not lake.exists(EVENTS.name, ds=ds, surface=surface):
                    continue
                if "skipped" in expert_examples(ds, surface, lake_uri, preset):
                    continue
                for v in variants:
                    expert_train(ds, surface, v, lake_uri, preset, pipeline_run="bench", overrides=overrides)
        for preset in presets:
            for surface in experts_on:
                if lake.exists(EXPERT_EXAMPLES.name, fm=preset, ds=ds, surface=surface):
                    compare_and_promote(ds, surface, lake_uri, preset, pipeline_run="bench")
        if log:
            print(f"{ds}: fm {t1 - t0:.0f}s, experts {time.time() - t1:.0f}s", flush=True)
    return fm_ne


def _verdict(rows: list[dict]) -> None:
    by = defaultdict(dict)
    for r in rows:
        by[(r["fm_preset"], r["surface"])][r["variant"]] = r["ne"]
    print("\nNE(variant) - NE(base), averaged over evaluated days (negative = better than base):")
    for (preset, surface), ne in sorted(by.items()):
        if "base" not in ne:
            continue
        deltas = {v: ne[v] - ne["base"] for v in ne if v != "base" and math.isfinite(ne[v])}
        ok = all(d < 0 for v, d in deltas.items() if v != "fm")  # the FM itself is the reference, not a variant
        text = "  ".join(f"{v} {d:+.4f}" for v, d in deltas.items())
        print(f"  {preset:<6} {surface:<7} {'all beat base' if ok else 'NOT all beat base'}:  {text}")
    gains: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (preset, surface), ne in by.items():
        for v in ne:
            if v not in ("base", "fm") and "base" in ne and math.isfinite(ne[v]):
                gains[(preset, v)][surface] = ne["base"] - ne[v]
    print("\nSurface where each variant gains the most NE over base:")
    for (preset, v), g in sorted(gains.items()):
        best = max(g, key=lambda surface: g[surface])
        print(f"  {preset:<6} {v:<10} {best} ({g[best]:+.4f}; " + ", ".join(f"{s} {x:+.4f}" for s, x in g.items()) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True, help="FMX_HOME for this run (lake, MLflow store)")
    ap.add_argument("--lake", default=None, help="existing lake (e.g. a MovieLens import); default: generate")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--events-per-day", type=int, default=20_000)
    ap.add_argument("--max-windows", type=int, default=7, help="run the first N windows of the lake")
    ap.add_argument("--presets", default="small,large")
    ap.add_argument("--variants", default="base,loopfm,kd,fe,loopfm_kd")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ExpertConfig override")
    ap.add_argument("--fm-set", action="append", default=[], metavar="KEY=VALUE", help="FMConfig override")
    ap.add_argument("--surfaces", default="", help="train experts on these surfaces only (default: all)")
    args = ap.parse_args()
    os.environ["FMX_HOME"] = args.home
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from experts.compare import compare_rows, format_table
    from features.lake import Lake
    from fm.train import parse_overrides

    lake_uri = args.lake or os.path.join(args.home, "lake")
    generated = []  # the built-in data's windows, when this run generates them
    if args.lake is None:
        from features.generate import GeneratorConfig, generate

        gen = GeneratorConfig(scale="small", events_per_day=args.events_per_day)
        generated = generate(Lake(lake_uri), gen, args.days)
    start = time.time()
    presets = args.presets.split(",")
    fm_ne = _pipeline(lake_uri, presets, args.variants.split(","), args.max_windows,
                      only=[s for s in args.surfaces.split(",") if s], overrides=parse_overrides(args.set),
                      fm_overrides=parse_overrides(args.fm_set))
    rows = compare_rows()
    print(f"\npipeline {time.time() - start:.0f}s\n")
    if generated:  # built-in data: the FMs' progressive NE beside the generator's Bayes NE
        from fm_ne_table import print_ne_table  # bench/ is on sys.path when run as a script

        print_ne_table(Lake(lake_uri), generated[: args.max_windows], presets, fm_ne, gen)
        print()
    print(format_table(rows))
    _verdict(rows)


if __name__ == "__main__":
    main()
