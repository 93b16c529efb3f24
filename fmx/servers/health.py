"""Whether the servers `fmx up` started are alive and healthy: the probes (Airflow's /api/v2/monitor/health
for the api-server, scheduler, dag-processor and triggerer; MLflow's /health; a Celery ping through the broker
for each worker; alive, with the recorded start time, for the reaper) and `status(home)`, the report of
`fmx status`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmx.servers.config import redact
from fmx.servers.state import ServerState, load_state, running_config


def mlflow_healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


AIRFLOW_PARTS = {"api-server": "metadatabase", "scheduler": "scheduler", "dag-processor": "dag_processor",
                 "triggerer": "triggerer"}  # process -> its entry in /api/v2/monitor/health  # fmt: skip


def airflow_health(url: str) -> dict[str, bool]:
    """{process: healthy} for the Airflow processes (AIRFLOW_PARTS): all False when the API does not answer."""
    import httpx

    try:
        resp = httpx.get(f"{url}/api/v2/monitor/health", timeout=5)
        health = resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        health = {}
    return {name: (health.get(part) or {}).get("status") == "healthy" for name, part in AIRFLOW_PARTS.items()}


def celery_workers(broker: str, timeout: float = 1.0) -> set[str]:
    """The node names of the Celery workers that answer a ping through `broker` (empty when it is unreachable)."""
    from celery import Celery

    app = Celery(broker=broker, set_as_current=False)
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_timeout = timeout
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:  # kombu's OperationalError, redis' ConnectionError, ...: not reachable means no worker
        return set()
    finally:
        app.close()
    return {name for reply in replies for name in reply}


def start_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def alive(pid: float, started: float) -> bool:
    """True when `pid` runs and is the process recorded (same start time), not a zombie or a reused PID."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def status(home: str | Path) -> dict[str, Any]:
    """{"running": bool, "airflow_url", "mlflow_url", "healthy": {"airflow", "mlflow"}, "logs", "processes":
    {name: {"pid", "port" (None for processes that listen on none), "state": "running"|"stopped", "healthy"}}}."""
    state = load_state(home)
    if state is None:
        return {"running": False, "processes": {}}
    procs = _processes(state)
    return {
        "running": all(p["state"] == "running" for p in procs.values()),
        "airflow_url": state.airflow_url,
        "mlflow_url": state.mlflow_url,
        "password_file": state.password_file,
        "mlflow_auth_file": str(Path(home).absolute() / "servers" / "mlflow_auth.json"),
        "db": "sqlite" if state.config.get("db") is None else redact(state.config["db"]),
        "executor": state.config.get("executor", "local"),
        "broker": redact(state.config.get("broker", "")),
        "processes": procs,
        "healthy": {
            "airflow": all(p["healthy"] for n, p in procs.items() if n in AIRFLOW_PARTS),
            "mlflow": procs.get("mlflow", {}).get("healthy", False),
        },
        "logs": state.logs,
    }


def _processes(state: ServerState) -> dict[str, dict[str, Any]]:
    ports = {"mlflow": state.config.get("mlflow_port"), "api-server": state.config.get("airflow_port")}
    airflow = airflow_health(state.airflow_url)
    mlflow = mlflow_healthy(state.mlflow_url)
    workers, node = set(), {}
    if state.config.get("executor") == "celery":
        workers = celery_workers(state.config["broker"])
        node = {f"worker-{i}": n for i, n in enumerate(running_config(state.config["home"]).worker_names(), start=1)}
    out = {}
    for name, (pid, started) in state.pids.items():
        running = alive(pid, started)
        healthy = mlflow if name == "mlflow" else node[name] in workers if name in node else airflow.get(name, True)
        out[name] = {"pid": int(pid), "port": ports.get(name), "state": "running" if running else "stopped",
                     "healthy": running and healthy}
    return out
