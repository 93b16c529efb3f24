"""The FM-lineage rule: which FM's features an expert checkpoint may consume next (`check_lineage`).

A checkpoint (experts.checkpoint) records its FM preset and the ordered list of (ds, fm_version) it consumed.
Features for a new window are refused (`FMLineageError`) when
  - they come from another FM preset (a foreign FM), or
  - their fm_version is one the expert consumed before but not the last one (an older, stale FM —
    e.g. fm_outputs left over from a rolled-back FM),
unless `rebaseline=True`, which keeps the weights and restarts the recorded lineage. The same
version as last time is accepted (the FM may skip training a day); a new version is the normal case
(the FM trains every day). FM versions named ``<preset>-<trained-through ds>-<hash>`` (parsed by
features.fm_version, the one place that knows the format) are also checked, rebaseline or not, to come from
that preset and to be trained through a window before the one they scored (leakage guard), and — without
rebaseline — not through an earlier day than the last consumed version.
"""

from __future__ import annotations

from experts.checkpoint import Checkpoint
from features.fm_version import parse_fm_version


class FMLineageError(ValueError):
    """Features come from an FM preset/version the expert was not trained with."""


def check_lineage(ckpt: Checkpoint, preset: str, versions: list[str], ds: str, rebaseline: bool = False) -> list[tuple[str, str]]:
    """The lineage after consuming `versions` at `ds`, or FMLineageError (see module docstring)."""
    if len(versions) != 1:
        raise FMLineageError(f"window {ds}: expert features come from {len(versions)} FM versions {versions}")
    version = versions[0]
    _check_version_name(version, preset, ds)
    if rebaseline:
        return [(ds, version)]
    if preset != ckpt.fm_preset:
        raise FMLineageError(
            f"expert {ckpt.surface}/{ckpt.config.variant} was trained with FM preset {ckpt.fm_preset!r}; features "
            f"for {ds} come from FM preset {preset!r}. Pass rebaseline=True (--rebaseline) to start a new lineage."
        )
    seen = [v for _, v in ckpt.fm_versions]
    if seen and version in seen and version != seen[-1]:
        raise FMLineageError(
            f"expert {ckpt.surface}/{ckpt.config.variant} last consumed fm_version {seen[-1]!r}; features for {ds} "
            f"come from the older version {version!r} (stale FM outputs?). Re-export the FM for {ds} or pass "
            "rebaseline=True (--rebaseline)."
        )
    last_day = version_day(seen[-1]) if seen else None
    day = version_day(version)
    if last_day and day and day < last_day:
        raise FMLineageError(f"fm_version {version!r} for {ds} was trained through {day}, before the last consumed "
                             f"version {seen[-1]!r}: stale FM outputs. Pass rebaseline=True to accept them.")
    return [*ckpt.fm_versions, (ds, version)]


def version_day(version: str) -> str | None:
    """The trained-through day of a ``<preset>-<ds>-<hash>`` FM version, or None for other names."""
    parsed = parse_fm_version(version)
    return parsed.day if parsed else None


def _check_version_name(version: str, preset: str, ds: str) -> None:
    parsed = parse_fm_version(version)
    if parsed is None:
        return
    if parsed.preset != preset:
        raise FMLineageError(f"fm_version {version!r} names FM preset {parsed.preset!r}, features were read "
                             f"as preset {preset!r}")
    if parsed.day >= ds:
        raise FMLineageError(f"leakage guard: fm_version {version!r} was trained through {parsed.day}, so it "
                             f"cannot supply features for window {ds}")
