"""What a process that is about to run fmx tasks imports ahead of them, once.

A task's own first imports of torch, polars, MLflow and the stage modules cost seconds (~1.3 s torch, ~0.6 s
MLflow; STACK.md), and a process's first MLflow `log_model` builds MLflow's module -> package map (~0.6 s).
A torch optimizer's first step or construction imports torch._dynamo (`TRAINING_MODULES`): measured on the
expert stage at 1M events/day, 37.3 -> 32.3 s with it imported beforehand (~1 s on its own after torch, the
rest its first use), paid once per process instead of by the first training task of each.
`fmx up`'s scheduler imports them all before it forks the LocalExecutor's workers, whose task processes are
forks of them (fmx.servers.executor). `fmx run`'s forkserver imports only FIRST_TASK_MODULES, what a day's first
tasks (plan, ingest) need, so that its workers start ~2.5 s sooner; each worker imports the rest in a
background thread while those tasks run (fmx.run.inprocess). Importing is all it does: no thread pool, DB
connection or tracking client is created.
"""

from __future__ import annotations

import importlib

FIRST_TASK_MODULES = ("polars", "pyarrow.parquet", "features.stage")  # plan and ingest: no torch, no MLflow
TRAINING_MODULES = ("torch", "torch._dynamo")  # torch.optim imports torch._dynamo when first used
STAGE_MODULES = (*FIRST_TASK_MODULES, *TRAINING_MODULES, "mlflow", "fm.stage", "experts.stage", "experts.reference")


def preload(modules: tuple[str, ...] = STAGE_MODULES) -> list[str]:
    """Import `modules` and, with MLflow among them, fill MLflow's module -> package map; returns the modules
    that failed to import (a failure here only means a task pays for that import itself, and raises there)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            failed.append(name)
    if "mlflow" not in modules:
        return failed
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception:  # noqa: BLE001 - a private helper of MLflow: a warm-up only, never required
        pass
    return failed
