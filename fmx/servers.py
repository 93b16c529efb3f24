"""Local Airflow and MLflow servers for fmx: start, wait until healthy, report, stop.

`up(cfg)` starts, each in its own process group with its output in ``$FMX_HOME/servers/logs/<name>.log``:

- ``mlflow server`` (tracking + artifact proxy; SQLite ``$FMX_HOME/mlflow.db`` and artifacts under
  ``$FMX_HOME/mlartifacts`` — the same store `features.tracking` uses without a server),
- ``airflow api-server`` (127.0.0.1, one worker), ``airflow scheduler --skip-serve-logs`` and
  ``airflow dag-processor`` (LocalExecutor, AIRFLOW_HOME ``$FMX_HOME/airflow``, DAGs from the repo's
  ``dags/``, SQLite metadata; examples off; parallelism 4; the simple auth manager with one ``admin``
  user whose password lives in ``$FMX_HOME/servers/passwords.json``; pool ``fmx_training``).

With `ServerConfig.db` = ``postgresql://user:pw@host:port/NAME`` both metadata stores move to PostgreSQL,
in the databases ``NAME_airflow`` and ``NAME_mlflow`` (created when missing): they are separate because
both projects keep an ``alembic_version`` table.

Tasks run by the scheduler inherit ``FMX_HOME`` and ``MLFLOW_TRACKING_URI`` = the MLflow server, so
stages log to the server. `down(home)` SIGTERMs every process group recorded in
``$FMX_HOME/servers/state.json`` (checking each PID still is the process started, by its start time),
waits, then SIGKILLs what is left. Both are idempotent.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fmx.airflow_api import AirflowAPI

AIRFLOW_USER = "admin"
POOL = "fmx_training"
POOL_SLOTS = 1  # one FM training at a time: each day warm-starts from the previous day's checkpoint
PREFERRED_PORTS = {"airflow": 8080, "mlflow": 5000}
HEALTH_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


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
    schedule: bool = (
        True  # False: the scheduler creates no scheduled/catch-up runs; triggers and backfills run
    )

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

    def mlflow_db_url(self) -> str:
        if self.db is None:
            return f"sqlite:///{self.home / 'mlflow.db'}"
        return _postgres_url(self.db, "_mlflow", driver="postgresql")


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
    """$FMX_HOME (default ./.fmx), absolute."""
    return Path(os.environ.get("FMX_HOME", ".fmx")).absolute()


def resolve_config(
    home: str | Path | None = None,
    dags_folder: str | Path | None = None,
    airflow_port: int | None = None,
    mlflow_port: int | None = None,
    db: str | None = None,
    schedule: bool = True,
) -> ServerConfig:
    """Defaults: home $FMX_HOME (./.fmx); dags the repo's dags/; ports $FMX_AIRFLOW_PORT / $FMX_MLFLOW_PORT,
    else 8080 / 5000 when free, else any free port; db $FMX_DB, else SQLite."""
    home_path = Path(home).absolute() if home else resolve_home()
    dags = Path(dags_folder or Path(__file__).resolve().parents[1] / "dags").absolute()
    if not dags.is_dir():
        raise ServerError(f"DAGs folder {dags} does not exist")
    db = db or os.environ.get("FMX_DB") or None
    if db is not None:
        _postgres_url(db, "", driver="postgresql")  # validate early
    return ServerConfig(
        home=home_path,
        dags_folder=dags,
        airflow_port=_port("airflow", airflow_port),
        mlflow_port=_port("mlflow", mlflow_port),
        db=db,
        schedule=schedule,
    )


def _port(name: str, requested: int | None) -> int:
    requested = requested or int(os.environ.get(f"FMX_{name.upper()}_PORT", 0)) or None
    if requested is not None:
        if not _port_free(requested):
            raise ServerError(f"{name} port {requested} is already in use on 127.0.0.1")
        return requested
    if _port_free(PREFERRED_PORTS[name]):
        return PREFERRED_PORTS[name]
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


def _state_file(home: Path) -> Path:
    return home / "servers" / "state.json"


def load_state(home: str | Path) -> ServerState | None:
    path = _state_file(Path(home).absolute())
    if not path.exists():
        return None
    return ServerState(**json.loads(path.read_text()))


def _save_state(home: Path, state: ServerState) -> None:
    path = _state_file(home)
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
    )  # fmt: skip


def _private_json(path: Path, make: Any) -> dict[str, str]:
    """Read a small JSON secret file, creating it (mode 0600) with `make()` on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(make(), f)
    return json.loads(path.read_text())


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
        },
    )


