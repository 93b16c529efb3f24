"""fmx.servers without starting Airflow or MLflow: configuration, URLs, environment, secrets, and the
stop logic on a real process group (a `sleep` standing in for a server)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from fmx import servers
from fmx.cli import cli
from fmx.servers import free_port


def test_sqlite_defaults_live_under_fmx_home(isolated_home: Path) -> None:
    cfg = servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port())
    assert (
        cfg.home == isolated_home and cfg.dags_folder == Path(servers.__file__).resolve().parents[2] / "dags"
    )
    assert cfg.airflow_db_url() == f"sqlite:///{isolated_home}/airflow/airflow.db"
    assert cfg.mlflow_db_url() == f"sqlite:///{isolated_home}/mlflow.db"  # the store common.tracking uses


def test_postgres_url_gives_one_database_per_service(isolated_home: Path) -> None:
    cfg = servers.resolve_config(db="postgres://fmx:pw@db.example:5433/fmx?sslmode=require")
    assert cfg.airflow_db_url() == "postgresql+psycopg2://fmx:pw@db.example:5433/fmx_airflow?sslmode=require"
    assert cfg.mlflow_db_url() == "postgresql+psycopg2://fmx:pw@db.example:5433/fmx_mlflow?sslmode=require"


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("mysql://u@h/x", "postgresql://"),
        ("postgresql://u@h/", "name one database"),
        ("postgresql://u@h/a/b", "one"),
    ],
)
def test_bad_db_urls_are_rejected_clearly(db: str, message: str) -> None:
    with pytest.raises(servers.ServerError, match=message):
        servers.resolve_config(db=db)


def test_busy_ports_fall_back_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        busy = held.getsockname()[1]
        monkeypatch.setitem(servers.PREFERRED_PORTS, "airflow", busy)
        cfg = servers.resolve_config(mlflow_port=free_port())
        assert cfg.airflow_port != busy  # preferred port taken: any free one
        with pytest.raises(servers.ServerError, match=f"port {busy} is already in use"):
            servers.resolve_config(airflow_port=busy)
        monkeypatch.setenv("FMX_MLFLOW_PORT", str(busy))
        with pytest.raises(servers.ServerError, match="mlflow port"):
            servers.resolve_config()


def test_server_env_configures_airflow_and_keeps_secrets_stable(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW__CORE__EXECUTOR", "CeleryExecutor"
    )  # a caller's Airflow config must not leak in
    cfg = servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port(), schedule=False)
    env = servers.server_env(cfg)
    assert env["AIRFLOW__CORE__EXECUTOR"] == servers.LOCAL_EXECUTOR and env["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"{cfg.airflow_url}/execution/"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(cfg.dags_folder)
    assert (
        env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
        and env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "False"
    )
    assert env["MLFLOW_TRACKING_URI"] == cfg.mlflow_url and env["FMX_HOME"] == str(isolated_home)
    password_file = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = servers.airflow_password(isolated_home)
    assert json.loads(password_file.read_text()) == {"admin": password} and len(password) >= 16
    again = servers.server_env(cfg)
    assert servers.airflow_password(isolated_home) == password
    assert again["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]


def test_down_and_status_without_servers(isolated_home: Path) -> None:
    assert servers.down(isolated_home) == []
    assert servers.status(isolated_home) == {"running": False, "processes": {}}
    runner = CliRunner()
    assert "no servers running" in runner.invoke(cli, ["down"]).output
    result = runner.invoke(cli, ["status"])
    assert result.exit_code == 1 and "fmx up" in result.output
    with pytest.raises(servers.ServerError, match="fmx up"):
        servers.airflow_password(isolated_home)


def test_up_rejects_a_bad_db_before_starting_anything(isolated_home: Path) -> None:
    result = CliRunner().invoke(cli, ["up", "--db", "sqlite:///x.db"])
    assert result.exit_code != 0 and "postgresql://" in result.output
    assert servers.load_state(isolated_home) is None


def test_down_stops_the_whole_process_group(isolated_home: Path) -> None:
    """A leader with a child (like a scheduler and its workers): SIGTERM to the group stops both."""
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    child = _wait_for_child(leader.pid)
    (isolated_home / "servers").mkdir()
    state = servers.ServerState(
        airflow_url="http://127.0.0.1:1",
        mlflow_url="http://127.0.0.1:2",
        password_file="",
        logs={},
        config={},
        pids={"fake": [leader.pid, psutil.Process(leader.pid).create_time()]},
    )
    servers.save_state(isolated_home, state)
    fake = servers.status(isolated_home)["processes"]["fake"]
    assert fake["state"] == "running" and fake["pid"] == leader.pid
    assert servers.down(isolated_home, timeout=10) == ["fake"]
    leader.wait(timeout=5)
    assert not _running(child)
    assert servers.load_state(isolated_home) is None and servers.down(isolated_home) == []


def test_a_reused_pid_is_not_signalled(isolated_home: Path) -> None:
    """A recorded PID whose start time differs belongs to another process now: leave it alone."""
    (isolated_home / "servers").mkdir()
    me = psutil.Process(os.getpid())
    state = servers.ServerState("", "", "", {}, {}, pids={"old": [me.pid, me.create_time() - 3600]})
    servers.save_state(isolated_home, state)
    assert servers.down(isolated_home) == []


def _wait_for_child(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if children:
            return children[0].pid
        time.sleep(0.05)
    raise AssertionError("child process did not start")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_mlflow_server_authenticates_and_no_secret_is_on_a_command_line(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's basic-auth app with a per-FMX_HOME admin password (0600); the store URL (with a PostgreSQL
    password) in the environment, never in argv; tasks and fmx's clients get the credentials by env."""
    import common.tracking as tracking
    from fmx.servers.credentials import mlflow_credentials, private_dirs
    from fmx.servers.env import commands, mlflow_server_env

    cfg = servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port(),
                                 db="postgresql://fmx:Sup3rSecret@db.example:5432/fmx")
    argv = " ".join(" ".join(cmd) for cmd in commands(cfg).values())
    assert "Sup3rSecret" not in argv and "--backend-store-uri" not in argv
    assert commands(cfg)["mlflow"][4:6] == ["--app-name", "basic-auth"]
    env = mlflow_server_env(cfg)
    assert "Sup3rSecret" in env["MLFLOW_BACKEND_STORE_URI"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    creds = mlflow_credentials(isolated_home)
    assert len(creds["password"]) >= 24 and creds["password"] not in argv
    task_env = servers.server_env(cfg)
    assert (task_env["MLFLOW_TRACKING_USERNAME"], task_env["MLFLOW_TRACKING_PASSWORD"]) == (
        creds["username"], creds["password"])
    assert "MLFLOW_BACKEND_STORE_URI" not in task_env and "MLFLOW_FLASK_SERVER_SECRET_KEY" not in task_env
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert f"admin_password = {creds['password']}" in ini.read_text()
    for secret in (ini, isolated_home / "servers" / "mlflow_auth.json", isolated_home / "servers" / "secrets.json"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    private_dirs(servers.resolve_config(airflow_port=free_port(), mlflow_port=free_port()))
    for folder in ("servers", "servers/logs", "airflow", "mlartifacts"):
        assert (isolated_home / folder).stat().st_mode & 0o777 == 0o700, folder
    assert (isolated_home / "mlflow.db").stat().st_mode & 0o777 == 0o600
    # fmx's own clients pick the credentials up for the server `fmx up` started (never for another one)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "x")  # so that the test's end restores the variables' absence
        monkeypatch.delenv(name)
    tracking._server_credentials("http://127.0.0.1:1")
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == creds["password"]
