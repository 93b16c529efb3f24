"""fmx_fm: the daily foundation-model pipeline for window D.

ingest(D) -> per FM preset: fm_export(D) with FM_{D-1} -> fm_train(D) warm-started from FM_{D-1}
-> experts_conf -> trigger_experts (one fmx_experts run for day D, see dags/fmx_experts.py).

Tasks call stage wrappers with references only; XCom carries ds, URIs, versions, run ids. The day is
the Param ds or the run's logical date (== data_interval_start for scheduled and backfill runs).
Runs stay in day order (max_active_runs=1, depends_on_past, wait_for_downstream — backfill ignores
max_active_runs, so fm_export(D) also waits for fm_train(D-1)): each FM day warm-starts from the one
before. Past days: `airflow backfill create --dag-id fmx_fm --from-date .. --to-date ..`, any dates.

The schedule is the lake's: one run per window of $FMX_WINDOW_DAYS days (default 1) from
$FMX_START_DATE, catching up. Without FMX_START_DATE the DAG has no start date and no catch-up (an
unpaused DAG runs only the latest interval), while manual triggers, `fmx run` and backfills run any
window of any date (see dagkit).
"""

from __future__ import annotations

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, dag, task, task_group

from fmx import dagkit

START = dagkit.schedule_start()  # $FMX_START_DATE, or None: no start date, no catch-up
FM_OUTPUTS = Asset(
    "fmx://lake/fm_outputs", extra={"table": "fm_outputs"}
)  # lineage of the exported FM knowledge


@dag(
    schedule=dagkit.schedule(),
    start_date=START,
    catchup=START is not None,  # catch up from the chosen first window; without one, only the latest
    max_active_runs=1,
    params=dagkit.params(),
    default_args={**dagkit.DEFAULT_ARGS, "depends_on_past": True, "wait_for_downstream": True},
    tags=["fmx", "fm"],
    doc_md=__doc__,
)
def fmx_fm() -> None:
    @task
    def ingest(params=None, logical_date=None, run_id=None) -> dict:
        from features.stage import ingest as stage

        run = dagkit.resolve_run(params, logical_date, run_id)
        out = dagkit.timed(
            stage, ds=run["ds"], lake_uri=run["lake"], source=run["source"], scale=run["scale"],
            surfaces=run["surfaces"],
        )
        return {**out, **run}  # the run's references win over the stage's own keys (e.g. surfaces)

    @task
    def fm_presets(day: dict) -> list[str]:
        return day["fm_presets"]

    @task(outlets=[FM_OUTPUTS])
    def fm_export(day: dict, preset: str) -> dict:
        from fm.stage import fm_export as stage

        return {**dagkit.timed(stage, preset=preset, **dagkit.refs(day)), "ds": day["ds"], "preset": preset}

    @task(pool=dagkit.TRAINING_POOL, execution_timeout=dagkit.TRAIN_TIMEOUT)
    def fm_train(day: dict, exported: dict, preset: str) -> dict:
        from fm.stage import fm_train as stage

        out = dagkit.timed(stage, preset=preset, nproc=day["fm_nproc"], **dagkit.refs(day))
        return {**out, "ds": day["ds"], "preset": preset, "scored_with": exported.get("fm_version")}

    @task_group
    def fm_preset(day: dict, preset: str) -> None:
        fm_train(day, fm_export(day, preset), preset)

    @task
    def experts_conf(day: dict) -> dict:
        """Day D's fmx_experts conf: the same day, lake, surfaces, variants, presets and pipeline run."""
        return {k: day[k] for k in dagkit.RUN_KEYS}

    day = ingest()
    conf = experts_conf(day)
    fm_preset.partial(day=day).expand(preset=fm_presets(day)) >> conf
    conf >> TriggerDagRunOperator(task_id="trigger_experts", trigger_dag_id="fmx_experts", conf=conf)


fmx_fm()
