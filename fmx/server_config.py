"""Configuration of the local servers (`fmx up`): where their state lives, ports, metadata URLs, secrets,
and the environment every server process, Airflow CLI call and Airflow task runs with.

State under ``$FMX_HOME``: ``servers/state.json`` (what runs, its config), ``servers/passwords.json``
(the Airflow ``admin`` password), ``servers/mlflow_auth.json`` (the MLflow ``admin`` user and password),
``servers/mlflow_auth.ini`` (MLflow's basic-auth config; its user store ``servers/mlflow_auth.db``),
``servers/secrets.json`` (Fernet key, JWT, API and MLflow Flask secrets), ``servers/logs/``, ``airflow/``
(AIRFLOW_HOME), ``mlflow.db`` and ``mlartifacts/``. ``servers/``, ``airflow/`` and ``mlartifacts/`` are 0700,
every file with a secret and ``mlflow.db`` is 0600 (`private_dirs`).

Secrets never go on a command line: the MLflow server gets its store URL (which may hold a PostgreSQL
password) as MLFLOW_BACKEND_STORE_URI and its auth config through MLFLOW_AUTH_CONFIG_PATH; fmx's clients and
the Airflow tasks get MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from common.home import fmx_home

AIRFLOW_USER = "admin"
MLFLOW_USER = "admin"
POOL = "fmx_training"
POOL_SLOTS = 1  # one FM training at a time: each day warm-starts from the previous day's checkpoint
PREFERRED_PORTS = {"airflow": 8080, "mlflow": 5000}
LOCAL_EXECUTOR = "fmx.executor.PreloadingLocalExecutor"  # fmx.executor.EXECUTOR_PATH (that module imports airflow)


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
        return _postgres_url(self.db, "_airflow", driver="postgresql+psycopg2")

    def worker_names(self) -> list[str]:
        """The Celery node name of each worker `up` starts, also the hostname its task instances record."""
        if self.executor != "celery":
            return []
        return [f"fmx-worker-{i}@{socket.gethostname()}" for i in range(1, self.workers + 1)]

    def mlflow_db_url(self) -> str:
        if self.db is None:
            return f"sqlite:///{self.home / 'mlflow.db'}"
        return _postgres_url(
            self.db, "_mlflow", driver="postgresql+psycopg2"
        )  # SQLAlchemy 2.1 defaults to psycopg 3


@dataclass
class ServerState:
    """What `up` started; saved as ``state.json`` so that `down` and `status` find it."""

    airflow_url: str
    mlflow_url: str
    password_file: str
    logs: dict[str, str]
    config: dict[str, Any]  # the ServerConfig fields, so `airflow_cli` and `down` need only FMX_HOME
    pids: dict[str, list[float]] = field(default_factory=dict)  # name -> [pid, process start time]


def resolve_home() -> Path:
    """$FMX_HOME (default ./.fmx), absolute (common.home.fmx_home)."""
    return fmx_home()


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
    dags = Path(dags_folder or Path(__file__).resolve().parents[1] / "dags").absolute()
    if not dags.is_dir():
        raise ServerError(f"DAGs folder {dags} does not exist")
    db = db or os.environ.get("FMX_DB") or None
    if db is not None:
        _postgres_url(db, "", driver="postgresql")  # validate early
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


def schedule_from(lake_uri: str, start_date: str | None, end_date: str | None = None) -> dict[str, Any]:
    """start_date, end_date and window_days of fmx_fm's schedule.

    start: a date; "lake" = the lake's next unprocessed window (the first with events whose FM of the
    scheduled presets is not trained yet); default $FMX_START_DATE, else "" (no schedule of its own).
    end: a date; "lake" = the lake's last window with events; "none" = no end; default $FMX_END_DATE, else
    "lake" when the start is "lake" (the schedule runs the windows the lake holds, not a catch-up to
    today), else no end. The window length is always the lake's (1 for a new lake).
    """
    from features.lake import Lake

    meta = Lake(lake_uri).meta()
    start = start_date or os.environ.get("FMX_START_DATE", "")
    end = end_date or os.environ.get("FMX_END_DATE", "") or ("lake" if start == "lake" else "")
    if "lake" in (start, end):
        windows = _lake_windows(lake_uri)
        if not windows:
            raise ServerError(f"--start-date/--end-date lake: lake {lake_uri} holds no windows yet "
                              "(import or generate first)")  # fmt: skip
        start = _next_unprocessed(lake_uri, windows, int(meta.get("window_days", 1))) if start == "lake" else start
        end = windows[-1] if end == "lake" else end
    end = "" if end == "none" else end
    for flag, text in (("--start-date", start), ("--end-date", end)):
        _check_day(flag, text)
    return {"start_date": start, "end_date": end, "window_days": int(meta.get("window_days", 1))}


def describe_schedule(cfg: ServerConfig, now: Any = None) -> str:
    """What unpausing fmx_fm runs, in one line: the windows, how many are past (run at once), and the end."""
    from datetime import UTC, date, datetime, timedelta

    if not cfg.schedule:
        return "off (--no-schedule): only triggered runs and backfills run"
    if not cfg.start_date:
        return "off (no --start-date): only triggered runs and backfills run"
    start, step = date.fromisoformat(cfg.start_date), timedelta(days=cfg.window_days)
    end = date.fromisoformat(cfg.end_date) if cfg.end_date else None
    today = (now or datetime.now(UTC)).date()
    if end is not None and start > end:
        return f"fmx_fm: nothing to run (the lake's windows through {cfg.end_date} are done)"
    past, ds = 0, start
    while ds + step <= today and (end is None or ds <= end):  # a window runs once it has ended
        past, ds = past + 1, ds + step
    what = f"fmx_fm: one run per {cfg.window_days}-day window from {cfg.start_date}"
    if end is not None:
        return f"{what} through {cfg.end_date} ({(end - start) // step + 1} runs, {past} of them at once)"
    return f"{what}, no end ({past} past windows run at once, then one per window)"


def _check_day(flag: str, text: str) -> None:
    from datetime import date

    if text:
        try:
            date.fromisoformat(text)
        except ValueError:
            raise ServerError(f"{flag} {text!r} is not a date YYYY-MM-DD (or 'lake')") from None


def _lake_windows(lake_uri: str) -> list[str]:
    from features.stage import lake_windows

    try:
        return lake_windows(lake_uri)
    except (OSError, ValueError) as exc:
        raise ServerError(f"cannot list the windows of lake {lake_uri}: {exc}") from None


def _next_unprocessed(lake_uri: str, windows: list[str], window_days: int) -> str:
    """The first window whose scheduled FM presets are not all trained; past the last one when all are."""
    from datetime import date, timedelta

    from fmx.dagkit import DEFAULT_FM_PRESETS, done_versions

    todo = [ds for ds in windows if not done_versions(ds, lake_uri, DEFAULT_FM_PRESETS)]
    if todo:
        return todo[0]
    return (date.fromisoformat(windows[-1]) + timedelta(days=window_days)).isoformat()


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


def _postgres_url(url: str, suffix: str, driver: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "postgresql+psycopg2"):
        raise ServerError(
            f"--db must be a postgresql://user:password@host:port/name URL, got scheme {parts.scheme!r}"
        )
    name = parts.path.strip("/")
    if not name or "/" in name:
        raise ServerError(f"--db URL must name one database (postgresql://.../NAME), got path {parts.path!r}")
    return urlunsplit((driver, parts.netloc, f"/{name}{suffix}", parts.query, ""))


# ---- state under FMX_HOME ----------------------------------------------------------------------


def state_file(home: Path) -> Path:
    return home / "servers" / "state.json"


def load_state(home: str | Path) -> ServerState | None:
    path = state_file(Path(home).absolute())
    if not path.exists():
        return None
    return ServerState(**json.loads(path.read_text()))


def save_state(home: Path, state: ServerState) -> None:
    path = state_file(home)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold a database password
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=2)
    tmp.replace(path)


def running_config(home: str | Path) -> ServerConfig:
    """The ServerConfig of the servers `up` started under `home` (ServerError when none)."""
    state = load_state(home)
    if state is None:
        raise ServerError(f"no servers started under {Path(home).absolute()}: run `fmx up` first")
    c = state.config
    return ServerConfig(
        home=Path(c["home"]), dags_folder=Path(c["dags_folder"]), airflow_port=c["airflow_port"],
        mlflow_port=c["mlflow_port"], db=c["db"], parallelism=c["parallelism"], schedule=c["schedule"],
        lake=c.get("lake", ""), start_date=c.get("start_date", ""), end_date=c.get("end_date", ""),
        window_days=c.get("window_days", 1), executor=c.get("executor", "local"), broker=c.get("broker", ""),
        workers=c.get("workers", 2), worker_concurrency=c.get("worker_concurrency", 1),
    )  # fmt: skip


def _private_json(path: Path, make: Any) -> dict[str, str]:
    """Read a small JSON secret file, creating it (mode 0600) with `make()` on first use."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created concurrently: read theirs
            return json.loads(path.read_text())
        with os.fdopen(fd, "w") as f:
            json.dump(make(), f)
    return json.loads(path.read_text())


