"""The migrated-DB template of `fmx run`: saved once (atomically), copied into a new home, a bad one ignored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fmx.run import airflow_setup


def _db(path: Path, rows: int) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # the copy must include what is still in the WAL
        conn.execute("CREATE TABLE alembic_version (version_num TEXT)")
        conn.executemany("INSERT INTO alembic_version VALUES (?)", [(str(i),) for i in range(rows)])
    return path


def test_template_is_saved_then_copied_with_private_mode(tmp_path: Path) -> None:
    source, template = _db(tmp_path / "migrated.db", 3), tmp_path / "cache" / "airflow-x-empty.db"
    airflow_setup._save_template(source, template)
    assert template.exists() and not list(template.parent.glob("*.tmp"))
    target = tmp_path / "home" / "airflow.db"
    target.parent.mkdir()
    assert airflow_setup._copy_db(template, target)
    assert target.stat().st_mode & 0o077 == 0
    with sqlite3.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (3,)


def test_an_unreadable_template_is_not_used(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    assert not airflow_setup._copy_db(bad, tmp_path / "airflow.db")


def test_template_lives_in_the_cache_named_by_airflow_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = airflow_setup.migrated_template()
    assert path.parent == tmp_path / "fmx" and path.name.startswith("airflow-3.") and path.suffix == ".db"


def test_a_new_home_gets_a_private_config_with_both_secrets_and_an_existing_one_is_kept(tmp_path: Path) -> None:
    import configparser

    from cryptography.fernet import Fernet

    cfg = tmp_path / "airflow.cfg"
    airflow_setup.write_config(cfg)
    assert cfg.stat().st_mode & 0o077 == 0 and not list(tmp_path.glob("*.tmp"))
    parser = configparser.ConfigParser()
    parser.read(cfg)
    Fernet(parser["core"]["fernet_key"].encode())  # a valid key, or this raises
    assert len(parser["api_auth"]["jwt_secret"]) >= 16
    before = cfg.read_text()
    airflow_setup.write_config(cfg)  # a second job on the same home: the secrets stay
    assert cfg.read_text() == before


CONFIGURE = """
import sys
from pathlib import Path
from fmx.run import airflow_setup
airflow_setup.configure_airflow(Path(sys.argv[1]))
print("migrated" if "alembic.command" in sys.modules else "not migrated")  # upgradedb runs alembic's command
"""


def test_a_db_this_airflow_brought_to_head_is_not_migrated_again(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def configure(home: Path) -> str:
        out = subprocess.run([sys.executable, "-c", CONFIGURE, str(home)],
                             capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    version = airflow_setup.airflow_version()
    first, second = tmp_path / "first", tmp_path / "second"
    assert configure(first) == "migrated"  # no template yet: migrated from scratch, the template saved
    mark = first / "airflow" / airflow_setup.MIGRATED_MARK
    assert mark.read_text() == version
    assert configure(second) == "not migrated"  # a copy of the template: at head by construction
    assert (second / "airflow" / airflow_setup.MIGRATED_MARK).read_text() == version
    assert configure(first) == "not migrated"  # a second job on the same home
    mark.write_text("2.10.0")  # brought to head by another Airflow: this one migrates it
    assert configure(first) == "migrated" and mark.read_text() == version
    (first / "airflow" / "airflow.db").unlink()  # a new DB in an old home: its old mark does not count
    (first / "airflow" / "airflow.db-wal").unlink(missing_ok=True)
    assert configure(first) == "not migrated"  # copied from the template again
    with sqlite3.connect(first / "airflow" / "airflow.db") as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
