"""One simulated day of the generator's world: impressions, the shown items, clicks and likes.

Events of one day: the day's users are drawn by activity, each impression gets a time (diurnal
profile), a surface (the user's mix) and an *intent* (a category) that persists along the
user's day across surfaces and switches now and then. The first intent of the day is the
category of the user's last click in the previous window, read from the lake (`carry_intent`): this is
the sequential carry-over, and what makes "recent clicks shift the next click" learnable. The shown
item is the best of 3 candidates (from the intent category or by popularity) under a noisy
ranker. Click ~ Bernoulli(p_click) with logit = surface base + user-surface bias + brand quality
+ item novelty + 0.8 affinity(u_s, v) + 1.0 [category == intent] + region x category
+ surface x category - 0.3 log1p(position) + device x surface. like ~ Bernoulli(p_like) only
for clicked events (0 otherwise, never null). `p_click` is stored with each event as the
Bayes-optimal ceiling for reports; it is never a model input.

`events_frame` turns a day into EVENTS rows: event_id = (date ordinal << 32) | row of the day (sorted by
ts): unique, stable.
"""

from __future__ import annotations

from datetime import date
from typing import NamedTuple

import numpy as np
import polars as pl

from features.lake import Lake
from features.schemas import CLICK, EVENTS, ITEM_ID, LIKE, P_CLICK, SURFACE, TS, USER_ID
from features.windows import Window
from features.world import (
    SURFACES,
    Arrays,
    GeneratorConfig,
    item_block,
    population,
    stream_rng,
    user_block,
    world_params,
)

_CANDIDATES = 3


class Day(NamedTuple):
    """What one day's simulation starts from: its index since the origin, the world, populations, carry-over."""

    day: int  # index since the origin
    world: Arrays
    users: Arrays
    items: Arrays
    carry: np.ndarray  # per user row, the category of the last click of the previous window (-1: none)


def day_inputs(lake: Lake, cfg: GeneratorConfig, window: Window, origin: date) -> Day:
    """The `Day` of `window` in a lake whose generated stream starts at `origin`."""
    day, world = (window.start - origin).days, world_params(cfg)
    users, items = population(user_block, cfg, world, day), population(item_block, cfg, world, day)
    carry = carry_intent(lake, window.prev(), items, len(users["u"])) if day else np.full(len(users["u"]), -1)
    return Day(day, world, users, items, carry)


def carry_intent(lake: Lake, prev: Window, items: Arrays, n_users: int) -> np.ndarray:
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


def simulate_day(cfg: GeneratorConfig, world: Arrays, users: Arrays, items: Arrays, carry: np.ndarray,
                  day: int) -> tuple[Arrays, Arrays, Arrays]:
    """One day's impressions (sorted by user, time), the logit terms of each, and the day's item view.

    Returns (ev, terms, items): ev has user, t, surface, position, device, intent, item (rows), u_s
    (the user's interest on that surface that day), p_click, click, like; items gains today's "age".
    """
    rng, dim = stream_rng(cfg, 3, day), cfg.preset.dim
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


def events_frame(ev: Arrays, window: Window, extra: dict[str, np.ndarray] | None = None) -> pl.DataFrame:
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
