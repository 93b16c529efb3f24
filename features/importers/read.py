"""Reading source files into string columns (with file, line and raw text), and validating them.

Every source value starts as a string so that one vectorised pass can say, per row, the first thing
wrong with it. `validate` returns the good rows typed for the lake and the bad rows in the
QUARANTINE layout: source (file name), source_line (1-based data row, header excluded), reason, raw.
"""

from __future__ import annotations

import glob
import os
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from features.importers.mapping import Mapping, SourceTable

SRC, LINE, RAW, REASON = "__source", "__line", "__raw", "__reason"


def source_files(table: SourceTable, root: Path, required: bool = True) -> list[Path]:
    """Files of `table`: its glob patterns under `root` (a folder), or `root` itself when it is a file."""
    if root.is_file():
        return [root]
    found = sorted({Path(p) for pattern in table.files for p in glob.glob(str(root / pattern))})
    if not found and required:
        raise ValueError(f"no source files match {list(table.files)} under {root}")
    return found


def _split_lines(path: Path, table: SourceTable) -> tuple[list[str], pl.DataFrame]:
    """(column names, frame of SRC, LINE, RAW and one string column per name) for a delimited file."""
    lines = path.read_bytes().decode(table.encoding, errors="replace").splitlines()
    names = list(table.columns)
    if table.header:
        head = lines[0].split(table.delimiter) if lines else []
        names = names or [h.strip() for h in head]
        lines = lines[1:]
    frame = pl.DataFrame({RAW: lines}).with_columns(
        pl.lit(path.name).alias(SRC), pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(LINE)
    )
    frame = frame.filter(pl.col(RAW).str.strip_chars() != "")  # blank lines are not rows
    parts = pl.col(RAW).str.split(table.delimiter)
    frame = frame.with_columns(
        parts.list.len().alias("__fields"),
        *[parts.list.get(i, null_on_oob=True).str.strip_chars().alias(n) for i, n in enumerate(names)],
    )
    return names, frame


def _parquet(path: Path) -> tuple[list[str], pl.DataFrame]:
    frame = pl.read_parquet(path)
    names = frame.columns
    frame = frame.with_columns(pl.col(n).cast(pl.String) for n in names)
    raw = pl.concat_str([pl.col(n).fill_null("") for n in names], separator=",")
    return names, frame.with_columns(
        raw.alias(RAW),
        pl.lit(path.name).alias(SRC),
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(LINE),
        pl.lit(len(names), pl.UInt32).alias("__fields"),
    )


def read_strings(table: SourceTable, files: list[Path]) -> tuple[list[str], pl.DataFrame]:
    """All rows of `files` as string columns plus SRC, LINE, RAW and `__fields` (fields found on the line)."""
    frames, names = [], None
    for path in files:
        cols, frame = _parquet(path) if table.format == "parquet" else _split_lines(path, table)
        if names is not None and cols != names:
            raise ValueError(f"{path.name}: columns {cols} differ from the first file's {names}")
        names = cols
        frames.append(frame)
    assert names is not None
    return names, pl.concat(frames, how="vertical_relaxed")


def read_side_table(table: SourceTable, files: list[Path]) -> pl.DataFrame:
    """A side table as string columns; single-character delimiters go through the quote-aware CSV reader."""
    if table.format == "parquet" or len(table.delimiter) > 1:
        return read_strings(table, files)[1].drop(SRC, LINE, RAW, "__fields")
    frames = []
    for path in files:
        text = path.read_bytes().decode(table.encoding, errors="replace").encode()
        frames.append(
            pl.read_csv(
                text,
                separator=table.delimiter,
                has_header=table.header,
                infer_schema=False,
                new_columns=list(table.columns) or None,
                truncate_ragged_lines=True,
            )
        )
    return pl.concat(frames, how="diagonal_relaxed").with_columns(pl.all().str.strip_chars())


def _ts_expr(m: Mapping) -> pl.Expr:
    """Source timestamp -> Datetime(us, UTC); null when it does not parse."""
    col = pl.col(m.ts)
    if m.ts_format:
        parsed = col.str.strptime(pl.Datetime("us"), m.ts_format, strict=False)
        return parsed.dt.replace_time_zone("UTC")
    scale = {"s": 1_000_000, "ms": 1_000, "us": 1}[m.ts_unit]
    micros = (col.cast(pl.Float64, strict=False) * scale).round(0).cast(pl.Int64, strict=False)
    return micros.cast(pl.Datetime("us", "UTC"))


def _label_exprs(m: Mapping) -> dict[str, pl.Expr]:
    labels = {"click": m.click, **({"like": m.like} if m.like else {})}
    return {name: pl.sql_expr(text) for name, text in labels.items()}


def _numeric_columns(m: Mapping, names: list[str], rows: pl.DataFrame) -> list[str]:
    """Columns the label expressions use that hold numbers (most non-empty values parse as numbers).

    Those are compared as numbers and a value that does not parse is a bad row; the others (e.g.
    ``action = 'clicked'``) are compared as text.
    """
    used = {c for e in _label_exprs(m).values() for c in e.meta.root_names()}
    missing = sorted(used - set(names))
    if missing:
        raise ValueError(f"mapping: label expressions use columns {missing} that the source lacks ({names})")
    numeric = []
    for col in sorted(used):
        filled = rows[col].filter(rows[col].fill_null("") != "")
        if filled.cast(pl.Float64, strict=False).null_count() * 2 < max(filled.len(), 1):
            numeric.append(col)
    return numeric


