"""The one small exception hierarchy of the project.

Every error a user can cause (bad config, bad data, a missing upstream stage) derives from
TraceError, and its message says what to change. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class TraceError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(TraceError):
    """A config value is invalid; raised before any work starts."""


class SchemaError(TraceError):
    """A Parquet file does not match its declared contract (or is not readable Parquet)."""


class StageError(TraceError):
    """A stage cannot run: missing inputs, an upstream stage not complete, a backend failure."""


class NotBuiltError(TraceError):
    """A command that is planned but not built yet."""
