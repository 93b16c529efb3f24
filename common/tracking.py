"""MLflow conventions shared by every stage wrapper: where the store is, and the run tree.

Run tree: one parent run per (pipeline run, window) — tagged ``fmx.pipeline_run`` and ``ds``, named
``<ds> · <pipeline>`` (`parent_name`) — and one nested run per stage (FM export, FM training, each
(surface, variant) expert). Stages run in separate processes (Airflow tasks), so a stage finds or creates
its parent by tags rather than holding it; the parent is created only when a stage run starts.

Failures: a stage whose body raises ends FAILED with the error's first line in tag ``fmx.error``; its
parent then ends FAILED too, with ``fmx.error`` naming the failed stage. A parent's status is the worst
of its stages' newest attempts (a retry that succeeds makes it FINISHED again), settled by every stage
as it ends, under a per-parent file lock (processes on one host; across hosts the last writer wins).
A parent left without any child (the stage's own run could not start) is deleted.

Defaults: tracking URI ``sqlite:///$FMX_HOME/mlflow.db`` and artifacts under ``$FMX_HOME/mlartifacts``
(absolute, so a task's cwd does not matter); `MLFLOW_TRACKING_URI` overrides the store.

Metric keys are exactly `METRIC_KEYS` (plus ``base_rate`` on FM and reference runs); every stage run carries
the tags in `REQUIRED_TAGS`. Lineage runs (common.lineage_runs: one per model, stepped by day, in the
experiment ``fmx-lineage``) use `LINEAGE_KEYS`.
Only stage wrappers and loggers call this module — never model or loss code.

Shared-store safety: the SQLite store is created under a file lock (two commands on a fresh FMX_HOME do
not race on its migrations) with mode 0600; against the MLflow server `fmx up` started, fmx's clients
authenticate with ``$FMX_HOME/servers/mlflow_auth.json`` unless MLFLOW_TRACKING_USERNAME is set. Each stage
run is tagged with its owner (``fmx.owner`` = host:pid:process start); `stage_run` ends RUNNING runs of
the same stage whose owner died (KILLED), and refuses to start while a live one runs on this host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.home import fmx_home

EXPERIMENT = "fmx"
METRIC_KEYS = ("auc", "logloss", "ne", "calibration", "gap_closure", "transfer_ratio", "ne_vs_base", "ne_vs_base_lo",
               "ne_vs_base_hi", "kd_scale", "fm_gate")
DAY_KEYS = (*METRIC_KEYS, "base_rate")  # what a lineage run copies from its day runs (common.lineage_runs)
LINEAGE_KEYS = (*DAY_KEYS, *(f"mean_{k}" for k in METRIC_KEYS), "days")  # a lineage run's metric keys
REQUIRED_TAGS = ("ds", "surface", "variant", "fm_version")
PIPELINE_RUN_TAG = "fmx.pipeline_run"
PIPELINE_TAG = "fmx.pipeline"  # the DAG (or "cli") whose run created the parent
OWNER_TAG = "fmx.owner"
ERROR_TAG = "fmx.error"  # one line: "<ExceptionType>: <first line of the message>", truncated
ERROR_CHARS = 500
PARENT_ID_TAG = "mlflow.parentRunId"
SAME_STAGE_TAGS = ("surface", "variant", "fm_preset")  # with the run name and ds: "the same stage run"
STALE_RUN_S = 24 * 3600.0  # a RUNNING run this old, from another host, is taken as dead


class StageBusy(RuntimeError):
    """The same stage for the same window is running right now in a live process on this host."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{fmx_home() / 'mlflow.db'}"


def setup(experiment: str = EXPERIMENT) -> str:
    """Point mlflow at the store and make sure the experiment exists; return its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    _server_credentials(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        return _experiment(experiment, local=not uri.startswith(("http://", "https://")))


def _server_credentials(uri: str) -> None:
    """Use the credentials of the server `fmx up` started (FMX_HOME/servers) when it is the tracking URI."""
    path = fmx_home() / "servers" / "mlflow_auth.json"
    if not uri.startswith("http") or os.environ.get("MLFLOW_TRACKING_USERNAME") or not path.exists():
        return
    state = fmx_home() / "servers" / "state.json"
    if state.exists() and json.loads(state.read_text()).get("mlflow_url", "").rstrip("/") != uri.rstrip("/"):
        return  # another server: its credentials are the caller's business
    creds = json.loads(path.read_text())
    os.environ["MLFLOW_TRACKING_USERNAME"] = creds["username"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = creds["password"]


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: an exclusive file lock while the store is created/migrated; the file made 0600."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(Path(f"{db}.lock")):
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))  # metadata: owner only
        yield


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created 0600) for the duration: serialises processes of one host."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def host_lock(name: str) -> Any:
    """`file_lock` on ``$FMX_HOME/locks/<name>.lock`` (name: letters, digits, ``._-`` only)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200]
    return file_lock(fmx_home() / "locks" / f"{safe}.lock")


