"""A run directory: the one owner of its layout, its readers and its writers.

Layout (nothing else in the product spells these names)::

    RUN/config.yaml            resolved config (saved once; a resumed run must match it)
    RUN/provenance.json        one record per launch: git sha, versions, hosts, device, data, command
    RUN/state.json             which stages are done, their best metric
    RUN/metrics.jsonl          one JSON object per finished epoch
    RUN/ckpt/<stage>/last.pt   everything needed to resume the stage exactly
    RUN/ckpt/<stage>/best.pt   the weights of the stage's best validation epoch (feeds the next stage)
    RUN/tb/                    TensorBoard
    RUN/eval/, RUN/eval_<split>/     ``medattn eval`` (metrics.json, preds.csv, ...)
    RUN/report/, RUN/report_<split>/ ``medattn report``
    RUN/viz/                   ``medattn viz`` overlays
    RUN/slurm/                 SLURM logs of ``medattn submit`` / ``sbatch`` (sbatch-<job>.out),
                               jobs.jsonl: one line per submission
    RUN/train.log              a sweep's trainer output;  RUN/sweep_trial.json: a sweep trial's ledger

Every write is atomic (a temporary file in the same directory, renamed into place), so a kill at
any moment leaves the old file or the new one, never half of one; the metrics log is appended a
whole line at a time and a torn last line is skipped when read.

:func:`load_run` is the one way a consumer (``eval``, ``report``, ``viz``, ``predict``,
benchmarks) gets a trained model back: config -> method -> model -> checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc.checkpoint import BackgroundWriter, atomic_torch_save, atomic_write_text, load as load_checkpoint_file
from medattn.errors import DataError, MedattnError

CHECKPOINT_KINDS = ("best", "last")


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

    def eval_dir(self, split: str = "test") -> Path:
        return self.root / ("eval" if split == "test" else f"eval_{split}")

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
        return {d.name[len("external-"):]: d for d in sorted(base.glob("external-*")) if (d / "metrics.json").is_file()}

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
        """Sections of ``cfg`` that differ from the saved config (``runtime`` may differ: it does
        not change the science; nor may raised ``stages.<stage>.epochs``: see
        :meth:`raised_epochs`). Empty when there is no saved config yet."""
        if not self.exists():
            return []
        old, new = self.config().to_dict(), cfg.to_dict()
        new = _without_raised_epochs(old, new)
        return [k for k in sorted(set(old) | set(new)) if k != "runtime" and old.get(k) != new.get(k)]

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
        """Refuse a config that differs from the saved one, naming the sections (raised epochs
        are accepted: the run continues)."""
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
            raise ConfigError(f"{self.root} holds a run with a different config (sections differ: "
                              f"{', '.join(diff)}); {what} with the same config and overrides (only "
                              "stages.<stage>.epochs may be raised, to continue it), or use a new --out")

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
                for kind in CHECKPOINT_KINDS:
                    self.checkpoint(s, kind).unlink(missing_ok=True)
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
        if background:
            if self._writer is None:
                self._writer = BackgroundWriter()
            self._writer.submit(payload, path)
        else:
            self.wait_for_writes()
            atomic_torch_save(payload, path)
        return path

    def wait_for_writes(self) -> None:
        """Block until every background checkpoint write is on disk (re-raises a failed one)."""
        if self._writer is not None:
            self._writer.wait()

    def load_checkpoint(self, stage: str, kind: str = "best", map_location: Any = "cpu") -> dict[str, Any]:
        return load_checkpoint_file(self.checkpoint(stage, kind), map_location)

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
        """Delete the temporary files of writes that a kill interrupted (``.NAME.tmpPID``)."""
        gone = []
        for d in (self.root, *(self.root / "ckpt").glob("*")):
            if d.is_dir():
                for p in d.glob(".*.tmp*"):
                    p.unlink(missing_ok=True)
                    gone.append(p)
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


def _without_raised_epochs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with every raised ``stages.<stage>.epochs`` put back to its ``old`` value."""
    stages = {s: (dict(v, epochs=old["stages"][s]["epochs"])
                  if s in old.get("stages", {}) and v["epochs"] > old["stages"][s]["epochs"] else v)
              for s, v in (new.get("stages") or {}).items()}
    return {**new, "stages": stages}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.seed{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)  # checkpoints are replaced by rename, never written in place
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


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


