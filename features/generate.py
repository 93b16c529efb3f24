"""Synthetic multi-surface impression logs: fmx's built-in data (tables events, users, items).

World model (vectorised numpy; deterministic from `GeneratorConfig.seed`):

- Users: a latent interest u (`dim` floats) = centre of the user's *segment* + noise, so `segment`
  is informative; a slow drift u(t) = u + 0.35 (cos wt a + sin wt b) with a 60-day period; per
  surface a small interest offset and click bias (surface-specific taste on top of the shared u, sd 0.2
  and 0.15: taste mostly carries across surfaces, which is what lets an FM trained on all of them help
  the sparse one); an activity rate (log-normal); a surface mix (live reaches only ~35 % of users, for few events each:
  the sparse surface where knowledge from the other surfaces matters most); a main device; a
  `region` with its own taste for each category.
- Items: a latent v = centre of the item's *category* + noise; a brand (nested in the category)
  with a quality that moves clicks and likes; a popularity that fades with the item's age, so the
  new items of every day get shown.
- Events of one day: the day's users are drawn by activity, each impression gets a time (diurnal
  profile), a surface (the user's mix) and an *intent* (a category) that persists along the
  user's day across surfaces and switches now and then. The first intent of the day is the
  category of the user's last click in the previous window, read from the lake: this is the
  sequential carry-over, and what makes "recent clicks shift the next click" learnable. The shown
  item is the best of 3 candidates (from the intent category or by popularity) under a noisy
  ranker. Click ~ Bernoulli(p_click) with logit = surface base + user-surface bias + brand quality
  + item novelty + 0.8 affinity(u_s, v) + 1.0 [category == intent] + region x category
  + surface x category - 0.3 log1p(position) + device x surface. like ~ Bernoulli(p_like) only
  for clicked events (0 otherwise, never null). `p_click` is stored with each event as the
  Bayes-optimal ceiling for reports; it is never a model input.

Scales (events per day; users / items on day one, plus new ones every day): "tiny" 2k (300 / 150,
+20 / +10), "small" 50k (6k / 2k, +200 / +60), "default" 1M (100k / 25k, +2.5k / +600); "default"
generates a day in ~4 s on 2 cores. Bayes AUC of p_click is ~0.79-0.85 per surface (NE ~0.83-0.86 with
the day's own CTR as base rate), CTR ~4 % (feed, video, live) to ~7.5 % (search), stationary from day one
("tiny" is noisier). event_id = (date ordinal << 32) | row of the day (sorted by ts): unique, stable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import polars as pl

from common.metrics import auc, logloss, ne
from features.lake import Lake
from features.schemas import CLICK, EVENTS, ITEM_ID, ITEMS, LIKE, P_CLICK, SURFACE, TS, USER_ID, USERS
from features.windows import Window, window_series

Arrays = dict[str, np.ndarray]
_CANDIDATES = 3
_DEVICE_MIX = np.array([0.05, 0.6, 0.27, 0.08])  # unknown, mobile, desktop, tv

DEFAULT_START = date(2026, 1, 1)  # the built-in stream's first day when a new lake names none


@dataclass(frozen=True)
class Scale:
    events_per_day: int
    users: int  # users on the first day
    new_users: int  # users added on every later day
    items: int
    new_items: int
    dim: int
    categories: int
    brands_per_category: int
    segments: int
    regions: int


SCALES: dict[str, Scale] = {
    "tiny": Scale(2_000, 300, 20, 150, 10, 8, 6, 5, 4, 5),
    "small": Scale(50_000, 6_000, 200, 2_000, 60, 16, 16, 12, 6, 10),
    "default": Scale(1_000_000, 100_000, 2_500, 25_000, 600, 16, 32, 30, 8, 20),
}


@dataclass(frozen=True)
class SurfaceParams:
    share: float  # share of the day's impressions (before reach)
    reach: float  # fraction of users who use the surface at all
    base: float  # base click logit
    position_p: float  # slot position ~ geometric(position_p) - 1, capped at max_position
    max_position: int
    device: tuple[float, float, float, float]  # click-logit effect of unknown, mobile, desktop, tv


SURFACES: dict[str, SurfaceParams] = {
    "feed": SurfaceParams(0.50, 1.00, -4.8, 0.08, 49, (-0.2, 0.1, -0.1, -0.3)),
    "search": SurfaceParams(0.22, 0.80, -4.6, 0.30, 19, (-0.2, -0.1, 0.25, -0.5)),
    "video": SurfaceParams(0.23, 0.70, -4.9, 0.12, 29, (-0.2, 0.0, -0.1, 0.5)),
    "live": SurfaceParams(0.05, 0.35, -5.2, 0.35, 9, (-0.2, 0.3, -0.2, 0.1)),
}


@dataclass(frozen=True)
class GeneratorConfig:
    """What the generator makes: a scale preset, the surfaces, the seed, an optional events/day override."""

    scale: str = "small"
    seed: int = 0
    surfaces: tuple[str, ...] = ("feed", "search", "video", "live")
    events_per_day: int | None = None

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown generator scale {self.scale!r}; known: {sorted(SCALES)}")
        unknown = [s for s in self.surfaces if s not in SURFACES]
        if not self.surfaces or unknown or len(set(self.surfaces)) != len(self.surfaces):
            raise ValueError(f"bad surfaces {self.surfaces!r}: need distinct names among {sorted(SURFACES)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.events_per_day is not None and self.events_per_day < 1:
            raise ValueError(f"events_per_day must be >= 1, got {self.events_per_day}")

    @property
    def preset(self) -> Scale:
        return SCALES[self.scale]

    @property
    def daily_events(self) -> int:
        return self.events_per_day or self.preset.events_per_day


# ---- the world: global parameters and the user / item populations --------------------------------
def _rng(cfg: GeneratorConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *stream])


def _world(cfg: GeneratorConfig) -> Arrays:
    sc, rng = cfg.preset, _rng(cfg, 0)
    return {
        "segment_centre": rng.normal(0, 1, (sc.segments, sc.dim)),
        "category_centre": rng.normal(0, 1, (sc.categories, sc.dim)),
        "category_share": rng.dirichlet(np.full(sc.categories, 2.0)),
        "region_category": rng.normal(0, 0.35, (sc.regions, sc.categories)),
        "surface_category": rng.normal(0, 0.3, (len(SURFACES), sc.categories)),
        "brand_quality": rng.normal(0, 0.35, sc.categories * sc.brands_per_category),
    }


def _user_block(cfg: GeneratorConfig, world: Arrays, k: int) -> Arrays:
    """The users who arrive on day index k (ids continue the previous blocks)."""
    sc, rng = cfg.preset, _rng(cfg, 1, k)
    n, n_surf = sc.users if k == 0 else sc.new_users, len(SURFACES)
    segment = rng.integers(0, sc.segments, n)
    reach = rng.random((n, n_surf)) < np.array([p.reach for p in SURFACES.values()])
    share = np.array([p.share for p in SURFACES.values()])
    return {
        "segment": segment,
        "region": rng.integers(0, sc.regions, n),
        "first_day": np.full(n, k),
        "u": 0.9 * world["segment_centre"][segment] + rng.normal(0, 0.4, (n, sc.dim)),
        "drift_a": rng.normal(0, 1, (n, sc.dim)),
        "drift_b": rng.normal(0, 1, (n, sc.dim)),
        "surface_offset": rng.normal(0, 0.2, (n, n_surf, sc.dim)),
        "surface_bias": rng.normal(0, 0.15, (n, n_surf)),
        "activity": rng.lognormal(0, 1.0, n),
        "mix": share * reach * rng.lognormal(0, 0.5, (n, n_surf)),
        "device": rng.choice(4, n, p=_DEVICE_MIX),
    }


def _item_block(cfg: GeneratorConfig, world: Arrays, k: int) -> Arrays:
    """The items published on day index k."""
    sc, rng = cfg.preset, _rng(cfg, 2, k)
    n = sc.items if k == 0 else sc.new_items
    category = rng.choice(sc.categories, n, p=world["category_share"])
    brand = category * sc.brands_per_category + rng.integers(0, sc.brands_per_category, n)
    return {
        "category": category,
        "brand": brand,
        "first_day": np.full(n, k),
        "v": world["category_centre"][category] + rng.normal(0, 0.7, (n, sc.dim)),
        "popularity": rng.normal(0, 1.0, n),
        # the day-one catalogue was published over the 30 days before the log starts (first_ds stays the
        # origin: that is when the log first sees it); without this every item is new on day one and the
        # novelty term makes CTR fall for a week (feed 4.1% -> 3.1% measured), a warm-up no real log has
        "age0": rng.integers(0, 30, n) if k == 0 else np.zeros(n, np.int64),
    }


def _population(block: Callable[..., Arrays], cfg: GeneratorConfig, world: Arrays, day: int) -> Arrays:
    """Every block up to day index `day`, concatenated; row r has id r + 1."""
    blocks = [block(cfg, world, k) for k in range(day + 1)]
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}


# ---- one day's events ----------------------------------------------------------------------------
def _carry_intent(lake: Lake, prev: Window, items: Arrays, n_users: int) -> np.ndarray:
    """Per user row, the category of the user's last click in window `prev` (-1: none)."""
    carry = np.full(n_users, -1)
    parts = lake.partitions(EVENTS.name, ds=prev.ds)
    if not parts:
        return carry
    last = (
        lake.scan_many(EVENTS.name, parts)
        .filter(pl.col(CLICK) == 1)
        .sort(TS, "event_id")
        .group_by(USER_ID)
        .agg(pl.col(ITEM_ID).last())
        .collect()
    )
    carry[last[USER_ID].to_numpy() - 1] = items["category"][last[ITEM_ID].to_numpy() - 1]
    return carry


