"""The comparison table a person would build in the MLflow UI, from MLflow alone.

Reads the expert_train runs (tag ``fmx.stage = expert_train``) of the tracking store, keeps those
whose ``ds`` lies in [ds_from, ds_to] and that were evaluated (cold starts have no metrics), and
averages each metric per (fm_preset, surface, variant) over the days that have it. The FM itself
appears as variant ``fm`` (its fm_export per-surface runs: the same rows, the same base rate), and the counting
reference as variant ``ref`` (experts.reference runs, tag variant=ref, evaluated=true: every event of the
surface's window, the same base rate), after it: variants..., fm, ref. The reference does not depend on the FM;
its runs carry the fm_preset they were called with, so each preset's block shows it. The champion
(registry alias ``champion`` of ``fmx-expert-<surface>-<preset>``) is marked with ``*``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from experts.config import VARIANTS
from experts.reference import VARIANT as REF
from experts.registry import STAGE_TAG, TRAIN_STAGE, champion

COLUMNS = ("auc", "ne", "calibration", "gap_closure", "transfer_ratio")


def compare_rows(surface: str | None = None, ds_from: str | None = None, ds_to: str | None = None) -> list[dict[str, Any]]:
    """One row per (fm_preset, surface, variant): the mean of COLUMNS over the range, days, champion flag."""
    import mlflow

    from features.tracking import setup

    exp_id = setup()
    flt = f"tags.`{STAGE_TAG}` = '{TRAIN_STAGE}' and tags.evaluated = 'true'"
    if surface:
        flt += f" and tags.surface = '{surface}'"
    runs = mlflow.search_runs([exp_id], filter_string=flt, output_format="list", max_results=50_000)
    # the FM's own progressive metrics per surface (fm_export child runs, same rows and base rate)
    fm_flt = "tags.variant = 'fm' and tags.surface != 'all'" + (f" and tags.surface = '{surface}'" if surface else "")
    runs += [r for r in mlflow.search_runs([exp_id], filter_string=fm_flt, output_format="list", max_results=50_000)
             if "ne" in r.data.metrics]
    # the counting reference per surface (experts.reference; a run not evaluated has no metrics)
    ref_flt = f"tags.variant = '{REF}' and tags.evaluated = 'true'" + (f" and tags.surface = '{surface}'" if surface else "")
    runs += mlflow.search_runs([exp_id], filter_string=ref_flt, output_format="list", max_results=50_000)
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    days: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for run in runs:
        tags, ds = run.data.tags, run.data.tags.get("ds", "")
        if (ds_from and ds < ds_from) or (ds_to and ds > ds_to):
            continue
        key = (tags.get("fm_preset", "?"), tags["surface"], tags["variant"])
        days[key].add(ds)
        for col in COLUMNS:
            if col in run.data.metrics:
                groups[key][col].append(run.data.metrics[col])
    rows = []
    order = {v: i for i, v in enumerate((*VARIANTS, "fm", REF))}
    for key in sorted(groups, key=lambda k: (k[1], k[0], order.get(k[2], 99))):
        preset, surf, variant = key
        champ = champion(surf, preset)
        row: dict[str, Any] = {"fm_preset": preset, "surface": surf, "variant": variant, "days": len(days[key]),
                               "champion": champ is not None and champ.tags.get("variant") == variant}
        row.update({c: (sum(v) / len(v)) if (v := groups[key].get(c)) else math.nan for c in COLUMNS})
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table, one block per surface."""
    if not rows:
        return "no evaluated expert runs in the tracking store for this selection"
    head = f"{'surface':<8} {'fm':<6} {'variant':<10} {'days':>4} " + " ".join(f"{c:>14}" for c in COLUMNS)
    lines, last = [head, "-" * len(head)], None
    for r in rows:
        if last is not None and r["surface"] != last:
            lines.append("")
        last = r["surface"]
        name = r["variant"] + (" *" if r["champion"] else "")
        vals = " ".join(f"{r[c]:>14.4f}" if math.isfinite(r[c]) else f"{'-':>14}" for c in COLUMNS)
        lines.append(f"{r['surface']:<8} {r['fm_preset']:<6} {name:<10} {r['days']:>4} {vals}")
    lines.append(f"* = champion (registry alias). {REF} = counting reference (item/user CTR + log counts, LR "
                 "fitted on ds-1). NE base rate: CTR of the training window (ds-1).")
    return "\n".join(lines)


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    """`rows` as the text table, JSON (a list of objects, NaN as null) or CSV (header + one line per row)."""
    if fmt == "table":
        return format_table(rows)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    if fmt == "json":
        import json

        return json.dumps(clean, indent=2)
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["fm_preset", "surface", "variant", "days", "champion", *COLUMNS],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(clean)
        return out.getvalue().rstrip("\n")
    raise ValueError(f"unknown format {fmt!r}: expected table, json or csv")
