"""Export errors, split so the CLI can tell a user's mistake from a failed check."""
from __future__ import annotations


class ExportError(RuntimeError):
    """A user-facing problem (bad argument, existing output, missing data): one line, exit code 2."""


class ExportCheckError(ExportError):
    """An export-time check failed (checker, parity, robustness): the graphs must not be shipped."""
