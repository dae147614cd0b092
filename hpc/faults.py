"""Fault injection for the resume tests (tests/test_chaos.py): hold the trainer at a named
moment so that a test can signal or kill it exactly there.

Off unless a variable is set; each call then costs one comparison.

``MEDATTN_FAULT_HOLD=POINT@N``
    The N-th time this process reaches POINT it writes ``$MEDATTN_FAULT_DIR/POINT.<rank>.<pid>``
    (JSON: pid, rank, and the stage and per-stage global step of the last optimizer step this
    process took) and waits up to ``MEDATTN_FAULT_HOLD_S`` seconds (default 60), or until a stop
    signal arrives. Points: ``step`` (after an optimizer step), ``ckpt_write``
    (a checkpoint's temporary file is written and synced, not yet renamed into place),
    ``validation`` (after the first validation batch).
``MEDATTN_FAULT_AFTER_STEPS=K``
    After global step K, ``os._exit(137)``: a node failure, with no cleanup and no checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

_spec = os.environ.get("MEDATTN_FAULT_HOLD", "")
_POINT, _, _N = _spec.partition("@")
_COUNT = 0
_LAST: dict = {"stage": None, "global_step": 0}
KILL_AFTER_STEPS = int(os.environ.get("MEDATTN_FAULT_AFTER_STEPS", "0") or 0)


def point(name: str) -> None:
    """Mark that this process reached ``name`` (see the module notes)."""
    global _COUNT
    if name != _POINT:
        return
    _COUNT += 1
    if _COUNT != int(_N or 1):
        return
    from hpc.stop import STOP

    rank = os.environ.get("RANK", "0")
    marker = Path(os.environ.get("MEDATTN_FAULT_DIR", ".")) / f"{name}.{rank}.{os.getpid()}"
    from medattn.fileio import write_text

    # atomic: a watcher never reads half a marker
    write_text(marker, json.dumps({"pid": os.getpid(), "rank": int(rank), **_LAST}))
    deadline = time.time() + float(os.environ.get("MEDATTN_FAULT_HOLD_S", "60"))
    while time.time() < deadline and not STOP.requested:
        time.sleep(0.02)


def after_step(stage: str, global_step: int) -> None:
    """Called after every optimizer step (``global_step`` counts the stage's steps)."""
    _LAST["stage"], _LAST["global_step"] = stage, global_step
    if KILL_AFTER_STEPS and global_step >= KILL_AFTER_STEPS:
        os._exit(137)
