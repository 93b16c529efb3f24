"""Importing this module preloads what a worker of `fmx run` needs before its first task.

For `multiprocessing`'s forkserver, whose preload list takes module names: `fmx run`'s forkserver imports
this once, and every worker forked from it starts with the imports done (fmx.run.inprocess): the stage modules
(`fmx.run.preload.preload`), Airflow's task runner, and the in-process Execution API app (`API`) that each
worker serves all its tasks' requests with, already through its first request. That first request is
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

from fmx.run.preload import preload

FAILED = preload()
API = InProcessExecutionAPI()  # its app serves every task of a worker (fmx.run.inprocess.worker_client)


async def _first_request() -> int:
    """One request no route matches (404, nothing read or written): Cadwyn builds its versioned routers
    and Starlette its middleware stack, both kept on the app."""
    transport = httpx.ASGITransport(app=API.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://in-process.invalid.") as client:
        return (await client.get("/fmx-preload")).status_code


asyncio.run(_first_request())
