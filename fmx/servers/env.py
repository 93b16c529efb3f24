"""The environment and argv of every server process, Airflow CLI call and Airflow task (`server_env`,
`process_env`, `commands`, `airflow_cli`).

Secrets never go on a command line: the MLflow server gets its store URL (which may hold a PostgreSQL
password) as MLFLOW_BACKEND_STORE_URI and its auth config through MLFLOW_AUTH_CONFIG_PATH; fmx's clients and
the Airflow tasks get MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from fmx.servers.config import AIRFLOW_USER, LOCAL_EXECUTOR, ServerConfig, ServerError
from fmx.servers.credentials import mlflow_auth_config, mlflow_login, password_file, server_secrets


def server_env(cfg: ServerConfig) -> dict[str, str]:
    """The environment every server process, Airflow CLI call and Airflow task runs with."""
    keys = server_secrets(cfg)
    creds = mlflow_login(cfg)
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
        # LocalExecutor: Airflow's, with the stage modules imported before its workers fork (fmx/servers/executor.py)
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
            AIRFLOW__CORE__HOSTNAME_CALLABLE="fmx.servers.env.worker_hostname",
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
        "MLFLOW_FLASK_SERVER_SECRET_KEY": server_secrets(cfg).get("mlflow_secret_key") or server_secrets(cfg)["secret_key"],
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
        "reaper": [*module_cmd("fmx.servers.reaper")],  # ends runs a pause strands (fmx/servers/reaper.py)
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