def fit_init_weights(model: Any, state: dict[str, Any], where: str | os.PathLike) -> list[str]:
    """Check ``state`` (a state dict) against ``model``; returns the head keys to skip.

    Every key must be there with the model's shape, except the weights of Linear layers whose
    output size differs (a head for another number of classes, e.g. fine-tuning on another
    dataset): those are skipped, and the caller warns. Nothing is loaded here.

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
    problems = key_problems((("shape mismatch", shapes), ("missing from the checkpoint", missing),
                             ("not in the model", unexpected)))
    if problems:
        raise ConfigError(f"init_from {where}: the checkpoint does not fit this run's model (same method and "
                          "backbone needed; only a head for another number of classes may differ): "
                          + "; ".join(problems))
    return skipped


# ---------------------------------------------------------------------------------------------
# a trained model back
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A run's model, ready for inference (``model`` in eval mode on ``device``)."""

    run: Run
    cfg: Any
    spec: Any  # medattn.methods.DataSpec
    method: Any
    model: Any
    stage: str
    checkpoint: Path
    device: Any
    note: str = ""
    data: str | None = None  # the prepared directory, when one was used
    info: dict | None = None  # the checkpoint's inference record (hpc.checkpoint.inference_record)
    # The split the checkpoint was trained on ({name, seed, hash}; None: an older checkpoint).
    trained_split: dict | None = None


def load_run(run_dir: str | os.PathLike | Run, stage: str | None = None, checkpoint: str = "best",
             device: Any = "cpu", data: str | os.PathLike | None = None,
             overrides: list[str] | None = None) -> LoadedRun:
    """Rebuild a run's method and model and load a checkpoint: config -> method -> model -> weights.

    Args:
        run_dir: the run directory (or a :class:`Run`).
        stage: whose model (default: the last finished stage; see :meth:`Run.pick_checkpoint`).
        checkpoint: ``best`` or ``last``.
        device: torch device.
        data: the prepared directory; by default the checkpoint's own record of labels and
            preprocessing, else the prepared directory the run trained on.
        overrides: runtime overrides applied to the saved config.
    """
    import torch

    from medattn.methods import DataSpec, build

    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    cfg = run.config(overrides)
    stage, path, note = run.pick_checkpoint(stage, checkpoint, cfg.stage_names())
    dev = torch.device(device)
    state = load_checkpoint_file(path, dev)
    data_dir = str(data) if data else None
    if data_dir is None and state.get("spec"):
        spec = DataSpec.from_dict(state["spec"])
    else:
        data_dir = data_dir or run.data_path()
        if data_dir is None:
            raise DataError(run.provenance_path, "cannot tell which prepared data the run used; pass --data")
        from medattn.data.prepared import PreparedDataset

        spec = DataSpec.from_dataset(PreparedDataset.open(data_dir), cfg)
    method, model = build(cfg, spec)
    from hpc.distributed import apply_runtime_flags

    # Evaluation as training runs: channels_last (inputs are converted the same way) and cuDNN's
    # algorithm search for the fixed shapes.
    model = apply_runtime_flags(model.to(dev), cfg, dev)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise DataError(path, f"checkpoint does not fit the run's model: {str(e).splitlines()[0]}") from None
    method.load_extra_state(state.get("method", {}))
    model.eval()
    return LoadedRun(run, cfg, spec, method, model, stage, path, dev, note, data_dir, state.get("inference"),
                     (state.get("spec") or {}).get("split"))
