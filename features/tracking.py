"""MLflow conventions shared by every stage wrapper: where the store is, and the run tree.

Run tree: one parent run per (pipeline run, window) — tagged ``fmx.pipeline_run`` and ``ds`` — and one
nested run per stage (FM export, FM training, each (surface, variant) expert). Stages run in separate
processes (Airflow tasks), so a stage finds or creates its parent by tags rather than holding it.

Defaults: tracking URI ``sqlite:///$FMX_HOME/mlflow.db`` and artifacts under ``$FMX_HOME/mlartifacts``
(absolute, so a task's cwd does not matter); `MLFLOW_TRACKING_URI` overrides the store.

Metric keys are exactly `METRIC_KEYS`; every run carries the tags in `REQUIRED_TAGS`.
Only stage wrappers and loggers call this module — never model or loss code.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "fmx"
METRIC_KEYS = ("auc", "logloss", "ne", "calibration", "gap_closure", "transfer_ratio")
REQUIRED_TAGS = ("ds", "surface", "variant", "fm_version")
PIPELINE_RUN_TAG = "fmx.pipeline_run"


def fmx_home() -> Path:
    return Path(os.environ.get("FMX_HOME", ".fmx")).absolute()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{fmx_home() / 'mlflow.db'}"


def setup(experiment: str = EXPERIMENT) -> str:
    """Point mlflow at the store and make sure the experiment exists; return its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifacts = fmx_home() / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    try:
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # created concurrently by another task
        exp_id = mlflow.get_experiment_by_name(experiment).experiment_id  # type: ignore[union-attr]
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parent_run_id(pipeline_run: str, ds: str, experiment: str = EXPERIMENT) -> str:
    """The id of the parent run for (pipeline run, window), created on first use."""
    import mlflow

    exp_id = setup(experiment)
    filter_string = f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run}' and tags.ds = '{ds}' and tags.`fmx.kind` = 'day'"
    found = mlflow.search_runs([exp_id], filter_string=filter_string, output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(
        exp_id,
        run_name=f"{pipeline_run}/{ds}",
        tags={PIPELINE_RUN_TAG: pipeline_run, "ds": ds, "fmx.kind": "day", "git_sha": git_sha()},
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextmanager
def stage_run(
    name: str,
    *,
    pipeline_run: str,
    ds: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    experiment: str = EXPERIMENT,
) -> Iterator[Any]:
    """A nested MLflow run for one stage under the (pipeline run, ds) parent; yields the active run."""
    import mlflow

    parent = parent_run_id(pipeline_run, ds, experiment)
    all_tags = {
        "ds": ds,
        PIPELINE_RUN_TAG: pipeline_run,
        "orchestrator_run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID", pipeline_run),
        "git_sha": git_sha(),
        "fmx.kind": "stage",
        **tags,
    }
    with mlflow.start_run(run_name=name, parent_run_id=parent, nested=True, tags=all_tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield run
