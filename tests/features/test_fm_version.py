"""features.fm_version: the fm_version string is built and parsed in one place."""

from __future__ import annotations

from features.fm_version import FMVersion, format_fm_version, parse_fm_version


def test_a_built_version_parses_back() -> None:
    version = format_fm_version("small", "2026-01-03", "0123456789")
    assert version == "small-2026-01-03-0123456789"
    assert parse_fm_version(version) == FMVersion("small", "2026-01-03", "0123456789")
    assert parse_fm_version(format_fm_version("my-fm", "2026-01-03", "ab")) == FMVersion("my-fm", "2026-01-03", "ab")


def test_other_names_parse_to_none() -> None:
    for name in ("imported", "small-2026-1-3-abc", "small-2026-01-03-XYZ", "small-2026-01-03-"):
        assert parse_fm_version(name) is None
