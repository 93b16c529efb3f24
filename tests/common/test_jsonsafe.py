"""common.jsonsafe.strict_json: the one sanitiser of stage results (XCom, CLI) and lake records."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from common.jsonsafe import strict_json


def test_non_finite_floats_become_null_and_numpy_scalars_plain() -> None:
    value = {"auc": math.nan, "ne": np.float32(0.5), "rows": np.int64(3), 1: (math.inf, [np.float64(-math.inf)])}
    out = strict_json(value)
    assert out == {"auc": None, "ne": 0.5, "rows": 3, "1": [None, [None]]}
    assert type(out["rows"]) is int and type(out["ne"]) is float
    json.dumps(out, allow_nan=False)


def test_importing_it_loads_nothing_heavy() -> None:
    """fmx.dagkit imports it at DAG parse time."""
    code = "import sys, common.jsonsafe; print(sorted(n for n in ('numpy', 'torch', 'mlflow') if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