def experiment_id(experiment: str) -> str:
    """Like `setup` (store, credentials, experiment created if missing) without making `experiment` active."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    _server_credentials(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        return _experiment(experiment, local=not uri.startswith(("http://", "https://")), activate=False)


def _experiment(experiment: str, local: bool, activate: bool = True) -> str:
    """The experiment's id, created if missing; a local store keeps artifacts in $FMX_HOME/mlartifacts.

    (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so the store kind is decided from the URI, not
    the environment: otherwise artifacts would land in ./mlruns of whatever the cwd is.)
    """
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        if activate:
            mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    location = None
    if local:  # a tracking server has its own --artifacts-destination
        artifacts = fmx_home() / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    try:
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # created concurrently by another task
        exp_id = mlflow.get_experiment_by_name(experiment).experiment_id  # type: ignore[union-attr]
    if activate:
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_RUN_KINDS = ("manual", "scheduled", "backfill", "asset_triggered", "dataset_triggered")


def parent_name(pipeline_run: str, ds: str, dag_id: str | None = None) -> str:
    """``<ds> · <pipeline>``: the day first, then the DAG and the kind of its run (or the pipeline run id).

    Airflow 3 names a run after its ``run_after`` — for a daily data-interval schedule, the END of the
    interval, one day after the ds it processes (``scheduled__2026-01-05T00:00:00+00:00`` runs 2026-01-04).
    So a scheduled or backfill run id's date is left out (the ds says the day); a manual run keeps its
    trigger time, to the minute. Other ids (``fmx-run-...``, ``manual``) are kept as they are (≤ 48 chars).
    """
    kind, sep, suffix = pipeline_run.partition("__")
    if sep and kind in _RUN_KINDS:
        label = kind if kind in ("scheduled", "backfill") else f"{kind} {suffix[:16].replace('T', ' ')}".rstrip()
    else:
        label = pipeline_run[:48]
    return f"{ds} · {dag_id} {label}" if dag_id else f"{ds} · {label}"


def error_line(exc: BaseException) -> str:
    """``<ExceptionType>: <first non-empty line of the message>``, at most `ERROR_CHARS` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


def parent_run_id(pipeline_run: str, ds: str, experiment: str = EXPERIMENT) -> str:
    """The id of the parent run for (pipeline run, window), created on first use (by `stage_run` only).

    Named by `parent_name`, tagged with the pipeline run, ds, and the DAG that created it (``fmx.pipeline``).
    """
    import mlflow

    exp_id = setup(experiment)
    filter_string = f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run}' and tags.ds = '{ds}' and tags.`fmx.kind` = 'day'"
    # stages of one day start concurrently (fmx run's workers, an executor's slots): find-or-create under a
    # host lock, so they share one parent (across hosts, the oldest parent is found first next time)
    with host_lock(f"parent-{experiment}-{pipeline_run}-{ds}"):
        found = mlflow.search_runs([exp_id], filter_string=filter_string, output_format="list", max_results=1,
                                   order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        client = mlflow.MlflowClient()
        dag_id = os.environ.get("AIRFLOW_CTX_DAG_ID")
        run = client.create_run(
            exp_id,
            run_name=parent_name(pipeline_run, ds, dag_id),
            tags={PIPELINE_RUN_TAG: pipeline_run, "ds": ds, "fmx.kind": "day", PIPELINE_TAG: dag_id or "cli",
                  "git_sha": git_sha()},
        )
        client.set_terminated(run.info.run_id)
        return run.info.run_id


@contextmanager
def stage_run(
    name: str,
    *,
    pipeline_run: str,
    ds: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    experiment: str = EXPERIMENT,
) -> Iterator[Any]:
    """A nested MLflow run for one stage under the (pipeline run, ds) parent; yields the active run.

    An exception from the body ends the run FAILED with `ERROR_TAG` and re-raises; the parent's status
    is then settled (`settle_parent`). StageBusy is raised before any run exists.
    """
    import mlflow

    end_dead_runs(name, ds, tags, experiment)  # may refuse (StageBusy): before a parent could be created
    parent = parent_run_id(pipeline_run, ds, experiment)
    all_tags = {
        "ds": ds,
        PIPELINE_RUN_TAG: pipeline_run,
        "orchestrator_run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID", pipeline_run),
        "git_sha": git_sha(),
        "fmx.kind": "stage",
        **tags,
        OWNER_TAG: _owner(),
    }
    try:
        with mlflow.start_run(run_name=name, parent_run_id=parent, nested=True, tags=all_tags) as run:
            try:
                if params:
                    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
                yield run
            except BaseException as exc:  # also KeyboardInterrupt: the run says why it stopped
                mlflow.set_tag(ERROR_TAG, error_line(exc))
                raise
    finally:
        settle_parent(parent)