def _sample_times(rng: np.random.Generator, n: int) -> np.ndarray:
    """Microseconds into the day, with an evening peak."""
    hour_weight = 1.0 + 0.8 * np.sin((np.arange(24) - 13) / 24 * 2 * np.pi)
    hour = rng.choice(24, n, p=hour_weight / hour_weight.sum())
    return (hour * 3_600_000_000 + rng.integers(0, 3_600_000_000, n)).astype(np.int64)


def _categorical_rows(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) matrix of non-negative weights (inverse CDF, vectorised)."""
    cum = np.cumsum(weights, axis=1)
    pick = rng.random(len(weights)) * cum[:, -1]
    return np.minimum((cum < pick[:, None]).sum(axis=1), weights.shape[1] - 1)


def _intents(rng: np.random.Generator, cfg: GeneratorConfig, world: Arrays, users: Arrays, user: np.ndarray,
             carry: np.ndarray) -> np.ndarray:
    """Per event (sorted by user, ts): the user's current intent category (sticky Markov chain)."""
    n = len(user)
    first = np.ones(n, dtype=bool)
    first[1:] = user[1:] != user[:-1]
    switch = rng.random(n) < 0.12
    starts = np.flatnonzero(first | switch)
    seg_user = user[starts]
    pref = users["u"][seg_user] @ world["category_centre"].T / np.sqrt(cfg.preset.dim)
    drawn = np.argmax(1.5 * pref + np.log(world["category_share"]) + rng.gumbel(size=pref.shape), axis=1)
    keep = first[starts] & ~switch[starts] & (carry[seg_user] >= 0)
    drawn[keep] = carry[seg_user[keep]]
    return drawn[np.cumsum(first | switch) - 1]


