"""Read what a run directory holds, tolerating a run that is still going or was cut short.

A report must never crash on a partial run: every file is optional except the saved config
(without it the directory is not a run). What is missing or unreadable becomes a note that the
report prints, so the reader knows what they are not seeing and why.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.run import EvalDir, Run
from medattn.errors import DataError


@dataclass
class RunArtifacts:
    """Everything the report reads from ``RUN`` (None = absent)."""

    root: Path
    split: str
    config_text: str
    config: dict[str, Any]
    state: dict[str, Any]
    records: list[dict[str, Any]]
    provenance: list[dict[str, Any]]
    eval_dir: Path
    metrics: dict[str, Any] | None = None
    preds: Any = None  # pandas DataFrame of preds.csv
    data_dir: Path | None = None
    dataset_info: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ stages
    @property
    def stage_names(self) -> list[str]:
        return list((self.config.get("stages") or {}).keys())

    @property
    def done_stages(self) -> list[str]:
        st = self.state.get("stages", {})
        return [s for s in self.stage_names if st.get(s, {}).get("done")]

    @property
    def last_done_stage(self) -> str | None:
        done = self.done_stages
        return done[-1] if done else None

    # ------------------------------------------------------------------ data
    @property
    def source(self) -> dict[str, Any]:
        return dict((self.dataset_info or {}).get("source") or {})

    @property
    def split_kind(self) -> str | None:
        if self.metrics and self.metrics.get("split_kind"):
            return str(self.metrics["split_kind"])
        if self.dataset_info and self.dataset_info.get("split"):
            return str(self.dataset_info["split"])
        return None

    @property
    def data_kind(self) -> str:
        """``synthetic``, ``nih`` (real ChestX-ray14), ``other`` or ``unknown``."""
        if self.dataset_info is None:
            return "unknown"
        from medattn.data.prepared import is_synthetic

        if is_synthetic(self.dataset_info):
            return "synthetic"
        kind = str(self.source.get("kind", "")).lower()
        return "nih" if kind == "nih" else ("other" if kind else "unknown")

    @property
    def eval_labels(self) -> list[str]:
        if self.metrics and self.metrics.get("eval_labels"):
            return list(self.metrics["eval_labels"])
        if self.dataset_info:
            return list(self.dataset_info.get("eval_labels") or self.dataset_info.get("label_names") or [])
        return []

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def backbone(self) -> str:
        return str((self.config.get("model") or {}).get("backbone", "?"))


def _read_json(path: Path, notes: list[str], what: str) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{what} {path} is unreadable ({e}); left out.")
        return None


def data_dir_of(run: Run, override: str | None) -> Path | None:
    """The prepared directory: ``override``, else the one the latest launch recorded."""
    if override:
        return Path(override)
    d = run.data_path()
    return Path(d) if d else None


def collect(run_dir: str | Path, split: str = "test", data: str | None = None,
            eval_dir: str | Path | None = None) -> RunArtifacts:
    """Read a run directory.

    Args:
        run_dir: the run (``medattn train --out``).
        split: the evaluated split whose ``metrics.json`` the report shows.
        data: the prepared directory (default: the one in provenance.json).
        eval_dir: where the evaluation lives (default RUN/eval or RUN/eval_<split>).

    Raises:
        DataError: ``run_dir`` is not a run directory (no config.yaml).
    """
    import yaml

    run = Run(run_dir).require()
    root = run.root
    notes: list[str] = []
    text = run.config_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DataError(run.config_path, f"unreadable YAML: {e}") from None
    try:
        state = run.state()
    except DataError as e:
        notes.append(f"{e}; left out.")
        state = {"stages": {}}
    prov = run.provenance()
    records = run.records(notes)
    edir = Path(eval_dir) if eval_dir else run.eval_dir(split)
    art = RunArtifacts(root=root, split=split, config_text=text, config=config, state=state, records=records,
                       provenance=prov, eval_dir=edir, notes=notes)
    art.metrics = _read_json(EvalDir(edir).metrics_path, notes, "evaluation")
    preds_path = EvalDir(edir).preds_path
    if art.metrics is not None and preds_path.is_file():
        import pandas as pd

        try:
            art.preds = pd.read_csv(preds_path)
        except Exception as e:  # pandas raises several parser errors
            notes.append(f"{preds_path} is unreadable ({e}); ROC curves left out.")
    art.data_dir = data_dir_of(run, data)
    if art.data_dir is not None:
        from medattn.data.prepared import Prepared

        info = Prepared(art.data_dir).info_path
        if info.is_file():
            art.dataset_info = _read_json(info, notes, "dataset description")
        else:
            notes.append(f"the prepared data {art.data_dir} is not here (no dataset.json): the data source is "
                         f"unknown and heat-map overlays need it; pass --data PREP.")
    return art


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
