"""A tiny, schema-conforming lake for expert tests: events, users, items and fm_outputs we write ourselves.

fm_outputs here are random but informative (the logit is a noisy copy of the true click logit), so
FM-fed variants have something to learn from; they conform to schemas.FM_OUTPUTS via Lake.write.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

from features.lake import Lake
from features.windows import Window, window_series

SURFACES = ("feed", "live")
START = date(2026, 1, 1)


def write_day(lake: Lake, window: Window, rows: int = 300, users: int = 40, items: int = 60, seed: int = 0,
              surfaces: tuple[str, ...] = SURFACES) -> None:
    rng = np.random.default_rng(seed * 1000 + window.start.toordinal())
    for k, surface in enumerate(surfaces):
        n = rows if k == 0 else rows // 3
        uid = rng.integers(0, users, n)
        iid = rng.integers(0, items, n)
        true_logit = -1.5 + np.sin(uid * 0.7) + np.cos(iid * 1.3)
        click = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.int8)
        ts = [window.start_ts + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 86400, n))]
        base_id = window.start.toordinal() * 100_000 + k * 10_000
        events = pl.DataFrame({
            "event_id": np.arange(n) + base_id, "ts": ts, "user_id": uid, "item_id": iid, "surface": surface,
            "click": click, "like": None, "position": rng.integers(0, 10, n), "device": rng.integers(0, 4, n),
            "p_click": 1 / (1 + np.exp(-true_logit)),
        })
        lake.write("events", events, ds=window.ds, surface=surface)
    lake.write("users", pl.DataFrame({"user_id": np.arange(users), "segment": np.arange(users) % 5,
                                      "region": np.arange(users) % 3, "first_ds": [START] * users}), ds=window.ds)
    lake.write("items", pl.DataFrame({"item_id": np.arange(items), "category": np.arange(items) % 7,
                                      "brand": np.arange(items) % 4, "first_ds": [START] * items}), ds=window.ds)


def write_fm(lake: Lake, window: Window, preset: str = "small", version: str | None = None, repr_dim: int = 6,
             tae_dim: int = 4, noise: float = 0.5, surfaces: tuple[str, ...] = SURFACES) -> str:
    # the FM's own naming: <preset>-<trained-through ds>-<weights hash>
    version = version or f"{preset}-{window.prev().ds}-{hashlib.sha256(window.ds.encode()).hexdigest()[:10]}"
    for surface in surfaces:
        ev = lake.read("events", ds=window.ds, surface=surface).to_pydict()
        n = len(ev["event_id"])
        rng = np.random.default_rng(window.start.toordinal() + len(surface))
        uid, iid = np.array(ev["user_id"]), np.array(ev["item_id"])
        true_logit = -1.5 + np.sin(uid * 0.7) + np.cos(iid * 1.3)
        frame = pl.DataFrame({
            "event_id": ev["event_id"], "ts": ev["ts"], "user_id": uid, "item_id": iid, "surface": surface,
            "fm_version": version, "fm_logit_click": true_logit + noise * rng.standard_normal(n),
            "fm_logit_like": rng.standard_normal(n),
            "fm_repr": pl.Series(rng.integers(-127, 128, (n, repr_dim)).astype(np.int8)),
            "fm_repr_scale": np.full(n, 0.01, np.float32),
            "fm_tae": pl.Series(np.stack([np.sin(uid * 0.7), np.cos(iid * 1.3)] + [rng.standard_normal(n)] * (tae_dim - 2), 1).astype(np.float32)),
        })
        lake.write("fm_outputs", frame, fm=preset, ds=window.ds, surface=surface)
    return version


def make_lake(uri: str, days: int = 3, fm_from: int = 1, presets: tuple[str, ...] = ("small",), **kw) -> tuple[Lake, list[Window]]:
    """`days` windows of events; FM outputs from window `fm_from` on (the FM's first window is unscored)."""
    lake = Lake(uri)
    windows = window_series(START, days)
    lake.update_meta(window_days=1, surfaces=list(SURFACES), source="test", origin=START.isoformat())
    for w in windows:
        write_day(lake, w, **kw)
    for i, w in enumerate(windows):
        if i >= fm_from:
            for p in presets:
                write_fm(lake, w, p, noise=0.3 if p == "large" else 0.8)
    return lake, windows


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)
