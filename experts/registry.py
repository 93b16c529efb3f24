"""MLflow side of the experts: model logging, finding runs by tags, the per-surface registered model.

Registered model per (surface, FM preset): ``fmx-expert-<surface>-<preset>`` (an expert fed by another
FM preset is another lineage). Aliases: ``champion`` (the serving model) and ``challenger`` (the best
challenger of the last comparison). A model version carries tags variant, trained_through, fm_preset,
fm_version and checkpoint (the lake path of the same weights, which `compare_and_promote` loads to
score the champion). Only stage wrappers call this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
import torch

from experts.data import ExpertData
from experts.model import Expert

STAGE_TAG = "fmx.stage"
TRAIN_STAGE = "expert_train"
PROMOTE_STAGE = "expert_promote"


def registered_name(surface: str, preset: str) -> str:
    return f"fmx-expert-{surface}-{preset}"


def log_model(model: Expert, data: ExpertData) -> str:
    """Log the expert (pickle format, explicit signature and requirements: no slow inference); its URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    idx = torch.arange(min(len(data), 4))
    example = {k: v.numpy() for k, v in data.batch(idx).items()}
    with torch.no_grad():
        out = torch.sigmoid(model(data.batch(idx))["logit"]).numpy()
    # pickle format: the dict-of-tensors input does not export to pt2; the class is importable (experts.model)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, out),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        serialization_format="pickle",
    )
    return str(info.model_uri)


def find_train_run(ds: str, surface: str, variant: str, preset: str) -> Any | None:
    """The newest expert_train run for (ds, surface, variant, fm preset), or None."""
    import mlflow

    from common.tracking import setup

    exp_id = setup()
    flt = (f"tags.`{STAGE_TAG}` = '{TRAIN_STAGE}' and tags.ds = '{ds}' and tags.surface = '{surface}' "
           f"and tags.variant = '{variant}' and tags.fm_preset = '{preset}'")
    runs = mlflow.search_runs([exp_id], filter_string=flt, output_format="list", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def champion(surface: str, preset: str) -> Any | None:
    """The model version aliased champion for (surface, preset), or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(registered_name(surface, preset), "champion")
    except MlflowException:
        return None


def register(model_uri: str, surface: str, preset: str, tags: dict[str, str], aliases: list[str]) -> str:
    """Register `model_uri` as a new version of the surface's model, set `aliases`; the version number."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name = registered_name(surface, preset)
    try:
        client.create_registered_model(name, tags={"surface": surface, "fm_preset": preset})
    except MlflowException:
        pass  # already registered
    with contextlib.redirect_stderr(io.StringIO()):  # its "already exists / Created version" chatter, per call
        version = mlflow.register_model(model_uri, name, tags=tags).version
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return str(version)
