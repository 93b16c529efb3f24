"""Strict JSON values: what a stage returns (XCom, the CLI's output) and what the lake's JSON records hold.

`strict_json` replaces every non-finite float by None (a metric can be NaN, e.g. the AUC of one class; strict
JSON has no NaN/inf) and numpy scalars by plain Python values, recursively through mappings, lists and tuples.
Imports nothing heavy (DAG files import it at parse time through fmx.dagkit): numpy scalars are recognised only
when numpy is already loaded, as it must be for one to exist.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None and numpy scalars made plain (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
