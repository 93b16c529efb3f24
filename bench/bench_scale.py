"""Peak memory and wall time per stage as events per day grow (issue 12: windows larger than memory).

    .venv/bin/python bench/bench_scale.py [--sizes 0.1M,1M,4M,10M] [--workdir DIR] [--keep]

For each size N (events per day) a fresh lake gets two generated days of N events (the generator refuses
to mix sizes in one lake); day 1 is ingested and trains FM_1 (setup). Each stage then runs on day 2
in its own subprocess (this script with --child), which reports its peak RSS (getrusage(RUSAGE_SELF)
.ru_maxrss: the whole process, imports included) and its wall time:

  generate   features.generate.generate_window(day 2) (setup; not a target of the issue)
  ingest     features.stage.ingest(day 2, source=lake): validation, user_history, counter_state
  fm_export  fm.export.export_fm(day 2) with FM_{day 1}
  fm_train   fm.train.run_training(day 2), the configured (streaming) path; examples/s of the training loop
  fm_train_mem  the same on the in-memory path (FMConfig.stream=False), at 1M only: the ratio's baseline
  examples   features.expert_examples.build_expert_examples(day 2, feed)
  expert     experts.stage.expert_train(day 2, feed, base) (MLflow in a temporary sqlite store)

Prints one table row per (size, stage): peak RSS MB, wall s, events/s (N / wall), and for fm_train the
training loop's examples/s; then the issue's targets (RSS at the largest size vs the smallest, <= 3 GB,
training ratio, wall time per event from 1M to the largest size) as held / missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generate", "ingest", "fm_export", "fm_train", "fm_train_mem", "examples", "expert")
DAY1, DAY2 = date(2026, 1, 1), date(2026, 1, 2)


def parse_size(text: str) -> int:
    """'0.1M' -> 100000, '250k' -> 250000, '5000' -> 5000."""
    text = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "km" else text
    try:
        return int(float(number) * mult)
    except ValueError:
        raise SystemExit(f"bad size {text!r}: use e.g. 0.1M, 250k or 5000") from None


# ---- child: one stage in this process ----------------------------------------------------------------


def _generate(lake_uri: str, n: int, day: date) -> dict[str, Any]:
    from features.generate import GeneratorConfig, generate_window
    from features.lake import Lake
    from features.windows import Window

    lake = Lake(lake_uri)
    generate_window(lake, GeneratorConfig(scale="small", events_per_day=n), Window(day))
    return {}


def _fm_cfg(lake_uri: str, **overrides: Any) -> Any:
    from features.lake import Lake
    from fm.config import lake_config

    return lake_config("small", Lake(lake_uri).meta(), **overrides)


def run_stage(stage: str, lake_uri: str, n: int) -> dict[str, Any]:
    """Run one stage on day 2 (or a setup step on day 1) in this process; extra numbers to report."""
    from features.lake import Lake

    lake = Lake(lake_uri)
    if stage in ("generate1", "generate"):
        return _generate(lake_uri, n, DAY1 if stage == "generate1" else DAY2)
    ds = (DAY1 if stage.endswith("1") else DAY2).isoformat()
    if stage in ("ingest", "ingest1"):
        from features.stage import ingest

        ingest(ds, lake_uri, source="lake")
        return {}
    if stage in ("fm_train", "fm_train1", "fm_train_mem"):
        from fm.train import run_training

        cfg = _fm_cfg(lake_uri)
        cfg = replace(cfg, stream=False) if stage == "fm_train_mem" else cfg
        res = run_training(cfg, lake.window(ds), lake, cold_start=stage == "fm_train1")
        return {"examples_per_s": res.examples / max(res.seconds, 1e-9), "examples": res.examples}
    if stage == "fm_export":
        from fm.export import export_fm

        export_fm(_fm_cfg(lake_uri), lake.window(ds), lake)
        return {}
    if stage == "examples":
        from features.expert_examples import build_expert_examples

        build_expert_examples(lake, lake.window(ds), "feed", "small")
        return {}
    if stage == "expert":
        from experts.stage import expert_train

        expert_train(ds, "feed", "base", lake_uri)
        return {}
    raise SystemExit(f"unknown stage {stage!r}")


def child(stage: str, lake_uri: str, n: int) -> None:
    t0 = time.perf_counter()
    extra = run_stage(stage, lake_uri, n)
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("BENCH " + json.dumps({"stage": stage, "rss_mb": rss_mb, "seconds": seconds, **extra}), flush=True)


# ---- parent ----------------------------------------------------------------------------------------


def spawn(stage: str, lake_uri: str, n: int, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--lake", lake_uri, "--n", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"stage": stage, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("BENCH "):])


def run_size(n: int, workdir: Path, with_mem: bool) -> list[dict[str, Any]]:
    lake_uri = str(workdir / f"lake-{n}")
    shutil.rmtree(lake_uri, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / f'mlflow-{n}.db'}", "FMX_HOME": str(workdir / "home")}
    for setup in ("generate1", "ingest1", "fm_train1"):
        got = spawn(setup, lake_uri, n, env)
        if "error" in got:
            return [{"size": n, **got}]
    rows = []
    for stage in STAGES:
        if stage == "fm_train_mem" and not with_mem:
            continue
        got = spawn(stage, lake_uri, n, env)
        rows.append({"size": n, **got})
        print(fmt_row(rows[-1]), flush=True)
    if not ARGS.keep:
        shutil.rmtree(lake_uri, ignore_errors=True)
    return rows


def fmt_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['size']:>10,} | {r['stage']:<12} | failed: {r['error'][:90]} |"
    eps = f"{r['examples_per_s']:,.0f}" if "examples_per_s" in r else ""
    return (f"| {r['size']:>10,} | {r['stage']:<12} | {r['rss_mb']:>8,.0f} | {r['seconds']:>8.1f} | "
            f"{r['size'] / max(r['seconds'], 1e-9):>10,.0f} | {eps:>10} |")


HEADER = ("| events/day | stage        | peak RSS MB |   wall s |   events/s | train ex/s |\n"
          "|-----------:|--------------|---------:|---------:|-----------:|-----------:|")


def targets(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if "error" not in r and r["stage"] != "generate"]
    sizes = sorted({r["size"] for r in ok})
    if not sizes:
        return []
    peak = {n: max(r["rss_mb"] for r in ok if r["size"] == n and r["stage"] != "fm_train_mem") for n in sizes}
    lo, hi = sizes[0], sizes[-1]
    out = [f"peak RSS at {hi:,} = {peak[hi]:,.0f} MB vs {peak[lo]:,.0f} MB at {lo:,}: x{peak[hi] / peak[lo]:.2f} "
           f"(target <= 1.25): {'held' if peak[hi] <= 1.25 * peak[lo] else 'missed'}",
           f"peak RSS per process <= 3 GB: {'held' if peak[hi] <= 3072 else 'missed'} ({peak[hi]:,.0f} MB)"]
    train = {(r["size"], r["stage"]): r.get("examples_per_s") for r in ok}
    for n in sizes:
        if train.get((n, "fm_train_mem")) and train.get((n, "fm_train")):
            ratio = train[(n, "fm_train")] / train[(n, "fm_train_mem")]
            out.append(f"training examples/s streaming / in-memory at {n:,}: {ratio:.2f} (target >= 0.9): "
                       f"{'held' if ratio >= 0.9 else 'missed'}")
    big = [n for n in sizes if n >= 1_000_000]
    if len(big) >= 2:
        for stage in ("ingest", "fm_export", "fm_train", "examples", "expert"):
            per = {n: r["seconds"] / n for r in ok for n in [r["size"]] if r["stage"] == stage and n in big}
            if len(per) == len(big):
                ratio = per[big[-1]] / per[big[0]]
                out.append(f"wall s per event {stage} {big[-1]:,} vs {big[0]:,}: x{ratio:.2f} (target within 1.2): "
                           f"{'held' if 1 / 1.2 <= ratio <= 1.2 else 'missed'}")
    return out


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.1M,1M,4M,10M", help="comma-separated events/day (0.1M, 250k, 5000)")
    p.add_argument("--mem-at", default="1M", help="size at which the in-memory training baseline also runs")
    p.add_argument("--workdir", default=None, help="where the lakes go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep each size's lake")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lake", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ARGS = p.parse_args()
    if ARGS.child:
        child(ARGS.child, ARGS.lake, ARGS.n)
        return
    sizes = [parse_size(s) for s in ARGS.sizes.split(",") if s.strip()]
    workdir = Path(ARGS.workdir or tempfile.mkdtemp(prefix="fmx-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    rows = []
    for n in sizes:
        rows += run_size(n, workdir, with_mem=n == parse_size(ARGS.mem_at))
    print()
    print(HEADER)
    for r in rows:
        print(fmt_row(r))
    for line in targets(rows):
        print("- " + line)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
