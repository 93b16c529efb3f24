"""Scale-out, run for real on one machine: the DAGs on Airflow's CeleryExecutor (Redis broker, PostgreSQL
metadata, two Celery worker processes), the lake on an S3-compatible server (moto), and one day's FM training
under torchrun as two nodes (two launchers, c10d rendezvous on 127.0.0.1) through the `fm_nproc` path.

Redis and PostgreSQL come from Debian's packages (infra/ci-setup.sh); the tests skip, saying so, only when
their binaries are absent.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from features.lake import Lake
from fm import checkpoint, launch
from tests.fm.conftest import TINY, make_lake, overrides_args, subprocess_env

pytestmark = pytest.mark.e2e


def test_two_torchrun_nodes_match_one_process(tmp_path) -> None:
    """fm.launch with 2 nodes x 1 process: each worker reports world 2 over 2 nodes, and the weights equal the
    single-process run's within float tolerance (as tests/fm/test_ddp.py checks for one node)."""
    lake_uri = str(tmp_path / "lake")
    (w1,) = make_lake(lake_uri, 1, events_per_day=600)
    single = str(tmp_path / "single")
    shutil.copytree(lake_uri, single)
    overrides = {**TINY, "batch_size": 50, "shuffle_rows": 32, "shuffle_buffer": 2}
    args = ["--ds", w1.ds, "--threads", "1", *overrides_args(overrides)]
    env = subprocess_env()
    subprocess.run([sys.executable, "-m", "fm.train", *args, "--lake", single], check=True,
                   capture_output=True, env=env)  # fmt: skip
    ran = launch.run_torchrun([*args, "--lake", lake_uri], nproc=2, nnodes=2, env=env)
    assert [(w["rank"], w["node"], w["world"], w["nodes"]) for w in ran.workers] == [(0, 0, 2, 2), (1, 1, 2, 2)]
    a = checkpoint.load(Lake(lake_uri), "small", w1.ds, "final")["model"]
    b = checkpoint.load(Lake(single), "small", w1.ds, "final")["model"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in b), f"max abs diff {worst}"


def test_nproc_must_split_over_the_nodes() -> None:
    with pytest.raises(ValueError, match="does not split evenly over 2 torchrun node"):
        launch.commands(["--ds", "2026-01-01"], nproc=3, nnodes=2)