def _check(cond: pl.Expr, reason: str | pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    return cond, reason if isinstance(reason, pl.Expr) else pl.lit(reason)


def _reasons(m: Mapping, names: list[str], numeric: list[str]) -> list[tuple[pl.Expr, pl.Expr]]:
    """Ordered checks (condition that is True when bad, reason); the first failing one is reported."""
    lo, hi = (datetime.fromisoformat(t).replace(tzinfo=UTC) for t in (m.ts_min, m.ts_max))
    checks = [
        _check(
            pl.col("__fields") != len(names),
            pl.format("wrong number of fields: {} (expected {})", pl.col("__fields"), pl.lit(len(names))),
        )
    ]
    for key, col in (("user_id", m.user_id), ("item_id", m.item_id), ("ts", m.ts)):
        checks.append(_check(pl.col(col).fill_null("") == "", f"missing {key} (column {col})"))
    for key, col in (("user_id", m.user_id), ("item_id", m.item_id)):
        checks.append(
            _check(pl.col(col).cast(pl.Int64, strict=False).is_null(), f"bad type: {key} is not an integer")
        )
    checks.append(_check(_ts_expr(m).is_null(), f"bad type: timestamp {m.ts} does not parse"))
    checks.append(
        _check((_ts_expr(m) < lo) | (_ts_expr(m) >= hi), f"timestamp out of range [{m.ts_min}, {m.ts_max})")
    )
    for col in numeric:
        checks.append(_check(pl.col(f"__nan_{col}"), f"bad type: {col} is not a number"))
    for name, expr in _label_exprs(m).items():
        value = expr.cast(pl.Float64)
        checks.append(_check(~value.is_in([0.0, 1.0]), f"bad label: {name} must be 0 or 1"))
    for key, col in (("position", m.position), ("device", m.device)):
        if col:
            bad = (pl.col(col).fill_null("") != "") & pl.col(col).cast(pl.Int64, strict=False).is_null()
            checks.append(_check(bad, f"bad type: {key} is not an integer"))
    return checks


def validate(
    m: Mapping, names: list[str], rows: pl.DataFrame, surface: pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(good events typed for the lake, bad rows in the QUARANTINE layout). `surface` may be null = bad."""
    for col in (m.user_id, m.item_id, m.ts, m.position, m.device, m.surface.column):
        if col and col not in names:
            raise ValueError(f"mapping: column {col!r} is not in the source columns {names}")
    numeric = _numeric_columns(m, names, rows)
    reason = pl.lit(None, pl.String)
    for cond, why in reversed(_reasons(m, names, numeric)):
        reason = pl.when(cond.fill_null(True)).then(why).otherwise(reason)
    # label expressions see numbers; whether a value failed to parse is kept for the reason
    rows = rows.with_columns(
        pl.col(n).cast(pl.Float64, strict=False).is_null().alias(f"__nan_{n}") for n in numeric
    )
    rows = rows.with_columns(pl.col(n).cast(pl.Float64, strict=False) for n in numeric)
    typed = rows.with_columns(reason.alias(REASON)).with_columns(
        pl.col(m.user_id).cast(pl.Int64, strict=False).alias("user_id"),
        pl.col(m.item_id).cast(pl.Int64, strict=False).alias("item_id"),
        _ts_expr(m).alias("ts"),
        *[e.cast(pl.Int8, strict=False).alias(n) for n, e in _label_exprs(m).items()],
        *[
            (pl.col(c).cast(pl.Int64, strict=False).fill_null(0) if c else pl.lit(0)).alias(k)
            for k, c in (("position", m.position), ("device", m.device))
        ],
        surface.alias("surface"),
    )
    if not m.like:
        typed = typed.with_columns(pl.lit(None, pl.Int8).alias("like"))
    typed = typed.with_columns(
        pl.when(pl.col(REASON).is_null() & pl.col("surface").is_null())
        .then(pl.format("unknown surface for value {}", pl.col(m.surface.column or m.item_id)))
        .otherwise(pl.col(REASON))
        .alias(REASON)
    )
    key = pl.struct("user_id", "item_id", "ts")
    dup = pl.col(REASON).is_null() & ~key.is_first_distinct().over(pl.col(REASON).is_null())
    typed = typed.with_columns(
        pl.when(dup)
        .then(pl.lit("duplicate event (same user_id, item_id, ts)"))
        .otherwise(pl.col(REASON))
        .alias(REASON)
    )
    bad = typed.filter(pl.col(REASON).is_not_null()).select(
        pl.col(SRC).alias("source"),
        pl.col(LINE).alias("source_line"),
        pl.col(REASON).alias("reason"),
        pl.col(RAW).alias("raw"),
    )
    good = typed.filter(pl.col(REASON).is_null()).select(
        "user_id", "item_id", "ts", "surface", "click", "like", "position", "device"
    )
    return good, bad


def describe_files(files: list[Path], root: Path) -> list[str]:
    return [os.path.relpath(f, root) if root.is_dir() else f.name for f in files]
