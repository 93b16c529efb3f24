"""DAG runs in this process with a LocalExecutor-style pool: what `DAG.test()` does, minus its per-run costs.

`DAG.test()` (Airflow 3.3) re-parses the whole DAG bundle and writes it to the metadata DB on every call,
and runs one task instance at a time in the calling process. `DagRunner` keeps its scheduling part — the
same DagRun (`get_or_create_dagrun`), the same dependency loop (`DagRun.update_state`), the same
mark-success pattern — but syncs the bundle once per job, and hands each ready task instance to a pool of
worker processes that run it with Airflow's own in-process task runner (`run_task_in_process`: the
Execution API's state changes, XCom and task-SDK context, as under `DAG.test()`). Mapped task instances
that are ready together (experts of different surfaces and variants) run concurrently, one per worker.

Workers are spawned (not forked: the parent holds SQLite connections and threads), parse the DAG folder
once, and import the stage modules in a background thread while they wait for work, so that a task's
first import of torch/polars/mlflow does not land on the critical path. The metadata DB is SQLite in WAL
mode: workers write short transactions (task state, XCom) beside the scheduler loop.

The pool is this runner's only concurrency bound (as under `DAG.test()`, Airflow pools are not consulted):
every fmx stage holds torch to one intra-op thread, so one task per core does not oversubscribe.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

PRELOAD = ("polars", "pyarrow.parquet", "torch", "mlflow", "fm.stage", "experts.stage", "experts.reference")


@dataclass(frozen=True)
class TaskRef:
    """What a worker needs to run one task instance: plain values, pickled to the worker."""

    id: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    dag_version_id: str


class DagRunner:
    """Runs DAG runs of `dags` (parsed once by the caller) with `workers` worker processes.

    Call `sync()` once before the first run (writes the bundle to the metadata DB), `run()` per DAG run,
    `close()` at the end (or use it as a context manager).
    """

    def __init__(self, dags: Mapping[str, Any], dags_folder: Path, workers: int, retries: bool = True) -> None:
        import multiprocessing

        self.dags = dict(dags)
        self.workers = max(1, workers)
        self._scheduler_dags: dict[str, Any] = {}
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(str(dags_folder), retries),
        )  # fmt: skip
        for _ in range(self.workers):  # spawn them all now (the pool spawns on demand, mid-job otherwise)
            self._pool.submit(_noop)

    def __enter__(self) -> DagRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. Their tasks have ended (states and XCom are committed), so they are terminated
        rather than left to wind down an interpreter holding torch and mlflow (~4 s each, measured)."""
        workers = list(self._pool._processes.values())  # the executor's own handles, read before shutdown
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()
        for process in workers:
            process.join()

    def sync(self) -> None:
        """Write the DAG bundle to the metadata DB once (DAG.test() does it on every call)."""
        from airflow.dag_processing.bundles.manager import DagBundlesManager
        from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
        from airflow.serialization.serialized_objects import DagSerialization
        from airflow.utils.session import create_session

        manager = DagBundlesManager()
        with create_session() as session:
            manager.sync_bundles_to_db(session=session)
        for bundle in manager.get_all_dag_bundles():
            if not bundle.is_initialized:
                bundle.initialize()
            bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
            sync_bag_to_db(bag, bundle.name, bundle.version)
        for dag_id, dag in self.dags.items():
            dag.validate()
            self._scheduler_dags[dag_id] = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))

    def run(
        self, dag_id: str, logical_date: datetime, conf: dict, mark_success: str = "", max_active: int = 0
    ) -> Any:
        """One DagRun of `dag_id` to its end; returns the DagRun (state success/failed).

        Task ids matching `mark_success` are marked success instead of run; `max_active` bounds the task
        instances in flight (0: the pool's size).
        """
        from airflow.models.dagrun import DagRun
        from airflow.serialization.definitions.dag import SerializedDAG
        from airflow.utils.session import create_session
        from airflow.utils.state import DagRunState, TaskInstanceState

        scheduler_dag = self._scheduler_dags[dag_id]
        SerializedDAG.clear_dags(
            dags=[scheduler_dag], start_date=logical_date, end_date=logical_date, dag_run_state=False
        )
        with create_session() as session:
            run = self._create_run(scheduler_dag, logical_date, conf, session)
            limit = max_active or self.workers
            pattern = re.compile(mark_success) if mark_success else None
            running: dict[tuple[str, int], Future] = {}
            while run.state == DagRunState.RUNNING:
                ready = self._schedule(run, session, exclude=running)
                for ti in ready:
                    if pattern is not None and pattern.fullmatch(ti.task_id):
                        ti.state = TaskInstanceState.SUCCESS
                    elif len(running) < limit:
                        running[(ti.task_id, ti.map_index)] = self._dispatch(ti, session)
                session.commit()
                self._wait(run, running, session, idle=not ready and run.state == DagRunState.RUNNING)
            return session.scalar(_select_run(DagRun, run.dag_id, run.run_id))

    def _create_run(self, scheduler_dag: Any, logical_date: datetime, conf: dict, session: Any) -> Any:
        from airflow.models.dagrun import DagRun, get_or_create_dagrun
        from airflow.sdk import timezone
        from airflow.serialization.encoders import coerce_to_core_timetable
        from airflow.utils.types import DagRunTriggeredByType, DagRunType

        run_after = timezone.utcnow()  # also the run's start date: the UI's durations are wall time
        interval = coerce_to_core_timetable(scheduler_dag.timetable).infer_manual_data_interval(
            run_after=logical_date
        )
        return get_or_create_dagrun(
            dag=scheduler_dag, start_date=run_after, logical_date=logical_date, data_interval=interval,
            run_after=run_after, conf=conf, session=session, triggered_by=DagRunTriggeredByType.TEST,
            triggering_user_name="fmx_run",
            run_id=DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=logical_date,
                                          run_after=run_after),
        )  # fmt: skip

    @staticmethod
    def _schedule(run: Any, session: Any, exclude: Mapping[tuple[str, int], Any]) -> list[Any]:
        """DAG.test()'s step: let the DagRun decide what is schedulable; return the scheduled TIs not in flight."""
        from airflow.sdk import timezone
        from airflow.utils.state import TaskInstanceState

        session.expire_all()
        schedulable, _ = run.update_state(session=session)
        for ti in schedulable:
            if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
            ti.scheduled_dttm = timezone.utcnow()
        session.commit()
        return [
            ti for ti in run.get_task_instances(session=session)
            if ti.state == TaskInstanceState.SCHEDULED and (ti.task_id, ti.map_index) not in exclude
        ]  # fmt: skip

    def _dispatch(self, ti: Any, session: Any) -> Future:
        from airflow.utils.state import TaskInstanceState

        ti.state = TaskInstanceState.QUEUED  # the Execution API starts only queued task instances
        session.commit()
        ref = TaskRef(str(ti.id), ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number,
                      str(ti.dag_version_id))  # fmt: skip
        return self._pool.submit(_run_in_worker, ref)

    @staticmethod
    def _wait(run: Any, running: dict[tuple[str, int], Future], session: Any, idle: bool) -> None:
        """Block until a task in flight ends (a worker that died fails its task); sleep when nothing runs."""
        if not running:
            if idle:
                time.sleep(0.5)  # e.g. a retry waiting out its delay, as DAG.test() does
            return
        done, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
        for key, future in list(running.items()):
            if future in done:
                del running[key]
                if future.exception() is not None:
                    _fail(session, run, *key, future.exception())


