"""Importing this module preloads what a worker of `fmx run` needs before its first task.

For `multiprocessing`'s forkserver, whose preload list takes module names: `fmx run`'s forkserver imports
this once, and every worker forked from it starts with the imports done (fmx.run.inprocess): what a day's
first tasks need (`fmx.run.preload.FIRST_TASK_MODULES`; the worker imports torch, MLflow and the other stage
modules in the background), Airflow's task runner with its ORM mappers configured (each process's first query
did it: ~0.6 s in the first task of each worker, measured), and the in-process Execution API app (`API`) that
each worker serves all its tasks' requests with, already through its first request. That first request is
what costs: the Execution API is a Cadwyn app, which generates the routers of every API version on its
first call (~5 s per process, measured: it was each worker's first task `start` call, on the critical
path of day 1, once per worker); done here it is done once for all workers. It goes through
httpx's ASGI transport in a throw-away event loop: no thread, DB connection or tracking client is left
behind (they would not survive the fork); each worker starts its own loop thread and DB session.
"""

from __future__ import annotations

import asyncio

import airflow.dag_processing.dagbag  # noqa: F401  (the worker parses the DAG folder with it)
import airflow.sdk.execution_time.supervisor  # noqa: F401  (run_task_in_process)
import httpx
from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI
from airflow.models import import_all_models
from sqlalchemy.orm import configure_mappers

from fmx.run.preload import FIRST_TASK_MODULES, preload

FAILED = preload(FIRST_TASK_MODULES)
import_all_models()
configure_mappers()  # Airflow's ORM mappers, built at a process's first query (~0.6 s): no DB is touched
API = InProcessExecutionAPI()  # its app serves every task of a worker (fmx.run.inprocess.worker_client)


async def _first_request() -> int:
    """One request no route matches (404, nothing read or written): Cadwyn builds its versioned routers
    and Starlette its middleware stack, both kept on the app."""
    transport = httpx.ASGITransport(app=API.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://in-process.invalid.") as client:
        return (await client.get("/fmx-preload")).status_code


asyncio.run(_first_request())
