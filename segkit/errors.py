"""User-facing errors: each message names the file or key and says how to fix it."""

from __future__ import annotations


class SegkitError(Exception):
    """A mistake in the user's input. The CLI prints the message (no traceback) and exits 2."""


class ConfigError(SegkitError):
    """A config key has a wrong, unknown or impossible value."""


class DataError(SegkitError):
    """A data file is missing, unreadable or inconsistent with the config."""


class UnreadableError(DataError):
    """A file that cannot be read as what it claims to be (corrupt, truncated, or a header that promises more
    than the file holds): a command over many files reports it and goes on with the others."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
