"""Why are progressive calibrations off? Measures two hypotheses on a lake that `fmx run` produced.

For every scored day D (from the third window on) and surface:
  - drift: the CTR ratio CTR(D-1) / CTR(D) — the calibration a model that learnt D-1's CTR perfectly would
    score on D — next to each model's measured calibration (from the lake's eval records);
  - FM version skew: the expert trained through D-1 read FM_{D-2}'s outputs while training, but is scored on
    D with FM_{D-1}'s. Re-export D with FM_{D-2} (into a copy of the lake), rebuild D's expert_examples and
    score the same expert checkpoints: if skew caused the miscalibration, calibration moves towards 1.

Run: ``python bench/calibration_hypotheses.py LAKE [--preset small]`` (copies LAKE to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from common.metrics import calibration, ne
from experts.checkpoint import latest_before, load_checkpoint
from experts.config import ExpertConfig
from experts.data import load_examples
from experts.evaluate import predict, training_ctr
from features.expert_examples import build_expert_examples
from features.lake import Lake
from features.schemas import FM_OUTPUTS
from fm.config import lake_config
from fm.export import export_fm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lake")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fmx-skew-")) / "lake"
    shutil.copytree(args.lake, tmp)
    lake = Lake(str(tmp))
    days = sorted({p["ds"] for p in lake.partitions(FM_OUTPUTS.name, fm=args.preset)})
    surfaces = sorted({p["surface"] for p in lake.partitions(FM_OUTPUTS.name, fm=args.preset)})
    print("| day | surface | CTR(D-1)/CTR(D) | variant | calib (FM_{D-1} feats) | calib (FM_{D-2} feats) "
          "| NE (D-1) | NE (D-2) |")
    print("|---|---|---|---|---|---|---|---|")
    for ds in days[2:]:
        window = lake.window(ds)
        export_fm(lake_config(args.preset, lake.meta()), window, lake, trained_through=window.prev().prev())
        for surface in surfaces:
            ctr_prev = training_ctr(lake, window, surface)
            skew_rel = build_expert_examples(lake, window, surface, args.preset)
            del skew_rel
            skewed = load_examples(lake, args.preset, ds, surface, ExpertConfig().history_length)
            y = skewed.label.numpy().astype(np.float64)
            for variant in ("base", "loopfm", "kd", "fe", "loopfm_kd"):
                rel = latest_before(lake, args.preset, surface, variant, window)
                rec = tmp / f"models/experts/{args.preset}/{surface}/evals/ds={ds}/{variant}.json"
                if rel is None or not rec.exists():
                    continue
                orig = json.loads(rec.read_text())["metrics"]
                p = predict(load_checkpoint(lake, rel).build(), skewed)
                print(f"| {ds} | {surface} | {ctr_prev / y.mean():.3f} | {variant} | {orig['calibration']:.3f} | "
                      f"{calibration(y, p):.3f} | {orig['ne']:.4f} | {ne(y, p, ctr_prev):.4f} |", flush=True)
    shutil.rmtree(tmp.parent)


if __name__ == "__main__":
    main()
