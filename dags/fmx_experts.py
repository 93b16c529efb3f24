"""fmx_experts: the surface experts of window D, on the FM outputs fmx_fm exported for D.

plan -> expert_examples per (surface, FM preset) -> expert_train per (surface, variant, FM preset)
-> compare_and_promote per (surface, FM preset), with `reference` per (surface, FM preset) beside them
(the counting baseline, variant `ref`): dynamic task mapping over the lists `plan` resolves.

Decoupled from the FM by an explicit trigger, not an Asset schedule: fmx_fm's last task starts one
fmx_experts run per FM day with conf {ds, lake_uri, surfaces (decided by fmx_fm's ingest), variants,
fm_presets, pipeline_run}. An
Asset schedule would fold the events of several days that land while an experts run is busy into one
run, so the experts would skip days they must warm-start through in order; the trigger keeps one run
per day with the day explicit. fmx_fm still records the fm_outputs Asset, for lineage.
Re-run the experts of a day without retraining the FM: trigger this DAG with the Param ds.
Created unpaused (it has no schedule, so that starts nothing): fmx_fm's triggers run as soon as fmx_fm is
unpaused, and pausing it is a deliberate stop (fmx.servers.reaper ends its stranded runs).
"""

from __future__ import annotations

from airflow.sdk import dag, task

from fmx import dagkit


@dag(schedule=None, max_active_runs=1, params=dagkit.params(), default_args=dagkit.DEFAULT_ARGS, tags=["fmx", "experts"],
     is_paused_upon_creation=False, doc_md=__doc__)  # fmt: skip
def fmx_experts() -> None:
    @task(multiple_outputs=False)  # one XCom (the dict), not one per key: each is an Execution API call
    def plan(params=None, logical_date=None, run_id=None) -> dict:
        """The run's references: the surfaces fmx_fm decided, checked against the lake (a manual trigger may
        name others; none given: every surface of ds)."""
        from features.stage import plan_surfaces

        run = dagkit.resolve_run(params, logical_date, run_id)
        with dagkit.bad_input_fails_at_once():
            return {**run, "surfaces": plan_surfaces(run["ds"], run["lake_uri"], run["surfaces"])}

    @task
    def grid(day: dict, axes: list[str]) -> list[dict]:
        """The mapped tasks' kwargs: one dict per combination of the day's lists (e.g. surface x variant)."""
        return dagkit.grid(day, axes)

    @task(multiple_outputs=False, map_index_template=dagkit.MAP_LABEL)
    def expert_examples(day: dict, surface: str, fm_preset: str) -> dict:
        from experts.stage import expert_examples as stage

        dagkit.label(surface, fm_preset)
        out = dagkit.timed(stage, ds=day["ds"], surface=surface, lake_uri=day["lake_uri"], fm_preset=fm_preset)
        return {**out, "ds": day["ds"], "surface": surface, "fm_preset": fm_preset}

    @task(pool=dagkit.TRAINING_POOL, execution_timeout=dagkit.TRAIN_TIMEOUT, multiple_outputs=False,
          map_index_template=dagkit.MAP_LABEL)
    def expert_train(day: dict, surface: str, variant: str, fm_preset: str) -> dict:
        from experts.stage import expert_train as stage

        dagkit.label(surface, variant, fm_preset)
        out = dagkit.timed(stage, surface=surface, variant=variant, fm_preset=fm_preset, **dagkit.refs(day))
        return {**out, "ds": day["ds"], "surface": surface, "variant": variant, "fm_preset": fm_preset}

    @task(multiple_outputs=False, map_index_template=dagkit.MAP_LABEL)
    def reference(day: dict, surface: str, fm_preset: str) -> dict:
        """The counting reference (variant `ref`) scored on the same rows: the bar every model must clear."""
        from experts.reference import reference_eval as stage

        dagkit.label(surface, fm_preset)
        out = dagkit.timed(stage, surface=surface, fm_preset=fm_preset, **dagkit.refs(day))
        return {**out, "ds": day["ds"], "surface": surface, "fm_preset": fm_preset}

    @task(multiple_outputs=False, map_index_template=dagkit.MAP_LABEL)
    def compare_and_promote(day: dict, surface: str, fm_preset: str) -> dict:
        from experts.stage import compare_and_promote as stage

        dagkit.label(surface, fm_preset)
        out = dagkit.timed(stage, surface=surface, fm_preset=fm_preset, **dagkit.refs(day))
        return {**out, "ds": day["ds"], "surface": surface, "fm_preset": fm_preset}

    day = plan()
    per_surface = grid.override(task_id="per_surface")(day, ["surface", "fm_preset"])
    per_model = grid.override(task_id="per_model")(day, ["surface", "variant", "fm_preset"])
    examples = expert_examples.partial(day=day).expand_kwargs(per_surface)
    trained = expert_train.partial(day=day).expand_kwargs(per_model)
    refs = reference.partial(day=day).expand_kwargs(per_surface)
    [examples >> trained, refs] >> compare_and_promote.partial(day=day).expand_kwargs(per_surface)


fmx_experts()
