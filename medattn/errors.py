"""User-facing errors.

Anything a user can cause with bad input (a missing file, a malformed CSV row, an unknown config
key) raises a subclass of :class:`MedattnError`. The CLI prints its message, without a traceback,
and exits with status 2. The message always names the file, row or key at fault.
"""
from __future__ import annotations

import os


class MedattnError(Exception):
    """Base class for errors caused by the user's input or environment (exit status 2)."""

    exit_code = 2


class ConfigError(MedattnError):
    """A config file or a ``key=value`` override is wrong; the message names the key."""


class DataError(MedattnError):
    """A data file is missing, unreadable or malformed.

    Args:
        path: the file (or directory) at fault.
        message: what is wrong with it.
        row: 1-based line number in a text file, or the row's image id, when known.
        column: the column at fault, when known.
    """

    def __init__(self, path: str | os.PathLike | None, message: str, *, row: int | str | None = None,
                 column: str | None = None):
        self.path = None if path is None else str(path)
        self.row = row
        self.column = column
        where = self.path or ""
        if row is not None:
            where += f", row {row}" if where else f"row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}" if where else message)


class MissingDependencyError(MedattnError):
    """An optional dependency (DALI, submitit, Ray) is not installed; names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str = ""):
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"{module} is not installed{what}: pip install 'medattn[{extra}]'")
