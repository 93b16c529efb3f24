"""Peak memory and wall time per stage as events per day grow (issue 12: windows larger than memory).

    .venv/bin/python bench/bench_scale.py [--sizes 0.1M,1M,4M,10M] [--workdir DIR] [--keep]

For each size N (events per day) a fresh lake gets two generated days of N events (the generator refuses
to mix sizes in one lake); day 1 is ingested and gives FM_1 (setup). FM_1 is trained on day 1 of the first
size only; the other sizes get a copy of it (`fm_copy1`): day 2's stages warm-start from / score with a model
of the same preset and shape either way, so they do the same work, and the setup at 10M saves a cold-start
training of ~20 minutes. Each stage then runs on day 2
in its own subprocess (this script with --child), which reports its peak RSS (getrusage(RUSAGE_SELF)
.ru_maxrss: the whole process, imports included) and its wall time, from after the stage's imports (a worker
of the product has them preloaded, fmx.run.preload: ~1-4 s a new interpreter pays once, not per event;
STAGE_IMPORTS), with the size's MLflow store created beforehand (setup: a job's store exists before its tasks):

  generate   features.generate.generate_window(day 2) (setup; not a target of the issue)
  ingest     features.stage.ingest(day 2, source=lake): validation, user_history, counter_state
  fm_export  fm.export.export_fm(day 2) with FM_{day 1}
  fm_train   fm.train.run_training(day 2), the configured (streaming) path; examples/s of the training loop
  fm_train_mem  the same on the in-memory path (FMConfig.stream=False), at 1M only: the ratio's baseline
  examples   features.expert_examples.build_expert_examples(day 2, feed)
  expert     experts.stage.expert_train(day 2, feed, base) (MLflow in the size's sqlite store in --workdir)

A stage whose run took under REPEAT_UNDER_S (60 s) runs REPEATS (3) times in fresh processes, and its row gives
the median wall and CPU seconds (marked "x3"; peak RSS: the largest): one run of ~30 s on this shared 2-core
machine varied by 16% (the expert at 1M: 28.5-33.2 s over five runs), near the 20% band the per-event verdict
tests, while a 10M run averages that noise over minutes. Neither generate (setup) nor fm_train repeats: fm_train
runs for minutes from 1M up, and a repeat at 0.1M would only lengthen a figure no per-event verdict reads.
`--repeat-all` repeats the long runs too (every repeatable stage, every size: the 10M stages triple their ~4-7
minutes each): a minutes-long run does not average this machine's noise out as assumed above. The expert at
10M took 259.4 and 195.1 s in two runs of the same work on the same lake at 0e77d75 (user CPU 194 and 153 s),
201.8-300.3 s over three at 73f5590.

Before each run the parent writes back the page cache's dirty pages (`os.sync()`): the kernel writes a file back
~30 s after it was written (vm.dirty_expire_centisecs 3000 here) unless it exceeds the background threshold,
so the last output of a stage (expert_examples at 1M: 476 MB) was written back inside the clock of the next
run, which a ~25 s stage at 1M pays in full and a ~4 minute one at 10M amortises.

`--keep` keeps each size's lake in --workdir; `--reuse --stages a,b` reruns only those stages on a kept lake.

Prints one table row per (size, stage): peak RSS MB, wall s, CPU s (user + system: the figure a shared,
noisy machine disturbs least), sys s (its kernel part: page faults, file writes into the page cache), events/s
(N / wall), and for fm_train the training loop's examples/s; then the issue's targets (RSS at the largest size
vs the smallest, <= 3 GB, training ratio, wall time per event from 1M to the largest size) as held / missed,
with user CPU per event beside them (CPU s less sys s: the stage's own code, without the kernel's share). On
this VM the kernel's share moves most: first-touched memory is slow to fault in (the expert at 1M: sys 13.7 and
22.7 s of 37-52 s in two runs, 0.6M page faults), and how much of it a run pays depends on the host's state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

from fmx.run.preload import TRAINING_MODULES

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generate", "ingest", "fm_export", "fm_train", "fm_train_mem", "examples", "expert")
REPEATABLE = ("ingest", "fm_export", "examples", "expert")  # a re-run on day 2 redoes the same work
REPEATS, REPEAT_UNDER_S = 3, 60.0
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


def copy_fm1(source_uri: str, lake_uri: str) -> None:
    """FM_1 of the lake at `source_uri` (final.pt and its versions.json entry) into the lake at `lake_uri`."""
    from features.lake import Lake
    from fm import checkpoint, versions

    src, dst = Lake(source_uri), Lake(lake_uri)
    rel = checkpoint.relpath("small", DAY1.isoformat(), "final")
    dst.write_bytes(rel, src.read_bytes(rel))
    entry = versions.read_versions(src, "small")[DAY1.isoformat()]
    versions.record_version(dst, "small", DAY1.isoformat(), {**entry, "path": dst.path(rel)})


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
    if stage == "tracking":  # setup: the MLflow store exists before a job (creating one is a migration)
        from common.tracking import setup

        setup()
        return {}
    if stage == "expert":
        from experts.stage import expert_train

        expert_train(ds, "feed", "base", lake_uri)
        return {}
    raise SystemExit(f"unknown stage {stage!r}")


# What each stage imports, loaded before its clock starts: a worker of `fmx run` or `fmx up` has them before its
# task (fmx.run.preload; the MLflow store's module after its first tracked task), ~1-4 s in a new interpreter,
# a cost per process, not per event. Only the stage's own: peak RSS stays that of what the stage needs.
STAGE_IMPORTS = {
    "ingest": ("features.stage",), "fm_export": ("fm.export",), "fm_train": ("fm.train", *TRAINING_MODULES),
    "fm_train_mem": ("fm.train", *TRAINING_MODULES), "examples": ("features.expert_examples",),
    "expert": ("experts.stage", "mlflow", "mlflow.store.tracking.sqlalchemy_store", *TRAINING_MODULES),
}


def child(stage: str, lake_uri: str, n: int) -> None:
    """One stage in this process, timed from after its imports (STAGE_IMPORTS); peak RSS is the whole
    process's, imports included."""
    from fmx.run.preload import preload

    preload(STAGE_IMPORTS.get(stage, ()))
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    extra = run_stage(stage, lake_uri, n)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    user, kernel = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime  # kernel: page faults, I/O, reclaim
    figures = {"stage": stage, "rss_mb": r1.ru_maxrss / 1024, "seconds": seconds, "cpu_s": user + kernel,
               "user_s": user, "sys_s": kernel, **extra}  # ru_maxrss: KiB on Linux
    print("BENCH " + json.dumps(figures), flush=True)


