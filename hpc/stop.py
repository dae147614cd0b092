"""The stop flag: SIGTERM and SIGUSR2 (preemption, time limit, a sweep scheduler) ask every rank
to finish its step, checkpoint and exit with status 3.

Kept free of torch so that ``medattn train`` can install the handler as its first action,
before the seconds of importing torch and DALI: a stop that arrives while the trainer starts
is then an orderly exit (nothing trained yet, nothing to save) rather than a death by signal.
"""
from __future__ import annotations

import os
import signal


class StopFlag:
    """Set by SIGTERM/SIGUSR2 (or by a launcher); checked by every rank at step boundaries."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    def __call__(self, signum, frame):  # signal handler
        self.requested = True
        self.signum = signum

    def install(self) -> None:
        names = os.environ.get("MEDATTN_STOP_SIGNALS", "TERM,USR2").split(",")
        for n in filter(None, (s.strip() for s in names)):
            try:
                signal.signal(getattr(signal, f"SIG{n}"), self)
            except (AttributeError, ValueError):
                pass  # not the main thread, or an unknown name


STOP = StopFlag()
