"""Lineage runs: one MLflow run per model lineage (FM preset, surface, variant) with its metrics by day.

A day run (``expert/...`` expert_train, ``fm_export/<surface>``, ``reference/<surface>``) holds one point
per metric, so MLflow's charts cannot draw a model's NE over days. After each day run its stage calls
`sync(preset, surface, variant, step_of)`, which rebuilds the lineage's whole expected history from the
day runs and brings the lineage run in line with it:

- experiment ``<experiment>-lineage`` (``fmx-lineage``): one run per lineage, named
  ``lineage/<preset>/<surface>/<variant>``, tags ``fmx.lineage`` = ``<preset>/<surface>/<variant>``,
  ``fmx.kind`` = ``fmx.stage`` = ``lineage``, surface, variant, fm_preset, fm_version (of the newest day),
  ds_first, ds_last. Kept apart from the day tree so that searches of day runs (``fmx compare``, the
  registry, tests) never meet it, and so that the experiment's chart view shows only trends.
- the day runs of a lineage are the rows ``fmx compare`` reads (experts/compare.py): tags surface,
  variant, fm_preset; ``evaluated = true`` except for the FM (variant ``fm``: its ``fm_export/<surface>``
  runs with a metric ``ne``); status FINISHED. A day re-run counts once: the newest run of each ds.
  ``transfer_ratio``, which compare_and_promote logs onto an expert_train run after the fact, reaches the
  lineage at the lineage's next sync (the next day's expert_train).
- metrics: each `DAY_KEYS` value of the day at step = `step_of(ds)` (the lake's window index,
  features.lake.Lake.steps) and timestamp = the day (ds 00:00 UTC), so MLflow's charts plot it against
  step or wall time; ``mean_<k>`` (`METRIC_KEYS`): the running mean over the lineage's days up to that
  day — its latest value is ``fmx compare``'s mean over all days; ``days``: the number of days so far.

Idempotent: a point already logged with the same (key, step, timestamp, value) is not logged again
(MLflow also drops exact duplicates). When a logged point differs from the day runs (a re-run changed a
day's value; MLflow cannot delete metric points), the lineage run is deleted and rebuilt whole, so each
chart holds exactly one value per step. Concurrency: a sync holds a file lock per lineage
(``$FMX_HOME/locks``) — two tasks of one host never race to create or rebuild it; tasks of several hosts
(one tracking server) may each create one, and every sync keeps the oldest (start time, run id) and
deletes the others. Everything read from MLflow is data: tags and metric values only, no artifacts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from datetime import UTC, datetime
from typing import Any

from common.tracking import DAY_KEYS, EXPERIMENT, METRIC_KEYS, experiment_id, host_lock

LINEAGE_TAG = "fmx.lineage"
NOTE = "mlflow.note.content"
EXPERIMENT_NOTE = ("One run per model (FM preset, surface, variant; fm = the FM, ref = the counting reference): its "
                   "metrics by day (step = window index, time = the day) and mean_<metric> = fmx compare's mean.")
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call

Point = tuple[str, int]  # (metric key, step)


def lineage_experiment(experiment: str = EXPERIMENT) -> str:
    return f"{experiment}-lineage"


def lineage_key(preset: str, surface: str, variant: str) -> str:
    return f"{preset}/{surface}/{variant}"


def day_ms(ds: str) -> int:
    """The day `ds` at 00:00 UTC in epoch milliseconds (the timestamp of its points)."""
    return int(datetime.fromisoformat(ds).replace(tzinfo=UTC).timestamp() * 1000)


def day_runs(preset: str, surface: str, variant: str, experiment: str = EXPERIMENT) -> dict[str, Any]:
    """{ds: the newest FINISHED day run of the lineage} (the rows fmx compare reads)."""
    import mlflow

    flt = (f"tags.surface = '{surface}' and tags.variant = '{variant}' and tags.fm_preset = '{preset}' "
           "and attributes.status = 'FINISHED'" + ("" if variant == "fm" else " and tags.evaluated = 'true'"))
    exp_id = experiment_id(experiment)  # first: a client is bound to the tracking URI when it is made
    runs = mlflow.MlflowClient().search_runs([exp_id], flt, max_results=50_000)
    days = [r for r in runs if r.data.tags.get("ds") and (variant != "fm" or "ne" in r.data.metrics)]  # not fm "all"
    return newest_finished(days, key=lambda r: r.data.tags["ds"])


def newest_finished(runs: Iterable[Any], key: Callable[[Any], Hashable]) -> dict[Any, Any]:
    """{key(run): the newest FINISHED run with that key}: a day re-run counts once (here and in fmx compare)."""
    newest: dict[Any, Any] = {}
    for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id)):
        if run.info.status == "FINISHED":
            newest[key(run)] = run
    return newest


def expected_points(days: dict[str, dict[str, float]], step_of: Callable[[str], int]) -> dict[Point, tuple[float, int]]:
    """{(key, step): (value, timestamp ms)}: each day's `DAY_KEYS`, running ``mean_<k>`` and ``days``."""
    points: dict[Point, tuple[float, int]] = {}
    seen: dict[str, list[float]] = {}
    for n, ds in enumerate(sorted(days), 1):
        step, ts = step_of(ds), day_ms(ds)
        for key, value in days[ds].items():
            if key not in DAY_KEYS or not math.isfinite(value):
                continue
            points[(key, step)] = (value, ts)
            if key in METRIC_KEYS:
                seen.setdefault(key, []).append(value)
                points[(f"mean_{key}", step)] = (sum(seen[key]) / len(seen[key]), ts)
        points[("days", step)] = (float(n), ts)
    return points