# ---- parent ----------------------------------------------------------------------------------------


def spawn(stage: str, lake_uri: str, n: int, env: dict[str, str]) -> dict[str, Any]:
    """Run `stage` in a child process (`child`), after writing back what earlier runs left dirty in the page
    cache (module docstring); its figures."""
    os.sync()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--lake", lake_uri, "--n", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"stage": stage, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("BENCH "):])


def measure(stage: str, lake_uri: str, n: int, env: dict[str, str]) -> dict[str, Any]:
    """One stage's figures: its run, or the median of REPEATS runs when it is short (module docstring)."""
    got = spawn(stage, lake_uri, n, env)
    if "error" in got or stage not in REPEATABLE or (got["seconds"] >= REPEAT_UNDER_S and not ARGS.repeat_all):
        return got
    runs = [got] + [spawn(stage, lake_uri, n, env) for _ in range(REPEATS - 1)]
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {**got, "runs": len(runs), "rss_mb": max(r["rss_mb"] for r in runs),
            **{k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu_s", "user_s", "sys_s")}}


def run_size(n: int, workdir: Path, with_mem: bool) -> list[dict[str, Any]]:
    lake_uri = str(workdir / f"lake-{n}")
    fm1_lake = workdir / "fm1-lake"  # FM_1 of the first size (see module docstring)
    reuse = ARGS.reuse and (Path(lake_uri) / "user_history" / f"ds={DAY2.isoformat()}").exists()
    if not reuse:
        shutil.rmtree(lake_uri, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / f'mlflow-{n}.db'}", "FMX_HOME": str(workdir / "home")}
    for setup in ("tracking",) if reuse else ("generate1", "ingest1", "tracking"):
        got = spawn(setup, lake_uri, n, env)
        if "error" in got:
            return [{"size": n, **got}]
    if reuse:
        pass
    elif fm1_lake.exists():
        copy_fm1(str(fm1_lake), lake_uri)
    else:
        got = spawn("fm_train1", lake_uri, n, env)
        if "error" in got:
            return [{"size": n, **got}]
        shutil.copytree(Path(lake_uri) / "models", fm1_lake / "models")
    rows = []
    for stage in STAGES:
        if (stage == "fm_train_mem" and not with_mem) or stage not in ARGS.stages.split(","):
            continue
        if reuse and stage in ("generate", "ingest"):
            continue
        got = measure(stage, lake_uri, n, env)
        rows.append({"size": n, **got})
        print(fmt_row(rows[-1]), flush=True)
    if not ARGS.keep:
        shutil.rmtree(lake_uri, ignore_errors=True)
    return rows


def fmt_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['size']:>10,} | {r['stage']:<14} | failed: {r['error'][:90]} |"
    eps = f"{r['examples_per_s']:,.0f}" if "examples_per_s" in r else ""
    stage = r["stage"] + (f" x{r['runs']}" if r.get("runs") else "")
    return (f"| {r['size']:>10,} | {stage:<14} | {r['rss_mb']:>8,.0f} | {r['seconds']:>8.1f} | "
            f"{r.get('cpu_s', float('nan')):>8.1f} | {r.get('sys_s', float('nan')):>6.1f} | "
            f"{r['size'] / max(r['seconds'], 1e-9):>10,.0f} | {eps:>10} |")


HEADER = ("| events/day | stage          | peak RSS MB |   wall s |    CPU s |  sys s |   events/s | train ex/s |\n"
          "|-----------:|----------------|---------:|---------:|---------:|-------:|-----------:|-----------:|")


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
            for key, what, judged in (("seconds", "wall", True), ("cpu_s", "CPU", True), ("user_s", "user CPU", False)):
                per = {r["size"]: r[key] / r["size"] for r in ok if r["stage"] == stage and r["size"] in big}
                if len(per) == len(big) and all(v == v for v in per.values()):
                    ratio = per[big[-1]] / per[big[0]]
                    verdict = "held" if 1 / 1.2 <= ratio <= 1.2 else "missed"
                    tail = f"(target within 1.2): {verdict}" if judged else "(no target: CPU less the kernel's share)"
                    out.append(f"{what} s per event {stage} {big[-1]:,} vs {big[0]:,}: x{ratio:.2f} {tail}")
    return out


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.1M,1M,4M,10M", help="comma-separated events/day (0.1M, 250k, 5000)")
    p.add_argument("--mem-at", default="1M", help="size at which the in-memory training baseline also runs")
    p.add_argument("--workdir", default=None, help="where the lakes go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep each size's lake")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a kept lake of the same size in --workdir (day 2 ingested): skip its setup")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--repeat-all", action="store_true",
                   help=f"run every repeatable stage {REPEATS} times at every size, long ones too (module docstring)")
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
