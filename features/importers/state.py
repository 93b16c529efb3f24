"""Import state in the lake meta, so that a killed import leaves a lake no stage accepts.

An import writes, before its first partition, ``import_state = "running"`` with ``import_id``,
``import_started`` (UTC, ISO 8601) and ``import_command`` (the `fmx import` command line that re-runs
it) into the lake meta (features.lake, ``_lake.json``); only after its last partition it writes
``import_state = "complete"`` together with window_days, surfaces, source, origin, first_ds, last_ds
and import_id. The meta file is replaced atomically, so a reader sees one or the other.

`require_complete_import(lake)` is what every stage calls before it reads the lake: it raises
ValueError while the meta says ``running`` and does nothing for a lake that never held an import
(no import_state: e.g. generated) or whose last import completed.
"""

from __future__ import annotations

import os
import shlex
from datetime import UTC, datetime
from typing import Any

from features.lake import Lake

RUNNING, COMPLETE = "running", "complete"


def import_command(
    preset: str, path: str, lake_uri: str, mapping_file: str | None, window: str | int | None
) -> str:
    """The `fmx import` command line that runs this import again (local paths made absolute)."""
    args = ["fmx", "import", preset, os.path.abspath(path)]
    args += ["--mapping", os.path.abspath(mapping_file)] if mapping_file else []
    args += ["--window", str(window)] if window is not None else []
    lake = lake_uri if "://" in lake_uri else os.path.abspath(lake_uri)
    return shlex.join([*args, "--lake", lake])


def mark_running(lake: Lake, import_id: str, command: str) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return lake.update_meta(
        import_state=RUNNING, import_id=import_id, import_started=started, import_command=command
    )


def mark_complete(lake: Lake, **meta: Any) -> dict[str, Any]:
    return lake.update_meta(import_state=COMPLETE, **meta)


def require_complete_import(lake: Lake) -> None:
    """Raise ValueError when the lake's last import started and did not complete (see module docstring)."""
    meta = lake.meta()
    if meta.get("import_state") != RUNNING:
        return
    command = meta.get("import_command") or "fmx import ..."
    raise ValueError(
        f"lake {lake.uri}: the import {meta.get('import_id')} started at {meta.get('import_started')} "
        f"did not complete; re-run `{command}`"
    )
