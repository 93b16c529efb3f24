"""The FM versions index of a preset: models/fm/<preset>/versions.json, {ds: {"fm_version", "parent", "path",
"steps"}} (layout: fm.checkpoint). Without torch: fmx_fm's `plan` reads it to skip a day that is done, and a
day's first tasks run before their worker has imported torch (fmx.run.inprocess)."""

from __future__ import annotations

import json
from typing import Any

from features.lake import Lake

ROOT = ("models", "fm")


def versions_path(preset: str) -> str:
    return "/".join([*ROOT, preset, "versions.json"])


def read_versions(lake: Lake, preset: str) -> dict[str, dict[str, Any]]:
    path = versions_path(preset)
    return json.loads(lake.read_bytes(path)) if lake.file_exists(path) else {}


def record_version(lake: Lake, preset: str, ds: str, entry: dict[str, Any]) -> None:
    """Add or replace ds's entry in the versions index (single writer: the rank-0 trainer of that ds)."""
    versions = read_versions(lake, preset) | {ds: entry}
    lake.write_bytes(versions_path(preset), json.dumps(dict(sorted(versions.items())), indent=2).encode())
