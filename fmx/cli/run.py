"""`fmx run`: the main job — the real Airflow DAGs, in this process, for N days (see fmx/run/runner.py)."""

from __future__ import annotations

import click

from fmx import dagkit
from fmx.cli import cli, lake_option, resolve_lake


def _choices(values: tuple[str, ...]) -> click.Choice:
    return click.Choice(values, case_sensitive=False)


@cli.command("run")
@click.option("--days", default=4, show_default=True, type=click.IntRange(min=1), help="Number of windows to run.")
@click.option(
    "--scale", type=_choices(dagkit.SCALES), default="small", show_default=True, help="Generator scale."
)
@click.option("--source", type=_choices(dagkit.SOURCES), default="auto", show_default=True,
              help="auto: what the lake holds; generator: synthesize each day; lake: the windows imported "
                   "into --lake.")  # fmt: skip
@lake_option
@click.option("--fm-presets", multiple=True, type=_choices(dagkit.FM_PRESETS), default=("small",),
              show_default=True, help="FM sizes (repeat for several: enables the transfer ratio).")  # fmt: skip
@click.option("--surfaces", multiple=True, help="Surfaces of the lake, repeat for several (default: all).")
@click.option(
    "--variants", multiple=True, type=_choices(dagkit.VARIANTS), help="Expert variants (default: all)."
)
@click.option(
    "--start", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First day (default: generator start)."
)
@click.option(
    "--no-retries", is_flag=True, help="Fail at the first task error instead of retrying with back-off."
)
@click.option("--rerun", is_flag=True,
              help="Train days again that are already done (fmx_fm's Param rerun); else a done day is skipped.")
@click.option("--workers", default=0, type=click.IntRange(min=0),
              help="Worker processes running task instances concurrently (0: one per core).")  # fmt: skip
def run_cmd(
    days: int,
    scale: str,
    source: str,
    lake_uri: str | None,
    fm_presets: tuple[str, ...],
    surfaces: tuple[str, ...],
    variants: tuple[str, ...],
    start: object,
    no_retries: bool,
    rerun: bool,
    workers: int,
) -> None:
    """Run fmx_fm and fmx_experts for DAYS windows with Airflow in-process, then print the comparison.

    Airflow's metadata DB lives in $FMX_HOME/airflow (SQLite), MLflow's in $FMX_HOME/mlflow.db.
    """
    import time

    from common.tracking import fmx_home, tracking_uri
    from fmx.run import inprocess, runner

    started = time.perf_counter()
    runner.configure_airflow(fmx_home(), when_configured=inprocess.start_forkserver)
    setup_s = time.perf_counter() - started
    cfg = runner.JobConfig(
        days=days,
        scale=scale,
        source=source,
        lake=resolve_lake(lake_uri),
        fm_presets=fm_presets,
        surfaces=surfaces,
        variants=variants or dagkit.VARIANTS,
        start=start.date() if start else None,  # type: ignore[attr-defined]
        retries=not no_retries,
        rerun=rerun,
        workers=workers,
    )
    try:
        report = runner.run_job(cfg, echo=click.echo, closing=compare_table)
    except runner.JobFailed as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("")
    click.echo(report.closing)
    click.echo("")
    total = time.perf_counter() - started
    click.echo(
        f"{len(report.days)} days ({report.days[0]} .. {report.days[-1]}) in {total:.1f} s: stage work "
        f"{report.stage_s:.1f} s, orchestration {total - report.stage_s:.1f} s "
        f"({100 * (total - report.stage_s) / total:.0f}%; of it Airflow DB set-up {setup_s:.1f} s); "
        f"stages' own time summed {report.stage_sum_s:.1f} s (concurrent stages overlap)"
    )
    click.echo(f"MLflow UI:  {mlflow_command()} ui --backend-store-uri {tracking_uri()} --port 5000")


def mlflow_command() -> str:
    """The `mlflow` executable beside this Python (the venv's), so the printed command runs as printed."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else (shutil.which("mlflow") or "mlflow")


def compare_table(days: list[str]) -> str:
    """The table `fmx compare --from FIRST --to LAST` prints for the days of this job (run in a worker of
    the job: fmx.run.runner.run_job's `closing`)."""
    from experts.compare import compare_rows, format_table

    return format_table(compare_rows(ds_from=days[0], ds_to=days[-1]))
