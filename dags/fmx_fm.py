"""fmx_fm: the daily foundation-model pipeline for window D.

plan(D) -> ingest(D) -> per FM preset: fm_export(D) with FM_{D-1} -> fm_train(D) warm-started from FM_{D-1}
-> experts_conf -> trigger_experts (one fmx_experts run for day D, see dags/fmx_experts.py). ingest decides
the run's surfaces once (the requested ones the window holds, or all), and experts_conf hands them down.

Tasks call stage wrappers with references only; XCom carries ds, URIs, versions, run ids. The day is
the Param ds or the run's logical date (== data_interval_start for scheduled and backfill runs).
Runs stay in day order (max_active_runs=1, depends_on_past, wait_for_downstream — backfill ignores
max_active_runs, so fm_export(D) also waits for fm_train(D-1)): each FM day warm-starts from the one
before. Past days: `airflow backfill create --dag-id fmx_fm --from-date .. --to-date ..`, any dates.

The schedule is the lake's: one run per window of $FMX_WINDOW_DAYS days (default 1) from
$FMX_START_DATE through $FMX_END_DATE (if set), catching up. Without FMX_START_DATE the DAG has no start
date and no catch-up (an unpaused DAG runs only the latest interval), while manual triggers, `fmx run`
and backfills run any window of any date (see dagkit).

A day is done once: `plan` skips ingest, the FM and the experts trigger when every requested FM preset
already holds its checkpoint for the day (a log line names them), unless the Param rerun is true.
"""

from __future__ import annotations

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, dag, task, task_group

from fmx import dagkit

START = dagkit.schedule_start()  # $FMX_START_DATE, or None: no start date, no catch-up
END = dagkit.schedule_end()  # $FMX_END_DATE, or None: no last window
FM_OUTPUTS = Asset("fmx://lake/fm_outputs", extra={"table": "fm_outputs"})  # lineage of the exported FM knowledge


@dag(
    schedule=dagkit.schedule(),
    start_date=START,
    end_date=END,
    catchup=START is not None,  # catch up from the chosen first window; without one, only the latest
    max_active_runs=1,
    params=dagkit.params(rerun=True),
    default_args={**dagkit.DEFAULT_ARGS, "depends_on_past": True, "wait_for_downstream": True},
    tags=["fmx", "fm"],
    doc_md=__doc__,
)
def fmx_fm() -> None:
    @task.short_circuit(ignore_downstream_trigger_rules=False, multiple_outputs=False)  # skips ingest, trigger_experts
    def plan(params=None, logical_date=None, run_id=None) -> dict | bool:
        """The run's references, or False when the day is done and rerun is false (dagkit.unless_done)."""
        with dagkit.bad_input_fails_at_once():
            run = dagkit.resolve_run(params, logical_date, run_id)
            return dagkit.unless_done(run, rerun=bool(params.get("rerun")))

    @task(multiple_outputs=False)  # one XCom (the dict), not one per key: each is an Execution API call
    def ingest(run: dict) -> dict:
        """Land window ds; the run's references with its surfaces decided (features.stage.plan_surfaces)."""
        from features.stage import ingest as stage
        from features.stage import plan_surfaces

        out = dagkit.timed(stage, surfaces=run["surfaces"], **{k: run[k] for k in ("ds", "lake_uri", "source", "scale")})
        with dagkit.bad_input_fails_at_once():
            surfaces = plan_surfaces(run["ds"], run["lake_uri"], run["surfaces"])
        return {**out, **run, "surfaces": surfaces}  # the run's references win over the stage's own keys

    @task
    def fm_presets(day: dict) -> list[str]:
        return day["fm_presets"]

    @task(outlets=[FM_OUTPUTS], multiple_outputs=False)
    def fm_export(day: dict, fm_preset: str) -> dict:
        from fm.stage import fm_export as stage

        return {**dagkit.timed(stage, fm_preset=fm_preset, **dagkit.refs(day)), "ds": day["ds"], "fm_preset": fm_preset}

    @task(pool=dagkit.TRAINING_POOL, execution_timeout=dagkit.TRAIN_TIMEOUT, multiple_outputs=False)
    def fm_train(day: dict, exported: dict, fm_preset: str) -> dict:
        from fm.stage import fm_train as stage

        out = dagkit.timed(stage, fm_preset=fm_preset, nproc=day["fm_nproc"], **dagkit.refs(day))
        return {**out, "ds": day["ds"], "fm_preset": fm_preset, "scored_with": exported.get("fm_version")}

    @task_group(group_id="fm_preset")
    def per_fm_preset(day: dict, fm_preset: str) -> None:
        fm_train(day, fm_export(day, fm_preset), fm_preset)

    @task(multiple_outputs=False)
    def experts_conf(day: dict) -> dict:
        """Day D's fmx_experts conf: ingest's references (the same day, lake, surfaces it decided, variants,
        FM presets, pipeline run). A done day skips it with ingest: it would otherwise resolve the skipped
        ingest's XCom, which the task SDK reports as an error line although the run is correct."""
        return {k: day[k] for k in dagkit.RUN_KEYS}

    run = plan()
    day = ingest(run)
    conf = experts_conf(day)
    per_fm_preset.partial(day=day).expand(fm_preset=fm_presets(day)) >> conf
    trigger_experts = TriggerDagRunOperator(task_id="trigger_experts", trigger_dag_id="fmx_experts", conf=conf)
    [run, conf] >> trigger_experts  # plan skips it on a done day


fmx_fm()
