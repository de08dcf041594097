"""The one error type raised for bad user data."""

from __future__ import annotations


class DataValidationError(ValueError):
    """Input data do not satisfy the SeriesFrame contract.

    Messages name the column / key / item at fault, say what was expected and how to fix it.
    Subclasses ValueError so callers that already catch ValueError keep working.
    """
