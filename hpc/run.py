"""A run directory: the one owner of its layout, its readers and its writers.

Layout (nothing else in the product spells these names)::

    RUN/config.yaml            resolved config (saved once; a resumed run must match it)
    RUN/provenance.json        one record per launch: git sha, versions, hosts, device, data, command
    RUN/state.json             which stages are done, their best metric
    RUN/metrics.jsonl          one JSON object per finished epoch
    RUN/ckpt/<stage>/last.pt   everything needed to resume the stage exactly
    RUN/ckpt/<stage>/last.prev.pt   the last.pt before the latest save (a resume falls back to it
                               when last.pt cannot be read: a crash before its data reached the disk)
    RUN/ckpt/<stage>/last.unreadable.pt   such an unreadable last.pt, set aside by the resume
    RUN/ckpt/<stage>/best.pt   the weights of the stage's best validation epoch (feeds the next stage)
    RUN/tb/                    TensorBoard
    RUN/eval/, RUN/eval_<split>/     ``medattn eval`` (metrics.json, preds.csv, ...)
    RUN/report/, RUN/report_<split>/ ``medattn report``
    RUN/viz/                   ``medattn viz`` overlays
    RUN/slurm/                 SLURM logs of ``medattn submit`` / ``sbatch`` (sbatch-<job>.out),
                               jobs.jsonl: one line per submission
    RUN/train.log              a sweep's trainer output;  RUN/sweep_trial.json: a sweep trial's ledger

Every write is atomic and durable (medattn.fileio: a temporary file in the same directory, fsync'd,
renamed into place, the directory fsync'd), so a kill at any moment leaves the old file or the
new one, never half of one; the metrics log is appended a
whole line at a time and a torn last line is skipped when read.

A trained model comes back through :func:`hpc.inference.load_model` (the inference floor), which
reads the run through this class.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hpc.checkpoint import BackgroundWriter, atomic_torch_save, load as load_checkpoint_file
from medattn import fileio
from medattn.fileio import write_text as atomic_write_text
from medattn.errors import DataError, MedattnError

CHECKPOINT_KINDS = ("best", "last")
# Config keys that change how samples are loaded, never which samples or their pixels: a resumed
# or resubmitted run may change them (e.g. fewer workers on a smaller node), as the runtime section.
LOADER_ONLY_KEYS = ("data.num_workers", "data.prefetch")


class EvalDir:
    """One evaluation's folder: RUN/eval, RUN/eval_<split>, RUN/eval/external-<dataset>, or the
    ``--out-dir`` of ``medattn eval`` (written by :mod:`hpc.evaluate` and :mod:`hpc.external_eval`,
    read by the report)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"EvalDir({str(self.root)!r})"

    @property
    def metrics_path(self) -> Path:
        """The metrics and their provenance (stage, checkpoint, split, intervals, timing)."""
        return self.root / "metrics.json"

    @property
    def preds_path(self) -> Path:
        """One row per image (and branch): probabilities and labels."""
        return self.root / "preds.csv"

    @property
    def per_image_path(self) -> Path:
        """Per-image scores of methods that have them (e.g. segmentation Dice)."""
        return self.root / "per_image.csv"

    @property
    def boxes_path(self) -> Path:
        """The attention boxes of methods that predict one."""
        return self.root / "boxes.csv"

    def written(self) -> list[Path]:
        """The files of this evaluation that exist, metrics first."""
        return [p for p in (self.metrics_path, self.preds_path, self.per_image_path, self.boxes_path) if p.is_file()]


