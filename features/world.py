"""The generator's world: its parameters (scales, surfaces, `GeneratorConfig`) and populations.

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

Scales (events per day; users / items on day one, plus new ones every day): "tiny" 2k (300 / 150,
+20 / +10), "small" 50k (6k / 2k, +200 / +60), "default" 1M (100k / 25k, +2.5k / +600).
Every draw is deterministic from `GeneratorConfig.seed` and a stream id (`stream_rng`): the world 0, the users
arriving on day k (1, k), the items of day k (2, k); features.simulate draws day k's events from (3, k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
_DEVICE_MIX = np.array([0.05, 0.6, 0.27, 0.08])  # unknown, mobile, desktop, tv

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

def stream_rng(cfg: GeneratorConfig, *stream: int) -> np.random.Generator:
    """The generator for draw stream `stream` (module docstring), from the seed."""
    return np.random.default_rng([cfg.seed, *stream])


def world_params(cfg: GeneratorConfig) -> Arrays:
    """The global parameters: segment and category centres, category shares, region / surface x category tastes, brand quality."""
    sc, rng = cfg.preset, stream_rng(cfg, 0)
    return {
        "segment_centre": rng.normal(0, 1, (sc.segments, sc.dim)),
        "category_centre": rng.normal(0, 1, (sc.categories, sc.dim)),
        "category_share": rng.dirichlet(np.full(sc.categories, 2.0)),
        "region_category": rng.normal(0, 0.35, (sc.regions, sc.categories)),
        "surface_category": rng.normal(0, 0.3, (len(SURFACES), sc.categories)),
        "brand_quality": rng.normal(0, 0.35, sc.categories * sc.brands_per_category),
    }


def user_block(cfg: GeneratorConfig, world: Arrays, k: int) -> Arrays:
    """The users who arrive on day index k (ids continue the previous blocks)."""
    sc, rng = cfg.preset, stream_rng(cfg, 1, k)
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


def item_block(cfg: GeneratorConfig, world: Arrays, k: int) -> Arrays:
    """The items published on day index k."""
    sc, rng = cfg.preset, stream_rng(cfg, 2, k)
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


def population(block: Callable[..., Arrays], cfg: GeneratorConfig, world: Arrays, day: int) -> Arrays:
    """Every block up to day index `day`, concatenated; row r has id r + 1."""
    blocks = [block(cfg, world, k) for k in range(day + 1)]
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}
