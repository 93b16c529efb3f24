"""Validating source rows (string columns from `read`): the first thing wrong with each row, and typing.

`validate` returns the good rows typed for the lake and the bad rows in the QUARANTINE layout: source
(file name), source_line (see `read`), reason, raw. Checks, in order (the first failing one is the
reason): field count, missing ids/ts, id types, ts parse, ts inside [ts_min, ts_max), label columns'
types, labels in {0, 1}, position/device types, unknown surface, duplicate (user_id, item_id, ts),
then the far-from-the-bulk rule (`far_rows`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import polars as pl

from features.importers.mapping import Mapping
from features.importers.read import FIELDS, LINE, RAW, SRC, first_line

REASON = "__reason"


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
    try:
        return {name: pl.sql_expr(text) for name, text in labels.items()}
    except pl.exceptions.PolarsError as exc:
        raise ValueError(
            f"mapping: label expression in {labels} is not valid SQL: {first_line(exc)}"
        ) from None


def _as_number(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Float64, strict=False)


def _as_boolean(col: str) -> pl.Expr:
    words = {"true": True, "false": False}
    return pl.col(col).str.to_lowercase().replace_strict(words, default=None, return_dtype=pl.Boolean)


LABEL_TYPES = {"number": _as_number, "boolean": _as_boolean}


def _label_types(m: Mapping, names: list[str], rows: pl.DataFrame) -> dict[str, str]:
    """Columns the label expressions use -> "number" / "boolean" (typed) or "text" (see mapping.py Labels)."""
    used = {c for e in _label_exprs(m).values() for c in e.meta.root_names()}
    missing = sorted(used - set(names))
    if missing:
        raise ValueError(f"mapping: label expressions use columns {missing} that the source lacks ({names})")
    types = {}
    for col in sorted(used):
        filled = rows.select(pl.col(col)).filter(pl.col(col).fill_null("") != "")
        types[col] = "text"
        for kind, convert in LABEL_TYPES.items():
            if filled.select(convert(col).null_count()).item() * 2 < max(filled.height, 1):
                types[col] = kind
                break
    return types


def _check(cond: pl.Expr, reason: str | pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    return cond, reason if isinstance(reason, pl.Expr) else pl.lit(reason)


def _reasons(m: Mapping, names: list[str], types: dict[str, str]) -> list[tuple[pl.Expr, pl.Expr]]:
    """Ordered checks (condition that is True when bad, reason); the first failing one is reported."""
    lo, hi = (datetime.fromisoformat(t).replace(tzinfo=UTC) for t in (m.ts_min, m.ts_max))
    checks = [
        _check(
            pl.col(FIELDS) != len(names),
            pl.format("wrong number of fields: {} (expected {})", pl.col(FIELDS), pl.lit(len(names))),
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
    for col, kind in types.items():
        if kind != "text":
            checks.append(_check(pl.col(f"__bad_{col}"), f"bad type: {col} is not a {kind}"))
    for name, expr in _label_exprs(m).items():
        value = expr.cast(pl.Float64, strict=False)
        checks.append(_check(~value.is_in([0.0, 1.0]), f"bad label: {name} must be 0 or 1"))
    for key, col in (("position", m.position), ("device", m.device)):
        if col:
            bad = (pl.col(col).fill_null("") != "") & pl.col(col).cast(pl.Int64, strict=False).is_null()
            checks.append(_check(bad, f"bad type: {key} is not an integer"))
    return checks


def _typed(m: Mapping, names: list[str], rows: pl.DataFrame, surface: pl.Expr) -> pl.DataFrame:
    """Rows with the lake's typed columns and REASON (null = good so far)."""
    types = _label_types(m, names, rows)
    reason = pl.lit(None, pl.String)
    for cond, why in reversed(_reasons(m, names, types)):
        reason = pl.when(cond.fill_null(True)).then(why).otherwise(reason)
    typed = {c: LABEL_TYPES[k](c) for c, k in types.items() if k != "text"}
    # label expressions see typed values; whether a value failed to convert is kept for the reason
    rows = rows.with_columns(e.is_null().alias(f"__bad_{c}") for c, e in typed.items())
    rows = rows.with_columns(e.alias(c) for c, e in typed.items())
    out = rows.with_columns(reason.alias(REASON)).with_columns(
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
    return out if m.like else out.with_columns(pl.lit(None, pl.Int8).alias("like"))


def _mark(typed: pl.DataFrame, bad: pl.Expr, why: pl.Expr) -> pl.DataFrame:
    """Set REASON to `why` where it is still null and `bad` holds."""
    return typed.with_columns(
        pl.when(pl.col(REASON).is_null() & bad).then(why).otherwise(pl.col(REASON)).alias(REASON)
    )


def log_bulk(days: pl.Series, max_gap_days: int) -> tuple[date, date]:
    """(first, last) day of the run of event days, cut at gaps > max_gap_days, that holds the most rows."""
    per_day = days.value_counts(name="rows").sort(days.name)
    gap = pl.col(days.name).diff().dt.total_days().fill_null(0) > max_gap_days
    runs = (
        per_day.with_columns(gap.cum_sum().alias("__run"))
        .group_by("__run")
        .agg(
            pl.col("rows").sum(),
            pl.col(days.name).min().alias("first"),
            pl.col(days.name).max().alias("last"),
        )
        .sort(["rows", "first"], descending=[True, False])
    )
    return runs["first"][0], runs["last"][0]


def _far(typed: pl.DataFrame, max_gap_days: int) -> pl.DataFrame:
    """Quarantine rows outside the log's bulk (see mapping.py, Far-off rows)."""
    day = pl.col("ts").dt.date()
    good_days = typed.filter(pl.col(REASON).is_null()).select(day.alias("__day"))["__day"]
    if max_gap_days == 0 or good_days.is_empty():
        return typed
    first, last = log_bulk(good_days, max_gap_days)
    rule = f"(rule: rows cut off from the bulk by a gap of more than max_gap_days={max_gap_days} days)"
    for side, outside, dist in (
        ("before", day < first, pl.lit(first) - day),
        ("after", day > last, day - pl.lit(last)),
    ):
        why = pl.format(
            f"timestamp {{}} lies {{}} days {side} the log's bulk {first}..{last} {rule}",
            day,
            dist.dt.total_days(),
        )
        typed = _mark(typed, outside, why)
    return typed


def validate(
    m: Mapping, names: list[str], rows: pl.DataFrame, surface: pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(good events typed for the lake, bad rows in the QUARANTINE layout). `surface` may be null = bad."""
    for col in (m.user_id, m.item_id, m.ts, m.position, m.device, m.surface.column):
        if col and col not in names:
            raise ValueError(f"mapping: column {col!r} is not in the source columns {names}")
    try:
        typed = _typed(m, names, rows, surface)
    except pl.exceptions.PolarsError as exc:
        raise ValueError(
            f"mapping: labels click={m.click!r} like={m.like!r} fail on the source: {first_line(exc)}"
        ) from None
    unknown = pl.format("unknown surface for value {}", pl.col(m.surface.column or m.item_id))
    typed = _mark(typed, pl.col("surface").is_null(), unknown)
    key = pl.struct("user_id", "item_id", "ts")
    dup = ~key.is_first_distinct().over(pl.col(REASON).is_null())
    typed = _mark(typed, dup, pl.lit("duplicate event (same user_id, item_id, ts)"))
    typed = _far(typed, m.max_gap_days)
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
