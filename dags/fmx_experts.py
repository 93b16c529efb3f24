"""fmx_experts: the surface experts of window D, on the FM outputs fmx_fm exported for D.

plan -> expert_examples per (surface, FM preset) -> expert_train per (surface, variant, FM preset)
-> compare_and_promote per (surface, FM preset). Mapped over the lists `plan` resolves.

Decoupled from the FM by an explicit trigger, not by an Asset schedule: fmx_fm's last task starts
one fmx_experts run per FM day with conf {ds, lake, fm_presets, pipeline_run, ...}. An Asset
schedule would merge the events of several days that land while an experts run is still going
into one run (losing days the experts must warm-start through, in order); the trigger keeps exactly
one run per day with its day explicit. fmx_fm still records the fm_outputs Asset for lineage.
To re-run the experts of a day without retraining the FM: trigger this DAG with Param ds.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from fmx import dagkit


@dag(
    schedule=None,
    max_active_runs=1,
    params=dagkit.params(),
    default_args=dagkit.DEFAULT_ARGS,
    tags=["fmx", "experts"],
    doc_md=__doc__,
)
def fmx_experts() -> None:
    @task
    def plan(params=None, logical_date=None, run_id=None) -> dict:
        """Resolve the day, lake and lists to map over; no surfaces given: every surface with events on ds."""
        from features.lake import Lake

        ds, lake = dagkit.run_day(params, logical_date), dagkit.lake_uri(params)
        surfaces = list(params["surfaces"]) or [p["surface"] for p in Lake(lake).partitions("events", ds=ds)]
        if not surfaces:
            raise ValueError(f"no events for ds={ds} in lake {lake}: run fmx_fm (ingest) for that day first")
        return {
            "ds": ds,
            "lake": lake,
            "surfaces": surfaces,
            "variants": list(params["variants"]),
            "fm_presets": list(params["fm_presets"]),
            "pipeline_run": dagkit.pipeline_run(params, run_id),
        }

    @task
    def expert_examples(day: dict, surface: str, preset: str) -> dict:
        from experts.stage import expert_examples as stage

        out = dagkit.timed(stage, ds=day["ds"], surface=surface, lake_uri=day["lake"], preset=preset)
        return {**out, "ds": day["ds"], "surface": surface, "preset": preset}

    @task(pool=dagkit.TRAINING_POOL, execution_timeout=dagkit.TRAIN_TIMEOUT)
    def expert_train(day: dict, surface: str, variant: str, preset: str) -> dict:
        from experts.stage import expert_train as stage

        out = dagkit.timed(
            stage,
            ds=day["ds"],
            surface=surface,
            variant=variant,
            lake_uri=day["lake"],
            preset=preset,
            pipeline_run=day["pipeline_run"],
        )
        return {**out, "ds": day["ds"], "surface": surface, "variant": variant, "preset": preset}

    @task
    def compare_and_promote(day: dict, surface: str, preset: str) -> dict:
        from experts.stage import compare_and_promote as stage

        out = dagkit.timed(
            stage,
            ds=day["ds"],
            surface=surface,
            lake_uri=day["lake"],
            preset=preset,
            pipeline_run=day["pipeline_run"],
        )
        return {**out, "ds": day["ds"], "surface": surface, "preset": preset}

    @task
    def grid(day: dict, axes: list[str]) -> list[dict]:
        """The mapped tasks' kwargs: one dict per combination of the day's lists (e.g. surface x variant)."""
        return dagkit.grid(day, axes)

    day = plan()
    per_surface = grid.override(task_id="per_surface")(day, ["surface", "preset"])
    per_model = grid.override(task_id="per_model")(day, ["surface", "variant", "preset"])
    examples = expert_examples.partial(day=day).expand_kwargs(per_surface)
    trained = expert_train.partial(day=day).expand_kwargs(per_model)
    promoted = compare_and_promote.partial(day=day).expand_kwargs(per_surface)
    examples >> trained >> promoted


fmx_experts()