def private_dirs(cfg: ServerConfig) -> None:
    """Make the folders with secrets or metadata 0700 and the MLflow SQLite store 0600 (created empty if
    missing: SQLite takes a 0-byte file as an empty database, and its journals inherit the mode)."""
    for path in (cfg.state_dir, cfg.state_dir / "logs", cfg.airflow_home, cfg.home / "mlartifacts"):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
    if cfg.db is None:
        store = cfg.home / "mlflow.db"
        os.close(os.open(store, os.O_WRONLY | os.O_CREAT, 0o600))
        store.chmod(0o600)


def mlflow_auth_file(home: Path) -> Path:
    return home / "servers" / "mlflow_auth.json"


def mlflow_credentials(home: str | Path) -> dict[str, str]:
    """{"username", "password"} of the MLflow server's admin user (created by the first `up`)."""
    path = mlflow_auth_file(Path(home).absolute())
    if not path.exists():
        raise ServerError(f"no MLflow credentials at {path}: run `fmx up` first")
    return json.loads(path.read_text())


def mlflow_auth_config(cfg: ServerConfig) -> Path:
    """Write MLflow's basic-auth config (0600: it holds the admin password the first start creates the admin
    user with); its path. Users and permissions live in ``servers/mlflow_auth.db``."""
    creds = _private_json(mlflow_auth_file(cfg.home),
                          lambda: {"username": MLFLOW_USER, "password": secrets.token_urlsafe(24)})
    path = cfg.state_dir / "mlflow_auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"  # only the admin user exists; nobody else reads anything
        f"database_uri = sqlite:///{cfg.state_dir / 'mlflow_auth.db'}\n"
        f"admin_username = {creds['username']}\n"
        f"admin_password = {creds['password']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)
    return path


