"""`fmx up`'s executor: Airflow's LocalExecutor, with the stage modules imported before its workers fork.

Under the LocalExecutor the scheduler forks `parallelism` worker processes at start, and each task instance
runs in a process its worker forks (the task SDK's supervisor): whatever the scheduler imported before
forking, every task process has without importing it again. Stock, each task imported torch, polars, MLflow
and its stage module itself, and built MLflow's module map on its first `log_model`: seconds per task, more
than most stages take. `PreloadingLocalExecutor` runs `fmx.run.preload.preload` in the scheduler, then starts
Airflow's own LocalExecutor unchanged (scheduling, queues, the supervisor and its Execution API calls).

Configured as ``[core] executor = fmx.servers.executor.PreloadingLocalExecutor`` (`fmx.servers.env.server_env`).
The modules are shared copy-on-write by the workers; nothing else (DB connections, threads) is created
before the fork.
"""

from __future__ import annotations

import logging
import time

from airflow.executors.local_executor import LocalExecutor

EXECUTOR_PATH = "fmx.servers.executor.PreloadingLocalExecutor"
log = logging.getLogger(__name__)


class PreloadingLocalExecutor(LocalExecutor):
    """Airflow's LocalExecutor whose forked workers (and so every task process) start with fmx's stage
    modules imported."""

    def start(self) -> None:
        from fmx.run.preload import preload

        started = time.perf_counter()
        failed = preload()
        log.info("fmx stage modules imported in %.1f s before forking the workers (failed: %s)",
                 time.perf_counter() - started, failed or "none")  # fmt: skip
        super().start()
