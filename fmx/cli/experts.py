"""`fmx experts examples|train|promote` and `fmx compare`: thin wrappers over experts.stage / compare."""

from __future__ import annotations

import json

import click

from fmx.cli import cli, lake_option, resolve_lake


def _run(func, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call a stage and turn its documented errors into a clean CLI error."""
    from features.lake import PartitionNotFound, SchemaError

    try:
        return func(*args, **kwargs)
    except (ValueError, PartitionNotFound, SchemaError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.group()
def experts() -> None:
    """Surface experts: point-in-time examples, progressive train, compare and promote."""


@experts.command("examples")
@click.option("--ds", required=True, help="Window (YYYY-MM-DD).")
@click.option("--surface", required=True)
@click.option("--preset", "fm_preset", default="small", show_default=True, help="FM preset whose outputs to join.")
@lake_option
def examples_cmd(ds: str, surface: str, fm_preset: str, lake_uri: str | None) -> None:
    """Write expert_examples(fm=PRESET, DS, SURFACE)."""
    from experts.stage import expert_examples

    click.echo(json.dumps(_run(expert_examples, ds, surface, resolve_lake(lake_uri), fm_preset)))


@experts.command("train")
@click.option("--ds", required=True)
@click.option("--surface", required=True)
@click.option("--variant", type=click.Choice(("base", "loopfm", "kd", "fe", "loopfm_kd")), required=True)
@click.option("--preset", "fm_preset", default="small", show_default=True)
@click.option("--pipeline-run", default="manual", show_default=True)
@click.option("--rebaseline", is_flag=True, help="Accept features from another FM lineage (restart it).")
@lake_option
def train_cmd(
    ds: str,
    surface: str,
    variant: str,
    fm_preset: str,
    pipeline_run: str,
    rebaseline: bool,
    lake_uri: str | None,
) -> None:
    """Progressive eval on DS with the model trained through DS-1, then warm-start train on DS."""
    from experts.stage import expert_train

    out = _run(expert_train, ds, surface, variant, resolve_lake(lake_uri), fm_preset, pipeline_run, rebaseline)
    click.echo(json.dumps(out, default=str))


@experts.command("promote")
@click.option("--ds", required=True)
@click.option("--surface", required=True)
@click.option("--preset", "fm_preset", default="small", show_default=True)
@click.option("--pipeline-run", default="manual", show_default=True)
@click.option("--margin", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Minimum NE gain: the challenger's whole 95% interval against the champion must lie below -MARGIN.")
@click.option("--pool-days", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pool the challenger-vs-champion interval over this many days (today and earlier decisions).")
@lake_option
def promote_cmd(ds: str, surface: str, fm_preset: str, pipeline_run: str, margin: float, pool_days: int,
                lake_uri: str | None) -> None:
    """Score all variants and the champion on DS's rows; promote the best if it beats the champion with 95%
    confidence (experts.promote.decide)."""
    from experts.stage import compare_and_promote

    out = _run(compare_and_promote, ds, surface, resolve_lake(lake_uri), fm_preset, pipeline_run, margin, pool_days)
    click.echo(json.dumps(out, default=str))


def _day(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from datetime import date

    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date YYYY-MM-DD") from None


@cli.command("compare")
@click.option("--surface", default=None, help="Only this surface.")
@click.option("--from", "ds_from", default=None, callback=_day, help="First window (YYYY-MM-DD), inclusive.")
@click.option("--to", "ds_to", default=None, callback=_day, help="Last window (YYYY-MM-DD), inclusive.")
@click.option("--format", "fmt", type=click.Choice(("table", "json", "csv")), default="table", show_default=True,
              help="table for people; json or csv for scripts and notebooks.")  # fmt: skip
def compare_cmd(surface: str | None, ds_from: str | None, ds_to: str | None, fmt: str) -> None:
    """Variants x (AUC, NE, calibration, gap closure, transfer ratio), averaged over the range, from MLflow."""
    from experts.compare import compare_rows, format_rows

    if ds_from and ds_to and ds_from > ds_to:
        raise click.BadParameter(f"--from {ds_from} is after --to {ds_to}")
    rows = compare_rows(surface, ds_from, ds_to)
    if not rows and surface and (known := sorted({r["surface"] for r in compare_rows(None, ds_from, ds_to)})):
        raise click.ClickException(f"no evaluated runs for surface {surface!r} in this range; surfaces with runs: {known}")
    if not rows and fmt == "table":
        raise click.ClickException("no evaluated runs in the tracking store for this selection (run `fmx run` first)")
    click.echo(format_rows(rows, fmt))
