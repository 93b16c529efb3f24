"""A small client for Airflow 3's REST API (``/api/v2``), as a person or a CI job uses it.

Authentication: POST ``/auth/token`` with the simple auth manager's user and password gives a JWT,
sent as a Bearer token. Only what fmx needs: pools, pausing and unpausing, triggering a run with a conf,
polling a run to a terminal state, the task states of a run (for error messages), and ending a run
(fmx.servers.reaper).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

TERMINAL = ("success", "failed")


class AirflowAPIError(RuntimeError):
    """The API answered with an error status; the message carries the status and the response body."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:2000]}")
        self.status = status
        self.body = body


class AirflowAPI:
    """Client for one Airflow API server. `url` like ``http://127.0.0.1:8080``."""

    def __init__(self, url: str, password: str, username: str = "admin", timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._client = httpx.Client(base_url=self.url, timeout=timeout)
        self._token: str | None = None

    def token(self) -> str:
        if self._token is None:
            resp = self._client.post("/auth/token", json=self._credentials)
            if resp.status_code not in (200, 201):
                raise AirflowAPIError("POST", "/auth/token", resp.status_code, resp.text)
            self._token = resp.json()["access_token"]
        return self._token

    def reset_token(self) -> None:
        """Forget the token (e.g. after a 401 once it expired): the next request logs in again."""
        self._token = None

    def request(
        self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kwargs: Any
    ) -> httpx.Response:
        """Send an authenticated request; raise AirflowAPIError unless the status is in `ok`."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        resp = self._client.request(method, path, headers=headers, **kwargs)
        if resp.status_code not in ok:
            raise AirflowAPIError(method, path, resp.status_code, resp.text)
        return resp

    # ---- resources ---------------------------------------------------------------------------
    def set_pool(self, name: str, slots: int, description: str = "") -> None:
        """Create pool `name` or set its slots."""
        body = {"name": name, "slots": slots, "description": description, "include_deferred": False}
        found = self.request("GET", f"/api/v2/pools/{name}", ok=(200, 404))
        if found.status_code == 404:
            self.request("POST", "/api/v2/pools", json=body)
        else:
            # Airflow 3.3 validates a PATCH against the full pool body (apache/airflow#73768): send it all,
            # keeping the pool's own include_deferred
            body["include_deferred"] = bool(found.json().get("include_deferred", False))
            self.request("PATCH", f"/api/v2/pools/{name}", json=body)

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the DAG processor has parsed `dag_id`; return its details.

        Raises TimeoutError naming the import errors Airflow reports, if any.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.request("GET", f"/api/v2/dags/{dag_id}", ok=(200, 404))
            if resp.status_code == 200:
                return resp.json()
            time.sleep(2.0)
        errors = self.request("GET", "/api/v2/importErrors").json().get("import_errors", [])
        raise TimeoutError(f"DAG {dag_id!r} not parsed after {timeout:.0f} s; import errors: {errors}")

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def pause(self, dag_id: str) -> None:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": True})

    def is_paused(self, dag_id: str) -> bool:
        return bool(self.request("GET", f"/api/v2/dags/{dag_id}").json()["is_paused"])

    def paused_dags(self) -> list[str]:
        dags = self.request("GET", "/api/v2/dags", params={"paused": True, "limit": 1000}).json()["dags"]
        return [d["dag_id"] for d in dags]

    def active_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """The queued and running runs of `dag_id`."""
        params = {"state": ["queued", "running"], "limit": 1000}
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns", params=params).json()["dag_runs"]

    def end_run(self, dag_id: str, run_id: str, note: str) -> None:
        """Mark a run failed (Airflow fails its running tasks and skips its pending ones) with `note`."""
        self.request(
            "PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed", "note": note[:1000]}
        )

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Trigger a run now (no logical date) with `conf` (validated against the DAG's Params); return its id."""
        resp = self.request(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        return resp.json()["dag_run_id"]

    def runs(self, dag_id: str, run_type: str | None = None) -> list[dict[str, Any]]:
        params = {"limit": 100, **({"run_type": run_type} if run_type else {})}
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns", params=params).json()["dag_runs"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """{task_id (with map index when mapped): state} for one run."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        items = self.request("GET", path, params={"limit": 1000}).json()
        out = {}
        for ti in items["task_instances"]:
            key = ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"
            out[key] = ti["state"]
        return out

    def wait_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 3.0) -> str:
        """Poll until the run is success/failed; return that state. TimeoutError (with task states) after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in TERMINAL:
                return state
            time.sleep(poll)
        raise TimeoutError(
            f"{dag_id}/{run_id} not finished after {timeout:.0f} s: {self.task_states(dag_id, run_id)}"
        )
