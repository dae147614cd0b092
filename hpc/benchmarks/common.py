"""Shared output for benchmarks: a printed table plus a JSON record with the machine, versions
and the exact command, so docs/benchmarks.md can cite each figure."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Sequence


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
        else:
            info["device"] = "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["device"] = "cpu"
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    return info


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, file=None) -> None:
    """Print rows as an aligned plain-text table (also valid Markdown)."""
    file = file or sys.stdout
    if not rows:
        print("(no results)", file=file)
        return
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |", file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |", file=file)


def write_result(name: str, rows: list[dict[str, Any]], out: str | os.PathLike | None,
                 extra: dict[str, Any] | None = None, argv: Sequence[str] | None = None) -> Path | None:
    """Write ``{name}-{UTC time}.json`` under ``out`` (a directory) or to ``out`` if it ends in .json."""
    if out is None:
        return None
    record = {
        "benchmark": name,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "medattn " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(),
        "results": rows,
    }
    if extra:
        record.update(extra)
    out = Path(out)
    if out.suffix == ".json":
        path = out
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = out / f"{name}-{stamp}.json"
    from medattn.fileio import write_text

    write_text(path, json.dumps(record, indent=2, default=str))
    return path
