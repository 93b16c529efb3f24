"""What an FM has not learned on the built-in data: its logit beside each true term of the generator.

`python bench/fm_missing_terms.py --lake LAKE --ds D [--presets small,large]`

LAKE is a generated lake that holds `fm_outputs` for D (e.g. the one bench/fm_ne_table.py or
bench/expert_table.py made; `--seed`/`--scale` must be those of the generator). For each FM preset it
fits a logistic regression of D's clicks on the FM's click logit alone, then on the logit plus one true
term of the click logit (features.explain.explain_window), and prints the NE of each (base rate = D's
CTR, all surfaces). A term the FM has learned adds nothing; the NE drop a term buys is what the FM is
missing of it. Groups: intent (the user's current category), personal (the user's own taste and
surface bias beyond their segment), item (the item's own vector beyond its category), and the
population-level terms one by one (seg / reg / surf x cat: segment / region / surface x category).
"""

from __future__ import annotations

import argparse
from datetime import date

import numpy as np
import polars as pl
from fm_ne_table import _logit, oracle_logloss  # bench/ is on sys.path when run as a script

from common.metrics import entropy
from features.explain import explain_window
from features.generate import GeneratorConfig
from features.lake import Lake
from features.schemas import FM_OUTPUTS
from features.windows import Window

GROUPS = {
    "intent": ["term_intent"],
    "personal": ["personal", "term_user_surface_bias"],
    "item": ["item_level"],
    "seg x cat": ["category_affinity"],
    "reg x cat": ["term_region_category"],
    "surf x cat": ["term_surface_category"],
    "brand": ["term_brand_quality"],
    "novelty": ["term_novelty"],
    "position": ["term_position"],
    "device": ["term_device"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", required=True)
    p.add_argument("--ds", required=True)
    p.add_argument("--presets", default="small,large")
    p.add_argument("--scale", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--events-per-day", type=int, default=None)
    args = p.parse_args()
    lake = Lake(args.lake)
    gen = GeneratorConfig(scale=args.scale, seed=args.seed, events_per_day=args.events_per_day)
    f = explain_window(lake, gen, Window(date.fromisoformat(args.ds))).with_columns(
        (pl.col("term_affinity") - pl.col("segment_affinity")).alias("personal"),
        (pl.col("segment_affinity") - pl.col("category_affinity")).alias("item_level"),
    )
    print(f"{'FM':8}{'FM alone':>10}" + "".join(f"{g:>11}" for g in GROUPS) + f"{'Bayes':>8}")
    for preset in [q for q in args.presets.split(",") if q]:
        parts = lake.partitions(FM_OUTPUTS.name, ds=args.ds, fm=preset)
        if not parts:
            print(f"{preset:8} no fm_outputs for {args.ds} in {lake.uri}")
            continue
        out = lake.scan_many(FM_OUTPUTS.name, parts).select("event_id", "fm_logit_click").collect()
        j = f.join(out, on="event_id")
        y = j["click"].to_numpy().astype(np.float64)
        h = entropy(float(y.mean()))
        z = j["fm_logit_click"].to_numpy().astype(np.float64)
        alone = oracle_logloss(z, y) / h
        added = [oracle_logloss(np.column_stack([z, *(j[c].to_numpy() for c in cols)]), y) / h
                 for cols in GROUPS.values()]
        print(f"{preset:8}{alone:>10.4f}" + "".join(f"{a - alone:>+11.4f}" for a in added) +
              f"{oracle_logloss(_logit(j), y) / h:>8.4f}")


if __name__ == "__main__":
    main()
