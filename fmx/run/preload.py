"""What a process that is about to run fmx tasks imports ahead of them, once.

A task's own first imports of torch, polars, MLflow and the stage modules cost seconds (~2 s torch, ~2 s
MLflow; STACK.md), and a process's first MLflow `log_model` builds MLflow's module -> package map (~3 s).
`fmx run`'s workers do it in the background while they wait for their first task (fmx.run.inprocess); `fmx up`'s
scheduler does it before it forks the LocalExecutor's workers, whose task processes are forks of them
(fmx.executor). Importing is all it does: no thread pool, DB connection or tracking client is created.
"""

from __future__ import annotations

import importlib

STAGE_MODULES = (
    "polars", "pyarrow.parquet", "torch", "mlflow", "features.stage", "fm.stage", "experts.stage",
    "experts.reference",
)  # fmt: skip


def preload() -> list[str]:
    """Import STAGE_MODULES and fill MLflow's module -> package map; returns the modules that failed to
    import (a failure here only means a task pays for that import itself, and raises there)."""
    failed = []
    for name in STAGE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            failed.append(name)
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception:  # noqa: BLE001 - a private helper of MLflow: a warm-up only, never required
        pass
    return failed
