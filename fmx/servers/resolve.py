"""A `ServerConfig` from `fmx up`'s flags, the environment ($FMX_HOME, $FMX_DB, $FMX_EXECUTOR, $FMX_BROKER,
$FMX_LAKE, $FMX_*_PORT) and the lake (the schedule, fmx.servers.schedule): `resolve_config`, with the
executor choice checked (`check_executor`) and free ports found (`free_port`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from fmx.servers.config import PREFERRED_PORTS, ServerConfig, ServerError, postgres_url, resolve_home
from fmx.servers.schedule import schedule_from


def resolve_config(
    home: str | Path | None = None,
    dags_folder: str | Path | None = None,
    airflow_port: int | None = None,
    mlflow_port: int | None = None,
    db: str | None = None,
    schedule: bool = True,
    lake: str | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
    executor: str | None = None,
    broker: str | None = None,
    workers: int = 2,
    worker_concurrency: int = 1,
) -> ServerConfig:
    """Defaults: home $FMX_HOME (./.fmx); dags the repo's dags/; ports $FMX_AIRFLOW_PORT / $FMX_MLFLOW_PORT,
    else 8080 / 5000 when free, else any free port; db $FMX_DB, else SQLite; lake $FMX_LAKE, else
    $FMX_HOME/lake; start_date / end_date: see `schedule_from`; executor $FMX_EXECUTOR, else "local"; broker
    $FMX_BROKER (executor "celery" only, which also needs a PostgreSQL db: see `check_executor`)."""
    home_path = Path(home).absolute() if home else resolve_home()
    dags = Path(dags_folder or Path(__file__).resolve().parents[2] / "dags").absolute()
    if not dags.is_dir():
        raise ServerError(f"DAGs folder {dags} does not exist")
    db = db or os.environ.get("FMX_DB") or None
    if db is not None:
        postgres_url(db, "", driver="postgresql")  # validate early
    executor = executor or os.environ.get("FMX_EXECUTOR") or "local"
    broker = broker or os.environ.get("FMX_BROKER") or ""
    check_executor(executor, broker, db, workers, worker_concurrency)
    return ServerConfig(
        home=home_path,
        dags_folder=dags,
        airflow_port=_port("airflow", airflow_port),
        mlflow_port=_port("mlflow", mlflow_port),
        db=db,
        schedule=schedule,
        lake=lake or os.environ.get("FMX_LAKE", ""),
        executor=executor,
        broker=broker,
        workers=workers,
        worker_concurrency=worker_concurrency,
        **schedule_from(lake or os.environ.get("FMX_LAKE") or str(home_path / "lake"), start_date, end_date),
    )



EXECUTORS = ("local", "celery")


BROKER_SCHEMES = ("redis", "rediss")


def check_executor(executor: str, broker: str, db: str | None, workers: int, concurrency: int) -> None:
    """A usable executor choice, or one ServerError line saying what is missing."""
    if executor not in EXECUTORS:
        raise ServerError(f"--executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if executor == "local":
        if broker:
            raise ServerError("--broker is for --executor celery (the LocalExecutor runs tasks in the scheduler)")
        return
    if db is None:
        raise ServerError("--executor celery needs --db postgresql://... (or FMX_DB): every worker writes the "
                          "metadata and Celery's results there, which SQLite cannot share between processes")  # fmt: skip
    if not broker:
        raise ServerError("--executor celery needs --broker redis://HOST:PORT/N (or FMX_BROKER), e.g. a "
                          "redis-server on 127.0.0.1")  # fmt: skip
    scheme = urlsplit(broker).scheme
    if scheme not in BROKER_SCHEMES:
        raise ServerError(f"--broker must be a redis:// or rediss:// URL, got scheme {scheme!r}")
    if workers < 1 or concurrency < 1:
        raise ServerError(f"--workers and --worker-concurrency must be >= 1, got {workers} and {concurrency}")


def _port(name: str, requested: int | None) -> int:
    requested = requested or int(os.environ.get(f"FMX_{name.upper()}_PORT", 0)) or None
    if requested is not None:
        if not _port_free(requested):
            raise ServerError(f"{name} port {requested} is already in use on 127.0.0.1")
        return requested
    if _port_free(PREFERRED_PORTS[name]):
        return PREFERRED_PORTS[name]
    return free_port()


def free_port() -> int:
    """A port on 127.0.0.1 that the kernel reports free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
