"""The `fmx` command. Sub-commands map one-to-one onto pipeline stages.

Each command module registers its commands on `cli`; heavy libraries (torch, polars, mlflow,
airflow) are imported inside the command bodies so that `fmx --help` stays instant.
"""

from __future__ import annotations

import importlib

import click

from features.lake import default_lake_uri

COMMAND_MODULES = (
    "fmx.cmd_data",
    "fmx.cmd_import",
    "fmx.cmd_fm",
    "fmx.cmd_experts",
    "fmx.cmd_run",
    "fmx.cmd_servers",
)


def lake_option(func):  # type: ignore[no-untyped-def]
    """`--lake URI`, default $FMX_HOME/lake (FMX_HOME defaults to ./.fmx)."""
    return click.option(
        "--lake",
        "lake_uri",
        default=None,
        show_default="$FMX_HOME/lake",
        help="Lake root URI (local folder, s3://, gs://, ...).",
    )(func)


def resolve_lake(lake_uri: str | None) -> str:
    return lake_uri or default_lake_uri()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """fmx: foundation model -> surface experts, on Airflow, MLflow and Parquet."""


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


_register()