def _describe(client: Any, exp_id: str) -> None:
    """Set the description the experiment list shows, once. Two tasks may both find it missing: the set runs
    under the host lock, and a store that refuses the second writer's set (SQLite's unique key on
    (experiment, key), a concurrent writer on another host) is fine once the tag is there."""
    with host_lock(f"lineage-note-{exp_id}"):
        if NOTE in client.get_experiment(exp_id).tags:
            return
        try:
            client.set_experiment_tag(exp_id, NOTE, EXPERIMENT_NOTE)
        except Exception:
            if NOTE not in client.get_experiment(exp_id).tags:
                raise


def sync(preset: str, surface: str, variant: str, step_of: Callable[[str], int],
         experiment: str = EXPERIMENT) -> str | None:
    """Bring the lineage run of (preset, surface, variant) in line with its day runs; its id (None: no days)."""
    import mlflow

    runs = day_runs(preset, surface, variant, experiment)
    if not runs:
        return None
    exp_id = experiment_id(lineage_experiment(experiment))
    client = mlflow.MlflowClient()
    _describe(client, exp_id)
    key = lineage_key(preset, surface, variant)
    expected = expected_points({ds: r.data.metrics for ds, r in runs.items()}, step_of)
    newest = runs[max(runs)]
    tags = {"surface": surface, "variant": variant, "fm_preset": preset, "ds_first": min(runs), "ds_last": max(runs),
            "fm_version": newest.data.tags.get("fm_version", "none")}
    with host_lock(f"lineage-{exp_id}-{key}"):
        run = _lineage_run(client, exp_id, key)
        missing = _missing(client, run, expected)
        if missing is None:  # a logged point disagrees with the day runs: start the lineage over
            client.delete_run(run.info.run_id)
            run = _lineage_run(client, exp_id, key)
            missing = dict(expected)
        _log(client, run.info.run_id, missing, tags)
    return str(run.info.run_id)


def _lineage_run(client: Any, exp_id: str, key: str) -> Any:
    """The lineage's run, created when missing; duplicates (created concurrently elsewhere) deleted."""
    flt = f"tags.`{LINEAGE_TAG}` = '{key}'"
    runs = client.search_runs([exp_id], flt, max_results=100)
    if not runs:
        client.create_run(exp_id, run_name=f"lineage/{key}", tags=_identity(key))
        runs = client.search_runs([exp_id], flt, max_results=100)
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))
    for duplicate in runs[1:]:
        client.delete_run(duplicate.info.run_id)
    return runs[0]


def _identity(key: str) -> dict[str, str]:
    preset, surface, variant = key.split("/")
    note = (f"Progressive metrics of {variant} on surface {surface} (FM preset {preset}), one point per day: "
            "step = the lake's window index, time = the day (00:00 UTC). mean_<metric> = running mean over the "
            "days so far; its latest value is `fmx compare`'s mean over all days. Rebuilt from the day runs.")
    return {LINEAGE_TAG: key, "fmx.kind": "lineage", "fmx.stage": "lineage", NOTE: note}


def _missing(client: Any, run: Any, expected: dict[Point, tuple[float, int]]) -> dict[Point, tuple[float, int]] | None:
    """The expected points not yet logged on `run`; None when a logged point is not an expected one."""
    logged: set[tuple[str, int, float, int]] = set()
    for key in {k for k, _ in expected} | set(run.data.metrics):
        logged |= {(m.key, m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, key)}
    if any(expected.get((k, step)) != (value, ts) for k, step, value, ts in logged):
        return None
    done = {(k, step) for k, step, _, _ in logged}
    return {point: v for point, v in expected.items() if point not in done}


def _log(client: Any, run_id: str, points: dict[Point, tuple[float, int]], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, RunTag

    metrics = [Metric(key, value, ts, step) for (key, step), (value, ts) in sorted(points.items())]
    for start in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id)