class Run:
    """The run directory ``root`` (it need not exist yet)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._writer: BackgroundWriter | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance_path(self) -> Path:
        return self.root / "provenance.json"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb_dir(self) -> Path:
        return self.root / "tb"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    def checkpoint(self, stage: str, kind: str = "last") -> Path:
        """``kind``: ``last`` (resume state) or ``best`` (the stage's selected weights)."""
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind {kind!r} is not one of {', '.join(CHECKPOINT_KINDS)}")
        return self.root / "ckpt" / stage / f"{kind}.pt"

    def previous_checkpoint(self, stage: str) -> Path:
        """The stage's resume checkpoint before the latest one (kept by every ``last`` save)."""
        return self.root / "ckpt" / stage / "last.prev.pt"

    def stage_checkpoints(self, stage: str) -> list[Path]:
        """Every checkpoint file a stage may have (best, last, the previous last, a set-aside one)."""
        return [*(self.checkpoint(stage, k) for k in CHECKPOINT_KINDS), self.previous_checkpoint(stage),
                self.unreadable_checkpoint(stage)]

    def unreadable_checkpoint(self, stage: str) -> Path:
        """Where a resume sets aside a ``last`` checkpoint it could not read (for a post-mortem)."""
        return self.root / "ckpt" / stage / "last.unreadable.pt"

    def eval_dir(self, split: str = "test") -> Path:
        return self.root / ("eval" if split == "test" else f"eval_{split}")

    def evaluation(self, split: str = "test", out_dir: str | os.PathLike | None = None) -> EvalDir:
        """The files of ``medattn eval --split SPLIT`` (in ``out_dir`` when one was given)."""
        return EvalDir(out_dir if out_dir else self.eval_dir(split))

    def external_evaluation(self, dataset: str, out_dir: str | os.PathLike | None = None) -> EvalDir:
        """The files of ``medattn eval --dataset DATASET``."""
        return EvalDir(out_dir if out_dir else self.external_eval_dir(dataset))

    @property
    def calibration_path(self) -> Path:
        """Temperatures and operating-point thresholds fitted on the validation split by
        ``medattn eval`` (read by ``medattn predict --calibrated / --operating-point``)."""
        return self.root / "calibration.json"

    def external_eval_dir(self, dataset: str) -> Path:
        """Where ``medattn eval --dataset DATASET`` writes (beside the in-distribution eval)."""
        return self.root / "eval" / f"external-{dataset}"

    def external_eval_dirs(self) -> dict[str, Path]:
        """``{dataset: directory}`` of every external evaluation written so far."""
        base = self.root / "eval"
        return {d.name[len("external-"):]: d for d in sorted(base.glob("external-*")) if EvalDir(d).metrics_path.is_file()}

    def report_dir(self, split: str = "test") -> Path:
        return self.root / ("report" if split == "test" else f"report_{split}")

    @property
    def viz_dir(self) -> Path:
        return self.root / "viz"

    def exists(self) -> bool:
        """Whether this is a run directory (it has a saved config)."""
        return self.config_path.is_file()

    def require(self) -> "Run":
        """Raise a DataError naming the file when this is not a run directory."""
        if not self.root.is_dir():
            raise DataError(self.root, "run directory does not exist")
        if not self.exists():
            raise DataError(self.config_path, "not a run directory (no config.yaml): train first with "
                                              "`medattn train --out`")
        return self

    # ------------------------------------------------------------------ config
    def config(self, overrides: list[str] | None = None):
        from medattn.config import load_saved_config

        return load_saved_config(self.require().config_path, overrides)

    def config_text(self) -> str:
        return self.require().config_path.read_text()

    def config_diff(self, cfg) -> list[str]:
        """The keys of ``cfg`` that differ from the saved config, each as ``"key: saved -> new"``
        (``data.num_workers: 4 -> 2``). The ``runtime`` section and :data:`LOADER_ONLY_KEYS` may
        differ (they do not change the science), and so may raised ``stages.<stage>.epochs`` (see
        :meth:`raised_epochs`). Empty when there is no saved config yet."""
        if not self.exists():
            return []
        from hpc.runlog import flatten

        old, new = self.config().to_dict(), cfg.to_dict()
        new = _without_raised_epochs(old, new)
        a, b = flatten(old), flatten(new)
        missing = object()
        out = []
        for k in sorted(set(a) | set(b)):
            if k.split(".")[0] == "runtime" or k in LOADER_ONLY_KEYS:
                continue
            x, y = a.get(k, missing), b.get(k, missing)
            if x != y:
                out.append(f"{k}: {'(none)' if x is missing else repr(x)} -> {'(none)' if y is missing else repr(y)}")
        return out

    def raised_epochs(self, cfg) -> dict[str, tuple[int, int]]:
        """``{stage: (saved epochs, new epochs)}`` for the stages whose epochs ``cfg`` raises.

        Raising a stage's epochs is the one change of the science a run accepts: the run
        continues (:meth:`reopen`). Lowering them is refused (the epochs are trained already)."""
        if not self.exists():
            return {}
        old = self.config().to_dict().get("stages") or {}
        new = cfg.to_dict().get("stages") or {}
        return {s: (old[s]["epochs"], new[s]["epochs"]) for s in new
                if s in old and new[s]["epochs"] > old[s]["epochs"]}

    def check_config(self, cfg, what: str = "resume") -> None:
        """Refuse a config that differs from the saved one, naming each key that differs with its
        saved and new values (raised epochs, the runtime section and loader-only keys are accepted)."""
        from medattn.errors import ConfigError

        if self.exists():
            old = self.config().to_dict().get("stages") or {}
            for s, st in (cfg.to_dict().get("stages") or {}).items():
                if s in old and st["epochs"] < old[s]["epochs"]:
                    raise ConfigError(f"{self.root}: stages.{s}.epochs={st['epochs']} is lower than the run's "
                                      f"{old[s]['epochs']}; a run can be continued with more epochs, never fewer "
                                      "(use a new --out, or --init-from this run)")
        diff = self.config_diff(cfg)
        if diff:
            shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more key(s)" if len(diff) > 8 else "")
            raise ConfigError(f"{self.root} holds a run with a different config ({shown}); {what} "
                              "with the same config and overrides (only stages.<stage>.epochs may be raised, to "
                              "continue it; runtime.* and " + ", ".join(LOADER_ONLY_KEYS) + " may change), or use "
                              "a new --out")

    def reopen_plan(self, cfg, order: list[str]) -> tuple[list[str], list[str]]:
        """(continued, restarted): what :meth:`reopen` would do for ``cfg`` (reads only).

        The first lengthened stage that has trained continues from its ``last`` checkpoint (its
        optimizer, schedule state, best metric and epoch counter), so only the new epochs train.
        Every stage after it that has trained is trained again from its start: it started from
        the lengthened stage's best weights, which the new epochs may change."""
        raised = self.raised_epochs(cfg)
        if not raised:
            return [], []
        st = self.state()["stages"]

        def started(s: str) -> bool:
            return bool(st.get(s, {}).get("done")) or any(self.has_checkpoint(s, k) for k in CHECKPOINT_KINDS)

        first = next((i for i, s in enumerate(order) if s in raised and started(s)), None)
        if first is None:
            return [], []
        return [order[first]], [s for s in order[first + 1:] if started(s)]

    def reopen(self, cfg, order: list[str]) -> tuple[list[str], list[str]]:
        """Continue a run whose ``cfg`` raises some stages' epochs (see :meth:`reopen_plan`):
        the continued stage is marked not done; the restarted stages lose their checkpoints,
        epoch records and state. The new config is saved last, so a kill in between redoes the
        same work. Returns (continued, restarted)."""
        continued, restarted = self.reopen_plan(cfg, order)
        if continued:
            st = self.state()
            for s in continued + restarted:
                st["stages"].pop(s, None)
            atomic_write_text(self.state_path, json.dumps(st, indent=2))
            for s in restarted:
                for path in self.stage_checkpoints(s):
                    path.unlink(missing_ok=True)
                self.drop_records_from(s, -1)  # its epoch-0 record too: the stage starts again
        self.save_config(cfg)
        return continued, restarted

    def save_config(self, cfg) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, cfg.to_yaml())

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"stages": {}}
        try:
            st = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(self.state_path, f"unreadable state file: {e}") from None
        st.setdefault("stages", {})
        return st

    def stage_done(self, stage: str) -> bool:
        return bool(self.state()["stages"].get(stage, {}).get("done"))

    def stages_done(self, stages: list[str]) -> bool:
        """All of ``stages`` done (False for a directory that is not a run, or an unreadable state)."""
        try:
            st = self.state()["stages"]
        except DataError:
            return False
        return all(st.get(s, {}).get("done") for s in stages)

    def done_stages(self, order: list[str]) -> list[str]:
        st = self.state()["stages"]
        return [s for s in order if st.get(s, {}).get("done")]

    def mark_stage(self, stage: str, **info: Any) -> None:
        st = self.state()
        st["stages"].setdefault(stage, {}).update(info)
        atomic_write_text(self.state_path, json.dumps(st, indent=2))

    # ------------------------------------------------------------------ provenance
    def provenance(self) -> list[dict[str, Any]]:
        if not self.provenance_path.is_file():
            return []
        try:
            hist = json.loads(self.provenance_path.read_text())
        except (OSError, json.JSONDecodeError):
            return []
        return hist if isinstance(hist, list) else [hist]

    def append_provenance(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.provenance_path, json.dumps(self.provenance() + [record], indent=2))

    def data_path(self) -> str | None:
        """The prepared directory the latest launch trained on."""
        for rec in reversed(self.provenance()):
            if rec.get("data"):
                return str(rec["data"])
        return None

    # ------------------------------------------------------------------ metrics log
    def records(self, notes: list[str] | None = None) -> list[dict[str, Any]]:
        """The epoch records; a torn line (a kill mid-write) is skipped (and noted in ``notes``)."""
        if not self.metrics_path.is_file():
            return []
        out, bad = [], 0
        for line in self.metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
        if bad and notes is not None:
            notes.append(f"{self.metrics_path}: skipped {bad} unreadable line(s) (a write cut short by a kill).")
        return out

    def append_record(self, record: dict[str, Any]) -> None:
        """One epoch record, as one line, synced (a report or a sweep may read it at once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def drop_records_from(self, stage: str, epoch: int) -> None:
        """Remove records of ``stage`` after ``epoch`` epochs (they are about to be retrained), so
        each (stage, epoch) appears once; ``epoch=-1`` removes the epoch-0 record (the validation of
        the starting weights) too."""
        if not self.metrics_path.is_file():
            return
        keep = [json.dumps(r) for r in self.records() if not (r.get("stage") == stage and r.get("epoch", 0) > epoch)]
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, stage: str, kind: str, payload: dict[str, Any], background: bool = False) -> Path:
        """Write a checkpoint atomically; ``background``: from a writer thread, after a copy of the
        payload to host memory (:class:`hpc.checkpoint.BackgroundWriter`). A foreground write
        waits for the background ones first, so checkpoints land in the order they were made."""
        path = self.checkpoint(stage, kind)
        # The resume checkpoint being replaced is kept (last.prev.pt): if the new one is lost to
        # a crash before its data reach the disk, the resume falls back to it (resume_state).
        previous = self.previous_checkpoint(stage) if kind == "last" else None
        if background:
            if self._writer is None:
                self._writer = BackgroundWriter()
            self._writer.submit(payload, path, previous)
        else:
            self.wait_for_writes()
            atomic_torch_save(payload, path, previous)
        return path

    def wait_for_writes(self) -> None:
        """Block until every background checkpoint write is on disk (re-raises a failed one)."""
        if self._writer is not None:
            self._writer.wait()

    def load_checkpoint(self, stage: str, kind: str = "best", map_location: Any = "cpu") -> dict[str, Any]:
        return load_checkpoint_file(self.checkpoint(stage, kind), map_location)

    def resume_state(self, stage: str, map_location: Any = "cpu") -> tuple[dict[str, Any] | None, Path | None,
                                                                           list[tuple[Path, str]]]:
        """(state, path, problems): the stage's resume state, read from ``last.pt``, or from
        ``last.prev.pt`` when ``last.pt`` cannot be read (truncated, zero bytes, not a torch file:
        a node that crashed before the data reached the disk); ``(None, None, problems)`` when
        neither exists or can be read: the stage starts again from its start. ``problems``: (file,
        line) per unreadable file, the line naming it and what the resume does instead. Reads only (every
        rank calls it); :meth:`set_aside_unreadable` moves the bad file out of the way.

        Raises:
            DataError: a checkpoint refused for another reason (it would run code on loading).
        """
        from hpc.checkpoint import UnreadableCheckpointError

        problems: list[tuple[Path, str]] = []
        candidates = [self.checkpoint(stage, "last"), self.previous_checkpoint(stage)]
        if not candidates[0].is_file():
            # No last.pt: the stage never saved, or its checkpoints were removed on purpose (a
            # continued run retraining it). A save never leaves last.pt missing (the previous one
            # is kept by a link before the rename), so a lone last.prev.pt is stale, not a fallback.
            return None, None, problems
        for i, path in enumerate(candidates):
            if not path.is_file():
                continue
            try:
                state = load_checkpoint_file(path, map_location)
            except UnreadableCheckpointError:
                later = [p for p in candidates[i + 1:] if p.is_file()]
                problems.append((path, f"{path}: unreadable checkpoint ({_damage(path)}); falling back to "
                                 + (str(later[0]) if later else f"the start of stage {stage}")))
                continue
            return state, path, problems
        return None, None, problems

    def set_aside_unreadable(self, stage: str, paths: list[Path]) -> None:
        """After a resume fell back (:meth:`resume_state`; rank 0, once every rank has read):
        move an unreadable ``last.pt`` to ``last.unreadable.pt``, so the next save does not keep
        it as the previous checkpoint, and delete an unreadable ``last.prev.pt``."""
        for path in paths:
            if path == self.checkpoint(stage, "last"):
                fileio.publish(path, self.unreadable_checkpoint(stage))
            else:
                path.unlink(missing_ok=True)

    def has_checkpoint(self, stage: str, kind: str) -> bool:
        return self.checkpoint(stage, kind).is_file()

    def pick_checkpoint(self, stage: str | None = None, kind: str = "best",
                        order: list[str] | None = None) -> tuple[str, Path, str]:
        """(stage, path, note): the ``kind`` checkpoint of ``stage``, by default of the last
        finished stage. A run with no finished stage falls back to the newest stage that has a
        checkpoint, and says so in the note.

        Raises:
            DataError: no usable checkpoint (naming the path expected).
        """
        order = order if order is not None else self.config().stage_names()
        st = self.state()["stages"]
        if stage is not None:
            if stage not in order:
                raise MedattnError(f"--stage {stage!r} is not a stage of this run ({', '.join(order)})")
            path = self.checkpoint(stage, kind)
            if not path.is_file():
                raise DataError(path, f"checkpoint missing (stage {stage!r} has not produced one yet)")
            return stage, path, "" if st.get(stage, {}).get("done") else f"stage {stage} has not finished"
        done = [s for s in order if st.get(s, {}).get("done")]
        if done and self.checkpoint(done[-1], kind).is_file():
            return done[-1], self.checkpoint(done[-1], kind), ""
        for s in reversed(order):
            for k in dict.fromkeys((kind, "last")):
                path = self.checkpoint(s, k)
                if path.is_file():
                    return s, path, f"stage {s} has not finished: using its {k} checkpoint so far"
        raise DataError(self.root / "ckpt", "no checkpoint yet: the run has not finished an epoch")

    def best_checkpoint_of_last_stage(self) -> Path:
        """The selected weights of the last finished stage (e.g. a lung model for ``--lung-model``)."""
        cfg_order = self.config().stage_names()
        done = self.done_stages(cfg_order)
        if not done or not self.checkpoint(done[-1], "best").is_file():
            raise DataError(self.root, "this run has no finished stage (no best checkpoint yet); train it first")
        return self.checkpoint(done[-1], "best")

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes that a kill interrupted (medattn.fileio's names)."""
        gone = []
        for d in (self.root, *(self.root / "ckpt").glob("*")):
            gone += fileio.remove_temporaries(d)
        return gone

    # ------------------------------------------------------------------ sharing (sweeps)
    def seed_from(self, base: "Run", stages: list[str], cfg) -> bool:
        """Make this run start with ``base``'s finished ``stages`` (their checkpoints as hard links
        when possible, their records and state), under its own config ``cfg``. Returns False when
        this run was seeded already. The config is written last, so an interrupted seeding is
        simply redone."""
        if self.exists():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        for s in stages:
            for kind in CHECKPOINT_KINDS:
                src = base.checkpoint(s, kind)
                if src.is_file():
                    _link_or_copy(src, self.checkpoint(s, kind))
        base_state = base.state()["stages"]
        state = {"stages": {s: dict(base_state[s], shared_from=str(base.root)) for s in stages}}
        atomic_write_text(self.state_path, json.dumps(state, indent=2))
        recs = [json.dumps(r) for r in base.records() if r.get("stage") in stages]
        atomic_write_text(self.metrics_path, "".join(r + "\n" for r in recs))
        if base.provenance_path.is_file():
            shutil.copy2(base.provenance_path, self.provenance_path)
        self.save_config(cfg)
        return True

    # ------------------------------------------------------------------ what launchers add (jobs/, sweeps/)
    @property
    def train_log_path(self) -> Path:
        """The output of every trainer a sweep started on this run (appended across launches)."""
        return self.root / "train.log"

    @property
    def sweep_trial_path(self) -> Path:
        """A sweep trial's ledger: its parameters, nodes and status (sweeps.trial)."""
        return self.root / "sweep_trial.json"

    def sweep_trial(self) -> dict[str, Any]:
        """The trial ledger; {} when there is none or it cannot be read (it is rewritten whole)."""
        try:
            cur = json.loads(self.sweep_trial_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return cur if isinstance(cur, dict) else {}

    def update_sweep_trial(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the trial ledger (atomic); returns the new ledger."""
        cur = self.sweep_trial()
        cur.update(fields)
        atomic_write_text(self.sweep_trial_path, json.dumps(cur, indent=2, default=str))
        return cur

    @property
    def slurm_jobs_path(self) -> Path:
        """One JSON line per SLURM submission (``medattn submit``, and ``medattn sweep --slurm`` in
        a sweep directory, which keeps its SLURM files in the same ``slurm/`` layout)."""
        return self.slurm_dir / "jobs.jsonl"

    def append_submission(self, record: dict[str, Any]) -> None:
        """Append one submission record to :attr:`slurm_jobs_path`, as one line, synced (the job
        ids are what a user needs to find or cancel the jobs)."""
        self.slurm_dir.mkdir(parents=True, exist_ok=True)
        with open(self.slurm_jobs_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def sbatch_log(self, job_id: str = "%j") -> Path:
        """The log of a ``medattn sbatch`` job; the default ``%j`` is SLURM's job id placeholder,
        as the script's ``#SBATCH --output`` takes it."""
        return self.slurm_dir / f"sbatch-{job_id}.out"


def stage_selections(run: Run, order: list[str], method, evaluated: str | None = None,
                     checkpoint: str = "best") -> dict[str, dict[str, Any]]:
    """Per stage of ``order``: what it started from and which of its epochs was kept, in data and in
    words, from state.json and the epoch records (eval's metrics.json ``stages``; the report).

    Each entry: ``epochs`` (trained), ``best_epoch`` (0 = the starting weights, validated before
    any training step, were kept: no epoch beat them), ``best_metric``, ``select_metric``, the
    method's :meth:`~medattn.methods.base.Method.stage_start` keys (AG-CNN fusion: ``fusion_init``,
    ``start``) and ``kept``, e.g. "global head, kept: no fusion epoch beat it on validation" or
    "fusion epoch 2". The ``evaluated`` stage also gets ``checkpoint`` and ``evaluated`` (the epoch
    its ``checkpoint`` holds)."""
    st = run.state()["stages"]
    recs = run.records()
    out: dict[str, dict[str, Any]] = {}
    for s in order:
        info = st.get(s, {})
        mine = [r for r in recs if r.get("stage") == s]
        if not info and not mine:
            continue
        last = mine[-1] if mine else {}
        best_epoch = info.get("best_epoch", last.get("select/best_epoch"))
        e: dict[str, Any] = {
            "epochs": info.get("epochs", max((int(r.get("epoch", 0)) for r in mine), default=0)),
            "done": bool(info.get("done")), "best_epoch": best_epoch,
            "best_metric": info.get("best_metric", last.get("select/best")),
            "select_metric": info.get("metric", last.get("select/metric")),
            **(method.stage_start(s) if method is not None else {})}
        start = e.get("start", "starting weights")
        if e["best_metric"] is None:
            e["kept"] = "no validated epoch (the final weights)"
        elif best_epoch == 0:
            e["kept"] = f"{start}, kept: no {s} epoch beat it on validation"
        else:
            e["kept"] = f"{s} epoch {best_epoch}"
        if s == evaluated:
            e["checkpoint"] = checkpoint
            e["evaluated"] = e["kept"] if checkpoint == "best" else f"{s} epoch {e['epochs']} (last checkpoint)"
        out[s] = e
    return out


def _damage(path: Path) -> str:
    """What is wrong with a checkpoint file torch cannot read, in a few words (torch's own
    messages run to hundreds of characters and, for a file that is no zip, talk of pickles)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if size == 0:
        return "empty: 0 bytes"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return f"not a torch checkpoint: wrong magic, {size} bytes"
    return f"truncated or damaged: {size} bytes"


def _without_raised_epochs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with every raised ``stages.<stage>.epochs`` put back to its ``old`` value."""
    stages = {s: (dict(v, epochs=old["stages"][s]["epochs"])
                  if s in old.get("stages", {}) and v["epochs"] > old["stages"][s]["epochs"] else v)
              for s, v in (new.get("stages") or {}).items()}
    return {**new, "stages": stages}


def _link_or_copy(src: Path, dst: Path) -> None:
    with fileio.atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)  # checkpoints are replaced by rename, never written in place
        except OSError:
            shutil.copy2(src, tmp)


# ---------------------------------------------------------------------------------------------
# starting a stage from another run (stages.<stage>.init_from, train --init-from)
# ---------------------------------------------------------------------------------------------
def init_source(init_from: str | os.PathLike, stage: str) -> tuple[Path, str]:
    """(checkpoint path, description) that ``stages.<stage>.init_from`` names.

    ``init_from`` is a checkpoint file, or a run directory: then that run's best checkpoint of the
    same stage when it has one, else of its last finished stage (e.g. a classifier run's only
    stage for the first stage of another config).

    Raises:
        DataError: no such file or run, or the run has no finished stage.
    """
    p = Path(init_from).expanduser()
    if p.is_file():
        return p, str(p)
    if not p.is_dir():
        raise DataError(p, f"stages.{stage}.init_from: no such checkpoint file or run directory")
    src = Run(p).require()
    order = src.config().stage_names()
    if stage in order and src.stage_done(stage) and src.has_checkpoint(stage, "best"):
        return src.checkpoint(stage, "best"), f"run {p} (its {stage} stage, best checkpoint)"
    done = src.done_stages(order)
    if not done or not src.has_checkpoint(done[-1], "best"):
        raise DataError(p, f"stages.{stage}.init_from: this run has no finished stage to start from")
    return src.checkpoint(done[-1], "best"), f"run {p} (its last finished stage {done[-1]}, best checkpoint)"


def init_mismatch(source: dict[str, Any], cfg) -> str:
    """What tells a checkpoint (``source``, as saved: its ``config``) apart from the run ``cfg``
    that would start from it, in the words a user knows: ``"backbone convnext_atto vs resnet18"``
    (this run's vs the checkpoint's; the method likewise). Empty when they agree or the checkpoint
    records no config."""
    theirs = source.get("config") if isinstance(source, dict) else None
    if not isinstance(theirs, dict):
        return ""
    ours = cfg.to_dict()
    parts = []
    for what, a, b in (("method", ours.get("method"), theirs.get("method")),
                       ("backbone", (ours.get("model") or {}).get("backbone"),
                        (theirs.get("model") or {}).get("backbone"))):
        if a is not None and b is not None and a != b:
            parts.append(f"{what} {a} vs {b}")
    return ", ".join(parts)


def fit_init_weights(model: Any, state: dict[str, Any], where: str | os.PathLike, mismatch: str = "") -> list[str]:
    """Check ``state`` (a state dict) against ``model``; returns the head keys to skip.

    Every key must be there with the model's shape, except the weights of Linear layers whose
    output size differs (a head for another number of classes, e.g. fine-tuning on another
    dataset): those are skipped, and the caller warns. Nothing is loaded here. ``mismatch``
    (:func:`init_mismatch`, e.g. "backbone convnext_atto vs resnet18"):
    said first, and the keys are then only counted (every key differs; naming them says nothing more).

    Raises:
        ConfigError: missing, unexpected or mismatched keys, named (the first few of each).
    """
    import torch

    from medattn.errors import ConfigError
    from medattn.models.weights import key_problems

    own = model.state_dict()
    heads = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            heads.update(f"{name}.{p}" if name else p for p in ("weight", "bias"))
    skipped, shapes = [], []
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            same_inputs = v.ndim == own[k].ndim and tuple(v.shape[1:]) == tuple(own[k].shape[1:])
            (skipped if k in heads and same_inputs else shapes).append(
                k if k in heads and same_inputs else f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    groups = (("shape mismatch", shapes), ("missing from the checkpoint", missing), ("not in the model", unexpected))
    if mismatch and any(keys for _, keys in groups):
        counts = ", ".join(f"{len(keys)} {what}" for what, keys in groups if keys)
        raise ConfigError(f"init_from {where}: {mismatch} (this run vs the checkpoint): the checkpoint does not "
                          f"fit this run's model ({counts}); start from a run of the same method and backbone")
    problems = key_problems(groups)
    if problems:
        raise ConfigError(f"init_from {where}: the checkpoint does not fit this run's model (same method and "
                          "backbone needed; only a head for another number of classes may differ): "
                          + "; ".join(problems))
    return skipped