def _pick_items(rng: np.random.Generator, items: Arrays, alive: np.ndarray, intent: np.ndarray, u_s: np.ndarray,
                dim: int) -> np.ndarray:
    """Per event, the shown item row: the best of _CANDIDATES under a noisy relevance ranker."""
    n, n_cat = len(intent), int(items["category"].max()) + 1
    weight = np.exp(items["popularity"][alive] + 1.5 * np.exp(-items["age"][alive] / 3.0))
    order = np.argsort(items["category"][alive], kind="stable")
    cats, rows = items["category"][alive][order], alive[order]
    cum_in_cat = np.zeros(len(rows))  # category c's items fill (c, c + 1] of one cumulative axis
    for c in range(n_cat):  # a loop over categories, not events
        sel = cats == c
        if sel.any():
            cum_in_cat[sel] = c + np.cumsum(weight[order][sel]) / weight[order][sel].sum()
    cum_all = np.cumsum(weight) / weight.sum()
    from_intent = rng.random((n, _CANDIDATES)) < 0.5
    by_intent = rows[np.minimum(np.searchsorted(cum_in_cat, intent[:, None] + rng.random((n, _CANDIDATES))),
                                len(rows) - 1)]
    by_pop = alive[np.minimum(np.searchsorted(cum_all, rng.random((n, _CANDIDATES))), len(alive) - 1)]
    cand = np.where(from_intent & np.isin(intent, cats)[:, None], by_intent, by_pop)
    score = np.stack([(u_s * items["v"][cand[:, c]]).sum(1) for c in range(_CANDIDATES)], 1) / np.sqrt(dim)
    return cand[np.arange(n), np.argmax(score + 0.7 * rng.gumbel(size=score.shape), axis=1)]


