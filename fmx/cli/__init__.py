"""The `fmx` command: the top-level group `cli` (the `fmx` entry point), `--lake`, and the one-line errors.

One module per family of sub-commands, each registering its commands on `cli` (COMMAND_MODULES): data
(`generate`, `ingest`), importer (`import`), fm (`fm train|export`), experts (`experts examples|train|promote`,
`compare`), servers (`up`, `down`, `status`, `airflow`), and `run` (fmx.cli.run). Sub-commands map one-to-one
onto pipeline stages or server actions; heavy libraries (torch, polars, mlflow,
airflow) are imported inside the command bodies so that `fmx --help` stays instant.

Errors: a usage error is click's; any other failure ends in one line, `Error: <message>`, and exit
code 1 — a bad value, a missing partition or a corrupt file names what is wrong, and a bug names its
exception type. `fmx --debug ...` (or FMX_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
from typing import Any

import click

from features.lake import LakeError, check_lake_uri, default_lake_uri

# The interpreter's teardown runs a full garbage collection over every object of the modules a command loaded
# (Airflow, MLflow, SQLAlchemy, torch): 2.3-3.4 s after `fmx run` ended, measured, a wait with nothing left
# to do. Frozen objects are left out of that collection; registered first, this runs after every other exit
# handler (they run last-in, first-out), so none of them is skipped.
atexit.register(gc.freeze)

COMMAND_MODULES = (
    "fmx.cli.data",
    "fmx.cli.importer",
    "fmx.cli.fm",
    "fmx.cli.experts",
    "fmx.cli.run",
    "fmx.cli.servers",
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
    """The lake URI (--lake, else the default), refused before any I/O when not allowed (features.lake)."""
    try:
        return check_lake_uri(lake_uri or default_lake_uri())
    except LakeError as exc:
        raise click.BadParameter(str(exc), param_hint="--lake") from None


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


class FmxGroup(click.Group):
    """The top-level group: failures become one `Error: ...` line (exit 1) unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get("fmx.debug") or os.environ.get("FMX_DEBUG") == "1":
                raise
            prefix = "" if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: "
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise click.ClickException(f"{prefix}{message} (run with fmx --debug for the traceback)") from None


@click.group(cls=FmxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (also FMX_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """fmx: foundation model -> surface experts, on Airflow, MLflow and Parquet."""
    ctx.meta["fmx.debug"] = debug


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


_register()
