"""Loader worker processes that survive the scheduler's signals and die with their trainer.

SLURM signals every process of a job step (``scancel --signal=USR2``, ``--signal=USR2@N``, the
SIGTERM of a preemption or a time limit), a terminal's Ctrl-C reaches the whole foreground
process group, and a sweep stops a trial with ``killpg(SIGTERM)``. The DALI external-source
workers and the DataLoader workers are in that group too. With the default actions they die at
once, the next batch fails ("Worker data receiving interrupted") or blocks forever in DALI's
shared-memory queue, and the trainer never reaches the step boundary where it would have saved
its checkpoint. So:

* the trainer alone acts on SIGINT, SIGTERM and SIGUSR2 (hpc/stop.py); a worker ignores them;
* a worker still obeys its own pool: DALI and the DataLoader end a stuck worker with
  ``Process.terminate()`` (SIGTERM from the parent), which a worker honours because it can tell
  the sender (``sigwaitinfo`` gives the sending pid);
* a worker dies with the trainer (``PR_SET_PDEATHSIG``): a trainer killed with SIGKILL leaves no
  orphan holding shared memory and CPU.

No window is left open: the creating thread blocks the three signals while workers are started
(:func:`spawn_guard`), so a worker is born with them blocked (the mask survives fork and exec)
and keeps them blocked until :func:`setup_worker` has taken over. A signal that reaches the
trainer meanwhile stays pending and is delivered when the guard ends.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1
_done = False


@contextlib.contextmanager
def spawn_guard() -> Iterator[None]:
    """Block the stop signals in this thread while worker processes are created."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives (Python-handled) signals; nothing to guard
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _parent_pid() -> int | None:
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None else None


def _die_with_parent(parent: int | None) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(0)  # the trainer died before the request took effect


def _obey_parent_terminate(parent: int | None) -> None:
    """Runs in a daemon thread: SIGTERM from the pool's owner ends the worker, any other is dropped."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if parent is None or info.si_pid == parent:
            os._exit(128 + signal.SIGTERM)


def setup_worker(*_args) -> None:
    """Make this loader worker process ignore the stop signals (see the module notes).

    Called first thing in every worker: as the DataLoader's ``worker_init_fn`` and when a
    :class:`~hpc.loader.source.BatchSource` is unpickled in a DALI worker. Idempotent; does
    nothing outside a multiprocessing child.
    """
    global _done
    parent = _parent_pid()
    if _done or parent is None:
        return
    _done = True
    # SIGTERM stays blocked in every thread; one thread takes it with the sender's pid.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_parent_terminate, args=(parent,), name="medattn-sigterm", daemon=True).start()
    for s in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    # Pending INT/USR2 (sent while the guard was up) are discarded now that they are ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR2})
    _die_with_parent(parent)
