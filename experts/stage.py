"""Stage wrappers for the experts (called by DAG tasks, CLI commands and tests): references in, a small dict out.

Each takes plain references (ds, lake URI, surface, variant and FM preset names — together an
experts.config.ExpertKey —, pipeline run id) and returns a strict-JSON dict (common.jsonsafe). Documented
skips (``{"skipped": reason}``): the FM has not scored any window up to ds yet (its first window: nothing to
join). Errors: expert_examples(ds) missing after the FM's first scores (experts.data.ExamplesMissing: only
`expert_examples` writes that table; the message names the command), missing FM outputs for a day the FM
should have scored, an FM version mismatch or lineage break, an empty surface, a surface the FM did not
score — see features.expert_examples / experts.lineage.

- `expert_examples`: writes expert_examples(fm=preset, ds, surface) (features.expert_examples).
- `expert_train`: the day of one expert (experts.train.train_day: progressive eval on ds with the model
  trained through a day before ds, then warm-start training on ds), recorded in its MLflow run
  (experts.progressive: train_run, log_train), then the lineage run of (preset, surface, variant)
  (common.lineage_runs). Trains with one torch thread.
- `compare_and_promote` lives in experts.promotion (re-exported here for the DAG and the CLI).
"""

from __future__ import annotations

from typing import Any

from common.jsonsafe import strict_json
from common.threads import torch_threads
from experts.config import VARIANTS, ExpertConfig, ExpertKey
from experts.data import fm_started
from experts.progressive import log_train, train_run
from experts.promotion import compare_and_promote
from experts.train import train_day
from features.expert_examples import build_expert_examples
from features.lake import Lake
from features.schemas import EVENT_ID, EXPERT_EXAMPLES

__all__ = ["VARIANTS", "compare_and_promote", "expert_examples", "expert_train"]


def expert_examples(ds: str, surface: str, lake_uri: str, fm_preset: str = "small") -> dict:
    """Write expert_examples(fm=fm_preset, ds, surface) (plus any missing loop_state); rows and path."""
    lake = Lake(lake_uri)
    window = lake.window(ds)
    if not fm_started(lake, fm_preset, window):
        return {"ds": ds, "surface": surface, "skipped": f"FM {fm_preset!r} has scored no window up to {ds}"}
    path = build_expert_examples(lake, window, surface, fm_preset, ExpertConfig().history_length)
    rows = lake.read(EXPERT_EXAMPLES.name, columns=[EVENT_ID], fm=fm_preset, ds=ds, surface=surface).num_rows
    return strict_json({"ds": ds, "surface": surface, "fm": fm_preset, "rows": rows, "path": path})


def expert_train(ds: str, surface: str, variant: str, lake_uri: str, fm_preset: str = "small",
                 pipeline_run: str = "manual", rebaseline: bool = False,
                 overrides: dict[str, Any] | None = None) -> dict:
    """Progressive eval on ds (model trained through < ds), then warm-start training on ds.

    Returns {"ds", "surface", "variant", "fm_version", "metrics" (empty on a cold start), "loss",
    "checkpoint", "run_id"} or {"skipped": reason}. A warm start keeps the checkpoint's config
    (`overrides` apply to a cold start only).
    """
    with torch_threads(1):  # the expert's layers are too small to gain from more
        return train_expert(ExpertKey(ds, surface, variant, fm_preset), Lake(lake_uri), pipeline_run, rebaseline,
                            overrides)


def train_expert(key: ExpertKey, lake: Lake, pipeline_run: str, rebaseline: bool = False,
                 overrides: dict[str, Any] | None = None) -> dict:
    """`expert_train` on a typed key: the day's work inside its MLflow run, then the lineage run."""
    from common.lineage_runs import sync as sync_lineage

    if not fm_started(lake, key.preset, lake.window(key.ds)):
        return {"ds": key.ds, "surface": key.surface, "variant": key.variant,
                "skipped": f"FM {key.preset!r} has scored nothing yet"}
    cfg = ExpertConfig(variant=key.variant).with_overrides(**(overrides or {}))
    if cfg.variant != key.variant:
        raise ValueError(f"overrides cannot change the variant of expert {key.name} (got {cfg.variant!r})")
    with train_run(key, pipeline_run) as run:  # a failure inside ends the run FAILED with the error
        day = train_day(lake, key, cfg, rebaseline)
        log_train(lake, day, rebaseline)
    sync_lineage(key.preset, key.surface, key.variant, lake.steps())  # the day run is FINISHED: add it to the trend
    return strict_json({**day.summary(), "run_id": str(run.info.run_id)})
