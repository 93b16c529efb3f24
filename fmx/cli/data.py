"""`fmx generate` (synthetic lake) and `fmx ingest` (one window, as the daily DAG runs it)."""

from __future__ import annotations

import json
from datetime import date

import click

from fmx.cli import cli, lake_option, resolve_lake

SCALE_NAMES = ("tiny", "small", "default")


@cli.command()
@click.option("--days", type=click.IntRange(min=1), required=True, help="Number of 1-day windows.")
@click.option(
    "--events-per-day", type=click.IntRange(min=1), default=None, help="Override the scale's events/day."
)
@click.option(
    "--scale",
    type=click.Choice(SCALE_NAMES),
    default="small",
    show_default=True,
    help="tiny ~2k, small ~50k, default ~1M events/day.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--start", default=None, help="First day YYYY-MM-DD [default: the lake's origin, else the built-in stream's first day]."
)
@lake_option
def generate(
    days: int, events_per_day: int | None, scale: str, seed: int, start: str | None, lake_uri: str | None
) -> None:
    """Write DAYS windows of synthetic multi-surface events, users and items into the lake."""
    from features.explain import bayes_metrics_by_surface
    from features.generate import GeneratorConfig
    from features.generate import generate as run_generator
    from features.lake import Lake
    from features.schemas import EVENTS

    lake = Lake(resolve_lake(lake_uri))
    first = _start_day(start, lake.meta().get("origin"))
    cfg = GeneratorConfig(scale=scale, seed=seed, events_per_day=events_per_day)
    try:
        windows = run_generator(lake, cfg, days, first, progress=click.echo)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    last = windows[-1].ds
    ceiling = bayes_metrics_by_surface(lake.scan_many(EVENTS.name, lake.partitions(EVENTS.name, ds=last)).collect())
    click.echo(f"lake {lake.uri}: {len(windows)} windows {windows[0].ds} .. {last}")
    for surface, m in ceiling.items():
        click.echo(
            f"  {last} {surface:<7} rows {int(m['rows']):>9,}  ctr {m['base_rate']:.4f}  "
            f"bayes auc {m['auc']:.4f}  ne {m['ne']:.4f} (base rate: this day's ctr)"
        )


def _start_day(start: str | None, origin: str | None) -> date:
    from features.generate import DEFAULT_START

    text = start or origin or DEFAULT_START.isoformat()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"bad day {text!r}: expected YYYY-MM-DD", param_hint="--start") from None


@cli.command()
@click.option("--ds", required=True, help="Window to ingest (YYYY-MM-DD).")
@click.option(
    "--source",
    type=click.Choice(("auto", "generator", "lake")),
    default="auto",
    show_default=True,
    help="auto: what the lake holds; generator: generate the window; lake: validate a window imported before.",
)
@click.option("--scale", type=click.Choice(SCALE_NAMES), default="small", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@lake_option
def ingest(ds: str, source: str, scale: str, seed: int, lake_uri: str | None) -> None:
    """Land and validate window DS and build its user_history state; prints the stage's JSON result."""
    from features.lake import PartitionNotFound, SchemaError
    from features.stage import ingest as run_ingest

    try:
        out = run_ingest(ds, resolve_lake(lake_uri), source=source, scale=scale, seed=seed)
    except (ValueError, PartitionNotFound, SchemaError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(out))
