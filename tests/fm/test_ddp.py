"""torchrun --nproc_per_node=2 (gloo, CPU) gives the single-process weights within float tolerance."""

from __future__ import annotations

import shutil
import subprocess

import torch

from features.lake import Lake
from fm import checkpoint
from tests.fm.conftest import PYTHON, TINY, make_lake, overrides_args, subprocess_env


def test_two_process_ddp_matches_single_process(tmp_path, lake_uri: str) -> None:
    (w1,) = make_lake(lake_uri, 1, events_per_day=600)
    single = str(tmp_path / "single")
    shutil.copytree(lake_uri, single)
    # 12 steps, last batch odd-sized; 19 cache groups of 32 rows over 4 shards: shards differ in size
    overrides = {**TINY, "batch_size": 50, "shuffle_rows": 32, "shuffle_buffer": 2}
    args = ["-m", "fm.train", "--ds", w1.ds, "--threads", "1", *overrides_args(overrides)]
    env = subprocess_env()
    subprocess.run([PYTHON, *args, "--lake", single], check=True, capture_output=True, env=env)
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--lake", lake_uri], capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = checkpoint.load(Lake(lake_uri), "small", w1.ds, "final")["model"]
    b = checkpoint.load(Lake(single), "small", w1.ds, "final")["model"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in b), f"max abs diff {worst}"
