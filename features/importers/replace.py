"""What a re-import removes, so that it replaces the previous import completely.

- `drop_stale_windows(lake, windows, events)`: every users / items / user_history partition whose ds
  is not one of this import's windows (the older import's later windows, or misaligned leftovers),
  and every events(ds, surface) partition this import did not write (also a surface of a written
  window that the new log lacks).
- `drop_derived(lake)`: everything computed from the previous import's events — every partition of
  every table of features.schemas.TABLES other than the imported ones and the quarantine (today
  fm_outputs, user_embeddings, item_embeddings, loop_state, expert_examples, and any table added
  later), and the model checkpoints and records under lake path ``models/``. Called when the
  import_id changes.
Both return {table (or "models"): partitions (files) removed}, only for what held something.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow.fs as pafs

from features.lake import Lake
from features.schemas import EVENTS, ITEMS, QUARANTINE, TABLES, USER_HISTORY, USERS

WINDOWED = (USERS.name, ITEMS.name, USER_HISTORY.name)
DERIVED = tuple(t for t in TABLES if t not in (EVENTS.name, QUARANTINE.name, *WINDOWED))
MODELS_DIR = "models"


def _drop(lake: Lake, table: str, keep: Callable[[dict[str, str]], bool]) -> int:
    stale = [p for p in lake.partitions(table) if not keep(p)]
    for keys in stale:
        lake.delete(table, **keys)
    return len(stale)


def drop_stale_windows(lake: Lake, windows: set[str], events: set[tuple[str, str]]) -> dict[str, int]:
    counts = {table: _drop(lake, table, lambda p: p["ds"] in windows) for table in WINDOWED}
    counts[EVENTS.name] = _drop(lake, EVENTS.name, lambda p: (p["ds"], p["surface"]) in events)
    return {t: n for t, n in counts.items() if n}


def drop_derived(lake: Lake) -> dict[str, int]:
    counts = {table: _drop(lake, table, lambda p: False) for table in DERIVED}
    models = lake.path(MODELS_DIR)
    if lake.fs.get_file_info(models).type == pafs.FileType.Directory:
        files = lake.fs.get_file_info(pafs.FileSelector(models, recursive=True))
        counts[MODELS_DIR] = sum(info.type == pafs.FileType.File for info in files)
        lake.fs.delete_dir(models)
    return {t: n for t, n in counts.items() if n}
