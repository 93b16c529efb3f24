"""Issue 16: the FM's progressive NE / AUC per surface beside the counting reference (``ref``), on an imported lake.

  .venv/bin/python bench/fm_vs_ref.py --lake /tmp/ml-lake [--windows 12] [--preset small] [--set key=value]

Copies the lake (the FM's checkpoints and derived tables go into the copy), then per window D of the first
`--windows`, in the DAG's order: fm_export(D) with FM_{D-1} (progressive metrics), then fm_train(D). The
reference is experts.reference.evaluate (fit on D-1, scored on D). Prints per surface the mean NE / AUC
over windows 3..N (the windows both score: the issue's table), the FM's calibration, and the mean row.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import defaultdict

import numpy as np

from features.lake import Lake
from features.schemas import EVENTS
from fm.config import lake_config
from fm.export import export_fm
from fm.train import parse_overrides, run_training


def _reference(lake: Lake, ds: str, surfaces: list[str]) -> dict[str, dict[str, float]]:
    try:
        from experts.reference import evaluate
    except ImportError:  # the reference module is not in this checkout yet
        return {}
    out = {}
    for s in surfaces:
        res = evaluate(lake, lake.window(ds), s)
        if res["evaluated"]:
            out[s] = res["metrics"]
    return out


def run(lake_uri: str, windows: int, preset: str, overrides: dict) -> tuple[list[str], dict[tuple[str, str, str], dict]]:
    """(the windows run, {(model, surface, ds): metrics} for model in (fm, ref), every scored window)."""
    lake = Lake(lake_uri)
    cfg = lake_config(preset, lake.meta(), **overrides)
    days = sorted({p["ds"] for p in lake.partitions(EVENTS.name)})[:windows]
    found: dict[tuple[str, str, str], dict] = {}
    for ds in days:
        t0 = time.time()
        res = export_fm(cfg, lake.window(ds), lake)
        found |= {("fm", s, ds): m for s, m in res.metrics.items()}
        found |= {("ref", s, ds): m for s, m in _reference(lake, ds, list(cfg.surfaces)).items()}
        run_training(cfg, lake.window(ds), lake)
        print(f"{ds}: {time.time() - t0:.1f}s", flush=True)
    return days, found


def report(days: list[str], found: dict[tuple[str, str, str], dict], first_scored: int = 2) -> None:
    """Mean NE / AUC per (surface, model) over windows first_scored.. of `days` (0-based: 2 = the third)."""
    keep = set(days[first_scored:])
    for (model, s, ds), m in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        print(f"  {ds} {s:<10} {model:<4} NE {m['ne']:.3f} AUC {m['auc']:.3f} cal {m['calibration']:.2f}")
    table: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (model, s, ds), m in found.items():
        if ds in keep:
            for k in ("ne", "auc", "calibration"):
                table[(s, model)][k].append(m[k])
    print(f"\nmean over windows {first_scored + 1}..{len(days)}: NE / AUC (calibration)")
    means: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in sorted({s for s, _ in table}):
        cells = []
        for model in ("ref", "fm"):
            v = table.get((s, model))
            if v:
                ne, auc, cal = (float(np.nanmean(v[k])) for k in ("ne", "auc", "calibration"))
                means[model].append((ne, auc))
                cells.append(f"{model} {ne:.3f} / {auc:.3f} ({cal:.2f})")
        print(f"  {s:<10} " + "   ".join(cells))
    print("  mean       " + "   ".join(f"{m} {np.mean([a for a, _ in v]):.3f} / {np.mean([b for _, b in v]):.3f}"
                                       for m, v in means.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", required=True, help="an imported lake (left untouched: the run works on a copy)")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--preset", default="small")
    p.add_argument("--first-scored", type=int, default=2, help="0-based first window of the means (2: the third)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FMConfig override")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="fm-vs-ref-")
    shutil.copytree(args.lake, f"{work}/lake")
    try:
        report(*run(f"{work}/lake", args.windows, args.preset, parse_overrides(args.set)), args.first_scored)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
