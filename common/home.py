"""`fmx_home()`: fmx's working folder, the one place ``$FMX_HOME`` is read.

Default ``./.fmx``. It holds the default lake (``lake/``), the local MLflow store (``mlflow.db``,
``mlartifacts/``), the Airflow home of `fmx run` and the servers of `fmx up` (``airflow/``, ``servers/``),
and host-local locks (``locks/``).
"""

from __future__ import annotations

import os
from pathlib import Path


def fmx_home() -> Path:
    """$FMX_HOME (default ./.fmx), absolute."""
    return Path(os.environ.get("FMX_HOME", ".fmx")).absolute()
