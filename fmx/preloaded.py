"""Importing this module preloads what a worker of `fmx run` needs before its first task.

For `multiprocessing`'s forkserver, whose preload list takes module names: `fmx run`'s forkserver imports
this once, and every worker forked from it starts with the imports done (fmx.inprocess): the stage modules
(`fmx.preload.preload`), Airflow's task runner, and its in-process Execution API with one app built (the
first build generates its versioned schemas: ~2.3 s, later ones ~0.2 s; measured). No thread, DB
connection or tracking client is created here: they would not survive the fork.
"""

from __future__ import annotations

import airflow.dag_processing.dagbag  # noqa: F401  (the worker parses the DAG folder with it)
import airflow.sdk.execution_time.supervisor  # noqa: F401  (run_task_in_process)
from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI

from fmx.preload import preload

FAILED = preload()
InProcessExecutionAPI().app  # noqa: B018 - built for its side effect: the schema caches every later app reuses
