"""fmx_fm: the daily foundation-model pipeline for window D.

ingest(D) -> per FM preset: fm_export(D) with FM_{D-1} -> fm_train(D) warm-started from FM_{D-1}
-> experts_conf -> trigger_experts (one fmx_experts run for day D, see dags/fmx_experts.py).

Every task calls a stage wrapper with references only; XCom carries ds, URIs, versions, run ids.
The day is the run's logical date (== data_interval_start for scheduled and backfill runs) or the
Param ds. Runs are kept in day order (max_active_runs=1, depends_on_past) because each FM day
warm-starts from the previous one. Past days: catchup, or `airflow backfill create --dag-id fmx_fm`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, CronDataIntervalTimetable, dag, task, task_group

from fmx import dagkit

FM_OUTPUTS = Asset("fmx://lake/fm_outputs", extra={"table": "fm_outputs"})


@dag(
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=True,
    max_active_runs=1,
    params=dagkit.params(),
    default_args={**dagkit.DEFAULT_ARGS, "depends_on_past": True},
    tags=["fmx", "fm"],
    doc_md=__doc__,
)
def fmx_fm() -> None:
    @task
    def ingest(params=None, logical_date=None, run_id=None) -> dict:
        from features.stage import ingest as stage

        ds, lake = dagkit.run_day(params, logical_date), dagkit.lake_uri(params)
        out = dagkit.timed(stage, ds=ds, lake_uri=lake, source=params["source"], scale=params["scale"])
        return {
            **out,
            "ds": ds,
            "lake": lake,
            "fm_presets": params["fm_presets"],
            "pipeline_run": dagkit.pipeline_run(params, run_id),
        }

    @task(outlets=[FM_OUTPUTS])
    def fm_export(day: dict, preset: str) -> dict:
        from fm.stage import fm_export as stage

        out = dagkit.timed(
            stage, ds=day["ds"], lake_uri=day["lake"], preset=preset, pipeline_run=day["pipeline_run"]
        )
        return {**out, "ds": day["ds"], "preset": preset}

    @task(pool=dagkit.TRAINING_POOL, execution_timeout=dagkit.TRAIN_TIMEOUT)
    def fm_train(day: dict, exported: dict, preset: str) -> dict:
        from fm.stage import fm_train as stage

        out = dagkit.timed(
            stage, ds=day["ds"], lake_uri=day["lake"], preset=preset, pipeline_run=day["pipeline_run"]
        )
        return {**out, "ds": day["ds"], "preset": preset, "scored_with": exported.get("fm_version")}

    @task_group
    def fm_preset(day: dict, preset: str) -> None:
        fm_train(day, fm_export(day, preset), preset)

    @task
    def fm_presets(day: dict) -> list[str]:
        return list(day["fm_presets"])

    @task
    def experts_conf(day: dict, params=None) -> dict:
        """The conf of day D's fmx_experts run: the same day, lake, presets and pipeline run."""
        keep = ("surfaces", "variants", "source", "scale")
        return {
            **{k: params[k] for k in keep},
            "ds": day["ds"],
            "lake": day["lake"],
            "fm_presets": day["fm_presets"],
            "pipeline_run": day["pipeline_run"],
        }

    day = ingest()
    trained = fm_preset.partial(day=day).expand(preset=fm_presets(day))
    conf = experts_conf(day)
    trained >> conf
    conf >> TriggerDagRunOperator(
        task_id="trigger_experts", trigger_dag_id="fmx_experts", conf=conf, wait_for_completion=False
    )


fmx_fm()