def _select_run(model: Any, dag_id: str, run_id: str) -> Any:
    from sqlalchemy import select

    return select(model).where(model.dag_id == dag_id, model.run_id == run_id)


def _fail(session: Any, run: Any, task_id: str, map_index: int, exc: BaseException | None) -> None:
    """A task whose worker raised (or died) ends failed unless the Execution API already finished it."""
    import logging

    from airflow.utils.state import State

    logging.getLogger("fmx.runner").error("task %s[%s] crashed its worker: %s", task_id, map_index, exc)
    session.expire_all()
    for ti in run.get_task_instances(session=session):
        if (ti.task_id, ti.map_index) == (task_id, map_index) and ti.state not in State.finished:
            ti.state = State.FAILED
    session.commit()


# ---- worker side ------------------------------------------------------------------------------------
_DAGS: dict[str, Any] = {}


def _init_worker(dags_folder: str, retries: bool) -> None:
    """Parse the DAG folder once (task objects run here); import the stage modules in the background."""
    import threading

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dags_folder)
    for dag in bag.dags.values():
        if not retries:
            for task in dag.tasks:
                task.retries = 0
    _DAGS.update(bag.dags)
    threading.Thread(target=_preload, daemon=True).start()


def _noop() -> None:
    return None


def _preload() -> None:
    """Import the stage modules and fill MLflow's module -> package map (built on a process's first
    log_model, ~3 s) while the worker waits for work; a failure here only means the task pays it later."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()  # and the module map
    except Exception:  # noqa: BLE001 - a private helper of MLflow: a warm-up only, never required
        pass


def _run_in_worker(ref: TaskRef) -> str:
    """Run one task instance with Airflow's in-process task runner; return its final state."""
    from uuid import UUID

    from airflow.sdk.api.datamodels._generated import TaskInstance as TaskInstanceSDK
    from airflow.sdk.execution_time.supervisor import run_task_in_process

    ti = TaskInstanceSDK(
        id=UUID(ref.id), task_id=ref.task_id, dag_id=ref.dag_id, run_id=ref.run_id,
        try_number=ref.try_number, map_index=ref.map_index, dag_version_id=UUID(ref.dag_version_id),
    )  # fmt: skip
    result = run_task_in_process(ti=ti, task=_DAGS[ref.dag_id].get_task(ref.task_id))
    return str(result.state)


def default_workers() -> int:
    """One worker per core this process may use ($FMX_RUN_WORKERS overrides)."""
    text = os.environ.get("FMX_RUN_WORKERS", "").strip()
    if text:
        return max(1, int(text))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

