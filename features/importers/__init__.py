"""Import a public or custom interaction log into the lake (`fmx import PRESET PATH`).

Presets: `movielens` (MovieLens-100K or -1M layout, picked from the files; see `side.py` for the
genre -> surface grouping), `kuairand` (KuaiRand log_*.csv) and `custom` (a mapping file only).
Mapping files are TOML (layout in `mapping.py`); the built-in ones live in features/mappings/, and
a --mapping file is laid over the preset's.

`import_source` contract:
- reads every source row, validates it (`read.validate`) and writes the rejected rows, with reason,
  source file, 1-based data line (header excluded) and raw text to ``quarantine(import_id=...)``.
  import_id = ``<mapping name>-<first 16 hex of sha256 over the mapping and each source file's name
  and bytes>``: deterministic, so a re-import of the same data replaces the same partition.
- fails with `ImportFailed` (count, share, threshold, top reasons, quarantine location) when the
  bad share exceeds `max_bad_share`; then nothing is written to events/users/items/user_history.
- otherwise writes, per window (aligned to the first event's day, `write.py`): events(ds, surface),
  users(ds) and items(ds) snapshots (ids seen up to and including the window, first_ds, side
  features or 0), and user_history(ds) via features.history.build_user_history, in window order;
  then lake meta window_days, surfaces, source (= mapping name), origin, import_id.
Returns {"import_id", "rows", "events", "quarantined", "windows", "first_ds", "last_ds", "surfaces",
"window_days", "seconds"}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from features.importers.mapping import Mapping, resolve_mapping
from features.importers.read import read_side_table, read_strings, source_files, validate
from features.importers.side import side_features
from features.importers.write import assign_windows, write_windows
from features.lake import Lake
from features.windows import parse_window_length

__all__ = ["ImportFailed", "import_source", "resolve_mapping", "Mapping"]


class ImportFailed(ValueError):
    """The import was refused (too many bad rows, or a lake that holds another source)."""


def import_id(m: Mapping, files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(asdict(m), sort_keys=True, default=str).encode())
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return f"{m.name}-{digest.hexdigest()[:16]}"


def _side(m: Mapping, root: Path, which: str) -> pl.DataFrame | None:
    spec = m.users if which == "users" else m.items
    if spec is None:
        return None
    files = source_files(spec.source, root, required=False) if root.is_dir() else []
    if not files:
        return None
    out_id, wanted = (
        ("user_id", ("segment", "region")) if which == "users" else ("item_id", ("category", "brand"))
    )
    frame = read_side_table(spec.source, files)
    return side_features(frame, spec.id, spec.features, spec.derive, out_id, wanted)


def _surface(m: Mapping, rows: pl.DataFrame, items: pl.DataFrame | None) -> tuple[pl.DataFrame, pl.Expr]:
    """Rows (with any joined column the rule needs) and the surface expression (null = unknown -> bad)."""
    rule = m.surface
    default = pl.lit(rule.default) if rule.default else pl.lit(None, pl.String)
    if rule.constant:
        return rows, pl.lit(rule.constant)
    if rule.column:
        mapped = (
            pl.col(rule.column).replace_strict(rule.values, default=default)
            if rule.values
            else pl.col(rule.column)
        )
        return rows, pl.when(pl.col(rule.column).fill_null("") == "").then(default).otherwise(mapped)
    if items is None or rule.item_column not in items.columns:
        raise ValueError(
            f"mapping: surface item_column {rule.item_column!r} needs an items side table with it"
        )
    joined = rows.with_columns(pl.col(m.item_id).cast(pl.Int64, strict=False).alias("__iid")).join(
        items.select(pl.col("item_id").alias("__iid"), pl.col(rule.item_column).alias("__isurface")),
        on="__iid",
        how="left",
        maintain_order="left",
    )
    return joined, pl.col("__isurface").fill_null(default)


def _failure(bad: pl.DataFrame, total: int, share: float, threshold: float, where: str) -> ImportFailed:
    top = Counter(bad["reason"].to_list()).most_common(5)
    reasons = "; ".join(f"{n} x {r}" for r, n in top)
    return ImportFailed(
        f"import refused: {bad.height} of {total} rows are bad ({share:.2%}, threshold {threshold:.2%}); "
        f"top reasons: {reasons}. Nothing was written to events; the bad rows are in {where}"
    )


def _check_lake(lake: Lake, m: Mapping, days: int, origin: str) -> None:
    meta = lake.meta()
    if not meta:
        return
    theirs = (meta.get("source"), meta.get("window_days"), meta.get("origin"))
    if theirs != (m.name, days, origin):
        raise ImportFailed(
            f"lake {lake.uri} already holds source={theirs[0]!r} window_days={theirs[1]} origin={theirs[2]}; "
            f"this import is source={m.name!r} window_days={days} origin={origin}. Use a fresh --lake."
        )


def import_source(
    preset: str,
    path: str,
    lake_uri: str,
    mapping_file: str | None = None,
    window: str | int | None = None,
    max_bad_share: float = 0.01,
) -> dict[str, Any]:
    """Import `path` with `preset` (+ `mapping_file`) into the lake at `lake_uri` (contract above)."""
    started = time.perf_counter()
    root = Path(path)
    if not root.exists():
        raise ValueError(f"import source {path} does not exist")
    m = resolve_mapping(preset, root, mapping_file)
    days = parse_window_length(window if window is not None else m.window)
    files = source_files(m.events, root)
    names, rows = read_strings(m.events, files)
    if rows.height == 0:
        raise ImportFailed(f"import source {path}: no rows in {[f.name for f in files]}")
    users, items = _side(m, root, "users"), _side(m, root, "items")
    rows, surface = _surface(m, rows, items)
    good, bad = validate(m, names, rows, surface)
    lake, iid = Lake(lake_uri), import_id(m, files)
    where = lake.write("quarantine", bad, import_id=iid)
    share = bad.height / rows.height
    if share > max_bad_share:
        raise _failure(bad, rows.height, share, max_bad_share, where)
    origin, events = assign_windows(good, days)
    _check_lake(lake, m, days, origin.isoformat())
    windows = write_windows(lake, events, origin, days, users, items)
    surfaces = sorted(events["surface"].unique().to_list())
    lake.update_meta(
        window_days=days, surfaces=surfaces, source=m.name, origin=origin.isoformat(), import_id=iid
    )
    return {
        "import_id": iid,
        "rows": rows.height,
        "events": events.height,
        "quarantined": bad.height,
        "windows": len(windows),
        "first_ds": windows[0].ds,
        "last_ds": windows[-1].ds,
        "surfaces": surfaces,
        "window_days": days,
        "seconds": round(time.perf_counter() - started, 2),
    }
