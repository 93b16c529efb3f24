"""What `fmx up` started, saved as ``$FMX_HOME/servers/state.json`` (0600: its config may hold a database
password) so that `fmx down`, `fmx status` and `fmx airflow` find it: `ServerState`, `load_state`,
`save_state`, and `running_config` (the ServerConfig of the running servers).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fmx.servers.config import ServerConfig, ServerError


@dataclass
class ServerState:
    """What `up` started; saved as ``state.json`` so that `down` and `status` find it."""

    airflow_url: str
    mlflow_url: str
    password_file: str
    logs: dict[str, str]
    config: dict[str, Any]  # the ServerConfig fields, so `airflow_cli` and `down` need only FMX_HOME
    pids: dict[str, list[float]] = field(default_factory=dict)  # name -> [pid, process start time]


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
