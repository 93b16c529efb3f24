"""What a server set-up is: `ServerConfig` (home, DAGs, ports, metadata databases, schedule, executor), the
names fmx gives its users and pool, `ServerError`, and the PostgreSQL URLs (`postgres_url`, `redact`,
`create_postgres_databases`). Built from flags, environment and lake by `fmx.servers.resolve`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.home import fmx_home

AIRFLOW_USER = "admin"
MLFLOW_USER = "admin"
POOL = "fmx_training"
POOL_SLOTS = 1  # one FM training at a time: each day warm-starts from the previous day's checkpoint
PREFERRED_PORTS = {"airflow": 8080, "mlflow": 5000}
LOCAL_EXECUTOR = "fmx.servers.executor.PreloadingLocalExecutor"  # executor.EXECUTOR_PATH (that module imports airflow)


class ServerError(RuntimeError):
    """A server did not start, or is not healthy, or the state under FMX_HOME is unusable."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the servers keep their state and how they listen. Build with `resolve_config`."""

    home: Path
    dags_folder: Path
    airflow_port: int
    mlflow_port: int
    db: str | None = None  # PostgreSQL server URL; None = SQLite files under home
    parallelism: int = 4
    schedule: bool = True  # False, or no start_date: no scheduled/catch-up runs; triggers and backfills run
    lake: str = ""  # FMX_LAKE of every task ("" = $FMX_HOME/lake)
    start_date: str = ""  # FMX_START_DATE: the first window fmx_fm schedules ("" = none, no catch-up)
    end_date: str = ""  # FMX_END_DATE: the last window fmx_fm schedules ("" = no end)
    window_days: int = 1  # FMX_WINDOW_DAYS: one scheduled run per window
    executor: str = "local"  # "local" (LocalExecutor in the scheduler) or "celery" (CeleryExecutor + workers)
    broker: str = ""  # Celery broker URL (redis://host:port/N); may hold a password: environment only
    workers: int = 2  # Celery worker processes `up` starts (executor "celery")
    worker_concurrency: int = 1  # task slots of each Celery worker

    @property
    def state_dir(self) -> Path:
        return self.home / "servers"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def airflow_db_url(self) -> str:
        if self.db is None:
            return f"sqlite:///{self.airflow_home / 'airflow.db'}"
        return postgres_url(self.db, "_airflow", driver="postgresql+psycopg2")

    def worker_names(self) -> list[str]:
        """The Celery node name of each worker `up` starts, also the hostname its task instances record."""
        if self.executor != "celery":
            return []
        return [f"fmx-worker-{i}@{socket.gethostname()}" for i in range(1, self.workers + 1)]

    def mlflow_db_url(self) -> str:
        if self.db is None:
            return f"sqlite:///{self.home / 'mlflow.db'}"
        return postgres_url(
            self.db, "_mlflow", driver="postgresql+psycopg2"
        )  # SQLAlchemy 2.1 defaults to psycopg 3


def resolve_home() -> Path:
    """$FMX_HOME (default ./.fmx), absolute (common.home.fmx_home)."""
    return fmx_home()


def postgres_url(url: str, suffix: str, driver: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "postgresql+psycopg2"):
        raise ServerError(
            f"--db must be a postgresql://user:password@host:port/name URL, got scheme {parts.scheme!r}"
        )
    name = parts.path.strip("/")
    if not name or "/" in name:
        raise ServerError(f"--db URL must name one database (postgresql://.../NAME), got path {parts.path!r}")
    return urlunsplit((driver, parts.netloc, f"/{name}{suffix}", parts.query, ""))


def create_postgres_databases(cfg: ServerConfig) -> None:
    try:
        import asyncpg  # noqa: F401  (Airflow 3 opens an async engine too; fail here, not in a server log)
        import psycopg2
        from psycopg2 import sql
    except ImportError:
        raise ServerError(
            "--db postgresql://... needs psycopg2 and asyncpg: pip install psycopg2-binary asyncpg"
        ) from None
    given = postgres_url(cfg.db or "", "", driver="postgresql")
    # The named database need not exist: fall back to the server's maintenance database to create ours.
    maintenance = urlunsplit(urlsplit(given)._replace(path="/postgres"))
    conn, errors = None, []
    for url in (given, maintenance):
        try:
            conn = psycopg2.connect(url)
            break
        except psycopg2.OperationalError as exc:
            errors.append(f"{redact(url)}: {str(exc).strip()}")
    if conn is None:
        raise ServerError("cannot connect to PostgreSQL: " + "; ".join(errors))
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for url in (cfg.airflow_db_url(), cfg.mlflow_db_url()):
                name = urlsplit(url).path.strip("/")
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg2.Error as exc:
        raise ServerError(
            f"cannot create the fmx databases (needs CREATEDB, or create them yourself): {exc}"
        ) from None
    finally:
        conn.close()


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
