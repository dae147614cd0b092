"""medattn.progress: plain lines in a batch log, silent when disabled, a heartbeat for one long call."""
from __future__ import annotations

import io
import time

from medattn.progress import Heartbeat, Progress


def test_batch_log_lines_count_rate_and_eta():
    out = io.StringIO()
    p = Progress(4, "medattn predict", unit="img", bar=False, every_s=0.0, stream=out)
    for _ in range(4):
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("medattn predict: 1/4 img (25%), ") and "img/s, ETA" in lines[0]
    assert lines[3].startswith("medattn predict: 4/4 img (100%)")
    assert lines[-1].endswith("(done)")


def test_quiet_below_the_interval_and_when_disabled():
    out = io.StringIO()
    with Progress(10, "medattn eval", unit="batch", bar=False, every_s=3600, stream=out) as p:
        p.update(10)
        p.line("error: x.png: no such file")  # messages always go out
    assert out.getvalue() == "medattn eval: error: x.png: no such file\n"
    out = io.StringIO()
    with Progress(10, "medattn eval", bar=False, every_s=0.0, stream=out, enabled=False) as p:
        p.update(10)
        p.line("hidden")
    assert out.getvalue() == "" and p.done == 10


def test_heartbeat_in_a_batch_log():
    out = io.StringIO()
    with Heartbeat("medattn export", "tracing and writing onnx", every_s=0.05, bar=False, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "medattn export: tracing and writing onnx ..."
    assert any(line.startswith("medattn export: tracing and writing onnx ... ") and line.endswith(" s")
               for line in lines[1:-1])
    assert lines[-1].startswith("medattn export: tracing and writing onnx: done in ")
