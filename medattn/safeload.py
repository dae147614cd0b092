"""Read a torch file without running code from it.

``torch.load(weights_only=True)`` accepts tensors and plain data (dicts, lists, tuples, str,
bytes, numbers) and refuses everything else, which an unrestricted unpickler would construct by
calling code named in the file. Every model, weights and checkpoint file medattn opens goes
through :func:`load_plain`, which tells the two failures apart: a file that needs a Python object
(:class:`UnsafeFileError`, naming it) and a file that is not a torch file at all (or is truncated).
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch


class UnsafeFileError(Exception):
    """The file needs Python objects beyond tensors and plain data (``name`` is the first one)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"it holds a Python object ({name}) besides tensors and plain data, and "
                         "loading that could run code from the file")


class UnreadableFileError(Exception):
    """Not a torch file, or a truncated one."""


def load_plain(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with the two failures told apart.

    Raises:
        FileNotFoundError, UnsafeFileError, UnreadableFileError.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m:
            raise UnsafeFileError(m.group(1)) from None
        raise UnreadableFileError(_first_line(e)) from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and format errors of all kinds
        raise UnreadableFileError(f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Unsupported", "WeightsUnpickler error:")) and len(line) > len("WeightsUnpickler error:"):
            return line
    return text.splitlines()[0] if text else type(e).__name__
