"""The comparison table a person would build in the MLflow UI, from MLflow alone.

Reads the expert_train runs (tag ``fmx.stage = expert_train``) of the tracking store, keeps those
whose ``ds`` lies in [ds_from, ds_to] and that were evaluated (cold starts have no metrics), and
averages each metric per (fm_preset, surface, variant) over the days that have it. A day run twice counts
once (its newest FINISHED run), as on the lineage runs of the MLflow UI (common.lineage_runs: their
``mean_<metric>`` is this table's row over all days). The FM itself
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

from common.lineage_runs import newest_finished
from experts.config import VARIANTS
from experts.promote import Interval, pool
from experts.reference import VARIANT as REF
from experts.registry import STAGE_TAG, TRAIN_STAGE, champion

COLUMNS = ("auc", "ne", "calibration", "gap_closure", "transfer_ratio")
VS_BASE = ("ne_vs_base", "ne_vs_base_lo", "ne_vs_base_hi")  # per day: NE - NE(base), 95% paired-bootstrap bounds


def compare_rows(surface: str | None = None, ds_from: str | None = None, ds_to: str | None = None) -> list[dict[str, Any]]:
    """One row per (fm_preset, surface, variant): the mean of COLUMNS over the range, days, champion flag."""
    import mlflow

    from common.tracking import setup

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
    vs_base: dict[tuple[str, str, str], list[Interval]] = defaultdict(list)
    days: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    newest = newest_finished(runs, key=lambda r: (r.data.tags.get("fm_preset", "?"), r.data.tags["surface"],
                                                  r.data.tags["variant"], r.data.tags.get("ds", "")))
    for run in newest.values():
        tags, ds = run.data.tags, run.data.tags.get("ds", "")
        if (ds_from and ds < ds_from) or (ds_to and ds > ds_to):
            continue
        key = (tags.get("fm_preset", "?"), tags["surface"], tags["variant"])
        days[key].add(ds)
        for col in COLUMNS:
            if col in run.data.metrics:
                groups[key][col].append(run.data.metrics[col])
        if all(k in run.data.metrics for k in VS_BASE):
            mean, lo, hi = (run.data.metrics[k] for k in VS_BASE)
            vs_base[key].append(Interval(mean, lo, hi, rows=0))
    rows = []
    order = {v: i for i, v in enumerate((*VARIANTS, "fm", REF))}
    for key in sorted(groups, key=lambda k: (k[1], k[0], order.get(k[2], 99))):
        preset, surf, variant = key
        champ = champion(surf, preset)
        row: dict[str, Any] = {"fm_preset": preset, "surface": surf, "variant": variant, "days": len(days[key]),
                               "from": min(days[key]), "to": max(days[key]),
                               "champion": champ is not None and champ.tags.get("variant") == variant}
        row.update({c: (sum(v) / len(v)) if (v := groups[key].get(c)) else math.nan for c in COLUMNS})
        pooled = pool(vs_base[key]) if vs_base[key] else None
        row.update(zip(VS_BASE, (pooled.mean, pooled.lo, pooled.hi) if pooled else (math.nan,) * 3, strict=True))
        rows.append(row)
    return rows


def _vs_base(r: dict[str, Any]) -> str:
    mean, lo, hi = (r[k] for k in VS_BASE)
    return f"{mean:+.4f} [{lo:+.4f},{hi:+.4f}]" if math.isfinite(mean) else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table, one block per surface: each row's day range, the means, NE - NE(base) with its interval."""
    if not rows:
        return "no evaluated expert runs in the tracking store for this selection"
    head = (f"{'surface':<8} {'fm':<6} {'variant':<11} {'days':>4} {'from':<10} {'to':<10} {'auc':>7} {'ne':>7} "
            f"{'ne_vs_base [95% CI]':<26} {'calibration':>11} {'gap_closure':>11} {'transfer_ratio':>14}")
    lines, last = [head, "-" * len(head)], None
    for r in rows:
        if last is not None and r["surface"] != last:
            lines.append("")
        last = r["surface"]
        name = r["variant"] + (" *" if r["champion"] else "")
        nums = [f"{r[c]:>{w}.4f}" if math.isfinite(r[c]) else f"{'-':>{w}}"
                for c, w in (("auc", 7), ("ne", 7), ("calibration", 11), ("gap_closure", 11), ("transfer_ratio", 14))]
        lines.append(f"{r['surface']:<8} {r['fm_preset']:<6} {name:<11} {r['days']:>4} {r['from']:<10} {r['to']:<10} "
                     f"{nums[0]} {nums[1]} {_vs_base(r):<26} {nums[2]} {nums[3]} {nums[4]}")
    lines.append(f"* = champion (registry alias). {REF} = counting reference (item/user CTR + log counts, LR "
                 "fitted on ds-1). NE base rate: CTR of the training window (ds-1).")
    lines.append("ne_vs_base: mean over the row's days of NE - NE(base) on the same rows; 95% interval from each "
                 "day's paired bootstrap (days pooled as independent).")
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
        writer = csv.DictWriter(out, fieldnames=["fm_preset", "surface", "variant", "days", "from", "to", "champion",
                                                     *COLUMNS, *VS_BASE],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(clean)
        return out.getvalue().rstrip("\n")
    raise ValueError(f"unknown format {fmt!r}: expected table, json or csv")
