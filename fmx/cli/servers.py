"""`fmx up`, `fmx down`, `fmx status`, `fmx airflow ...`: the local Airflow + MLflow servers (fmx.servers)."""

from __future__ import annotations

import json
import sys

import click

from fmx.cli import cli


@cli.command()
@click.option(
    "--airflow-port", type=int, default=None, help="Default $FMX_AIRFLOW_PORT, else 8080 if free, else any."
)
@click.option(
    "--mlflow-port", type=int, default=None, help="Default $FMX_MLFLOW_PORT, else 5000 if free, else any."
)
@click.option(
    "--db",
    default=None,
    help="postgresql://user:pw@host:port/NAME for both metadata stores (databases NAME_airflow, NAME_mlflow). "
    "Default $FMX_DB, else SQLite under $FMX_HOME.",
)
@click.option("--dags", "dags_folder", default=None, help="DAGs folder (default: the repository's dags/).")
@click.option(
    "--schedule/--no-schedule",
    default=True,
    show_default=True,
    help="--no-schedule: no scheduled or catch-up runs; triggered runs and backfills still run.",
)
@click.option("--lake", "lake_uri", default=None, help="Lake of every task (FMX_LAKE). Default $FMX_LAKE, else $FMX_HOME/lake.")
@click.option(
    "--start-date",
    default=None,
    help="First window fmx_fm schedules: YYYY-MM-DD, or 'lake' = the lake's next unprocessed window (its first "
    "window whose FM is not trained). Default $FMX_START_DATE, else none: nothing is scheduled, triggers and "
    "backfills run only what you ask.",
)
@click.option(
    "--end-date",
    default=None,
    help="Last window fmx_fm schedules: YYYY-MM-DD, 'lake' = the lake's last window, or 'none' (one run per "
    "window up to today, then one a day). Default $FMX_END_DATE, else 'lake' with --start-date lake, else none.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "celery"]),
    default=None,
    help="Airflow executor: local (tasks run by the scheduler) or celery (Celery workers, needs --db and --broker). "
    "Default $FMX_EXECUTOR, else local.",
)
@click.option(
    "--broker",
    default=None,
    help="Celery broker for --executor celery, e.g. redis://127.0.0.1:6379/0. Default $FMX_BROKER (prefer it "
    "when the URL holds a password).",
)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Celery worker processes to start (--executor celery).")  # fmt: skip
@click.option("--worker-concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Task slots of each Celery worker.")  # fmt: skip
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for health.")
def up(
    airflow_port: int | None,
    mlflow_port: int | None,
    db: str | None,
    dags_folder: str | None,
    schedule: bool,
    lake_uri: str | None,
    start_date: str | None,
    end_date: str | None,
    executor: str | None,
    broker: str | None,
    workers: int,
    worker_concurrency: int,
    timeout: float,
) -> None:
    """Start Airflow (api-server, scheduler, dag-processor, triggerer; with --executor celery also Celery
    workers), an MLflow server and fmx's reaper; wait until healthy. fmx_fm starts paused (fmx_experts
    unpaused: it runs only when triggered); the schedule line says which runs unpausing fmx_fm starts."""
    from fmx import servers

    try:
        cfg = servers.resolve_config(
            None, dags_folder, airflow_port, mlflow_port, db, schedule, lake_uri, start_date, end_date,
            executor, broker, workers, worker_concurrency,
        )  # fmt: skip
        click.echo(f"starting servers under {cfg.home} (logs in {cfg.state_dir / 'logs'}) ...", err=True)
        state = servers.up(cfg, timeout=timeout)
    except servers.ServerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Airflow  {state.airflow_url}   user admin, password in {state.password_file}")
    click.echo(f"MLflow   {state.mlflow_url}")
    if cfg.executor == "celery":
        click.echo(f"workers  {', '.join(cfg.worker_names())} (Celery, broker {servers.redact(cfg.broker)})")
    click.echo(f"schedule {servers.describe_schedule(cfg)}")
    click.echo(f"logs     {sorted(state.logs.values())[0].rsplit('/', 1)[0]}/")
    click.echo("stop with `fmx down`")


@cli.command()
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before SIGKILL.")
def down(timeout: float) -> None:
    """Stop every server process `fmx up` started under $FMX_HOME (idempotent)."""
    from fmx import servers

    home = servers.resolve_home()
    stopped = servers.down(home, timeout=timeout)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else f"no servers running under {home}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Show the servers' URLs and each process's PID, port, state and health; exit 1 when not all are running."""
    from fmx import servers

    info = servers.status(servers.resolve_home())
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif not info["processes"]:
        click.echo("no servers started (run `fmx up`)")
    else:
        click.echo(f"Airflow  {info['airflow_url']}  healthy={info['healthy']['airflow']}")
        click.echo(f"MLflow   {info['mlflow_url']}  healthy={info['healthy']['mlflow']}")
        click.echo(f"metadata {info['db']}; password in {info['password_file']}")
        if info.get("executor") == "celery":
            click.echo(f"executor celery, broker {info['broker']}")
        click.echo(f"  {'process':<14} {'pid':>8} {'port':>6}  {'state':<8} health")
        for name, proc in info["processes"].items():
            port = proc["port"] or "-"
            health = "healthy" if proc["healthy"] else "UNHEALTHY"
            click.echo(f"  {name:<14} {proc['pid']:>8} {port:>6}  {proc['state']:<8} {health}")
    sys.exit(0 if info["running"] and all(p["healthy"] for p in info["processes"].values()) else 1)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def airflow(args: tuple[str, ...]) -> None:
    """Run the `airflow` CLI against the servers `fmx up` started, e.g.
    `fmx airflow backfill create --dag-id fmx_fm --from-date 2026-01-02 --to-date 2026-01-03`."""
    import subprocess

    from fmx import servers

    try:
        cfg = servers.running_config(servers.resolve_home())
    except servers.ServerError as exc:
        raise click.ClickException(str(exc)) from None
    cmd = [sys.executable, "-m", "airflow", *args]
    sys.exit(subprocess.run(cmd, env=servers.server_env(cfg)).returncode)