# ---- environment and commands --------------------------------------------------------------------


def server_env(cfg: ServerConfig) -> dict[str, str]:
    """The environment every server process, Airflow CLI call and Airflow task runs with."""
    keys = _secrets(cfg)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__") and k != "MLFLOW_TRACKING_URI"
    }
    env.update(
        FMX_HOME=str(cfg.home),
        MLFLOW_TRACKING_URI=cfg.mlflow_url,
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job-runner subprocesses (and no huey store)
        AIRFLOW_HOME=str(cfg.airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(cfg.dags_folder),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
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
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=str(cfg.schedule),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=cfg.airflow_db_url(),
        AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="30",  # new DAG files show up within 30 s
    )
    return env


def _bin(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def _commands(cfg: ServerConfig) -> dict[str, list[str]]:
    mlflow_artifacts = cfg.home / "mlartifacts"
    return {
        "mlflow": [
            *_bin("mlflow"),
            "server",
            "--backend-store-uri",
            cfg.mlflow_db_url(),
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
            *_bin("airflow"),
            "api-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(cfg.airflow_port),
            "-w",
            "1",
        ],
        "scheduler": [*_bin("airflow"), "scheduler", "--skip-serve-logs"],
        "dag-processor": [*_bin("airflow"), "dag-processor"],
    }


def airflow_cli(cfg: ServerConfig, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run ``airflow ARGS`` against the servers' metadata DB; raise ServerError with its output on failure."""
    out = subprocess.run(
        [*_bin("airflow"), *args], env=server_env(cfg), capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise ServerError(
            f"`airflow {' '.join(args)}` failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-4000:]}"
        )
    return out


def _create_postgres_databases(cfg: ServerConfig) -> None:
    try:
        import psycopg2
        from psycopg2 import sql
    except ImportError:
        raise ServerError("--db postgresql://... needs psycopg2: pip install psycopg2-binary") from None
    given = _postgres_url(cfg.db or "", "", driver="postgresql")
    # The named database need not exist: fall back to the server's maintenance database to create ours.
    maintenance = urlunsplit(urlsplit(given)._replace(path="/postgres"))
    conn, errors = None, []
    for url in (given, maintenance):
        try:
            conn = psycopg2.connect(url)
            break
        except psycopg2.OperationalError as exc:
            errors.append(f"{_redact(url)}: {str(exc).strip()}")
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


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


# ---- up / down / status ------------------------------------------------------------------------------


def up(cfg: ServerConfig, timeout: float = HEALTH_TIMEOUT_S) -> ServerState:
    """Start MLflow and Airflow for `cfg`, wait until healthy, create the pool; return the saved state.

    Already running and healthy: returns the running state unchanged. On any failure, stops what it
    started and raises ServerError naming the log file to read.
    """
    running = load_state(cfg.home)
    if running is not None:
        if all(_alive(pid, started) for pid, started in running.pids.values()):
            return running
        down(cfg.home)
    for path in (cfg.state_dir / "logs", cfg.airflow_home, cfg.home / "mlartifacts"):
        path.mkdir(parents=True, exist_ok=True)
    env = server_env(cfg)
    if cfg.db is not None:
        _create_postgres_databases(cfg)
    _migrate(cfg, env)
    state = ServerState(
        airflow_url=cfg.airflow_url,
        mlflow_url=cfg.mlflow_url,
        password_file=str(password_file(cfg.home)),
        logs={name: str(cfg.state_dir / "logs" / f"{name}.log") for name in _commands(cfg)},
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in _commands(cfg).items():
            procs[name] = _spawn(cmd, env, Path(state.logs[name]), cfg.state_dir)
            state.pids[name] = [procs[name].pid, _start_time(procs[name].pid)]
            _save_state(cfg.home, state)  # saved after each start so `down` finds a half-started set
        _wait_healthy(cfg, state, procs, timeout)
        AirflowAPI(cfg.airflow_url, airflow_password(cfg.home)).set_pool(POOL, POOL_SLOTS, "fmx FM training")
    except BaseException:
        down(cfg.home)
        raise
    return state


def _migrate(cfg: ServerConfig, env: Mapping[str, str]) -> None:
    log = cfg.state_dir / "logs" / "db-migrate.log"
    with open(log, "wb") as out:
        rc = subprocess.run(
            [*_bin("airflow"), "db", "migrate"], env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if rc != 0:
        raise ServerError(f"`airflow db migrate` failed ({rc}); see {log}:\n{_tail(log)}")


def _spawn(cmd: list[str], env: Mapping[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # A new session makes the PID a process-group id, so `down` stops its workers and tasks too.
        return subprocess.Popen(
            cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _wait_healthy(
    cfg: ServerConfig, state: ServerState, procs: Mapping[str, subprocess.Popen[bytes]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    pending = {"mlflow", "airflow"}
    while pending:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = Path(state.logs[name])
                raise ServerError(f"{name} exited with code {proc.returncode}; see {log}:\n{_tail(log)}")
        if "mlflow" in pending and _mlflow_healthy(cfg.mlflow_url):
            pending.discard("mlflow")
        if "airflow" in pending and _airflow_healthy(cfg.airflow_url):
            pending.discard("airflow")
        if pending and time.monotonic() > deadline:
            logs = ", ".join(state.logs[n] for n in procs if n == "mlflow" or "mlflow" not in pending)
            raise ServerError(f"{sorted(pending)} not healthy after {timeout:.0f} s; see {logs}")
        time.sleep(1.0)


def _mlflow_healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _airflow_healthy(url: str) -> bool:
    """Metadata DB, scheduler and DAG processor all report healthy."""
    import httpx

    try:
        resp = httpx.get(f"{url}/api/v2/monitor/health", timeout=5)
    except httpx.HTTPError:
        return False
    if resp.status_code != 200:
        return False
    health = resp.json()
    parts = ("metadatabase", "scheduler", "dag_processor")
    return all((health.get(p) or {}).get("status") == "healthy" for p in parts)


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _alive(pid: float, started: float) -> bool:
    """True when `pid` runs and is the process recorded (same start time), not a zombie or a reused PID."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def down(home: str | Path, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM every process group `up` started under `home`, wait, SIGKILL leftovers; return the names stopped."""
    import psutil

    home = Path(home).absolute()
    state = load_state(home)
    if state is None:
        return []
    stopped, procs = [], []
    for name, (pid, started) in state.pids.items():
        if not _alive(pid, started):
            continue
        leader = psutil.Process(int(pid))
        group = [leader, *leader.children(recursive=True)]  # a task may have left the group
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
        for proc in group[1:]:
            _signal(proc, signal.SIGTERM)
        procs.extend(group)
        stopped.append(name)
    _, survivors = psutil.wait_procs(procs, timeout=timeout)
    for proc in survivors:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(survivors, timeout=5)
    _state_file(home).unlink(missing_ok=True)
    return stopped


def _signal(proc: Any, sig: int) -> None:
    import psutil

    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def status(home: str | Path) -> dict[str, Any]:
    """{"running": bool, "airflow_url", "mlflow_url", "processes": {name: "running"|"stopped"}, "healthy": {...}}."""
    state = load_state(home)
    if state is None:
        return {"running": False, "processes": {}}
    procs = {name: "running" if _alive(pid, t) else "stopped" for name, (pid, t) in state.pids.items()}
    return {
        "running": all(v == "running" for v in procs.values()),
        "airflow_url": state.airflow_url,
        "mlflow_url": state.mlflow_url,
        "password_file": state.password_file,
        "db": "sqlite" if state.config.get("db") is None else _redact(state.config["db"]),
        "processes": procs,
        "healthy": {
            "airflow": _airflow_healthy(state.airflow_url),
            "mlflow": _mlflow_healthy(state.mlflow_url),
        },
        "logs": state.logs,
    }
