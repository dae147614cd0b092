"""The stop flag: SIGTERM, SIGUSR2 and SIGINT ask every rank to finish its step, save a
checkpoint and exit.

Which signal means what (docs/slurm.md, "Signals"):

* SIGUSR2 (``--signal=USR2@N`` before a time limit, preemption, ``medattn submit``'s requeue) and
  SIGTERM (``scancel``, a preemption's grace period, a sweep stopping a trial): checkpoint and
  exit with status 3, "stopped, rerun to resume", which launchers turn into a requeue.
* SIGINT (Ctrl-C): the same checkpoint, then exit status 130, the shell's "interrupted", so a
  person who pressed Ctrl-C is not mistaken for a scheduler that wants the job requeued.

Kept free of torch so that ``medattn train`` can install the handler as its first action,
before the seconds of importing torch and DALI: a stop that arrives while the trainer starts
is then an orderly exit (nothing trained yet, nothing to save) rather than a death by signal.
Loader worker processes ignore these signals (hpc/loader/workers.py): only the trainer decides
when to stop, so a signal sent to the whole process group cannot kill the data pipeline under
it before the checkpoint.
"""
from __future__ import annotations

import os
import signal

EXIT_CHECKPOINTED = 3  # stopped by a scheduler's signal after saving a checkpoint: rerun to resume
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT) after saving a checkpoint: 128 + SIGINT


class StopFlag:
    """Set by SIGTERM/SIGUSR2/SIGINT (or by a launcher); checked by every rank at step boundaries."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    def __call__(self, signum, frame):  # signal handler
        first = not self.requested
        self.requested = True
        if self.signum is None or signum == signal.SIGINT:
            self.signum = signum  # Ctrl-C wins: a person asked, whatever the scheduler said
        if first and signum == signal.SIGINT:
            # Feedback on the terminal only (a scheduler's signals go to batch logs, which the
            # trainer writes itself once it stops). os.write: safe inside a handler.
            try:
                os.write(2, b"\nmedattn: interrupt: saving a checkpoint at the next step boundary "
                            b"(rerun the same command to resume)\n")
            except OSError:
                pass

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def exit_status(self) -> int:
        """Exit status of a run stopped by this flag (after its checkpoint)."""
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_CHECKPOINTED

    def install(self) -> None:
        names = os.environ.get("MEDATTN_STOP_SIGNALS", "TERM,USR2,INT").split(",")
        for n in filter(None, (s.strip() for s in names)):
            try:
                signal.signal(getattr(signal, f"SIG{n}"), self)
            except (AttributeError, ValueError):
                pass  # not the main thread, or an unknown name


STOP = StopFlag()
