"""The importer's one error type: a refusal a user caused, reported as one line naming file, column or value."""

from __future__ import annotations


class ImportFailed(ValueError):
    """The import was refused: unreadable or empty source, too many bad rows, or a lake holding another source."""
