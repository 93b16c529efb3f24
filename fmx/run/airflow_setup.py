"""Airflow for `fmx run`, isolated under $FMX_HOME/airflow: its environment, its SQLite metadata DB (migrated
once, or copied from a migrated empty template) and the training pool (fmx.run.runner runs the job on it).

Airflow is configured from the environment at its first import, so `configure_airflow` must run before
anything imports airflow in this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fmx import dagkit

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"


def airflow_env(fmx_home: Path) -> dict[str, str]:
    """The environment of the isolated in-process Airflow: SQLite metadata DB under $FMX_HOME/airflow."""
    home = fmx_home / "airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get(
            "FMX_AIRFLOW_LOG_LEVEL", "ERROR"
        ),  # task errors still show
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def configure_airflow(fmx_home: Path, when_configured: Callable[[], object] | None = None) -> Path:
    """Point this process's Airflow at $FMX_HOME/airflow, migrate its DB once, ensure the training pool.

    `when_configured` runs once Airflow's configuration is in the environment and its file written
    (`write_config`), before this process imports Airflow (~1.3 s) and checks the DB: e.g.
    `fmx.run.inprocess.start_forkserver`, whose imports then overlap the rest of the set-up.

    A new DB starts as a copy of the migrated empty one of this Airflow version (`migrated_template`), made
    by the first new home: a fresh migration costs ~2-4 s (measured). A DB this Airflow version has brought
    to head (a copy of its template, or migrated by an earlier job: `MIGRATED_MARK`) is not checked again:
    `upgradedb` on a DB at head costs ~0.7 s at the start of every job (measured)."""
    import sys

    env = airflow_env(fmx_home)
    if "airflow.configuration" in sys.modules and os.environ.get("AIRFLOW_HOME") != env["AIRFLOW_HOME"]:
        raise RuntimeError("airflow was imported before configure_airflow(): run the job in a fresh process")
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    db_file, template, mark = home / "airflow.db", migrated_template(), home / MIGRATED_MARK
    fresh = not db_file.exists()
    if fresh:
        mark.unlink(missing_ok=True)
        if template.exists() and _copy_db(template, db_file):
            mark.write_text(airflow_version())  # the template is this version's DB migrated to head
        else:
            db_file.unlink(missing_ok=True)  # no template, or an unreadable one: migrate from scratch
    write_config(home / "airflow.cfg")
    if when_configured is not None:
        when_configured()
    if not _migrated_here(mark):
        from airflow.utils import db

        db.upgradedb()  # at head already: ~0.7 s (alembic loads every migration); a new DB: ~2-4 s
        mark.write_text(airflow_version())
    db_file.chmod(0o600)  # metadata (conf, XCom) is private to its owner
    if fresh and not template.exists():
        _save_template(db_file, template)
    ensure_pool()
    return home


MIGRATED_MARK = ".fmx-migrated"  # in AIRFLOW_HOME: the Airflow version that last brought its DB to head


def airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


def _migrated_here(mark: Path) -> bool:
    """Whether the installed Airflow has already migrated this home's DB to head (its mark names it): a job
    after the first skips `upgradedb`; an upgraded Airflow (another version) migrates it again."""
    try:
        return mark.read_text().strip() == airflow_version()
    except OSError:
        return False


def write_config(path: Path) -> None:
    """A new home's airflow.cfg: its two secrets only (Airflow's defaults and `airflow_env` do the rest).

    Airflow writes a full default file at its first import when there is none, generating both secrets,
    so two processes importing it at once into a new home (this one and the workers' forkserver) would
    race on the file and its secrets. Written here first (atomically, mode 0600), neither writes it; an
    existing file is left as it is."""
    import secrets
    from base64 import b64encode

    from cryptography.fernet import Fernet

    if path.exists():
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(
        "# fmx run's Airflow: its defaults, with the environment of fmx.run.airflow_setup.airflow_env\n"
        f"[core]\nfernet_key = {Fernet.generate_key().decode()}\n\n"
        f"[api_auth]\njwt_secret = {b64encode(secrets.token_bytes(16)).decode()}\n"
    )
    try:
        os.link(tmp, path)  # whole or not at all; a concurrent first job's file, when it won, is kept
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def migrated_template() -> Path:
    """Where a freshly migrated, empty metadata DB of this Airflow version is kept, to be copied rather than
    migrated again by every new $FMX_HOME: $XDG_CACHE_HOME/fmx (default ~/.cache/fmx)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmx"
    return cache / f"airflow-{airflow_version()}-empty.db"


def _copy_db(source: Path, target: Path) -> bool:
    """Copy SQLite DB `source` to `target` (mode 0600) with SQLite's backup API (consistent, WAL content
    included); False when it could not (a cache that is not there or not readable is not an error)."""
    import sqlite3

    try:
        target.touch(mode=0o600)
        src, dst = sqlite3.connect(source), sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
    except (OSError, sqlite3.Error):
        return False
    return True


def _save_template(db_file: Path, template: Path) -> None:
    """Keep the just-migrated `db_file` (nothing run in it yet) as the template; a cache, so best effort."""
    tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if _copy_db(db_file, tmp):
        tmp.replace(template)  # atomic: a concurrent job reads the old state or the whole new one
    tmp.unlink(missing_ok=True)


def ensure_pool(name: str = dagkit.TRAINING_POOL, slots: int = dagkit.TRAINING_POOL_SLOTS) -> None:
    """Create the training pool if missing: tasks in a pool that does not exist wait forever."""
    from airflow.models.pool import Pool

    if Pool.get_pool(name) is None:
        Pool.create_or_update_pool(name, slots, "heavy training tasks of fmx", include_deferred=False)
