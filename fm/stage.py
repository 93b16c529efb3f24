"""FM stage wrappers: plain references in, a small JSON-able dict out, MLflow logging here and only here.

- `fm_export(ds, lake_uri, preset, pipeline_run)`: fm.export.export_fm for window ds (FM_{ds-1}); one
  nested MLflow run "fm_export" (tags surface="all", variant="fm", fm_version, fm_preset) with one child
  run per surface (tag surface=<s>) holding that surface's progressive metrics under the exact keys
  auc, logloss, ne, calibration, at step = window index since the lake's origin; then each surface's
  lineage run ``lineage/<preset>/<surface>/fm`` (common.lineage_runs, its NE & co. by day). Returns
  {"fm_version", "ds", "metrics": {surface: {...}}, "rows": {surface: n}, "base_rates", "compression",
  "skipped"}; on the lake's first window fm_version is None and skipped says why (nothing written).
Both build the FMConfig from the preset and the lake's meta surfaces (fm.config.lake_config), so an imported
lake (e.g. MovieLens genres as surfaces) gets its own heads; the checkpoint stores them and a warm start or
export on a lake with other surfaces fails with a clear ValueError.

- `fm_train(ds, lake_uri, preset, pipeline_run)`: fm.train.train_fm; nested run "fm_train" with params =
  the resolved FMConfig, metrics train_loss / examples_per_s (progress diagnostics, not evaluation
  metrics), tags fm_version / fm_parent, and the final checkpoint file as an artifact
  (mlflow.log_artifact, not mlflow.pytorch.log_model: the checkpoint is what warm starts and exports
  read, and log_model costs seconds per call). Returns {"fm_version", "parent", "ds", "steps", "examples"}.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from common.lineage_runs import sync as sync_lineage
from common.tracking import stage_run
from features.lake import Lake
from fm import checkpoint, launch
from fm.config import lake_config
from fm.export import BASE_RATE_SOURCE, export_fm
from fm.train import TrainResult, run_training


def fm_export(ds: str, lake_uri: str, fm_preset: str = "small", pipeline_run: str = "manual") -> dict[str, Any]:
    import mlflow

    lake = Lake(lake_uri)
    cfg = lake_config(fm_preset, lake.meta())  # heads = the lake's surfaces
    tags = {"surface": "all", "variant": "fm", "fm_version": "pending", "fm_preset": fm_preset}
    # the export runs inside its MLflow run: a failure ends it FAILED with the error (and a duplicate is refused first)
    with stage_run("fm_export", pipeline_run=pipeline_run, ds=ds, tags=tags, params={"fm_preset": fm_preset}):
        res = export_fm(cfg, lake.window(ds), lake)
        tags["fm_version"] = res.fm_version or "none"
        mlflow.set_tag("fm_version", tags["fm_version"])
        if res.skipped:
            mlflow.set_tag("skipped", res.skipped)
        step = lake.step(lake.window(ds))
        mlflow.log_metrics(res.compression, step=step)
        for surface, metrics in res.metrics.items():
            child_tags = {**tags, "ds": ds, "surface": surface, "base_rate_source": BASE_RATE_SOURCE}
            with mlflow.start_run(run_name=f"fm_export/{surface}", nested=True, tags=child_tags):
                mlflow.log_metrics({k: v for k, v in metrics.items() if v == v}, step=step)  # drop NaN
                mlflow.log_metric("base_rate", res.base_rates[surface], step=step)
    for surface in res.metrics:  # the stage run is FINISHED: each surface's day joins the FM's trend
        sync_lineage(fm_preset, surface, "fm", lake.steps())
    return {"fm_version": res.fm_version, "ds": ds, "metrics": res.metrics, "rows": res.rows,
            "base_rates": res.base_rates, "base_rate_source": BASE_RATE_SOURCE, "compression": res.compression,
            "skipped": res.skipped}


def fm_train(ds: str, lake_uri: str, fm_preset: str = "small", pipeline_run: str = "manual",
             cold_start: bool = False, nproc: int = 1) -> dict[str, Any]:
    """Train FM_ds. nproc > 1 launches the same entry point under torchrun (DDP) as child processes."""
    import mlflow

    lake = Lake(lake_uri)
    cfg = lake_config(fm_preset, lake.meta())  # heads = the lake's surfaces; a different set than the parent's fails
    tags = {"surface": "all", "variant": "fm", "fm_version": "pending", "fm_preset": fm_preset, "nproc": str(nproc)}
    with stage_run("fm_train", pipeline_run=pipeline_run, ds=ds, tags=tags, params=cfg.to_dict()):
        if nproc > 1:
            res = _train_under_torchrun(lake, ds, fm_preset, cold_start, nproc)
        else:
            res = run_training(cfg, lake.window(ds), lake, cold_start=cold_start)
        mlflow.set_tags({"fm_version": res.fm_version, "fm_parent": res.parent or "none"})
        step = lake.step(lake.window(ds))
        mlflow.log_metrics({"examples_per_s": res.examples / max(res.seconds, 1e-9), "train_loss": res.mean_loss},
                           step=step)
        _log_checkpoint(lake, fm_preset, ds)
    return {"fm_version": res.fm_version, "parent": res.parent, "ds": ds, "steps": res.steps,
            "examples": res.examples}


def _train_under_torchrun(lake: Lake, ds: str, preset: str, cold_start: bool, nproc: int) -> TrainResult:
    """Run `python -m fm.train` as `nproc` DDP processes under torchrun (fm.launch: gloo on CPU, nccl on GPU; over
    $FMX_FM_NNODES node launchers on this machine, default 1); the TrainResult rank 0 reported. Tags what ran:
    ddp_world_size and ddp_nodes from the workers' own reports."""
    import mlflow

    args = ["--ds", ds, "--lake", lake.uri, "--preset", preset] + (["--cold-start"] if cold_start else [])
    nnodes = launch.nnodes_from_env()
    try:
        ran = launch.run_torchrun(args, nproc, nnodes)
    except RuntimeError as exc:
        raise RuntimeError(f"FM training of {ds} under torchrun: {exc}") from None
    mlflow.set_tags({"ddp_world_size": str(ran.world), "ddp_nodes": str(ran.nodes)})
    return TrainResult(**ran.result)


def _log_checkpoint(lake: Lake, preset: str, ds: str) -> None:
    import mlflow

    rel = checkpoint.relpath(preset, ds, "final")
    if lake.is_local:
        mlflow.log_artifact(lake.path(rel), artifact_path="checkpoint")
        return
    with tempfile.TemporaryDirectory() as tmp:  # remote lake: copy the file down first
        local = os.path.join(tmp, "final.pt")
        with open(local, "wb") as f:
            f.write(lake.read_bytes(rel))
        mlflow.log_artifact(local, artifact_path="checkpoint")
