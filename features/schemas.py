"""Every lake table's Arrow schema and partitioning, declared once.

Writers cast to these schemas (`Lake.write`), readers check them (`Lake.read` / `Lake.scan`), tests
assert them. Column names used across packages are module constants here, so no stage spells a
column name of another stage's table by hand.

Vectors (FM representations, embeddings) are Arrow fixed-size lists so that DuckDB, Spark and polars
read them without custom code. Their width is a model setting, not a schema constant: a declared
`Vector(value_type)` accepts a fixed-size list of any width with that value type (the width is
checked to be constant within a file, which Arrow guarantees).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# Column names shared across stages.
EVENT_ID = "event_id"
TS = "ts"
USER_ID = "user_id"
ITEM_ID = "item_id"
SURFACE = "surface"
CLICK = "click"
LIKE = "like"
P_CLICK = "p_click"  # generator's true click probability: a ceiling for reports, never a model input
LABELS = (CLICK, LIKE)  # every task an FM head may predict; LIKE may be null (unknown for that log)
FM_VERSION = "fm_version"

TS_TYPE = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Vector:
    """A fixed-size list column of any width whose values have `value_type`."""

    value_type: pa.DataType


@dataclass(frozen=True)
class TableSpec:
    """A lake table: its name, Hive partition keys (in path order) and column schema."""

    name: str
    partition_by: tuple[str, ...]
    fields: tuple[tuple[str, pa.DataType | Vector | tuple, bool], ...]  # (name, type, nullable)

    @property
    def columns(self) -> list[str]:
        return [name for name, _, _ in self.fields]


def _list(inner: pa.DataType | Vector) -> tuple:
    """A variable-length list of `inner` (which may itself be a Vector)."""
    return ("list", inner)


# The columns that identify an event, shared by every per-event table (events, fm_outputs, expert_examples).
_EVENT_KEYS = (
        (EVENT_ID, pa.int64(), False),
        (TS, TS_TYPE, False),
        (USER_ID, pa.int64(), False),
        (ITEM_ID, pa.int64(), False),
        (SURFACE, pa.string(), False),
)
_LABELS_AND_CONTEXT = (
        (CLICK, pa.int8(), False),
        (LIKE, pa.int8(), True),
        ("position", pa.int16(), False),  # slot position on the surface, 0 = top
        ("device", pa.int8(), False),  # 0 = unknown, 1 = mobile, 2 = desktop, 3 = tv
)

EVENTS = TableSpec(
    "events",
    ("ds", "surface"),
    (
        *_EVENT_KEYS,
        *_LABELS_AND_CONTEXT,
        (P_CLICK, pa.float32(), True),
    ),
)

USERS = TableSpec(
    "users",
    ("ds",),
    (
        (USER_ID, pa.int64(), False),
        ("segment", pa.int32(), False),  # categorical side feature (age bucket, cohort, ...)
        ("region", pa.int32(), False),  # categorical side feature (country, occupation, ...)
        ("first_ds", pa.date32(), False),
    ),
)

ITEMS = TableSpec(
    "items",
    ("ds",),
    (
        (ITEM_ID, pa.int64(), False),
        ("category", pa.int32(), False),
        ("brand", pa.int32(), False),  # creator / studio / release-year bucket
        ("first_ds", pa.date32(), False),
    ),
)

USER_FEATURES = ("segment", "region")
ITEM_FEATURES = ("category", "brand")
CONTEXT_FEATURES = ("position", "device")

# Per-user interaction history at the end of a window (the state carried from day to day).
USER_HISTORY = TableSpec(
    "user_history",
    ("ds",),
    (
        (USER_ID, pa.int64(), False),
        ("hist_ts", _list(TS_TYPE), False),
        ("hist_item_id", _list(pa.int64()), False),
        ("hist_surface", _list(pa.string()), False),
        ("hist_click", _list(pa.int8()), False),
    ),
)

# Per (kind, key, surface) impressions and clicks over every window up to and including ds (features.counters:
# the counter state carried from day to day; surface "*" for kinds counted across surfaces).
COUNTER_STATE = TableSpec(
    "counter_state",
    ("ds",),
    (
        ("kind", pa.string(), False),  # item, user, item_surface, user_surface, surface
        ("key", pa.int64(), False),  # the item / user id (0 for kind surface)
        (SURFACE, pa.string(), False),
        ("imps", pa.int64(), False),
        ("clicks", pa.int64(), False),
    ),
)

# Rows an import rejected, with the reason and the source line (1-based, header excluded).
QUARANTINE = TableSpec(
    "quarantine",
    ("import_id",),
    (
        ("source", pa.string(), False),
        ("source_line", pa.int64(), False),
        ("reason", pa.string(), False),
        ("raw", pa.string(), True),
    ),
)

# FM output for each event of window ds, from the FM trained through the window before ds.
FM_OUTPUTS = TableSpec(
    "fm_outputs",
    ("fm", "ds", "surface"),
    (
        *_EVENT_KEYS,
        (FM_VERSION, pa.string(), False),
        ("fm_logit_click", pa.float32(), False),
        ("fm_logit_like", pa.float32(), False),
        ("fm_repr", Vector(pa.int8()), False),  # LoopFM compressed representation, int8 ...
        ("fm_repr_scale", pa.float32(), False),  # ... times this per-row scale
        ("fm_tae", Vector(pa.float32()), False),  # Foundation-Expert target-aware embedding
    ),
)

USER_EMBEDDINGS = TableSpec(
    "user_embeddings",
    ("fm", "ds"),
    ((USER_ID, pa.int64(), False), (FM_VERSION, pa.string(), False), ("vector", Vector(pa.float32()), False)),
)

ITEM_EMBEDDINGS = TableSpec(
    "item_embeddings",
    ("fm", "ds"),
    ((ITEM_ID, pa.int64(), False), (FM_VERSION, pa.string(), False), ("vector", Vector(pa.float32()), False)),
)

# Per-user last-L historical FM representations at the end of a window (LoopFM state).
LOOP_STATE = TableSpec(
    "loop_state",
    ("fm", "ds"),
    (
        (USER_ID, pa.int64(), False),
        ("hist_ts", _list(TS_TYPE), False),
        ("hist_code", _list(Vector(pa.int8())), False),  # the FM's int8 representation codes (fm_repr) ...
        ("hist_scale", _list(pa.float32()), False),  # ... and their scales (fm_repr_scale), as exported
        ("hist_click", _list(pa.int8()), False),
        ("hist_surface", _list(pa.string()), False),
    ),
)

# One training / evaluation row of a surface expert, all FM knowledge point-in-time joined.
EXPERT_EXAMPLES = TableSpec(
    "expert_examples",
    ("fm", "ds", "surface"),
    (
        *_EVENT_KEYS,
        *_LABELS_AND_CONTEXT,
        ("segment", pa.int32(), False),
        ("region", pa.int32(), False),
        ("category", pa.int32(), False),
        ("brand", pa.int32(), False),
        (FM_VERSION, pa.string(), False),
        ("fm_logit_click", pa.float32(), False),
        ("fm_tae", Vector(pa.float32()), False),
        ("loop_hist_code", _list(Vector(pa.int8())), False),  # last L FM reprs (int8 codes), ts < this ts ...
        ("loop_hist_scale", _list(pa.float32()), False),  # ... each times its scale (as fm_outputs stores them)
        ("loop_hist_click", _list(pa.int8()), False),
        ("loop_hist_len", pa.int16(), False),
        ("counters", Vector(pa.float32()), False),  # features.counters.DENSE_NAMES, point in time
    ),
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        EVENTS,
        USERS,
        ITEMS,
        USER_HISTORY,
        COUNTER_STATE,
        QUARANTINE,
        FM_OUTPUTS,
        USER_EMBEDDINGS,
        ITEM_EMBEDDINGS,
        LOOP_STATE,
        EXPERT_EXAMPLES,
    )
}


def type_matches(actual: pa.DataType, declared: pa.DataType | Vector | tuple) -> bool:
    """Whether a column's Arrow type satisfies the declared one (Vector: any fixed width)."""
    if isinstance(declared, Vector):
        return pa.types.is_fixed_size_list(actual) and actual.value_type == declared.value_type
    if isinstance(declared, tuple):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and type_matches(
            actual.value_type, declared[1]
        )
    if pa.types.is_timestamp(declared):
        return pa.types.is_timestamp(actual) and actual.unit == declared.unit and actual.tz in ("UTC", "+00:00")
    return actual == declared


def describe(declared: pa.DataType | Vector | tuple) -> str:
    if isinstance(declared, Vector):
        return f"fixed_size_list<{declared.value_type}>[*]"
    if isinstance(declared, tuple):
        return f"list<{describe(declared[1])}>"
    return str(declared)
