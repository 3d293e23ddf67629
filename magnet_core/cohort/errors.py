"""Exceptions shared by light modules (no pandas, no torch): DataError for user-facing data problems."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing problem with input data; the message names the file and what is wrong."""
