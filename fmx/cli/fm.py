"""`fmx fm train|export`: the FM stages from the command line (same wrappers the DAG tasks call)."""

from __future__ import annotations

import json

import click

from common.names import FM_PRESETS
from fmx.cli import cli, lake_option, resolve_lake


@cli.group("fm")
def fm_group() -> None:
    """Foundation model: train on a window, export its knowledge about a window."""


def _common(func):  # type: ignore[no-untyped-def]
    func = click.option("--ds", required=True, help="Window start day, YYYY-MM-DD.")(func)
    func = click.option(
        "--preset", "fm_preset", default="small", show_default=True, type=click.Choice(FM_PRESETS), help="FM size preset."
    )(func)
    func = click.option("--pipeline-run", default="manual", show_default=True, help="MLflow parent run key.")(
        func
    )
    return lake_option(func)


@fm_group.command("train")
@_common
@click.option(
    "--cold-start", is_flag=True, help="Start from scratch even if the previous window's FM is missing."
)
def train_cmd(ds: str, fm_preset: str, pipeline_run: str, lake_uri: str | None, cold_start: bool) -> None:
    """Warm-start from FM_{ds-1} and train one pass over window ds."""
    from fm.stage import fm_train

    click.echo(json.dumps(fm_train(ds, resolve_lake(lake_uri), fm_preset, pipeline_run, cold_start=cold_start)))


@fm_group.command("export")
@_common
def export_cmd(ds: str, fm_preset: str, pipeline_run: str, lake_uri: str | None) -> None:
    """Score window ds with FM_{ds-1}: fm_outputs, embeddings, progressive metrics."""
    from fm.stage import fm_export

    click.echo(json.dumps(fm_export(ds, resolve_lake(lake_uri), fm_preset, pipeline_run), indent=2))
