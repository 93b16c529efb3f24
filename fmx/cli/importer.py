"""`fmx import PRESET PATH`: load a public or custom interaction log into the lake (features.importers)."""

from __future__ import annotations

import json

import click

from fmx.cli import cli, lake_option, resolve_lake


@cli.command("import")
@click.argument("preset", type=click.Choice(["movielens", "kuairand", "custom"]))
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--mapping",
    "mapping_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML mapping laid over the preset's (required for 'custom').",
)
@click.option("--window", default=None, help="Window length, e.g. 1d or 7d (default: the mapping's).")
@click.option(
    "--max-bad-share",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Refuse the import when more than this share of rows is bad.",
)
@lake_option
def import_cmd(
    preset: str,
    path: str,
    mapping_file: str | None,
    window: str | None,
    max_bad_share: float,
    lake_uri: str | None,
) -> None:
    """Validate PATH with PRESET's mapping, quarantine bad rows, and write windows into the lake."""
    from features.importers import ImportFailed, import_source

    try:
        result = import_source(preset, path, resolve_lake(lake_uri), mapping_file, window, max_bad_share)
    except ImportFailed as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(json.dumps(result, indent=2))