def _impressions(rng: np.random.Generator, cfg: GeneratorConfig, users: Arrays, n: int) -> Arrays:
    """Who, when, where: n impressions sorted by (user row, time); surface = index into SURFACES."""
    surf_cols = np.array([list(SURFACES).index(s) for s in cfg.surfaces])
    mix = users["mix"][:, surf_cols]
    activity = users["activity"] * (mix.sum(1) > 0)  # users of none of cfg.surfaces stay away
    user = rng.choice(len(activity), n, p=activity / activity.sum())
    t = _sample_times(rng, n)
    order = np.lexsort((t, user))
    user, t = user[order], t[order]
    surface = surf_cols[_categorical_rows(rng, mix[user])]
    params = list(SURFACES.values())
    position = np.minimum(rng.geometric(np.array([p.position_p for p in params])[surface]) - 1,
                          np.array([p.max_position for p in params])[surface])
    device = np.where(rng.random(n) < 0.85, users["device"][user], rng.integers(0, 4, n))
    return {"user": user, "t": t, "surface": surface, "position": position, "device": device}


def _click_terms(world: Arrays, users: Arrays, items: Arrays, ev: Arrays, affinity: np.ndarray) -> Arrays:
    """The additive terms of each impression's true click logit (see the module docstring), by name."""
    user, item, surface, cat = ev["user"], ev["item"], ev["surface"], items["category"][ev["item"]]
    params = list(SURFACES.values())
    return {
        "surface_base": np.array([p.base for p in params])[surface],
        "user_surface_bias": users["surface_bias"][user, surface],
        "brand_quality": world["brand_quality"][items["brand"][item]],
        "novelty": 0.4 * np.exp(-items["age"][item] / 2.0),  # today's and yesterday's items
        "affinity": 0.8 * affinity,
        "intent": 1.0 * (cat == ev["intent"]),
        "region_category": world["region_category"][users["region"][user], cat],
        "surface_category": world["surface_category"][surface, cat],
        "position": -0.3 * np.log1p(ev["position"]),
        "device": np.array([p.device for p in params])[surface, ev["device"]],
    }


def _simulate_day(cfg: GeneratorConfig, world: Arrays, users: Arrays, items: Arrays, carry: np.ndarray,
                  day: int) -> tuple[Arrays, Arrays, Arrays]:
    """One day's impressions (sorted by user, time), the logit terms of each, and the day's item view.

    Returns (ev, terms, items): ev has user, t, surface, position, device, intent, item (rows), u_s
    (the user's interest on that surface that day), p_click, click, like; items gains today's "age".
    """
    rng, dim = _rng(cfg, 3, day), cfg.preset.dim
    ev = _impressions(rng, cfg, users, int(rng.poisson(cfg.daily_events)))
    ev["intent"] = _intents(rng, cfg, world, users, ev["user"], carry)
    phase = 2 * np.pi * day / 60.0  # slow drift of every user's interests, one turn in 60 days
    u_day = users["u"] + 0.35 * (np.cos(phase) * users["drift_a"] + np.sin(phase) * users["drift_b"])
    ev["u_s"] = u_day[ev["user"]] + users["surface_offset"][ev["user"], ev["surface"]]  # (n, dim)
    items = {**items, "age": day - items["first_day"] + items["age0"]}
    ev["item"] = _pick_items(rng, items, np.flatnonzero(items["first_day"] <= day), ev["intent"], ev["u_s"], dim)
    affinity = (ev["u_s"] * items["v"][ev["item"]]).sum(1) / np.sqrt(dim)
    terms = _click_terms(world, users, items, ev, affinity)
    ev["p_click"] = 1.0 / (1.0 + np.exp(-sum(terms.values())))
    ev["click"] = rng.random(len(ev["p_click"])) < ev["p_click"]
    quality = terms["brand_quality"]
    ev["like"] = ev["click"] & (rng.random(len(ev["click"])) < 1.0 / (1.0 + np.exp(2.0 - 0.8 * affinity - 2.0 * quality)))
    return ev, terms, items


def _day_events(cfg: GeneratorConfig, world: Arrays, users: Arrays, items: Arrays, carry: np.ndarray,
                day: int, window: Window) -> pl.DataFrame:
    """All of one day's impressions (every surface), sorted by ts, with event_id assigned."""
    ev, _, _ = _simulate_day(cfg, world, users, items, carry, day)
    return _events_frame(ev, window)


