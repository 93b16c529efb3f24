"""fmx_fm's schedule as `fmx up` sets it: the first and last window (dates, or "lake": read from the lake)
and the window length (`schedule_from`), and the one line saying what unpausing fmx_fm runs
(`describe_schedule`). The DAG reads them from $FMX_START_DATE, $FMX_END_DATE, $FMX_WINDOW_DAYS (fmx.dagkit).
"""

from __future__ import annotations

import os
from typing import Any

from fmx.servers.config import ServerConfig, ServerError


def schedule_from(lake_uri: str, start_date: str | None, end_date: str | None = None) -> dict[str, Any]:
    """start_date, end_date and window_days of fmx_fm's schedule.

    start: a date; "lake" = the lake's next unprocessed window (the first with events whose FM of the
    scheduled presets is not trained yet); default $FMX_START_DATE, else "" (no schedule of its own).
    end: a date; "lake" = the lake's last window with events; "none" = no end; default $FMX_END_DATE, else
    "lake" when the start is "lake" (the schedule runs the windows the lake holds, not a catch-up to
    today), else no end. The window length is always the lake's (1 for a new lake).
    """
    from features.lake import Lake

    meta = Lake(lake_uri).meta()
    start = start_date or os.environ.get("FMX_START_DATE", "")
    end = end_date or os.environ.get("FMX_END_DATE", "") or ("lake" if start == "lake" else "")
    if "lake" in (start, end):
        windows = _lake_windows(lake_uri)
        if not windows:
            raise ServerError(f"--start-date/--end-date lake: lake {lake_uri} holds no windows yet "
                              "(import or generate first)")  # fmt: skip
        start = _next_unprocessed(lake_uri, windows, int(meta.get("window_days", 1))) if start == "lake" else start
        end = windows[-1] if end == "lake" else end
    end = "" if end == "none" else end
    for flag, text in (("--start-date", start), ("--end-date", end)):
        _check_day(flag, text)
    return {"start_date": start, "end_date": end, "window_days": int(meta.get("window_days", 1))}


def describe_schedule(cfg: ServerConfig, now: Any = None) -> str:
    """What unpausing fmx_fm runs, in one line: the windows, how many are past (run at once), and the end."""
    from datetime import UTC, date, datetime, timedelta

    if not cfg.schedule:
        return "off (--no-schedule): only triggered runs and backfills run"
    if not cfg.start_date:
        return "off (no --start-date): only triggered runs and backfills run"
    start, step = date.fromisoformat(cfg.start_date), timedelta(days=cfg.window_days)
    end = date.fromisoformat(cfg.end_date) if cfg.end_date else None
    today = (now or datetime.now(UTC)).date()
    if end is not None and start > end:
        return f"fmx_fm: nothing to run (the lake's windows through {cfg.end_date} are done)"
    past, ds = 0, start
    while ds + step <= today and (end is None or ds <= end):  # a window runs once it has ended
        past, ds = past + 1, ds + step
    what = f"fmx_fm: one run per {cfg.window_days}-day window from {cfg.start_date}"
    if end is not None:
        return f"{what} through {cfg.end_date} ({(end - start) // step + 1} runs, {past} of them at once)"
    return f"{what}, no end ({past} past windows run at once, then one per window)"


def _check_day(flag: str, text: str) -> None:
    from datetime import date

    if text:
        try:
            date.fromisoformat(text)
        except ValueError:
            raise ServerError(f"{flag} {text!r} is not a date YYYY-MM-DD (or 'lake')") from None


def _lake_windows(lake_uri: str) -> list[str]:
    from features.stage import lake_windows

    try:
        return lake_windows(lake_uri)
    except (OSError, ValueError) as exc:
        raise ServerError(f"cannot list the windows of lake {lake_uri}: {exc}") from None


def _next_unprocessed(lake_uri: str, windows: list[str], window_days: int) -> str:
    """The first window whose scheduled FM presets are not all trained; past the last one when all are."""
    from datetime import date, timedelta

    from fmx.dagkit import DEFAULT_FM_PRESETS, done_versions

    todo = [ds for ds in windows if not done_versions(ds, lake_uri, DEFAULT_FM_PRESETS)]
    if todo:
        return todo[0]
    return (date.fromisoformat(windows[-1]) + timedelta(days=window_days)).isoformat()
