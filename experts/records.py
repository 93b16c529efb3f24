"""Lake-side records of the experts: progressive eval results and the champion decision of each day.

Both are small JSON files under ``models/experts/<preset>/<surface>/``, one per day, written atomically
(`Lake.write_bytes`), so re-running a day replaces its record exactly:

- ``evals/ds=<D>/<variant>.json``: the progressive eval of `variant` on window D (the model trained
  through D-1 scored on D's rows): metrics, FM metrics, base rate, rows, trained_through.
- ``champion/ds=<D>.json``: the champion AFTER compare_and_promote(D): {"variant", "trained_through",
  "checkpoint", "decision", "version"}. The champion scored on window D is the one of the newest
  record BEFORE D (`champion_before`): a re-run of D, even after D+1 ran, scores the same model as
  the first run did, never one trained on D itself.

Every value is strict JSON (common.jsonsafe.strict_json: NaN/inf -> null).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs

from common.jsonsafe import strict_json
from features.lake import Lake
from features.windows import Window


def _dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(strict_json(record), allow_nan=False, sort_keys=True).encode()


def eval_rel(preset: str, surface: str, ds: str, variant: str) -> str:
    return f"models/experts/{preset}/{surface}/evals/ds={ds}/{variant}.json"


def write_eval(lake: Lake, preset: str, surface: str, ds: str, variant: str, record: dict[str, Any]) -> None:
    lake.write_bytes(eval_rel(preset, surface, ds, variant), _dumps(record))


def read_eval(lake: Lake, preset: str, surface: str, ds: str, variant: str) -> dict[str, Any] | None:
    rel = eval_rel(preset, surface, ds, variant)
    return json.loads(lake.read_bytes(rel)) if lake.file_exists(rel) else None


def _champion_dir(preset: str, surface: str) -> str:
    return f"models/experts/{preset}/{surface}/champion"


def champion_rel(preset: str, surface: str, ds: str) -> str:
    return f"{_champion_dir(preset, surface)}/ds={ds}.json"


def write_champion(lake: Lake, preset: str, surface: str, ds: str, record: dict[str, Any]) -> None:
    lake.write_bytes(champion_rel(preset, surface, ds), _dumps(record))


def read_champion(lake: Lake, preset: str, surface: str, ds: str) -> dict[str, Any] | None:
    """The champion record written for `ds`, or None."""
    rel = champion_rel(preset, surface, ds)
    return json.loads(lake.read_bytes(rel)) if lake.file_exists(rel) else None


def _decided_days(lake: Lake, preset: str, surface: str) -> list[str]:
    base = lake.path(_champion_dir(preset, surface))
    if lake.fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    names = (i.base_name for i in lake.fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.File)
    return sorted(n[len("ds="):-len(".json")] for n in names if n.startswith("ds=") and n.endswith(".json"))


def champion_before(lake: Lake, preset: str, surface: str, window: Window) -> dict[str, Any] | None:
    """The champion record of the newest day that ends before `window` starts, or None."""
    days = [d for d in _decided_days(lake, preset, surface) if Window.parse(d, window.days).end <= window.start]
    return json.loads(lake.read_bytes(champion_rel(preset, surface, days[-1]))) if days else None


def decided_after(lake: Lake, preset: str, surface: str, window: Window) -> bool:
    """Whether a champion decision exists for a day after `window` (then `window` is a re-run of the past)."""
    return any(d > window.ds for d in _decided_days(lake, preset, surface))