def _events_frame(ev: Arrays, window: Window, extra: dict[str, np.ndarray] | None = None) -> pl.DataFrame:
    """The EVENTS rows of one simulated day (plus `extra` columns), sorted by ts, with event_id assigned."""
    frame = pl.DataFrame({
        TS: (window.start_ts.timestamp() * 1e6 + ev["t"]).astype(np.int64),
        USER_ID: ev["user"] + 1, ITEM_ID: ev["item"] + 1, SURFACE: np.array(list(SURFACES))[ev["surface"]],
        CLICK: ev["click"].astype(np.int8), LIKE: ev["like"].astype(np.int8), "position": ev["position"].astype(np.int16),
        "device": ev["device"].astype(np.int8), P_CLICK: ev["p_click"].astype(np.float32), **(extra or {}),
    }).sort(TS, USER_ID, maintain_order=True)
    return frame.with_columns(
        (pl.int_range(pl.len(), dtype=pl.Int64) | (window.start.toordinal() << 32)).alias("event_id"),
        pl.col(TS).cast(pl.Datetime("us", "UTC")),
    )


def explain_window(lake: Lake, cfg: GeneratorConfig, window: Window) -> pl.DataFrame:
    """Every event of a generated `window` with the terms of its true click logit (for bench/fm_ne_table.py).

    Re-simulates the day (deterministic from cfg, the day index and the previous window's events) and
    checks that it reproduces the lake's p_click. Columns: event_id, surface, click, p_click, one
    ``term_<name>`` per additive logit term (they sum to logit(p_click)), and two population-level
    stand-ins for the personal affinity term: ``segment_affinity`` (the user's taste replaced by their
    segment's centre: what no per-user data is needed to know) and ``category_affinity`` (the item's
    vector replaced by its category's centre as well).
    """
    meta = lake.meta()
    if meta.get("source") != "generator" or (meta.get("scale"), meta.get("seed")) != (cfg.scale, cfg.seed):
        raise ValueError(f"lake {lake.uri} was not generated with scale={cfg.scale!r}, seed={cfg.seed} "
                         f"(its meta: source={meta.get('source')!r}, scale={meta.get('scale')!r}, seed={meta.get('seed')})")
    origin = date.fromisoformat(meta["origin"])
    day, world = (window.start - origin).days, _world(cfg)
    users, items = _population(_user_block, cfg, world, day), _population(_item_block, cfg, world, day)
    carry = _carry_intent(lake, window.prev(), items, len(users["u"])) if day else np.full(len(users["u"]), -1)
    ev, terms, _ = _simulate_day(cfg, world, users, items, carry, day)
    seg_u = 0.9 * world["segment_centre"][users["segment"][ev["user"]]]
    v, centre = items["v"][ev["item"]], world["category_centre"][items["category"][ev["item"]]]
    extra = {f"term_{k}": t for k, t in terms.items()} | {
        "segment_affinity": 0.8 * (seg_u * v).sum(1) / np.sqrt(cfg.preset.dim),
        "category_affinity": 0.8 * (seg_u * centre).sum(1) / np.sqrt(cfg.preset.dim),
    }
    frame = _events_frame(ev, window, extra).select("event_id", SURFACE, CLICK, P_CLICK, *extra)
    stored = lake.scan_many(EVENTS.name, lake.partitions(EVENTS.name, ds=window.ds)).select("event_id", P_CLICK)
    check = frame.lazy().join(stored, on="event_id", how="full").collect()
    if check.height != frame.height or not check[P_CLICK].equals(check[P_CLICK + "_right"], check_names=False):
        raise ValueError(f"re-simulating {window} does not reproduce lake {lake.uri}'s events: it was written by "
                         "another generator version or edited")
    return frame


# ---- lake I/O ------------------------------------------------------------------------------------
def _check_lake(lake: Lake, cfg: GeneratorConfig, window: Window) -> date:
    """The lake's generator origin (this window for a new lake); refuse mixing configs or skipping days."""
    meta, mine = lake.meta(), {"scale": cfg.scale, "seed": cfg.seed, "events_per_day": cfg.daily_events,
                               "surfaces": list(cfg.surfaces)}
    if meta.get("source") not in (None, "generator"):
        raise ValueError(f"lake {lake.uri} holds source={meta['source']!r} data; generate into another lake")
    if "generator" in meta and meta["generator"] != mine:
        raise ValueError(f"lake {lake.uri} was generated with {meta['generator']}, not {mine}; use another lake")
    if meta.get("window_days", 1) != 1:
        raise ValueError(f"lake {lake.uri} has {meta['window_days']}-day windows; the generator writes 1-day ones")
    origin = date.fromisoformat(meta["origin"]) if "origin" in meta else window.start
    if window.start < origin:
        raise ValueError(f"window {window} is before the lake's origin {origin} ({lake.uri})")
    if window.start > origin and not lake.partitions(EVENTS.name, ds=window.prev().ds):
        raise ValueError(f"generating {window} needs the events of {window.prev()} in lake {lake.uri} "
                         f"(the sequential carry-over); generate from {origin} day by day")
    lake.update_meta(window_days=1, surfaces=list(cfg.surfaces), source="generator", origin=origin.isoformat(),
                     scale=cfg.scale, seed=cfg.seed, generator=mine)
    return origin


