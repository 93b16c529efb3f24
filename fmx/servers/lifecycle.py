"""Local Airflow and MLflow servers for fmx: start (`up`), wait until healthy, stop (`down`).

`up(cfg)` starts, each in its own process group with its output in ``$FMX_HOME/servers/logs/<name>.log``:

- ``mlflow server`` (tracking + artifact proxy; SQLite ``$FMX_HOME/mlflow.db`` and artifacts under
  ``$FMX_HOME/mlartifacts`` — the same store `common.tracking` uses without a server),
- ``airflow api-server`` (127.0.0.1, one worker), ``airflow scheduler --skip-serve-logs``,
  ``airflow dag-processor`` and ``airflow triggerer --skip-serve-logs`` (deferred tasks and sensors) (LocalExecutor
  with the stage modules imported before it forks, fmx/servers/executor.py; AIRFLOW_HOME ``$FMX_HOME/airflow``, DAGs from the repo's
  ``dags/``, SQLite metadata; examples off; parallelism 4; the simple auth manager with one ``admin``
  user whose password lives in ``$FMX_HOME/servers/passwords.json``; pool ``fmx_training``),
- ``python -m fmx.servers.reaper``: ends the runs that pausing a DAG strands (Airflow never schedules a paused
  DAG's runs; see fmx/servers/reaper.py),
- with ``ServerConfig.executor == "celery"``: the scheduler runs the CeleryExecutor (broker ``cfg.broker``,
  results in the metadata DB, which must be PostgreSQL) and ``up`` starts ``cfg.workers`` processes
  ``airflow celery worker --celery-hostname fmx-worker-<i>@<host> --skip-serve-logs``; each worker's tasks record
  its node name as their hostname (`fmx.servers.env.worker_hostname`). A worker is healthy once it answers a
  Celery ping through the broker.

With `ServerConfig.db` = ``postgresql://user:pw@host:port/NAME`` both metadata stores move to PostgreSQL,
in the databases ``NAME_airflow`` and ``NAME_mlflow`` (created when missing): they are separate because
both projects keep an ``alembic_version`` table.

The MLflow server runs MLflow's basic-auth app (``--app-name basic-auth``): anonymous requests get 401.
Tasks run by the scheduler inherit ``FMX_HOME``, ``MLFLOW_TRACKING_URI`` = the MLflow server and
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (from ``$FMX_HOME/servers/mlflow_auth.json``,
0600), so stages log to the server; no secret is on any process's command line (fmx.servers.env).
`down(home)` SIGTERMs every process group recorded in
``$FMX_HOME/servers/state.json`` (checking each PID still is the process started, by its start time),
waits, then SIGKILLs what is left. Both are idempotent. Health and `status`: fmx.servers.health.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from fmx.servers.airflow_api import AirflowAPI
from fmx.servers.config import POOL, POOL_SLOTS, ServerConfig, ServerError, create_postgres_databases
from fmx.servers.credentials import airflow_password, password_file, private_dirs
from fmx.servers.env import commands, module_cmd, process_env, server_env
from fmx.servers.health import airflow_health, alive, celery_workers, mlflow_healthy, start_time
from fmx.servers.state import ServerState, load_state, save_state, state_file

HEALTH_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def up(cfg: ServerConfig, timeout: float = HEALTH_TIMEOUT_S) -> ServerState:
    """Start MLflow and Airflow for `cfg`, wait until healthy, create the pool; return the saved state.

    Already running and healthy: returns the running state unchanged. On any failure, stops what it
    started and raises ServerError naming the log file to read.
    """
    running = load_state(cfg.home)
    if running is not None:
        if all(alive(pid, started) for pid, started in running.pids.values()):
            return running
        down(cfg.home)
    private_dirs(cfg)  # servers/, airflow/, mlartifacts/ 0700; mlflow.db 0600
    env = server_env(cfg)
    if cfg.db is not None:
        create_postgres_databases(cfg)
    _migrate(cfg, env)
    if cfg.db is None:
        (cfg.airflow_home / "airflow.db").chmod(0o600)
    state = ServerState(
        airflow_url=cfg.airflow_url,
        mlflow_url=cfg.mlflow_url,
        password_file=str(password_file(cfg.home)),
        logs={name: str(cfg.state_dir / "logs" / f"{name}.log") for name in commands(cfg)},
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in commands(cfg).items():
            procs[name] = _spawn(cmd, process_env(cfg, name), Path(state.logs[name]), cfg.state_dir)
            state.pids[name] = [procs[name].pid, start_time(procs[name].pid)]
            save_state(cfg.home, state)  # saved after each start so `down` finds a half-started set
        _wait_healthy(cfg, state, procs, timeout)
        AirflowAPI(cfg.airflow_url, airflow_password(cfg.home)).set_pool(POOL, POOL_SLOTS, "fmx FM training")
    except BaseException:
        down(cfg.home)
        raise
    return state


def _migrate(cfg: ServerConfig, env: Mapping[str, str]) -> None:
    log = cfg.state_dir / "logs" / "db-migrate.log"
    with _private_log(log) as out:
        rc = subprocess.run(
            [*module_cmd("airflow"), "db", "migrate"], env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if rc != 0:
        raise ServerError(f"`airflow db migrate` failed ({rc}); see {log}:\n{_tail(log)}")


def _private_log(path: Path, append: bool = False) -> BinaryIO:
    """A log file opened for writing, mode 0600 (logs may show URLs, user names, task output)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab" if append else "wb")


def _spawn(cmd: list[str], env: Mapping[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with _private_log(log, append=True) as out:
        # A new session makes the PID a process-group id, so `down` stops its workers and tasks too.
        return subprocess.Popen(
            cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _wait_healthy(
    cfg: ServerConfig, state: ServerState, procs: Mapping[str, subprocess.Popen[bytes]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    pending = {"mlflow", "airflow"} | ({"workers"} if cfg.worker_names() else set())
    while pending:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = Path(state.logs[name])
                raise ServerError(f"{name} exited with code {proc.returncode}; see {log}:\n{_tail(log)}")
        if "mlflow" in pending and mlflow_healthy(cfg.mlflow_url):
            pending.discard("mlflow")
        if "airflow" in pending and all(airflow_health(cfg.airflow_url).values()):
            pending.discard("airflow")
        if "workers" in pending and set(cfg.worker_names()) <= celery_workers(cfg.broker):
            pending.discard("workers")
        if pending and time.monotonic() > deadline:
            logs = ", ".join(state.logs[n] for n in procs if n == "mlflow" or "mlflow" not in pending)
            raise ServerError(f"{sorted(pending)} not healthy after {timeout:.0f} s; see {logs}")
        time.sleep(1.0)


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(home: str | Path, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM every process group `up` started under `home`, wait, SIGKILL leftovers; return the names stopped."""
    import psutil

    home = Path(home).absolute()
    state = load_state(home)
    if state is None:
        return []
    stopped, procs = [], []
    for name, (pid, started) in state.pids.items():
        if not alive(pid, started):
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
    state_file(home).unlink(missing_ok=True)
    return stopped


def _signal(proc: Any, sig: int) -> None:
    import psutil

    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass
