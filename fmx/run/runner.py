"""The main job in one process: the real DAGs of dags/ run day by day, `DAG.test()`-style (fmx.run.inprocess).

Airflow's own machinery runs every task: a metadata DB (SQLite under $FMX_HOME/airflow, migrated once:
fmx.run.airflow_setup), DAG runs with a logical date and a validated conf, dependency checks, dynamic task
mapping, XCom, the task SDK's runner. What a scheduler would add is played here as a scheduler would order it: for
each day D, one `fmx_fm` run (logical date D), then the `fmx_experts` run its `trigger_experts` task would
have started, with the conf that task would have passed (`trigger_experts` itself is marked success, so no
run is left queued for a scheduler that is not there); day D+1's fmx_fm run starts beside day D's
fmx_experts run (one run of each DAG at a time, as max_active_runs=1 and the trigger give). A day fmx_fm's
`plan` found done (and not `rerun`) triggers no experts run either. The DAGs are parsed and written to the
DB once per job; task instances run in a pool of worker processes (`JobConfig.workers`, default one per
core), so the experts' mapped tasks of different surfaces and variants run concurrently, and fill the
workers fmx_fm's chain (one task at a time, served first) leaves idle.

Work vs orchestration: a stage's own wall time is measured inside its task (`dagkit.timed`: start and
duration); the job's stage work is the wall time during which at least one stage ran (the union of
those intervals, so concurrent stages are not counted twice), orchestration the rest of the wall time.

Contract: `run_job(JobConfig) -> JobReport`; raises `JobFailed` naming the failed tasks. Airflow is
configured from the environment at its first import, so `configure_airflow` must run before anything
imports airflow in this process (`fmx run` does it first).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fmx import dagkit
from fmx.run.airflow_setup import (  # noqa: F401  (the set-up's names, imported from here too: fmx.cli.run, tests)
    DAGS_FOLDER,
    airflow_env,
    configure_airflow,
    ensure_pool,
    migrated_template,
)

FM_DAG, EXPERTS_DAG = "fmx_fm", "fmx_experts"


class JobFailed(RuntimeError):
    """A DAG run of the main job did not succeed."""


@dataclass(frozen=True)
class JobConfig:
    """What `fmx run` runs: `days` windows from `start` (generator) or the lake's first windows (lake).

    source "auto" = what the lake holds (`resolve_source`): its imported windows, else the generator.
    """

    days: int = 4
    scale: str = "small"
    source: str = "auto"
    lake: str = ""
    fm_presets: tuple[str, ...] = ("small",)
    surfaces: tuple[str, ...] = ()
    variants: tuple[str, ...] = dagkit.VARIANTS
    start: date | None = None
    retries: bool = True  # False: fail at the first error instead of backing off (tests, debugging)
    rerun: bool = False  # True: fmx_fm's Param rerun, train days again that are already done
    workers: int = 0  # worker processes running task instances; 0: one per core (fmx.run.inprocess)


@dataclass
class TaskTiming:
    dag_id: str
    ds: str
    task: str  # task id, with [map index] for mapped tasks
    state: str
    task_s: float  # Airflow's duration of the task instance
    stage_s: float  # the stage function's own wall time (0 for wiring tasks)
    stage_t0: float = 0.0  # its start, Unix time (0 for wiring tasks)


@dataclass
class JobReport:
    days: list[str]
    pipeline_run: str
    wall_s: float = 0.0
    tasks: list[TaskTiming] = field(default_factory=list)

    skipped_days: list[str] = field(default_factory=list)  # done days: fmx_fm's plan skipped them
    closing: str = ""  # what run_job's `closing` returned (the closing table), "" without one

    @property
    def stage_s(self) -> float:
        """Wall time during which at least one stage function ran (concurrent stages counted once)."""
        spans = sorted((t.stage_t0, t.stage_t0 + t.stage_s) for t in self.tasks if t.stage_s > 0)
        total, end = 0.0, float("-inf")
        for t0, t1 in spans:
            total += max(0.0, t1 - max(t0, end))
            end = max(end, t1)
        return total

    @property
    def stage_sum_s(self) -> float:
        """Every stage's own wall time, summed (> stage_s when stages ran concurrently)."""
        return sum(t.stage_s for t in self.tasks)

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.stage_s


def resolve_source(cfg: JobConfig) -> JobConfig:
    """`cfg` with its source decided by the lake (features.stage.resolve_source): an import runs its windows."""
    from dataclasses import replace

    from features.stage import resolve_source as source_of

    try:
        return replace(cfg, source=source_of(cfg.lake, cfg.source or "auto"))
    except ValueError as exc:
        raise JobFailed(str(exc)) from None


def check_surfaces(cfg: JobConfig) -> None:
    """Fail before the first run when a requested surface is not the lake's (or the generator's)."""
    if not cfg.surfaces:
        return
    from features.generate import GeneratorConfig
    from features.stage import known_surfaces, require_known

    generated = cfg.source == "generator"
    known = list(GeneratorConfig(scale=cfg.scale).surfaces) if generated else known_surfaces(cfg.lake)
    try:
        require_known(cfg.surfaces, known, f"lake {cfg.lake} ({cfg.source})")
    except ValueError as exc:
        raise JobFailed(str(exc)) from None


def job_days(cfg: JobConfig) -> list[str]:
    """The windows to run: consecutive days for the generator, the lake's first windows for source=lake."""
    if cfg.days < 1:
        raise JobFailed(f"--days must be >= 1, got {cfg.days}")
    if cfg.source == "generator":
        from features.generate import DEFAULT_START
        from features.lake import Lake

        origin = Lake(cfg.lake).meta().get("origin")
        start = cfg.start or (date.fromisoformat(origin) if origin else DEFAULT_START)
        return [(start + timedelta(days=i)).isoformat() for i in range(cfg.days)]
    from features.stage import lake_windows

    windows = [w for w in lake_windows(cfg.lake) if cfg.start is None or w >= cfg.start.isoformat()]
    if not windows:
        since = f" from {cfg.start}" if cfg.start else ""
        raise JobFailed(f"lake {cfg.lake} holds no windows with events{since}: import data first (fmx import)")
    return windows[: cfg.days]


def run_job(
    cfg: JobConfig, echo: Callable[[str], None] = print, closing: Callable[[list[str]], str] | None = None
) -> JobReport:
    """Run fmx_fm then fmx_experts for each day of the job; Airflow must be configured first.

    `closing(days)` (a module-level function: it is pickled), e.g. the closing comparison table, runs in a
    worker once every run has succeeded, and its text is `report.closing`: a worker has MLflow and the
    tracking store ready from the stages it ran, which this process would import and open first (~3 s of
    CPU, measured, taken from the workers on a 2-core machine).
    """
    from airflow.dag_processing.dagbag import DagBag

    from fmx.run.inprocess import DagRunner, default_workers

    started = time.perf_counter()
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise JobFailed(f"DAG import errors: {bag.import_errors}")
    fm_dag, experts_dag = bag.dags[FM_DAG], bag.dags[EXPERTS_DAG]
    if not cfg.retries:
        for task in [*fm_dag.tasks, *experts_dag.tasks]:
            task.retries = 0
    cfg = resolve_source(cfg)
    days = job_days(cfg)
    check_surfaces(cfg)
    report = JobReport(days=days, pipeline_run=f"fmx-run-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    with DagRunner(bag.dags, DAGS_FOLDER, cfg.workers or default_workers(), cfg.retries) as dags:
        dags.sync()
        _run_days(dags, fm_dag, experts_dag, cfg, report, echo)
        if closing is not None:
            report.closing = dags.call(closing, days).result()
    report.wall_s = time.perf_counter() - started
    return report


def _run_days(
    dags: Any, fm_dag: Any, experts_dag: Any, cfg: JobConfig, report: JobReport, echo: Callable[[str], None]
) -> None:
    """Day D's fmx_fm run, then its fmx_experts run; day D+1's fmx_fm starts beside day D's fmx_experts.

    What a scheduler does with fmx_fm's max_active_runs=1 and the trigger: one run of each DAG at a time, in
    day order, so fmx_fm is at most one day ahead of the experts. After a failed run nothing new starts;
    the run beside it ends first, then JobFailed is raised.
    """
    todo = list(report.days)  # days whose fmx_fm run is still to start
    waiting: list[tuple[str, dict]] = []  # (ds, conf) of the fmx_experts runs still to start
    active: dict[str, tuple[str, str]] = {}  # run_id -> (dag_id, ds) of the runs in flight, one per DAG
    failure: JobFailed | None = None
    while True:
        if failure is None and waiting and EXPERTS_DAG not in _dag_ids(active):
            ds, conf = waiting.pop(0)
            active[_start(dags, experts_dag, ds, conf)] = (EXPERTS_DAG, ds)
        if failure is None and todo and not waiting and FM_DAG not in _dag_ids(active):
            ds = todo.pop(0)
            echo(f"== day {ds}")
            # one FM task at a time: fmx_fm is a chain per preset, and concurrent presets would race to
            # create the day's MLflow parent run (common.tracking.parent_run_id is not locked). Its tasks
            # go first: the next experts run waits for this chain, not the other way round.
            active[_start(dags, fm_dag, ds, fm_conf(cfg, ds, report.pipeline_run), skip="trigger_experts",
                          max_active=1, ahead=True)] = (FM_DAG, ds)  # fmt: skip
        if not active:
            break
        for run in dags.step():
            _, ds = active.pop(run.run_id)
            try:
                _check_run(fm_dag if run.dag_id == FM_DAG else experts_dag, run, ds, report, echo)
            except JobFailed as exc:
                failure = failure or exc
                continue
            if run.dag_id != FM_DAG:
                continue
            if _day_done(run):
                report.skipped_days.append(ds)
                echo(f"  ds={ds} is already done (fmx_fm plan): no experts run; --rerun trains it again")
            else:
                waiting.append((ds, _xcom(run, "experts_conf")))
    if failure is not None:
        raise failure


def fm_conf(cfg: JobConfig, ds: str, pipeline_run: str) -> dict[str, Any]:
    """The conf of day `ds`'s fmx_fm run (validated against the DAG's Params before the run)."""
    return {
        "ds": ds, "lake_uri": cfg.lake, "source": cfg.source, "scale": cfg.scale,
        "fm_presets": list(cfg.fm_presets), "surfaces": list(cfg.surfaces), "variants": list(cfg.variants),
        "pipeline_run": pipeline_run, "rerun": cfg.rerun,
    }  # fmt: skip


def _dag_ids(active: dict[str, tuple[str, str]]) -> set[str]:
    return {dag_id for dag_id, _ in active.values()}


def _start(
    dags: Any, dag: Any, ds: str, conf: dict, skip: str = "", max_active: int = 0, ahead: bool = False
) -> str:
    """Start day `ds`'s run of `dag` with `conf`, validated against the DAG's Params first; its run id."""
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    try:
        params = copy.deepcopy(dag.params)
        params.update(conf)
        params.validate()
    except ParamValidationError as exc:
        raise JobFailed(f"{dag.dag_id}: bad run conf for ds={ds}: {exc}") from None
    logical = datetime.fromisoformat(ds).replace(tzinfo=UTC)
    return dags.start(dag.dag_id, logical, conf, mark_success=skip, max_active=max_active, ahead=ahead)


def _check_run(dag: Any, run: Any, ds: str, report: JobReport, echo: Callable[[str], None]) -> None:
    """Record and print an ended run's task timings; JobFailed when it did not succeed (or ran nothing)."""
    timings = _timings(run, dag, ds)
    report.tasks.extend(timings)
    echo(f"  -- {dag.dag_id} ds={ds}: {run.state}")
    for t in timings:
        stage = f" (stage {t.stage_s:.1f} s)" if t.stage_s else ""
        echo(f"  {dag.dag_id}.{t.task:<40} {t.state:<8} done in {t.task_s:6.1f} s{stage}")
    failed = [t.task for t in timings if t.state == "failed"]
    if str(run.state) != "success" or failed or not timings or any(t.state in NOT_RUN for t in timings):
        if not failed:
            raise JobFailed(_why_not_run(dag, run, ds))
        log_dir = os.environ.get("AIRFLOW__LOGGING__BASE_LOG_FOLDER", "$AIRFLOW_HOME/logs")
        raise JobFailed(
            f"{dag.dag_id} run for ds={ds} ended {run.state}; failed tasks: {failed} (see {log_dir})"
        )


NOT_RUN = ("None", "scheduled", "queued", "up_for_reschedule", "deferred")


def _why_not_run(dag: Any, run: Any, ds: str) -> str:
    """Why a run ended without running (all of) its tasks: Airflow's own failed dependency reasons."""
    from airflow.ti_deps.dep_context import DepContext
    from airflow.utils.session import create_session

    reasons: dict[str, str] = {}
    with create_session() as session:
        for ti in run.get_task_instances(session=session):
            if str(ti.state) not in NOT_RUN:
                continue
            ti.task = dag.get_task(ti.task_id)
            for dep in ti.get_failed_dep_statuses(dep_context=DepContext(), session=session):
                reasons.setdefault(dep.reason, ti.task_id)
    logical = datetime.fromisoformat(ds).replace(tzinfo=UTC)
    late = sorted({t.start_date for t in dag.tasks if t.start_date and t.start_date > logical})
    if late:  # Airflow creates no task instance for a date before the start date
        reasons.setdefault(
            f"the window {ds} is before the DAG's start date {late[0].date()} "
            f"(${dagkit.START_DATE_ENV}; unset it or set it to the lake's first window)",
            "every task",
        )
    why = "; ".join(f"{task}: {reason}" for reason, task in reasons.items()) or "no reason recorded by Airflow"
    return f"{dag.dag_id} run for ds={ds} ended {run.state} without running its tasks: {why}"


def _timings(run: Any, dag: Any, ds: str) -> list[TaskTiming]:
    """One line per task instance in DAG order; mapped ones named by their kwargs (surface/variant/preset)."""
    from airflow.utils.session import create_session

    values = {(x.task_id, x.map_index): x.value for x in _xcoms(run.run_id, run.dag_id)}
    order = {task.task_id: i for i, task in enumerate(dag.topological_sort())}
    out = []
    with create_session() as session:
        tis = sorted(
            run.get_task_instances(session=session), key=lambda t: (order.get(t.task_id, 0), t.map_index)
        )
        for ti in tis:
            value = values.get((ti.task_id, ti.map_index))
            value = value if isinstance(value, dict) else {}
            labels = [str(value[k]) for k in ("surface", "variant", "fm_preset") if k in value]
            name = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{'/'.join(labels) or ti.map_index}]"
            stage_s, t0 = float(value.get("stage_s", 0.0)), float(value.get("stage_t0", 0.0))
            out.append(TaskTiming(run.dag_id, ds, name, str(ti.state), float(ti.duration or 0.0), stage_s, t0))
    return out


@dataclass
class _XCom:
    task_id: str
    map_index: int
    value: Any


def _xcoms(run_id: str, dag_id: str, task_ids: Sequence[str] | None = None) -> list[_XCom]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = XComModel.get_many(run_id=run_id, dag_ids=dag_id, key="return_value", task_ids=task_ids)
    with create_session() as session:
        rows: list[Any] = list(session.scalars(query))  # XComModel rows
        return [_XCom(r.task_id, r.map_index, XComModel.deserialize_value(r)) for r in rows]


def _day_done(fm_run: Any) -> bool:
    """fmx_fm's plan found the day done: it returned False (a short-circuit's falsy result leaves no XCom)."""
    found = _xcoms(fm_run.run_id, fm_run.dag_id, ["plan"])
    return not found or found[0].value is False


def _xcom(run: Any, task_id: str) -> Any:
    found = _xcoms(run.run_id, run.dag_id, [task_id])
    if not found:  # _run_dag has already explained runs whose tasks did not run
        raise JobFailed(f"{run.dag_id}.{task_id} succeeded but returned nothing in run {run.run_id}")
    return found[0].value