def _snapshot(pop: Arrays, origin: date, columns: tuple[str, str], id_col: str) -> pl.DataFrame:
    first = np.datetime64(origin, "D") + pop["first_day"].astype("timedelta64[D]")
    return pl.DataFrame({id_col: np.arange(1, len(first) + 1), columns[0]: pop[columns[0]].astype(np.int32),
                         columns[1]: pop[columns[1]].astype(np.int32), "first_ds": first})


def generate_window(lake: Lake, cfg: GeneratorConfig, window: Window) -> dict[str, Any]:
    """Write events(ds, surface) for every surface, users(ds), items(ds) of one 1-day window.

    Deterministic from (cfg, the window's day index since the lake's origin) and the previous
    window's events (the carry-over); the first window of a new lake becomes its origin. Returns
    {"ds", "events", "surfaces": {surface: rows}, "users", "items", "seconds"}.
    """
    if window.days != 1:
        raise ValueError(f"the generator writes 1-day windows, got {window}")
    started = time.perf_counter()
    origin = _check_lake(lake, cfg, window)
    day, world = (window.start - origin).days, _world(cfg)
    users = _population(_user_block, cfg, world, day)
    items = _population(_item_block, cfg, world, day)
    carry = _carry_intent(lake, window.prev(), items, len(users["u"])) if day else np.full(len(users["u"]), -1)
    events = _day_events(cfg, world, users, items, carry, day, window)
    counts = {}
    for surface in cfg.surfaces:
        part = events.filter(pl.col(SURFACE) == surface)
        lake.write(EVENTS.name, part, ds=window.ds, surface=surface)
        counts[surface] = part.height
    lake.write(USERS.name, _snapshot(users, origin, ("segment", "region"), USER_ID), ds=window.ds)
    lake.write(ITEMS.name, _snapshot(items, origin, ("category", "brand"), ITEM_ID), ds=window.ds)
    return {"ds": window.ds, "events": events.height, "surfaces": counts, "users": len(users["u"]),
            "items": len(items["v"]), "seconds": round(time.perf_counter() - started, 3)}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def generate(lake: Lake, cfg: GeneratorConfig, days: int, start: date = DEFAULT_START,
             progress: Callable[[str], None] | None = _stderr) -> list[Window]:
    """Generate `days` consecutive 1-day windows from `start`, in order (same data as window by window)."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    windows = window_series(start, days)
    for w in windows:
        out = generate_window(lake, cfg, w)
        if progress:
            progress(f"generated {out['ds']}: {out['events']:,} events "
                     f"({', '.join(f'{s} {c:,}' for s, c in out['surfaces'].items())}) in {out['seconds']:.2f}s")
    return windows


# ---- the Bayes ceiling ---------------------------------------------------------------------------
def bayes_metrics(events: pl.DataFrame) -> dict[str, float]:
    """AUC, log loss and NE of the true `p_click` against `click`: the ceiling no model can beat.

    NE = log loss / entropy of the base rate, where the base rate is the CTR of these same events
    (recorded as "base_rate"). Returns {"rows", "base_rate", "mean_p_click", "auc", "logloss", "ne"}.
    """
    y = events[CLICK].to_numpy().astype(np.float64)
    p = events[P_CLICK].to_numpy().astype(np.float64)
    ctr = float(y.mean()) if len(y) else float("nan")
    return {"rows": float(len(y)), "base_rate": ctr, "mean_p_click": float(p.mean()), "auc": auc(y, p),
            "logloss": logloss(y, p), "ne": ne(y, p, ctr)}


def bayes_metrics_by_surface(events: pl.DataFrame) -> dict[str, dict[str, float]]:
    """`bayes_metrics` per surface (each with its own base rate)."""
    return {str(s): bayes_metrics(events.filter(pl.col(SURFACE) == s)) for s in sorted(events[SURFACE].unique())}