def password_file(home: Path) -> Path:
    return home / "servers" / "passwords.json"


def airflow_password(home: str | Path) -> str:
    """The `admin` password of the Airflow API (fixed per FMX_HOME, created by the first `up`)."""
    path = password_file(Path(home).absolute())
    if not path.exists():
        raise ServerError(f"no password file at {path}: run `fmx up` first")
    return json.loads(path.read_text())[AIRFLOW_USER]


def _secrets(cfg: ServerConfig) -> dict[str, str]:
    from cryptography.fernet import Fernet

    _private_json(password_file(cfg.home), lambda: {AIRFLOW_USER: secrets.token_urlsafe(16)})
    return _private_json(
        cfg.state_dir / "secrets.json",
        lambda: {
            "fernet_key": Fernet.generate_key().decode(),
            "jwt_secret": secrets.token_urlsafe(64),  # HS512 wants >= 64 bytes
            "secret_key": secrets.token_urlsafe(32),
            "mlflow_secret_key": secrets.token_urlsafe(32),
        },
    )


# ---- environment and commands --------------------------------------------------------------------


def server_env(cfg: ServerConfig) -> dict[str, str]:
    """The environment every server process, Airflow CLI call and Airflow task runs with."""
    keys = _secrets(cfg)
    creds = _private_json(mlflow_auth_file(cfg.home),
                          lambda: {"username": MLFLOW_USER, "password": secrets.token_urlsafe(24)})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
    env.update(
        FMX_HOME=str(cfg.home),
        MLFLOW_TRACKING_URI=cfg.mlflow_url,
        MLFLOW_TRACKING_USERNAME=creds["username"],  # tasks and CLI calls log to the authenticated server
        MLFLOW_TRACKING_PASSWORD=creds["password"],
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job-runner subprocesses (and no huey store)
        AIRFLOW_HOME=str(cfg.airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(cfg.dags_folder),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        # LocalExecutor: Airflow's, with the stage modules imported before its workers fork (fmx/executor.py)
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor" if cfg.executor == "celery" else LOCAL_EXECUTOR,
        AIRFLOW__CORE__PARALLELISM=str(cfg.parallelism),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{cfg.airflow_url}/execution/",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{AIRFLOW_USER}:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(password_file(cfg.home)),
        AIRFLOW__CORE__FERNET_KEY=keys["fernet_key"],
        AIRFLOW__API_AUTH__JWT_SECRET=keys["jwt_secret"],
        AIRFLOW__API__SECRET_KEY=keys["secret_key"],
        AIRFLOW__API__BASE_URL=cfg.airflow_url,
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(cfg.airflow_port),
        # No start date chosen: no scheduled run at all (an unpaused fmx_fm would otherwise run the latest
        # interval, a day nobody asked for); triggers and backfills run either way.
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=str(cfg.schedule and bool(cfg.start_date)),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=cfg.airflow_db_url(),
        AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="30",  # new DAG files show up within 30 s
        FMX_WINDOW_DAYS=str(cfg.window_days),
    )
    for key, value in (("FMX_START_DATE", cfg.start_date), ("FMX_END_DATE", cfg.end_date)):
        env.pop(key, None)  # a stale value of the caller's shell never leaks into the schedule
        if value:
            env[key] = value
    if cfg.lake:
        env["FMX_LAKE"] = cfg.lake
    if cfg.executor == "celery":
        env.update(
            AIRFLOW__CELERY__BROKER_URL=cfg.broker,
            AIRFLOW__CELERY__RESULT_BACKEND="db+" + cfg.airflow_db_url(),
            AIRFLOW__CELERY__WORKER_CONCURRENCY=str(cfg.worker_concurrency),
        )
    return env


def worker_hostname() -> str:
    """Airflow's [core] hostname_callable in the Celery workers `up` starts: the worker's node name
    ($FMX_WORKER_HOSTNAME), so each task instance records which worker ran it even when all run on one host."""
    return os.environ.get("FMX_WORKER_HOSTNAME") or socket.getfqdn()


def process_env(cfg: ServerConfig, name: str) -> dict[str, str]:
    """The environment of server process `name` (a key of `commands`)."""
    if name == "mlflow":
        return mlflow_server_env(cfg)
    env = server_env(cfg)
    if name.startswith("worker-"):
        env.update(
            FMX_WORKER_HOSTNAME=cfg.worker_names()[int(name.removeprefix("worker-")) - 1],
            AIRFLOW__CORE__HOSTNAME_CALLABLE="fmx.server_config.worker_hostname",
        )
    return env


def module_cmd(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def mlflow_server_env(cfg: ServerConfig) -> dict[str, str]:
    """`server_env` plus what only the MLflow server gets: its store URL (may hold a password, so never in
    argv), the basic-auth config and the Flask secret key."""
    return {
        **server_env(cfg),
        "MLFLOW_BACKEND_STORE_URI": cfg.mlflow_db_url(),
        "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(cfg)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _secrets(cfg).get("mlflow_secret_key") or _secrets(cfg)["secret_key"],
    }


def commands(cfg: ServerConfig) -> dict[str, list[str]]:
    """The argv of each server: no secret in any of them (the store URL travels in the environment)."""
    mlflow_artifacts = cfg.home / "mlartifacts"
    return {
        "mlflow": [
            *module_cmd("mlflow"),
            "server",
            "--app-name",
            "basic-auth",  # HTTP basic auth: anonymous requests get 401
            "--artifacts-destination",
            str(mlflow_artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(cfg.mlflow_port),
            "--workers",
            "1",
        ],  # fmt: skip
        "api-server": [
            *module_cmd("airflow"),
            "api-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(cfg.airflow_port),
            "-w",
            "1",
        ],
        "scheduler": [*module_cmd("airflow"), "scheduler", "--skip-serve-logs"],
        "dag-processor": [*module_cmd("airflow"), "dag-processor"],
        "triggerer": [*module_cmd("airflow"), "triggerer", "--skip-serve-logs"],  # deferred tasks, sensors
        "reaper": [*module_cmd("fmx.reaper")],  # ends runs a pause strands (fmx/reaper.py)
        **{
            f"worker-{i}": [
                *module_cmd("airflow"), "celery", "worker", "--celery-hostname", node,
                "--concurrency", str(cfg.worker_concurrency), "--skip-serve-logs",  # one host: logs are local files
            ]
            for i, node in enumerate(cfg.worker_names(), start=1)
        },  # fmt: skip
    }


def airflow_cli(cfg: ServerConfig, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run ``airflow ARGS`` against the servers' metadata DB; raise ServerError with its output on failure."""
    out = subprocess.run(
        [*module_cmd("airflow"), *args], env=server_env(cfg), capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise ServerError(
            f"`airflow {' '.join(args)}` failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-4000:]}"
        )
    return out


def create_postgres_databases(cfg: ServerConfig) -> None:
    try:
        import asyncpg  # noqa: F401  (Airflow 3 opens an async engine too; fail here, not in a server log)
        import psycopg2
        from psycopg2 import sql
    except ImportError:
        raise ServerError(
            "--db postgresql://... needs psycopg2 and asyncpg: pip install psycopg2-binary asyncpg"
        ) from None
    given = _postgres_url(cfg.db or "", "", driver="postgresql")
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
