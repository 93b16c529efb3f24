"""The same servers with Airflow's and MLflow's metadata on a real PostgreSQL (not SQLite).

The fixture creates a throw-away cluster with initdb into a temporary folder, starts it with pg_ctl on
127.0.0.1 and a free port (as the `postgres` user when run as root: PostgreSQL refuses to run as root),
and stops it afterwards. PostgreSQL comes from Debian packages (infra/ci-setup.sh); the test skips only
when its binaries are absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmx.servers import free_port
from tests.e2e.conftest import (
    EXPERTS_DAG,
    FM_DAG,
    experts_run_for,
    mlflow_runs,
    pipeline_conf,
    running_servers,
    wait_success,
)

pytestmark = pytest.mark.e2e
DAY = "2026-01-01"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))  # Debian keeps them off PATH
    return candidates[-1] if candidates else None


def _as_db_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.skip("running as root without `runuser`: cannot start PostgreSQL as an unprivileged user")
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port>, superuser `fmx`, trust auth on loopback only."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, pg_ctl) not found: run infra/ci-setup.sh (apt-get install postgresql)"
        )
    root = Path(tempfile.mkdtemp(prefix="fmx-pg-"))  # not under pytest's 0700 tmp: the postgres user needs it
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    run = lambda *cmd: subprocess.run(_as_db_user(list(cmd)), capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run(initdb, "-D", str(data), "-U", "fmx", "--auth=trust", "-E", "UTF8", "--no-instructions")
    assert out.returncode == 0, f"initdb failed:\n{out.stdout}\n{out.stderr}"
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    out = run(
        pg_ctl, "-D", str(data), "-l", str(root / "postgres.log"), "-o", opts, "-w", "-t", "60", "start"
    )
    assert out.returncode == 0, (
        f"pg_ctl start failed:\n{out.stdout}\n{out.stderr}\n{_read(root / 'postgres.log')}"
    )
    try:
        yield f"postgresql://fmx@127.0.0.1:{port}/fmx"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _count(url: str, query: str) -> int:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_pipeline_day_with_postgres_metadata(postgres_url: str, tmp_path: Path) -> None:
    import psutil

    # trust auth ignores the password; it stands for a real one that must never reach a server's argv
    secret = "NotOnArgv4711"
    with running_servers(tmp_path / "home", "--db", postgres_url.replace("fmx@", f"fmx:{secret}@")) as srv:
        assert not (srv.home / "airflow" / "airflow.db").exists() and not (srv.home / "mlflow.db").exists()
        for pid, _ in srv.state.pids.values():
            leader = psutil.Process(int(pid))
            for proc in [leader, *leader.children(recursive=True)]:
                try:
                    assert secret not in " ".join(proc.cmdline()), f"the DB password is in the argv of {proc.pid}"
                except psutil.Error:
                    continue
        for dag_id in (FM_DAG, EXPERTS_DAG):
            srv.api.wait_for_dag(dag_id, timeout=180)
            srv.api.unpause(dag_id)
        fm_run = srv.api.trigger(FM_DAG, pipeline_conf(srv.lake, ds=DAY, variants=["base"]))
        wait_success(srv, FM_DAG, fm_run)
        wait_success(srv, EXPERTS_DAG, experts_run_for(srv, DAY))

        # Day 1 trains the first FM (its experts skip: no FM has scored anything yet).
        runs = {r.info.run_name: r for r in mlflow_runs(srv, DAY)}
        assert {"fm_export", "fm_train"} <= set(runs), sorted(runs)
        assert runs["fm_train"].data.tags["fm_version"].startswith(f"small-{DAY}-")
        assert runs["fm_train"].data.tags["orchestrator_run_id"] == fm_run
        names = set(runs)
        # The metadata really lives in PostgreSQL: Airflow's runs and MLflow's runs, one database each.
        assert _count(postgres_url + "_airflow", "SELECT count(*) FROM dag_run WHERE state = 'success'") >= 2
        assert _count(postgres_url + "_mlflow", "SELECT count(*) FROM runs") >= len(names)