def settle_parent(parent: str) -> str | None:
    """Set a parent run's status from its stages; return it (None when the parent was deleted).

    Each stage (run name + `SAME_STAGE_TAGS`) counts by its newest attempt: FAILED (with `ERROR_TAG`
    "<n> stage(s) failed: <stage>: <error>") when one of them ended FAILED or KILLED, else FINISHED
    (the tag removed). A parent without any child run is deleted: no empty parents.
    """
    import mlflow

    client = mlflow.MlflowClient()
    with host_lock(f"parent-{parent}"):
        info = client.get_run(parent).info
        children = client.search_runs([info.experiment_id], f"tags.`{PARENT_ID_TAG}` = '{parent}'",
                                      max_results=50_000)
        if not children:
            client.delete_run(parent)
            return None
        newest: dict[tuple[str, ...], Any] = {}
        for run in sorted(children, key=lambda r: r.info.start_time):
            newest[(run.info.run_name, *(run.data.tags.get(k, "") for k in SAME_STAGE_TAGS))] = run
        failed = [r for r in newest.values() if r.info.status in ("FAILED", "KILLED")]
        if failed:
            first = failed[0]
            why = first.data.tags.get(ERROR_TAG, first.info.status.lower())
            client.set_tag(parent, ERROR_TAG, f"{len(failed)} stage(s) failed: {first.info.run_name}: {why}"
                           [:ERROR_CHARS])
            client.set_terminated(parent, status="FAILED")
            return "FAILED"
        if ERROR_TAG in client.get_run(parent).data.tags:
            client.delete_tag(parent, ERROR_TAG)
        client.set_terminated(parent, status="FINISHED")
        return "FINISHED"


def _owner(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (this one by default): start time tells a reused PID apart."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.2f}"


def _owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it is another host's (or unknown)."""
    import psutil

    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    try:
        return abs(psutil.Process(int(parts[1])).create_time() - float(parts[2])) < 0.05
    except (psutil.Error, ValueError):
        return False


def end_dead_runs(name: str, ds: str, tags: Mapping[str, str], experiment: str = EXPERIMENT) -> list[str]:
    """End (KILLED) the RUNNING runs of the same stage (run name, ds and `SAME_STAGE_TAGS`) whose process
    died: on this host by PID and start time, elsewhere after `STALE_RUN_S`. StageBusy when one is alive
    here. Returns the ids ended."""
    import mlflow

    exp_id = setup(experiment)  # first: the client is bound to the tracking URI when it is made
    client = mlflow.MlflowClient()
    flt = f"attributes.status = 'RUNNING' and tags.`fmx.kind` = 'stage' and tags.ds = '{ds}'"
    ended = []
    for run in client.search_runs([exp_id], filter_string=flt, max_results=1000):
        t = run.data.tags
        if run.info.run_name != name or any(t.get(k) != tags.get(k) for k in SAME_STAGE_TAGS):
            continue
        owner = t.get(OWNER_TAG, "")
        alive = _owner_alive(owner) if owner else None
        if alive:
            raise StageBusy(f"stage {name} for {ds} is already running in pid {owner.rsplit(':', 2)[1]} on this "
                            f"host (MLflow run {run.info.run_id}); wait for it or stop it")
        if alive is None and time.time() - run.info.start_time / 1000 < STALE_RUN_S:
            continue  # another host's run, recent: it may be alive
        client.set_tag(run.info.run_id, "fmx.ended_by", f"{_owner()}: owner {owner or 'unknown'} is gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended
