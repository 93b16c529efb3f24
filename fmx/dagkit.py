"""What the DAG files share: the validated trigger Params, task defaults, and the day of a run.

Imported by `dags/*.py` at parse time, so it imports nothing heavy (no polars, torch, mlflow; airflow
only inside functions the DAG files call anyway). Library code lives in features/, fm/, experts/;
this module only turns an Airflow run (params, logical date) into the plain references the stage
wrappers take (ds string, lake_uri string, FM preset names, pipeline_run id). A reference keeps one name
from the Param to the task: `lake_uri`, `fm_presets` (the Param's list) and `fm_preset` (one of them).

The FM preset names come from their one declaration, common.names.FM_PRESETS (no third-party import).
VARIANTS repeats experts.stage.VARIANTS so that parsing a DAG stays cheap; tests/dags asserts they agree. Surfaces are data, not an enum: any name
that is a safe partition value (SURFACE_PATTERN) passes the Param; the run checks it against the
lake's surfaces when it plans (`features.stage.plan_surfaces`).

The schedule comes from the deployment, never from a date in the code: $FMX_START_DATE (YYYY-MM-DD,
the first window to schedule, e.g. the lake's next unprocessed window), $FMX_END_DATE (the last window
to schedule, e.g. the lake's last window; unset: no end) and $FMX_WINDOW_DAYS (the lake's window length,
default 1). Without FMX_START_DATE the DAG has no start date and no catch-up: unpaused, it runs the
latest interval only; triggers, `fmx run` and backfills run any window of any date.
`fmx up --start-date/--end-date` sets these variables for the scheduler from dates or from the lake.

A day is done once: `unless_done` makes fmx_fm's first task skip the day (no ingest, no FM training, no
experts trigger) when every requested FM preset already holds its checkpoint for the day (the FM's own
record, fm.versions.read_versions), unless the run's Param `rerun` is true.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from common.jsonsafe import strict_json
from common.names import FM_PRESETS

START_DATE_ENV, END_DATE_ENV, WINDOW_DAYS_ENV = "FMX_START_DATE", "FMX_END_DATE", "FMX_WINDOW_DAYS"

SURFACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a partition value: no '/', no '..', no '='
VARIANTS = ("base", "loopfm", "kd", "fe", "loopfm_kd")
DEFAULT_FM_PRESETS = ("small",)  # what a scheduled run trains (the Param's default)
SOURCES = ("auto", "generator", "lake")
SCALES = ("tiny", "small", "default")
TRAINING_POOL = "fmx_training"
TRAINING_POOL_SLOTS = 1  # one heavy training task at a time: they each use every core they get

# Retries back off exponentially: 30 s, 60 s, 120 s ... capped at 10 min.
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "fmx",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=30),
}
TRAIN_TIMEOUT = timedelta(hours=3)
log = logging.getLogger("fmx.dagkit")


def schedule_start() -> datetime | None:
    """The first window fmx_fm schedules: $FMX_START_DATE at 00:00 UTC, or None (no schedule of its own)."""
    return _env_day(START_DATE_ENV)


def schedule_end() -> datetime | None:
    """The last window fmx_fm schedules: $FMX_END_DATE at 00:00 UTC, or None (no end: one run per window to
    today, then one a day). fmx_fm's end_date: triggers with the Param ds (no logical date) run any day; a
    backfill of a later window fails (Airflow: its tasks are past the DAG's end date)."""
    return _env_day(END_DATE_ENV)


def _env_day(name: str) -> datetime | None:
    import os

    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a date YYYY-MM-DD") from None


def window_days() -> int:
    """$FMX_WINDOW_DAYS: the lake's window length in days (default 1); one scheduled run per window."""
    import os

    text = os.environ.get(WINDOW_DAYS_ENV, "1").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{WINDOW_DAYS_ENV}={text!r} is not a whole number of days >= 1")
    return int(text)


def schedule() -> Any:
    """One data interval per window: @daily (UTC) for 1-day windows, else every N days from the start date.

    The end ($FMX_END_DATE) is the DAG's end_date. (Airflow 3.3.2's EventsTimetable, which would list the
    windows exactly, does not survive serialization: its encoder drops the `_summary` its decoder reads.)
    """
    from airflow.sdk import CronDataIntervalTimetable, DeltaDataIntervalTimetable

    days = window_days()
    if days == 1:
        return CronDataIntervalTimetable("@daily", timezone="UTC")
    return DeltaDataIntervalTimetable(timedelta(days=days))


def params(rerun: bool = False) -> dict[str, Any]:
    """The Params every fmx DAG accepts; Airflow validates a trigger's conf against them before any task runs.

    rerun=True adds the Param `rerun` (fmx_fm: train a day again that is already done, see `unless_done`).
    """
    from airflow.sdk import Param

    def enum_list(default: list[str], values: tuple[str, ...], min_items: int, doc: str) -> Any:
        items = {"type": "string", "enum": list(values)}
        return Param(
            default, type="array", items=items, minItems=min_items, uniqueItems=True, description=doc
        )

    return {
        "ds": Param(
            None,
            type=["null", "string"],
            format="date",
            description="Window to process (YYYY-MM-DD). Empty: the run's logical date.",
        ),
        "surfaces": Param(
            [],
            type="array",
            items={"type": "string", "pattern": SURFACE_PATTERN},
            uniqueItems=True,
            description="Surfaces to train experts for, any of the lake's (checked when the run plans). "
            "Empty: every surface of the window.",
        ),
        "variants": enum_list(list(VARIANTS), VARIANTS, 1, "Expert variants to train."),
        "fm_presets": enum_list(
            list(DEFAULT_FM_PRESETS), FM_PRESETS, 1, "FM sizes to export and train (several: transfer ratio)."
        ),
        "source": Param(
            "auto",
            enum=list(SOURCES),
            description="auto: what the lake holds; generator: synthesize the window; lake: imported windows.",
        ),
        "scale": Param("small", enum=list(SCALES), description="Generator scale (source=generator only)."),
        "lake_uri": Param("", type="string", description="Lake root URI. Empty: $FMX_HOME/lake on the worker."),
        "pipeline_run": Param(
            "", type="string", description="MLflow pipeline run id. Empty: this DAG run's id."
        ),
        "fm_nproc": Param(
            1,
            type="integer",
            minimum=1,
            maximum=64,
            description="FM training processes: >1 launches fm_train under torchrun (DDP; gloo on CPU, nccl on GPU).",
        ),
        **({"rerun": Param(False, type="boolean", description=RERUN_DOC)} if rerun else {}),
    }


RERUN_DOC = (
    "false: a day whose FM checkpoints (every requested preset) already exist is skipped, with a log line "
    "naming them; true: ingest and train the day again (and trigger its experts)."
)


def unless_done(run: dict[str, Any], rerun: bool) -> dict[str, Any] | bool:
    """`run` when its day still has work (or `rerun`), else False: the day is done, its tasks skip.

    Done = every requested FM preset holds its checkpoint for the day (fm.versions.read_versions).
    """
    done = done_versions(run["ds"], run["lake_uri"], run["fm_presets"])
    if not done:
        return run
    versions = ", ".join(done)
    if rerun:
        log.info("ds=%s was done (FM %s); rerun=true: training it again", run["ds"], versions)
        return run
    log.warning(
        "ds=%s is already done (FM %s): skipping ingest, FM training and the experts trigger; trigger with "
        'conf {"ds": "%s", "rerun": true} to train it again', run["ds"], versions, run["ds"],
    )  # fmt: skip
    return False


def done_versions(ds: str, lake_uri: str, fm_presets: list[str] | tuple[str, ...]) -> list[str]:
    """The fm_version of day `ds` for every preset in `fm_presets`, or [] when one of them has none yet."""
    from features.lake import Lake
    from fm.versions import read_versions

    lake = Lake(lake_uri)
    found = [read_versions(lake, fm_preset).get(ds) or {} for fm_preset in fm_presets]
    return [str(entry["fm_version"]) for entry in found] if found and all(found) else []


RUN_KEYS = ("ds", "lake_uri", "surfaces", "variants", "fm_presets", "source", "scale", "pipeline_run", "fm_nproc")


def resolve_run(params: Mapping[str, Any], logical_date: datetime | None, run_id: str) -> dict[str, Any]:
    """The run's references as plain values (the RUN_KEYS): what fmx_fm hands to its fmx_experts run as conf."""
    run = {k: params[k] for k in ("source", "scale")}
    run["fm_nproc"] = int(params.get("fm_nproc") or 1)
    run.update({k: list(params[k]) for k in ("surfaces", "variants", "fm_presets")})
    run.update(
        ds=run_day(params, logical_date), lake_uri=lake_uri(params), pipeline_run=pipeline_run(params, run_id)
    )
    return run


def refs(day: Mapping[str, Any]) -> dict[str, str]:
    """The references most stage wrappers take, from a resolved run: ds, lake_uri, pipeline_run."""
    return {k: day[k] for k in ("ds", "lake_uri", "pipeline_run")}


def run_day(params: Mapping[str, Any], logical_date: datetime | None) -> str:
    """The window a run works on: Param `ds`, else the run's logical date (never the wall clock).

    Scheduled and backfill runs of the daily DAG have logical_date == data_interval_start == the
    day's midnight. The logical date is used rather than data_interval_start because a manual run
    of a data-interval timetable infers the interval *before* its logical date.
    """
    if params.get("ds"):
        return str(params["ds"])
    if logical_date is None:
        raise ValueError("this run has no logical date: trigger it with the Param ds=YYYY-MM-DD")
    return logical_date.date().isoformat()


def lake_uri(params: Mapping[str, Any]) -> str:
    """Param `lake_uri`, else $FMX_HOME/lake; local paths made absolute (a task's cwd is not the trigger's)."""
    import os

    from features.lake import check_lake_uri, default_lake_uri

    uri = check_lake_uri(str(params.get("lake_uri") or default_lake_uri()))  # allow-list, before any I/O
    return uri if "://" in uri else os.path.abspath(uri)


def pipeline_run(params: Mapping[str, Any], run_id: str) -> str:
    return str(params.get("pipeline_run") or run_id)


@contextmanager
def bad_input_fails_at_once() -> Iterator[None]:
    """A ValueError (bad Param, lake or data: a user's error) fails the task without retries.

    Retrying cannot fix it, and three attempts with back-off would hide the message for minutes.
    """
    try:
        yield
    except ValueError as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def timed(stage: Callable[..., dict], **kwargs: Any) -> dict:
    """Call a stage wrapper; return its dict plus `stage_s`, its own wall time, and `stage_t0`, its start
    (Unix time: comparable across the processes of a host), for the work vs orchestration split."""
    t0, start = time.time(), time.perf_counter()
    with bad_input_fails_at_once():
        out = strict_json(dict(stage(**kwargs) or {}))
    out["stage_s"] = round(time.perf_counter() - start, 3)
    out["stage_t0"] = round(t0, 3)
    return out


GRID_LISTS = {"surface": "surfaces", "variant": "variants", "fm_preset": "fm_presets"}


def grid(day: Mapping[str, Any], axes: list[str]) -> list[dict[str, str]]:
    """Every combination of the day's lists along `axes` (e.g. ["surface", "fm_preset"]), as mapped-task kwargs.

    `day` holds the lists under their plural names (surfaces, variants, fm_presets; see GRID_LISTS).
    """
    import itertools

    unknown = [a for a in axes if a not in GRID_LISTS]
    if unknown:
        raise ValueError(f"unknown grid axes {unknown}; known: {sorted(GRID_LISTS)}")
    lists = [list(day[GRID_LISTS[a]]) for a in axes]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*lists)]


MAP_LABEL = "{{ fmx_label }}"  # a mapped task's name in the Airflow UI (map_index_template), set by `label`


def label(*parts: str) -> None:
    """Name this mapped task instance in the Airflow UI, e.g. ``feed/kd/small`` instead of map index 5."""
    from airflow.sdk import get_current_context

    get_current_context()["fmx_label"] = "/".join(parts)  # type: ignore[typeddict-unknown-key]
