"""The declarative mapping from a source log to the lake's events/users/items, loadable from TOML.

A mapping file (stdlib tomllib) looks like::

    name = "mylog"                 # recorded as the lake's `source`
    window = "1d"                  # default window length (the CLI's --window overrides it)
    ts_min = "1990-01-01"          # timestamps outside [ts_min, ts_max) are quarantined
    ts_max = "2100-01-01"
    max_gap_days = 60              # rows cut off from the log's bulk by a longer gap are quarantined (0: off)

    [events]                       # the interaction log
    files = ["*.csv"]              # glob patterns relative to PATH (a folder), or PATH itself (a file)
    format = "csv"                 # csv | parquet
    delimiter = ","                # any string ("::" works, see read.py)
    quote = '"'                    # RFC 4180 quoting: "a,b" and "two\nlines" are one field; "" = no quoting
    header = true                  # first line holds column names
    columns = []                   # names when header = false
    encoding = "utf-8"

    [fields]
    user_id = "uid"                # integer id columns
    item_id = "iid"
    ts = "time"
    ts_unit = "s"                  # s | ms | us (numbers since the epoch) ...
    ts_format = ""                 # ... or a strptime format for text timestamps (UTC)
    click = "rating >= 4"          # a SQL expression over source columns (polars.sql_expr), see Labels
    like = "rating == 5"           # optional; null when absent
    position = ""                  # optional columns, 0 when absent
    device = ""

    [surface]                      # exactly one of: constant, column (+ values, default), item_column
    column = "tab"
    values = { "0" = "feed", "1" = "search" }
    default = "other"              # for values not in `values`; without it such rows are quarantined

    [users]                        # optional side table; same keys as [events] plus:
    files = ["users.csv"]
    id = "uid"
    derive = ""                    # optional named hook (features.importers.side.DERIVE)
    features = { segment = "age_bucket", region = "country" }
    [items]                        # likewise, with features category / brand (and a `surface` column
                                   # when [surface] item_column names it)

Labels (`click`, `like`): each is a SQL expression whose value must be 0 or 1 (true or false); any other
value, or null, quarantines the row ("bad label"). The columns an expression uses are typed from their
non-empty values, per import:
- numeric when more than half parse as numbers: compared as numbers (``rating >= 4``, ``is_click``);
  a value that does not parse quarantines the row;
- boolean when more than half are ``true`` / ``false`` (any case; a Parquet boolean column reads as
  those words): a Boolean, so ``clicked``, ``clicked = true``, ``NOT skipped`` all work; any other
  value quarantines the row;
- text otherwise: compared as strings (``action = 'clicked'``).

Far-off rows: the log's distinct event days are cut wherever two consecutive days lie more than
`max_gap_days` apart; the run of days holding the most rows (the earliest on a tie) is the log's bulk
and every row outside it is quarantined ("timestamp ... lies N days after the log's bulk ..."), so one
mistyped year never makes the import write years of empty windows. `max_gap_days = 0` turns it off.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MAPPINGS_DIR = Path(__file__).resolve().parents[1] / "mappings"


@dataclass(frozen=True)
class SourceTable:
    """Where a table's rows are and how to split them into string columns."""

    files: tuple[str, ...]
    format: str = "csv"
    delimiter: str = ","
    header: bool = True
    columns: tuple[str, ...] = ()
    encoding: str = "utf-8"
    quote: str = '"'

    def __post_init__(self) -> None:
        if not self.delimiter or len(self.quote) > 1 or (self.quote and self.quote in self.delimiter):
            raise ValueError(
                f"mapping: delimiter must be non-empty and quote one character not in it "
                f"(got delimiter={self.delimiter!r}, quote={self.quote!r})"
            )
        if self.format not in ("csv", "parquet"):
            raise ValueError(f"mapping: format must be 'csv' or 'parquet', got {self.format!r}")
        if self.format == "csv" and not self.header and not self.columns:
            raise ValueError("mapping: a csv without a header needs `columns`")


@dataclass(frozen=True)
class SideTable:
    """A users or items side table: its id column and lake feature -> source column."""

    source: SourceTable
    id: str
    features: dict[str, str] = field(default_factory=dict)
    derive: str = ""


