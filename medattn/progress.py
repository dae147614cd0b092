"""Progress of a long command, the way the house shows it: a tqdm bar on a terminal, and in a batch
log (SLURM, CI, a pipe) one plain line every ``every_s`` seconds and one at the end, so a log
shows that a 40-minute ``medattn predict`` is alive without filling with carriage returns.

Used by ``synth``, ``prepare``, ``predict``, ``eval`` (its forward passes) and ``export`` (a
:class:`Heartbeat`, since tracing is one long call). The trainer has its own per-epoch bars and
lines (:mod:`hpc.runlog`), which carry the run's ETA as well.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

LOG_EVERY_S = 30.0  # plain progress lines when stderr is not a terminal


class Progress:
    """Count ``total`` items (``unit``) for command ``prog`` (the prefix of each log line).

    Args:
        total: how many items; 0 or None: unknown (lines give the count and rate only).
        prog: the line prefix, e.g. ``medattn predict``.
        desc: the bar's label.
        unit: what is counted (``img``, ``batch``).
        bar: a tqdm bar (True), plain lines (False), or by whether ``stream`` is a terminal (None).
        enabled: False gives a silent counter (e.g. ranks other than 0).
    """

    def __init__(self, total: int | None, prog: str, desc: str = "", unit: str = "img", bar: bool | None = None,
                 enabled: bool = True, every_s: float | None = None, stream: TextIO | None = None):
        self.total, self.prog, self.desc, self.unit = total or 0, prog, desc or prog.split()[-1], unit
        self.enabled, self.every_s = enabled, LOG_EVERY_S if every_s is None else every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self._bar = None
        use_bar = (self.stream.isatty() if bar is None else bar) and enabled
        if use_bar:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total or None, unit=unit, desc=self.desc, dynamic_ncols=True,
                                 leave=False, file=self.stream)
            except ImportError:  # a bare environment: plain lines
                self._bar = None

    def line(self, msg: str) -> None:
        """A plain line under the command's name (through the bar on a terminal)."""
        if not self.enabled:
            return
        text = f"{self.prog}: {msg}"
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, k: int = 1) -> None:
        self.done += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.line(self._status(now))

    def _status(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-9)
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            return (f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:.1f} {self.unit}/s, ETA {eta / 60:.1f} min")
        return f"{self.done} {self.unit}, {rate:.1f} {self.unit}/s"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        """Remove the bar; in a batch log, a final line when any lines were due (a run longer than
        ``every_s``), so the last count is in the log."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.elapsed >= self.every_s:
            self.line(self._status(time.perf_counter()) + " (done)")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Heartbeat:
    """For one long call (tracing a model for export): on a terminal, a bar that counts seconds;
    in a batch log, ``<prog>: <what> ... N s`` every ``every_s`` seconds until the call returns."""

    def __init__(self, prog: str, what: str, every_s: float | None = None, bar: bool | None = None,
                 stream: TextIO | None = None):
        self.progress = Progress(None, prog, desc=what, unit="s", bar=bar, every_s=every_s, stream=stream)
        self.what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        tick = 1.0 if self.progress._bar is not None else self.progress.every_s
        while not self._stop.wait(tick):
            if self.progress._bar is not None:
                self.progress._bar.update(1)
            else:
                self.progress.line(f"{self.what} ... {self.progress.elapsed:.0f} s")

    def __enter__(self) -> "Heartbeat":
        if self.progress._bar is None:
            self.progress.line(f"{self.what} ...")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.progress._bar is not None:
            self.progress._bar.close()
        else:
            self.progress.line(f"{self.what}: done in {self.progress.elapsed:.0f} s")
