"""Shared fixtures: every test gets its own FMX_HOME (lake, MLflow store) under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML100K = SHARED_DATA / "ml-100k"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FMX_HOME and the MLflow store in a fresh temporary folder for each test."""
    home = tmp_path / "fmx-home"
    home.mkdir()
    monkeypatch.setenv("FMX_HOME", str(home))
    monkeypatch.delenv("FMX_LAKE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return home


@pytest.fixture
def lake_uri(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


def require_ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (it lives in ../shared/data, outside the repository)")
    return ML100K


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A lake URI holding 3 generated days (2026-01-01 .. 03) at scale "tiny", seed 0: events, users, items.

    Built once per session; treat it as read-only (copy it with shutil.copytree before writing).
    No user_history: build it with features.history.build_user_history or features.stage.ingest.
    """
    from datetime import date

    from features.generate import GeneratorConfig, generate
    from features.lake import Lake

    uri = str(tmp_path_factory.mktemp("tiny-lake") / "lake")
    generate(Lake(uri), GeneratorConfig(scale="tiny", seed=0), days=3, start=date(2026, 1, 1), progress=None)
    return uri
