"""DAG runs in this process with a LocalExecutor-style pool: what `DAG.test()` does, minus its per-run costs.

`DAG.test()` (Airflow 3.3) re-parses the whole DAG bundle and writes it to the metadata DB on every call,
and runs one task instance at a time in the calling process. `DagRunner` keeps its scheduling part — the
same DagRun (`get_or_create_dagrun`), the same dependency loop (`DagRun.update_state`), the same
mark-success pattern — but syncs the bundle once per job, and hands each ready task instance to a pool of
worker processes that run it with Airflow's own in-process task runner (`run_task_in_process`: the
Execution API's state changes, XCom and task-SDK context, as under `DAG.test()`). Mapped task instances
that are ready together (experts of different surfaces and variants) run concurrently, one per worker.
Several DagRuns can be driven at once (`start` + `step`): one loop schedules them all and waits on the
workers' futures (no polling), so that one run's ready tasks fill the workers another run leaves idle.

Workers are forked from a forkserver (not from this process: it holds SQLite connections and threads) that
imported Airflow's task runner and what a day's first tasks need once, configured the ORM and served the
in-process Execution API's first request (fmx.run.preloaded, which serves the API's head router without
Cadwyn's per-version routers): each worker starts with them, so a task's first Execution API call does not
land on the critical path, and two workers do not pay the same seconds of CPU each at the start of the job.
Torch, MLflow and the other stage modules (~2.6 s) are imported by each worker in a background thread while
the day's first tasks (plan, ingest) run, instead of before the first worker starts: those two tasks run slower
for it (the imports hold the GIL; day 1's plan 0.1 -> 0.7 s, ingest 0.7 -> ~2 s,
measured), and the job's first ingest still starts ~4 s sooner (11.7 -> 7.0 s after the job's start, one quiet
run each, with the other cuts of that change). `fmx run` starts the forkserver during its set-up
(`start_forkserver`). Each worker parses the DAG folder once and serves all its tasks with one Execution API client
(`worker_client`) instead of a new app per task. A worker's SIGTERM goes
back to the default after each task (the task runner points it at the task's on_kill), so `close` ends
workers at once. The metadata DB is SQLite in WAL
mode: workers write short transactions (task state, XCom) beside the scheduler loop.

The pool is this runner's only concurrency bound (as under `DAG.test()`, Airflow pools are not consulted):
every fmx stage holds torch to one intra-op thread, so one task per core does not oversubscribe.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


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


@dataclass
class _Active:
    """A DagRun this runner drives: its ids (the ORM row is re-read at every step) and its tasks in flight."""

    dag_id: str
    run_id: str
    limit: int  # task instances of this run in flight at most
    pattern: re.Pattern[str] | None  # task ids marked success instead of run
    running: dict[tuple[str, int], Future] = field(default_factory=dict)
    # Whether its dependencies must be evaluated again at the next step: a task of it ended, it was just
    # started, or it had ready task instances no worker was free for. While its tasks run and none ended,
    # nothing can make more of its tasks ready, and update_state (~50 ms a run) is not called.
    stale: bool = True


class DagRunner:
    """Runs DAG runs of `dags` (parsed once by the caller) with `workers` worker processes.

    Call `sync()` once before the first run (writes the bundle to the metadata DB); then either `run()` one
    DagRun to its end, or `start()` several and `step()` until they end: their ready task instances share
    the pool, the runs started first served first. `close()` at the end (or use it as a context manager).
    """

    def __init__(self, dags: Mapping[str, Any], dags_folder: Path, workers: int, retries: bool = True) -> None:
        import multiprocessing

        self.dags = dict(dags)
        self.workers = max(1, workers)
        self._scheduler_dags: dict[str, Any] = {}
        self._active: list[_Active] = []
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["fmx.run.preloaded"])  # imported once, in the forkserver
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_worker, initargs=(str(dags_folder), retries),
        )  # fmt: skip
        # Start them all now (the pool starts them on demand, mid-job otherwise), from a thread: a start waits
        # for the forkserver's imports (~7 s), which the DAG sync and the first run's set-up need not.
        threading.Thread(target=self._start_workers, daemon=True).start()

    def _start_workers(self) -> None:
        for _ in range(self.workers):
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

    def call(self, fn: Any, *args: Any) -> Future:
        """`fn(*args)` in a worker (after the task instances already handed out): work that needs what the
        workers have ready (their imports, DB and tracking connections) but is no task, e.g. the closing
        report. `fn` and `args` are pickled: a module-level function and plain values."""
        return self._pool.submit(fn, *args)

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
        """One DagRun of `dag_id` to its end (beside any run already started); returns the DagRun."""
        run_id = self.start(dag_id, logical_date, conf, mark_success, max_active)
        while True:
            for run in self.step():
                if run.run_id == run_id:
                    return run

    def start(
        self, dag_id: str, logical_date: datetime, conf: dict, mark_success: str = "", max_active: int = 0,
        ahead: bool = False,
    ) -> str:
        """Create a DagRun of `dag_id` (as a trigger would) for `step()` to drive; returns its run id.

        Task ids matching `mark_success` are marked success instead of run; `max_active` bounds the run's
        task instances in flight (0: the pool's size); `ahead`: its ready tasks go before those of the runs
        started earlier (else after).
        """
        from airflow.serialization.definitions.dag import SerializedDAG
        from airflow.utils.session import create_session

        scheduler_dag = self._scheduler_dags[dag_id]
        SerializedDAG.clear_dags(
            dags=[scheduler_dag], start_date=logical_date, end_date=logical_date, dag_run_state=False
        )
        with create_session() as session:
            run_id = self._create_run(scheduler_dag, logical_date, conf, session).run_id
        pattern = re.compile(mark_success) if mark_success else None
        active = _Active(dag_id, run_id, max_active or self.workers, pattern)
        self._active.insert(0 if ahead else len(self._active), active)
        return run_id

    def step(self) -> list[Any]:
        """DAG.test()'s loop, once over every started run: schedule what its dependencies allow, hand ready
        task instances to free workers (earlier runs first), then block until a task in flight ends.
        Returns the DagRuns that ended in this step (state success or failed)."""
        from airflow.utils.session import create_session
        from airflow.utils.state import DagRunState, TaskInstanceState

        ended: list[_Active] = []
        ready_any = marked = False
        with create_session() as session:
            for active in list(self._active):
                if active.running and not active.stale:
                    continue
                active.stale = False
                run = self._get_run(active, session)
                ready = self._schedule(run, session, exclude=active.running)
                ready_any = ready_any or bool(ready)
                for ti in ready:
                    if active.pattern is not None and active.pattern.fullmatch(ti.task_id):
                        ti.state = TaskInstanceState.SUCCESS
                        active.stale = marked = True  # its downstream tasks (or its end) follow at once
                    elif len(active.running) < active.limit and self._in_flight() < self.workers:
                        active.running[(ti.task_id, ti.map_index)] = self._dispatch(ti, session)
                    else:
                        active.stale = True  # ready, waiting for a worker
                session.commit()
                if run.state != DagRunState.RUNNING and not active.running:
                    self._active.remove(active)
                    ended.append(active)
            if not ended and not marked:
                self._wait(session, idle=not ready_any)
            return [self._get_run(active, session) for active in ended]  # read after every other run's expiry

    def _get_run(self, active: _Active, session: Any) -> Any:
        from airflow.models.dagrun import DagRun

        run = session.scalar(_select_run(DagRun, active.dag_id, active.run_id))
        run.dag = self._scheduler_dags[active.dag_id]  # what create_dagrun set on the row it returned
        return run

    def _in_flight(self) -> int:
        return sum(len(active.running) for active in self._active)

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
        # only the scheduled ones: all of them, as before, cost as much again as update_state's own query
        scheduled = run.get_task_instances(state=TaskInstanceState.SCHEDULED, session=session)
        return [ti for ti in scheduled if (ti.task_id, ti.map_index) not in exclude]

    def _dispatch(self, ti: Any, session: Any) -> Future:
        from airflow.utils.state import TaskInstanceState

        ti.state = TaskInstanceState.QUEUED  # the Execution API starts only queued task instances
        session.commit()
        ref = TaskRef(str(ti.id), ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number,
                      str(ti.dag_version_id))  # fmt: skip
        return self._pool.submit(_run_in_worker, ref)

    def _wait(self, session: Any, idle: bool) -> None:
        """Block until a task in flight ends (a worker that died fails its task); sleep when nothing runs."""
        futures = {future: (active, key) for active in self._active for key, future in active.running.items()}
        if not futures:
            if idle and self._active:
                time.sleep(0.5)  # e.g. a retry waiting out its delay, as DAG.test() does
            return
        done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
        for future in done:
            active, key = futures[future]
            del active.running[key]
            active.stale = True
            if future.exception() is not None:
                _fail(session, active, *key, future.exception())


def _select_run(model: Any, dag_id: str, run_id: str) -> Any:
    from sqlalchemy import select

    return select(model).where(model.dag_id == dag_id, model.run_id == run_id)


def _fail(session: Any, active: _Active, task_id: str, map_index: int, exc: BaseException | None) -> None:
    """A task whose worker raised (or died) ends failed unless the Execution API already finished it."""
    import logging

    from airflow.models.dagrun import DagRun
    from airflow.utils.state import State

    logging.getLogger("fmx.run.runner").error("task %s[%s] crashed its worker: %s", task_id, map_index, exc)
    session.expire_all()
    run = session.scalar(_select_run(DagRun, active.dag_id, active.run_id))
    for ti in run.get_task_instances(session=session):
        if (ti.task_id, ti.map_index) == (task_id, map_index) and ti.state not in State.finished:
            ti.state = State.FAILED
    session.commit()


# ---- worker side ------------------------------------------------------------------------------------
_DAGS: dict[str, Any] = {}
_CLIENT: Any = None  # worker_client(), built by _init_worker


def _init_worker(dags_folder: str, retries: bool) -> None:
    """Parse the DAG folder once (task objects run here), build this worker's Execution API client and
    send its first DB-reading request; what a day's first tasks import came with the fork
    (fmx.run.preloaded). Then a background thread imports the other stage modules while the first tasks run
    (started last: its imports hold the GIL, which made this set-up 0.07 -> 0.8 s, measured)."""
    from airflow.dag_processing.dagbag import DagBag

    from fmx.run.preload import preload

    global _CLIENT
    bag = DagBag(dag_folder=dags_folder)
    for dag in bag.dags.values():
        if not retries:
            for task in dag.tasks:
                task.retries = 0
    _DAGS.update(bag.dags)
    _CLIENT = worker_client()
    try:  # a read (a count of task instances): opens the worker's DB connection before its first task
        _CLIENT.task_instances.get_count(dag_id=next(iter(_DAGS), "fmx"))
    except Exception:  # noqa: BLE001 - a warm-up only: the task's own requests raise what is wrong
        pass
    threading.Thread(target=preload, daemon=True, name="fmx-preload").start()  # after: it holds the GIL


def worker_client() -> Any:
    """The in-process Execution API client every task of this worker uses: what `run_task_in_process` builds
    for each task (`InProcessTestSupervisor._api_client`: a new app, event-loop thread and DB-backed DAG bag,
    ~0.2-0.3 s a task under load), built once on the app fmx.run.preloaded has already served a request with.
    The DAG bag caches DAGs by version: the bundle is synced once per job, before any task runs."""
    from airflow.api_fastapi.common.dagbag import dag_bag_from_app
    from airflow.models.dagbag import DBDagBag
    from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor

    from fmx.run.preloaded import API

    dag_bag = DBDagBag()
    API.app.dependency_overrides[dag_bag_from_app] = lambda: dag_bag
    client = InProcessTestSupervisor._Client(base_url=None, token="", dry_run=True, transport=API.transport)
    client.base_url = "http://in-process.invalid./"  # as the supervisor sets it
    return client


def _noop() -> None:
    return None


def _run_in_worker(ref: TaskRef) -> str:
    """Run one task instance with Airflow's in-process task runner; return its final state."""
    from uuid import UUID

    from airflow.sdk.api.datamodels._generated import TaskInstance as TaskInstanceSDK
    from airflow.sdk.execution_time.supervisor import run_task_in_process

    ti = TaskInstanceSDK(
        id=UUID(ref.id), task_id=ref.task_id, dag_id=ref.dag_id, run_id=ref.run_id,
        try_number=ref.try_number, map_index=ref.map_index, dag_version_id=UUID(ref.dag_version_id),
    )  # fmt: skip
    # The task runner points SIGTERM at the task's on_kill (and the process lives on): put it back after the
    # task, or `DagRunner.close`'s terminate would call a finished task's on_kill and wait for the worker
    # to wind down on its own (14 s at the end of a job, measured).
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = run_task_in_process(ti=ti, task=_DAGS[ref.dag_id].get_task(ref.task_id), client=_CLIENT)
    finally:
        signal.signal(signal.SIGTERM, before)
    return str(result.state)


def start_forkserver() -> None:
    """Start the workers' forkserver now, with this process's environment: its imports (fmx.run.preloaded,
    ~10 s) then overlap what this process does before the first task (DB migration, DAG parse and sync)
    instead of following it. Call it once Airflow's configuration is in the environment and on disk."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(["fmx.run.preloaded"])
    forkserver.ensure_running()


def default_workers() -> int:
    """One worker per core this process may use ($FMX_RUN_WORKERS overrides)."""
    text = os.environ.get("FMX_RUN_WORKERS", "").strip()
    if text:
        return max(1, int(text))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

