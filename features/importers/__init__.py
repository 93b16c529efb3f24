"""Import a public or custom interaction log into the lake (`fmx import PRESET PATH`).

Presets: `movielens` (MovieLens-100K or -1M layout, picked from the files; see `side.py` for the
genre -> surface grouping), `kuairand` (KuaiRand log_*.csv) and `custom` (a mapping file only).
Mapping files are TOML (layout in `mapping.py`); the built-in ones live in features/mappings/, and
a --mapping file is laid over the preset's.

`import_source` contract:
- reads every source record (`read.py`: a CSV reader with quoting; file, line and raw text kept),
  validates it (`validate.py`) and writes the rejected rows, with reason, source file, line (see
  `read.py`: the record's first data line, header excluded) and raw text to
  ``quarantine(import_id=...)``. import_id = ``<mapping name>-<first 16 hex of sha256 over the mapping
  and each source file's name and bytes>``: deterministic, so a re-import of the same data replaces
  the same partition.
- fails with `ImportFailed`, one line, when no file has a row, a file cannot be read (names it), or
  the bad share exceeds `max_bad_share` (count, share, threshold, top reasons, quarantine location);
  then nothing is written to events/users/items/user_history and the lake meta is unchanged.
- refuses (ImportFailed) a lake whose meta holds another source, window length or origin.
- otherwise marks the lake meta ``import_state = "running"`` (`state.py`), removes what the import
  replaces (`replace.py`: when the import_id differs from the lake's last one, or that one did not
  complete, every derived table and ``models/``), writes per window (aligned to the first event's
  day, `write.py`) events(ds, surface), users(ds) and items(ds) snapshots (ids seen up to and
  including the window, first_ds, side features or 0) and user_history(ds), in window order; removes
  the windowed partitions of the older import that this one did not write; and last writes meta
  ``import_state = "complete"``, window_days, surfaces, source (= mapping name), origin, first_ds,
  last_ds, import_id. Until then `require_complete_import` refuses the lake.
Returns {"import_id", "rows", "events", "quarantined", "windows", "first_ds", "last_ds", "surfaces",
"window_days", "replaced" ({table or "models": partitions or files removed}), "seconds"}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl

from features.importers.errors import ImportFailed
from features.importers.mapping import Mapping, resolve_mapping
from features.importers.read import read_side_table, read_strings, source_files
from features.importers.replace import drop_derived, drop_stale_windows
from features.importers.side import side_features
from features.importers.state import (
    RUNNING,
    import_command,
    mark_complete,
    mark_running,
    require_complete_import,
)
from features.importers.validate import validate
from features.importers.write import assign_windows, write_windows
from features.lake import Lake
from features.schemas import QUARANTINE
from features.windows import Window, parse_window_length

__all__ = ["ImportFailed", "Mapping", "import_source", "require_complete_import", "resolve_mapping"]


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
    """Refuse a lake holding another source, window length or origin (a killed first import holds none)."""
    meta = lake.meta()
    if "source" not in meta:
        return
    theirs = (meta.get("source"), meta.get("window_days"), meta.get("origin"))
    if theirs != (m.name, days, origin):
        raise ImportFailed(
            f"lake {lake.uri} already holds source={theirs[0]!r} window_days={theirs[1]} origin={theirs[2]}; "
            f"this import is source={m.name!r} window_days={days} origin={origin}. Use a fresh --lake."
        )


def _write(
    lake: Lake, iid: str, command: str, events: pl.DataFrame, origin: date, days: int, side: tuple[Any, Any]
) -> tuple[list[Window], dict[str, int]]:
    """Mark the import running, drop what it replaces, write every window, then mark it complete."""
    meta = lake.meta()
    mark_running(lake, iid, command)
    fresh = meta.get("import_id") != iid or meta.get("import_state") == RUNNING
    replaced = drop_derived(lake) if fresh else {}
    windows, written = write_windows(lake, events, origin, days, *side)
    replaced.update(drop_stale_windows(lake, {w.ds for w in windows}, written))
    return windows, replaced


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
    users, items = _side(m, root, "users"), _side(m, root, "items")
    rows, surface = _surface(m, rows, items)
    good, bad = validate(m, names, rows, surface)
    lake, iid = Lake(lake_uri), import_id(m, files)
    where = lake.write(QUARANTINE.name, bad, import_id=iid)
    share = bad.height / rows.height
    if share > max_bad_share or good.height == 0:
        raise _failure(bad, rows.height, share, max_bad_share, where)
    origin, events = assign_windows(good, days)
    _check_lake(lake, m, days, origin.isoformat())
    command = import_command(preset, path, lake_uri, mapping_file, window)
    windows, replaced = _write(lake, iid, command, events, origin, days, (users, items))
    surfaces = sorted(events["surface"].unique().to_list())
    mark_complete(
        lake,
        window_days=days,
        surfaces=surfaces,
        source=m.name,
        origin=origin.isoformat(),
        first_ds=windows[0].ds,
        last_ds=windows[-1].ds,
        import_id=iid,
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
        "replaced": replaced,
        "seconds": round(time.perf_counter() - started, 2),
    }
