"""The FM version string: the value of the ``fm_version`` column (schemas.FM_VERSION) of fm_outputs, built and
parsed here only.

Format: ``<preset>-<trained-through ds>-<hash>``, e.g. ``small-2026-01-03-0123456789``: the FM preset, the last
window its weights trained on (YYYY-MM-DD) and the first hex digits of its serving weights' hash (fm.checkpoint
builds the name with `format_fm_version`; experts.lineage reads it with `parse_fm_version`). Other names (an
imported FM's, a test's) parse to None: readers then check what does not depend on the name.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_PATTERN = re.compile(r"^(?P<preset>.+)-(?P<day>\d{4}-\d{2}-\d{2})-(?P<digest>[0-9a-f]+)$")


class FMVersion(NamedTuple):
    """The parts of an FM version name."""

    preset: str
    day: str  # the window the FM trained through (YYYY-MM-DD)
    digest: str  # hex digits of the serving weights' hash


def format_fm_version(preset: str, trained_through: str, digest: str) -> str:
    """``<preset>-<trained_through>-<digest>`` (module docstring)."""
    return f"{preset}-{trained_through}-{digest}"


def parse_fm_version(version: str) -> FMVersion | None:
    """The parts of a ``<preset>-<ds>-<hex>`` version, or None for a name of another form."""
    m = _PATTERN.match(version)
    return FMVersion(m.group("preset"), m.group("day"), m.group("digest")) if m else None
