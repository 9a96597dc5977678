"""User-facing errors: each message names the file or key and says how to fix it."""

from __future__ import annotations


class SegkitError(Exception):
    """A mistake in the user's input. The CLI prints the message (no traceback) and exits 2."""


class ConfigError(SegkitError):
    """A config key has a wrong, unknown or impossible value."""


class DataError(SegkitError):
    """A data file is missing, unreadable or inconsistent with the config."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
