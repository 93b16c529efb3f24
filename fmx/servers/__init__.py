"""`fmx up` / `fmx down` / `fmx status`: the local Airflow and MLflow servers, one concern per module.

- config: what a set-up is (`ServerConfig`, `ServerError`, user and pool names, PostgreSQL URLs)
- resolve: a ServerConfig from flags, environment and lake (`resolve_config`, `free_port`)
- schedule: fmx_fm's first and last window and window length, and the line describing them
- credentials: the secrets under $FMX_HOME/servers (passwords, MLflow basic auth, Fernet/JWT keys), 0600
- env: the environment and argv of each server process, Airflow CLI call and task (`server_env`, `commands`)
- state: what runs, saved in $FMX_HOME/servers/state.json (`load_state`, `running_config`)
- lifecycle: start and wait until healthy (`up`), stop (`down`)
- health: the health probes and `status`
- airflow_api: a client of Airflow's REST API (pools, pause, trigger, wait, end a run)
- reaper: the process that ends the runs pausing a DAG strands (`python -m fmx.servers.reaper`)
- executor: the LocalExecutor that imports the stage modules before it forks (imports airflow: loaded by
  the scheduler only, never from here)

The names below are what callers use (`from fmx import servers; servers.up(cfg)`).
"""

from fmx.servers.config import (
    AIRFLOW_USER,
    LOCAL_EXECUTOR,
    POOL,
    POOL_SLOTS,
    PREFERRED_PORTS,
    ServerConfig,
    ServerError,
    redact,
    resolve_home,
)
from fmx.servers.credentials import airflow_password, mlflow_credentials, password_file
from fmx.servers.env import airflow_cli, commands, process_env, server_env
from fmx.servers.health import status
from fmx.servers.lifecycle import down, up
from fmx.servers.resolve import free_port, resolve_config
from fmx.servers.schedule import describe_schedule
from fmx.servers.state import ServerState, load_state, running_config, save_state

__all__ = [
    "AIRFLOW_USER", "LOCAL_EXECUTOR", "POOL", "POOL_SLOTS", "PREFERRED_PORTS", "ServerConfig", "ServerError",
    "ServerState", "airflow_cli", "airflow_password", "commands", "describe_schedule", "down", "free_port",
    "load_state", "mlflow_credentials", "password_file", "process_env", "redact", "resolve_config", "resolve_home",
    "running_config", "save_state", "server_env", "status", "up",
]  # fmt: skip
