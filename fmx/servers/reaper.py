"""Ends the DAG runs that pausing a DAG strands; `fmx up` runs it as the process ``reaper``.

Why: Airflow's scheduler never looks at the runs of a paused DAG (``DagRun.get_running_dag_runs_to_examine``
and ``get_queued_dag_runs_to_set_running`` filter on ``DagModel.is_paused == false``), and no setting
changes that. A run in progress when its DAG is paused therefore stays "running" (or "queued") with its
next tasks never scheduled, until someone unpauses the DAG — the stranded run of issue 13.

What: every POLL_S seconds, for each paused DAG, each run still queued or running whose tasks have
nothing in flight (no task instance running or queued on a worker: what was running is let finish) is
ended through the REST API: state failed (Airflow skips its pending tasks) and a note that says why and
how to run the rest. Pausing thus means "stop now": unpausing schedules the next window, and the ended
day runs again by clearing it or by a trigger with its ds. Tasks of a later day that warm-start from the
ended one fail with a message that names it (fm.train refuses a missing parent).

Reads the API URL from AIRFLOW__API__BASE_URL and the password from $FMX_HOME (server_env gives both);
nothing on the command line. Logs one line per ended run to stdout (``servers/logs/reaper.log``).
"""

from __future__ import annotations

import signal
import sys
import time

from fmx.servers.airflow_api import AirflowAPI

POLL_S = 10.0
IN_FLIGHT = ("running", "queued", "restarting")
NOTE = "ended by fmx: {dag_id} was paused while this run was {state}; clear the run (or trigger ds) to run the rest"


def stranded(api: AirflowAPI) -> list[tuple[str, str, str]]:
    """(dag_id, run_id, state) of every queued/running run of a paused DAG with no task in flight."""
    out = []
    for dag_id in api.paused_dags():
        for run in api.active_runs(dag_id):
            states = api.task_states(dag_id, run["dag_run_id"]).values()
            if not any(s in IN_FLIGHT for s in states):
                out.append((dag_id, run["dag_run_id"], run["state"]))
    return out


def sweep(api: AirflowAPI) -> list[str]:
    """End every stranded run (re-checking that its DAG is still paused); return their ids."""
    ended = []
    for dag_id, run_id, state in stranded(api):
        if not api.is_paused(dag_id):  # unpaused meanwhile: the scheduler carries on with it
            continue
        api.end_run(dag_id, run_id, NOTE.format(dag_id=dag_id, state=state))
        print(f"ended {dag_id}/{run_id} ({state}): the DAG is paused", flush=True)
        ended.append(run_id)
    return ended


def main() -> None:
    """Poll until SIGTERM; API errors (servers starting or stopping) are logged and retried."""
    import os

    import httpx

    from fmx.servers.config import resolve_home
    from fmx.servers.credentials import airflow_password

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    api = AirflowAPI(os.environ["AIRFLOW__API__BASE_URL"], airflow_password(resolve_home()))
    print(f"reaper: ending runs stranded by a pause on {api.url} every {POLL_S:.0f} s", flush=True)
    connected = False
    while True:
        try:
            sweep(api)
            connected = True
        except httpx.ConnectError as exc:
            if connected:  # before the first answer the api-server is still starting: nothing to say
                print(f"reaper: {exc}", flush=True)
        except (httpx.HTTPError, RuntimeError) as exc:
            print(f"reaper: {type(exc).__name__}: {exc}", flush=True)
            api.reset_token()
        time.sleep(POLL_S)


if __name__ == "__main__":
    main()
