"""Atomic file writes: the one way the product replaces a file (or a folder) that something reads.

One durability rule for every writer: the new content goes to a temporary name in the same
folder, is flushed and fsync'd, renamed over the target with ``os.replace`` and the folder is
fsync'd. A kill or a node crash at any moment leaves the old file or the new one, never half
of one, and once the call returns the new file survives a power loss (without the file fsync a
crash after the rename can leave a zero-length or truncated file under the final name: the
rename reaches the disk before the data; without the folder fsync the rename itself can be lost).

Temporary names are ``.NAME.tmp<pid>-<random>`` (hidden, matched by :data:`TEMP_GLOB`), so a
reader that lists a folder never sees them and a rerun can delete those an earlier kill left
(:func:`remove_temporaries`). A write that fails removes its temporary file.

Variants: :func:`atomic_path` (a writer that wants a path: torch.jit ``save``, ONNX, pandas),
:func:`atomic_file` (a writer that wants a file object: ``torch.save``, ``pickle.dump``,
``savefig``), :func:`write_bytes`, :func:`write_text`, :func:`write_json`; :func:`publish` for a
writer that fills its own temporary (a shard streamed to ``.partial``, a report folder). With
``keep_previous``, the file being replaced is first kept under that name (a hard link, so the
target never disappears): a run keeps its previous resume checkpoint that way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

TEMP_GLOB = ".*.tmp*"


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (unique per process and call: a background writer
    thread and the main thread may write in the same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder ``path`` durable (best effort: not every file system can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _keep(path: Path, previous: Path) -> None:
    """``previous`` becomes the current content of ``path`` (a hard link, else a copy), atomically."""
    if not path.is_file():
        return
    tmp = temp_name(previous)
    try:
        try:
            os.link(path, tmp)  # files here are only ever replaced by rename, never written in place
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, previous)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None,
            before_replace: Callable[[], None] | None = None) -> Path:
    """Move the finished temporary ``tmp`` (a file or a folder, in ``path``'s folder) to ``path``
    under the durability rule. A folder replaces a folder: the old one is renamed aside first and
    removed after. ``before_replace``: called after the data is on disk, just before the rename
    (fault injection in tests)."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        old = None
        if path.exists():
            old = temp_name(path)
            os.replace(path, old)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return path
    _fsync_file(tmp)
    if keep_previous is not None:
        _keep(path, Path(keep_previous))
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_previous: str | os.PathLike | None = None,
                before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: on a clean exit ``tmp`` becomes ``p``
    (:func:`publish`); on an error it is removed and ``p`` is left as it was. Parent folders
    are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        publish(tmp, path, keep_previous, before_replace)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", keep_previous: str | os.PathLike | None = None,
                before_replace: Callable[[], None] | None = None, **open_kw: Any) -> Iterator[Any]:
    """``with atomic_file(p) as f: f.write(...)``: a file object on a temporary name (see
    :func:`atomic_path`)."""
    with atomic_path(path, keep_previous, before_replace) as tmp:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()


def write_bytes(path: str | os.PathLike, data: bytes, keep_previous: str | os.PathLike | None = None) -> Path:
    with atomic_file(path, "wb", keep_previous) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8); ``mode``: file permissions (e.g. 0o755 for a script)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            tmp.chmod(mode)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, default: Any = None) -> Path:
    """``obj`` as JSON with a final newline."""
    return write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes left in ``folder`` (not recursive)."""
    gone = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(TEMP_GLOB):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
