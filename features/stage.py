"""Stage wrappers for landing data: `ingest` (one window) and `lake_windows`.

Called by the daily DAG's ingest task, by `fmx ingest` and by tests, with plain references only
(ds string, lake URI string, scale name, seed); each returns a small JSON-able dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from features.counters import build_counters_through
from features.history import build_history_through
from features.lake import Lake, PartitionNotFound
from features.schemas import EVENTS
from features.windows import Window, window_series

if TYPE_CHECKING:
    from features.generate import GeneratorConfig

SOURCES = ("auto", "generator", "lake")


def resolve_source(lake_uri: str, source: str = "auto") -> str:
    """The source of a lake's windows: "auto" = what the lake holds ("lake" for an import, else "generator").

    An explicit "generator" on a lake that holds an import fails: the generator cannot extend it.
    """
    from features.importers.state import require_complete_import

    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    lake = Lake(lake_uri)
    require_complete_import(lake)  # a killed import leaves a lake no stage accepts
    held = lake.meta().get("source")
    imported = held is not None and held != "generator"
    if source == "generator" and imported:
        raise ValueError(
            f"lake {lake_uri} holds imported {held!r} windows, which the generator cannot extend: run them "
            "with source lake (or auto), or generate into another lake"
        )
    return source if source != "auto" else ("lake" if imported else "generator")


def lake_windows(lake_uri: str) -> list[str]:
    """The ds of every window holding at least one events partition, sorted."""
    return sorted({p["ds"] for p in Lake(lake_uri).partitions(EVENTS.name)})


def known_surfaces(lake_uri: str) -> list[str]:
    """Every surface the lake has held: its meta's list and every events partition's."""
    lake = Lake(lake_uri)
    return sorted(set(lake.meta().get("surfaces") or []) | {p["surface"] for p in lake.partitions(EVENTS.name)})


def require_known(requested: list[str] | tuple[str, ...], known: list[str], where: str) -> None:
    """Fail, listing the valid ones, when a requested surface is not among `known` (those of `where`)."""
    unknown = [s for s in requested if s not in known]
    if unknown:
        raise ValueError(f"unknown surfaces {unknown} for {where}; valid surfaces: {known}")


def plan_surfaces(ds: str, lake_uri: str, requested: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The surfaces a run of window `ds` trains experts for: `requested`, or every surface with events.

    A requested name the lake has never held fails with the valid ones listed; one the lake holds but
    window ds has no events for is left out (a sparse surface skips a window); none left fails.
    """
    from features.importers.state import require_complete_import

    lake = Lake(lake_uri)
    require_complete_import(lake)
    present = [p["surface"] for p in lake.partitions(EVENTS.name, ds=ds)]
    if not present:
        raise PartitionNotFound(f"no events for window ds={ds} in lake {lake.uri}: run fmx_fm for that window first")
    if not requested:
        return present
    require_known(requested, known_surfaces(lake_uri), f"lake {lake.uri}")
    chosen = [s for s in requested if s in present]
    if not chosen:
        raise ValueError(f"window ds={ds} has no events for surfaces {list(requested)}; it has {present}")
    return chosen


def ingest(
    ds: str,
    lake_uri: str,
    source: str = "auto",
    scale: str = "small",
    seed: int = 0,
    surfaces: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Land and validate window `ds`, then write its user_history(ds) state.

    source="auto": what the lake holds (`resolve_source`).
    source="generator": generate window ds unless the lake already holds it complete (`_generated`).
    The generator's settings are the lake's own (its meta `generator`: scale, seed, events per day,
    surfaces) once it has them; `scale` and `seed` only set up a new lake. A new lake takes ds as its
    origin; windows between the lake's origin and ds that hold no events yet are generated (and their
    history built) first, in order, because each generated day carries over from the day before.
    source="lake": the window was imported earlier (e.g. `fmx import`); its events(ds, *) must exist
    and pass the schema check (PartitionNotFound / SchemaError otherwise).
    Both: user_history of earlier windows is built first where missing, then user_history(ds) via
    `features.history.build_user_history`, and counter_state likewise (`features.counters`).
    Requested `surfaces` are checked against the lake (`plan_surfaces`) so that a bad name fails
    here, before any model trains.
    Returns {"ds", "surfaces" (every surface of the window), "rows", "source"}.
    """
    source = resolve_source(lake_uri, source)
    lake = Lake(lake_uri)
    window = lake.window(ds)
    if source == "generator":
        _generate_through(lake, window, scale, seed)
    present, rows = _validate_events(lake, window)
    build_history_through(lake, window)  # missing earlier states first, in order; then window's
    build_counters_through(lake, window)  # likewise for counter_state (point-in-time counters)
    plan_surfaces(window.ds, lake_uri, surfaces)
    return {"ds": window.ds, "surfaces": present, "rows": rows, "source": source}


def _generate_through(lake: Lake, window: Window, scale: str, seed: int) -> None:
    """Generate every missing window from the lake's origin up to `window`, then `window` unless complete."""
    from features.generate import generate_window

    cfg = generator_config(lake, scale, seed)
    meta = lake.meta()
    if meta.get("source") == "generator" and "origin" in meta:
        origin = lake.window(meta["origin"])
        for earlier in window_series(origin.start, max(0, (window.start - origin.start).days)):
            if earlier < window and not lake.partitions(EVENTS.name, ds=earlier.ds):
                generate_window(lake, cfg, earlier)
    if not _generated(lake, window, cfg.surfaces):
        generate_window(lake, cfg, window)


def generator_config(lake: Lake, scale: str = "small", seed: int = 0) -> GeneratorConfig:
    """The GeneratorConfig that made `lake` (its meta `generator`), or (scale, seed) for a lake without one.

    A run's Params default to scale small, seed 0: on a lake generated otherwise they must not win, or
    every run would regenerate (or refuse) the lake's windows at another scale.
    """
    from features.generate import SCALES, GeneratorConfig

    made = lake.meta().get("generator")
    if not isinstance(made, dict):
        return GeneratorConfig(scale=scale, seed=seed)
    per_day = made.get("events_per_day")
    preset = SCALES.get(str(made.get("scale")))
    return GeneratorConfig(
        scale=str(made["scale"]), seed=int(made["seed"]), surfaces=tuple(made["surfaces"]),
        events_per_day=None if preset is not None and per_day == preset.events_per_day else per_day,
    )  # fmt: skip


def _generated(lake: Lake, window: Window, surfaces: tuple[str, ...]) -> bool:
    """Window complete in the lake: events of every surface, and users/items (written last) for its ds."""
    from features.schemas import ITEMS, USERS

    held = {p["surface"] for p in lake.partitions(EVENTS.name, ds=window.ds)}
    return set(surfaces) <= held and all(lake.exists(t.name, ds=window.ds) for t in (USERS, ITEMS))


def _validate_events(lake: Lake, window: Window) -> tuple[list[str], int]:
    """Surfaces and row count of events(ds, *); every partition's schema is checked on scan."""
    parts = lake.partitions(EVENTS.name, ds=window.ds)
    if not parts:
        raise PartitionNotFound(
            f"no events for window ds={window.ds} in lake {lake.uri}; import or generate it first "
            f"(windows present: {lake_windows(lake.uri)[:5]}{'...' if len(lake_windows(lake.uri)) > 5 else ''})"
        )
    rows = 0
    for part in parts:
        rows += lake.scan(EVENTS.name, **part).select(pl.len()).collect().item()
    return [p["surface"] for p in parts], rows
