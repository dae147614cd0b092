"""Run reports: what a researcher looks at after a run.

``medattn report --run RUN`` writes RUN/report/index.html (one self-contained file: inline CSS,
figures embedded, no scripts) and RUN/report/report.md (the same content, figures in
RUN/report/figures/). ``medattn viz`` draws heat-map overlays for chosen images. See
docs/report.md for what the report shows and how to read it.

Python API:
    >>> from hpc.report import build_report        # doctest: +SKIP
    >>> r = build_report("runs/r50", split="test", samples=12)
    >>> r.html, r.markdown, r.figures
"""
from __future__ import annotations

from hpc.report.build import ReportResult, build_report

__all__ = ["build_report", "ReportResult"]
