"""Importing this module preloads what a worker of `fmx run` needs before its first task.

For `multiprocessing`'s forkserver, whose preload list takes module names: `fmx run`'s forkserver imports
this once, and every worker forked from it starts with the imports done (fmx.run.inprocess): what a day's
first tasks need (`fmx.run.preload.FIRST_TASK_MODULES`; the worker imports torch, MLflow and the other stage
modules in the background), Airflow's task runner with its ORM mappers configured (each process's first query
did it: ~0.6 s in the first task of each worker, measured), and the in-process Execution API (`API`) that each
worker serves all its tasks' requests with, already through its first request.

The Execution API is a Cadwyn app: on its first request Cadwyn generates the routers of every API version it
still serves (9 in Airflow 3.3), ~3.5 s of CPU at the start of every job (measured), on the critical path of
day 1. The task SDK installed beside it speaks only the newest version, whose routes are the head router's
(its HeadVersion changes nothing), so `head_app` serves that router in a plain FastAPI app with the in-process
app's own dependency overrides (auth bypassed), lifespan and DAG bag: ~0.4 s. Where those conditions do not
hold (another Airflow), Airflow's own versioned app is used, as before. The first request goes through httpx's
ASGI transport in a throw-away event loop: no thread, DB connection or tracking client is left behind (they
would not survive the fork); each worker starts its own loop thread and DB session.
"""

from __future__ import annotations

import asyncio
from typing import Any

import airflow.dag_processing.dagbag  # noqa: F401  (the worker parses the DAG folder with it)
import airflow.sdk.execution_time.supervisor  # noqa: F401  (run_task_in_process)
import httpx
from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI
from airflow.models import import_all_models
from sqlalchemy.orm import configure_mappers

from fmx.run.preload import FIRST_TASK_MODULES, preload


def head_app(versioned: Any) -> Any | None:
    """The in-process Execution API app `versioned` (Airflow's, not yet initialised), serving the head router
    only: its routes, overrides, lifespan, DAG bag and error handlers, without Cadwyn's per-version routers.

    None when the task SDK does not speak the newest API version or the head version changes anything: then
    only Cadwyn's routing is right, and the caller keeps `versioned`."""
    try:
        from airflow.api_fastapi.common.exceptions import init_error_handlers
        from airflow.api_fastapi.execution_api.routes import execution_api_router
        from airflow.api_fastapi.execution_api.versions import bundle
        from airflow.sdk.api.datamodels._generated import API_VERSION
        from cadwyn.route_generation import _DELETED_ROUTE_TAG
        from fastapi import FastAPI
    except ImportError:
        return None
    if bundle.versions[0].value != API_VERSION or bundle.head_version.changes:
        return None
    app = FastAPI(lifespan=versioned.router.lifespan_context)
    app.include_router(execution_api_router)
    # a route kept in the head router for older versions only (e.g. dag-runs/{dag_id}/previous) is not served
    app.router.routes = [r for r in app.router.routes if _DELETED_ROUTE_TAG not in getattr(r, "tags", ())]
    init_error_handlers(app)
    if Exception in versioned.exception_handlers:  # Airflow's: logs an unhandled error, answers 500
        app.add_exception_handler(Exception, versioned.exception_handlers[Exception])
    app.dependency_overrides.update(versioned.dependency_overrides)
    app.state.dag_bag = versioned.state.dag_bag
    return app


async def _first_request(app: Any) -> int:
    """One request no route matches (404, nothing read or written): the app builds its middleware stack (and
    a Cadwyn app its versioned routers), kept on the app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://in-process.invalid.") as client:
        return (await client.get("/fmx-preload")).status_code


FAILED = preload(FIRST_TASK_MODULES)
import_all_models()
configure_mappers()  # Airflow's ORM mappers, built at a process's first query (~0.6 s): no DB is touched
_VERSIONED = InProcessExecutionAPI().app  # Airflow's in-process app: auth overrides, lifespan, DAG bag
API = InProcessExecutionAPI(app=head_app(_VERSIONED) or _VERSIONED)  # every task of a worker (worker_client)
asyncio.run(_first_request(API.app))
