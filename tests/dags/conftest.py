"""Airflow for the DAG tests: a throw-away AIRFLOW_HOME, no example DAGs, the repository's dags/ folder.

Set at import (before any test imports airflow), because Airflow reads its configuration once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="fmx-airflow-test-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER))
