"""`fmx run`'s workers serve the Execution API from its head router (fmx.run.preloaded.head_app): the same
routes as the newest version Cadwyn generates, Airflow's in-process auth overrides, and a real request
answered through the worker client a task uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHECK = """
import json, sys
from pathlib import Path
from fmx.run import runner
runner.configure_airflow(Path(sys.argv[1]))
from cadwyn import generate_versioned_routers
from fastapi.routing import APIRoute
from airflow.api_fastapi.execution_api.routes import execution_api_router
from airflow.api_fastapi.execution_api.versions import bundle
from airflow.sdk.api.datamodels._generated import API_VERSION
from fmx.run import preloaded
from fmx.run.inprocess import worker_client

def routes(router):
    return sorted([r.path, sorted(r.methods)] for r in router.routes if isinstance(r, APIRoute))

newest = generate_versioned_routers(execution_api_router, versions=bundle).endpoints[API_VERSION]
app = preloaded.API.app
client = worker_client()
print(json.dumps({
    "app": type(app).__name__,
    "head": routes(app), "newest": routes(newest),
    "overrides": sorted(getattr(k, "__name__", type(k).__name__) for k in app.dependency_overrides),
    "count": client.task_instances.get_count(dag_id="fmx_fm").count,
}))
"""


def test_the_head_app_serves_the_newest_versions_routes_with_in_process_auth(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "home")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["app"] == "FastAPI"  # not Cadwyn: no per-version routers generated
    assert result["head"] == result["newest"] and len(result["head"]) > 40
    assert ["/dag-runs/{dag_id}/previous", ["GET"]] not in result["head"]  # an older versions' route only
    auth = ["JWTBearer", "has_connection_access", "has_variable_access", "has_xcom_access"]
    assert result["overrides"] == sorted([*auth, "dag_bag_from_app"])  # the worker's DAG bag: worker_client
    assert result["count"] == 0  # a DB-reading request, answered through the in-process transport
