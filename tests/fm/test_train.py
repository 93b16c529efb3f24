"""Warm start, version chain, missing-predecessor error, and kill-and-resume bit-for-bit."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess

import pytest
import torch

from common.ema import serving_weights
from features.lake import Lake
from fm import checkpoint, versions
from fm.data import load_window
from fm.model import FMBundle
from fm.train import run_training, train_fm
from tests.fm.conftest import PYTHON, TINY, make_lake, overrides_args, subprocess_env, tiny_cfg


def test_warm_start_and_version_chain(lake_uri: str) -> None:
    w1, w2, w3 = make_lake(lake_uri, 3, events_per_day=300)
    lake = Lake(lake_uri)
    cfg = tiny_cfg(ema_decay=0.0)  # serve the last iterate, so "same weights" below means the same version
    v1 = train_fm(cfg, w1, lake)
    assert v1.startswith(f"small-{w1.ds}-")
    with pytest.raises(FileNotFoundError, match="cannot warm-start"):
        train_fm(cfg, w3, lake)  # day 2's FM is missing
    # lr = 0: day 2 changes nothing, so its weights must be exactly day 1's (proves the warm start).
    frozen = run_training(tiny_cfg(lr=0.0, ae_lr=0.0, ema_decay=0.0), w2, lake)
    assert frozen.parent == v1
    day1 = checkpoint.load(lake, "small", w1.ds, "final")["model"]
    day2 = checkpoint.load(lake, "small", w2.ds, "final")["model"]
    assert all(torch.equal(day1[k], day2[k]) for k in day1)
    assert frozen.fm_version.split("-")[-1] == v1.split("-")[-1]  # same weights, same hash
    v2 = train_fm(cfg, w2, lake)
    v3 = train_fm(cfg, w3, lake)
    index = versions.read_versions(lake, "small")
    assert [index[w.ds]["parent"] for w in (w1, w2, w3)] == [None, v1, v2]
    assert index[w3.ds]["fm_version"] == v3
    assert not lake.file_exists(checkpoint.relpath("small", w3.ds, "progress"))
    assert train_fm(cfg, w3, lake) == v3  # deterministic re-run



def test_emb_lr_moves_only_the_embedding_tables(lake_uri: str) -> None:
    w1, w2 = make_lake(lake_uri, 2, events_per_day=300)
    lake = Lake(lake_uri)
    train_fm(tiny_cfg(ema_decay=0.0), w1, lake)
    run_training(tiny_cfg(ema_decay=0.0, emb_lr=0.0), w2, lake)  # today's rates apply to a warm start
    day1, day2 = (checkpoint.load(lake, "small", w.ds, "final")["model"] for w in (w1, w2))
    tables = {f"fm.{name}.weight" for name, m in FMBundle(tiny_cfg()).fm.named_modules()
              if isinstance(m, torch.nn.Embedding)}
    assert tables and tables <= set(day1)
    assert all(torch.equal(day1[k], day2[k]) for k in tables)
    assert not all(torch.equal(day1[k], day2[k]) for k in set(day1) - tables)  # the rest trained at lr

def _train_cmd(lake_uri: str, ds: str, overrides: dict) -> list[str]:
    return [PYTHON, "-m", "fm.train", "--ds", ds, "--lake", lake_uri, "--threads", "1", *overrides_args(overrides)]


def test_sigkill_then_resume_is_bit_identical(tmp_path, lake_uri: str) -> None:
    (w1,) = make_lake(lake_uri, 1, events_per_day=2000)
    reference = str(tmp_path / "reference")
    shutil.copytree(lake_uri, reference)
    overrides = {**TINY, "batch_size": 8, "ckpt_every": 5}  # 250 steps, a checkpoint every 5
    cmd = _train_cmd(lake_uri, w1.ds, overrides)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    killed_after = None
    for line in proc.stderr:  # type: ignore[union-attr]
        if "checkpoint step=" in line:
            killed_after = int(line.rsplit("=", 1)[1])
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and killed_after is not None
    lake = Lake(lake_uri)
    assert not lake.file_exists(checkpoint.relpath("small", w1.ds, "final"))
    assert lake.file_exists(checkpoint.relpath("small", w1.ds, "progress"))
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), check=True)
    assert "resuming from step" in resumed.stderr
    subprocess.run(_train_cmd(reference, w1.ds, overrides), capture_output=True, env=subprocess_env(), check=True)
    a = checkpoint.load(lake, "small", w1.ds, "final")
    b = checkpoint.load(Lake(reference), "small", w1.ds, "final")
    assert a["fm_version"] == b["fm_version"] == resumed.stdout.strip()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == a["n_steps"]
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in b["ema"]["weights"])
    ea, eb = a["opt_fm"]["state"], b["opt_fm"]["state"]
    assert all(torch.equal(ea[i]["exp_avg_sq"], eb[i]["exp_avg_sq"]) for i in eb)


def test_serving_weights_are_the_ema_of_the_trained_ones(lake_uri: str) -> None:
    w1, w2 = make_lake(lake_uri, 2, events_per_day=300)
    lake = Lake(lake_uri)
    v1 = train_fm(tiny_cfg(batch_size=16), w1, lake)
    state = checkpoint.load(lake, "small", w1.ds, "final")
    served, live = serving_weights(state), state["model"]
    assert set(served) == set(live)
    assert any(not torch.equal(served[k], live[k]) for k in live)  # the average lags the last iterate
    bundle = FMBundle(tiny_cfg())
    bundle.load_state_dict(served)
    assert v1 == checkpoint.fm_version("small", w1.ds, bundle)  # the version names what is served
    # a second window continues the same average (its update count carries over), from the raw weights
    train_fm(tiny_cfg(batch_size=16), w2, lake)
    day2 = checkpoint.load(lake, "small", w2.ds, "final")
    steps = [math.ceil(len(load_window(lake, w, tiny_cfg())) / 16) for w in (w1, w2)]
    assert state["ema"]["updates"] == steps[0] and day2["ema"]["updates"] == sum(steps)


def test_torch_threads_is_applied_and_restored() -> None:
    from common.threads import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: leave torch's setting alone
        assert torch.get_num_threads() == before