@dataclass(frozen=True)
class SurfaceRule:
    constant: str = ""
    column: str = ""
    values: dict[str, str] = field(default_factory=dict)
    default: str = ""
    item_column: str = ""

    def __post_init__(self) -> None:
        chosen = [k for k in ("constant", "column", "item_column") if getattr(self, k)]
        if len(chosen) != 1:
            raise ValueError(
                f"mapping [surface]: set exactly one of constant, column, item_column (got {chosen})"
            )


@dataclass(frozen=True)
class Mapping:
    name: str
    events: SourceTable
    user_id: str
    item_id: str
    ts: str
    click: str
    surface: SurfaceRule
    ts_unit: str = "s"
    ts_format: str = ""
    like: str = ""
    position: str = ""
    device: str = ""
    users: SideTable | None = None
    items: SideTable | None = None
    window: str = "1d"
    ts_min: str = "1990-01-01"
    ts_max: str = "2100-01-01"
    max_gap_days: int = 60

    def __post_init__(self) -> None:
        if self.max_gap_days < 0:
            raise ValueError(f"mapping: max_gap_days must be >= 0 (0 = off), got {self.max_gap_days}")
        if not self.ts_format and self.ts_unit not in ("s", "ms", "us"):
            raise ValueError(f"mapping: ts_unit must be s, ms or us (or set ts_format), got {self.ts_unit!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"mapping {where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _side(data: dict[str, Any] | None, where: str) -> SideTable | None:
    if not data:
        return None
    data = dict(data)
    try:
        head = {k: data.pop(k) for k in ("id", "features", "derive") if k in data}
        return SideTable(source=_build(SourceTable, data, where), **head)
    except TypeError as exc:
        raise ValueError(f"mapping {where}: {exc}") from None


def mapping_from_dict(data: dict[str, Any]) -> Mapping:
    """Build and validate a Mapping from the parsed TOML layout documented above."""
    data = dict(data)
    try:
        events = _build(SourceTable, data.pop("events"), "[events]")
        fields_ = data.pop("fields")
        surface = _build(SurfaceRule, data.pop("surface"), "[surface]")
    except KeyError as exc:
        raise ValueError(f"mapping: missing section [{exc.args[0]}]") from None
    users, items = _side(data.pop("users", None), "[users]"), _side(data.pop("items", None), "[items]")
    missing = [k for k in ("user_id", "item_id", "ts", "click") if not fields_.get(k)]
    if missing or "name" not in data:
        raise ValueError(f"mapping: missing {missing or ['name']} (in [fields] / top level)")
    return _build(
        Mapping,
        {**data, **fields_, "events": events, "surface": surface, "users": users, "items": items},
        "(top level / [fields])",
    )


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def load_mapping_dict(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"mapping file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"mapping file {path} is not valid TOML: {exc}") from None


def preset_dict(preset: str, source: Path) -> dict[str, Any]:
    """The built-in mapping of a preset (movielens picks its 100K or 1M layout from the files in `source`)."""
    if preset == "movielens":
        if (source / "ratings.dat").exists():
            return load_mapping_dict(MAPPINGS_DIR / "movielens_1m.toml")
        return load_mapping_dict(MAPPINGS_DIR / "movielens_100k.toml")
    if preset == "kuairand":
        return load_mapping_dict(MAPPINGS_DIR / "kuairand.toml")
    if preset == "custom":
        return {}
    raise ValueError(
        f"unknown import preset {preset!r}: expected movielens, kuairand or custom (with --mapping)"
    )


def resolve_mapping(preset: str, source: str | Path, mapping_file: str | Path | None = None) -> Mapping:
    """The preset's mapping with the keys of `mapping_file` (if any) laid over it."""
    base = preset_dict(preset, Path(source))
    if preset == "custom" and mapping_file is None:
        raise ValueError(
            "preset 'custom' needs --mapping FILE (see features/importers/mapping.py for the layout)"
        )
    data = deep_merge(base, load_mapping_dict(mapping_file)) if mapping_file else base
    return mapping_from_dict(data)
