"""Chaos: one AG-CNN run (three stages, 2 torch.distributed processes, DALI loader workers on)
interrupted again and again, at seeded random moments and in every way a cluster interrupts
a job, and rerun each time with the same command. It must end exactly where the same run ends
uninterrupted: the same optimizer steps per stage, no epoch trained twice in the record, the
same losses and validation metrics.

Interruptions (each kind at least once, across all three stages):
  SIGUSR2 and SIGTERM to every process of the launch, as SLURM signals a job step (scancel
  --signal, a preemption, a time limit), and SIGINT to the launcher's process group, as a
  terminal's Ctrl-C (torchrun passes it on to the ranks, which it starts in sessions of their
  own), at a random step, during validation and during a checkpoint write; SIGKILL of one rank
  (a node lost), at a random step and during a checkpoint write (the half-written file must be
  ignored and cleaned up).
The trainer is launched as the sbatch recipe launches it: torchrun under ``trap "" USR2`` (the
launcher ignores USR2; its workers act on it). The moments come from hpc/faults.py holds.

Steps lost: a signalled run loses none (it checkpoints at the stop); a killed one loses the
steps since its last checkpoint (runtime.ckpt_every_steps=3 here), which it trains again.
The figures are printed (docs/slurm.md quotes them).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prepfix import make_prepared

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CKPT_EVERY = 3
ARGS = ["data.image_size=32", "data.resize=40", "stages.global.epochs=3", "stages.local.epochs=2",
        "stages.fusion.epochs=2", "stages.*.batch_size=16", "data.num_workers=2", "runtime.log_every=2",
        "runtime.tensorboard=false", f"runtime.ckpt_every_steps={CKPT_EVERY}"]
STEPS = {"global": 12, "local": 8, "fusion": 8}  # 4 steps per epoch


def _env(tmp: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               MEDATTN_FAULT_DIR=str(tmp))
    for k in ("MEDATTN_FAULT_HOLD", "MEDATTN_FAULT_AFTER_STEPS"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cmd(out: Path, prep: Path) -> list[str]:
    # As jobs/templates/torchrun.sbatch runs it: torchrun ignores USR2, its workers act on it.
    return ["bash", "-c", 'trap "" USR2; exec "$@"', "torchrun", sys.executable, "-m", "torch.distributed.run",
            "--standalone", "--nproc-per-node=2", "-m", "medattn", "train", "--config", "demo", "--data", str(prep),
            "--out", str(out), *ARGS]


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants (from /proc): every process of a launch, whatever
    process group it is in (torchrun starts each rank in a session of its own)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d.name)] = int(fields[1])
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in parent:
            out.append(p)
            todo += [c for c, pp in parent.items() if pp == p]
    return out


def _signal_job(root: int, sig: int) -> None:
    """As SLURM signals a job step (``scancel --signal``, preemption, time limit): every process."""
    for pid in _tree(root):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _launch(out: Path, prep: Path, tmp: Path, log: Path, **env) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(_cmd(out, prep), env=_env(tmp, **env), stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_tree_gone(proc: subprocess.Popen, pids: list[int], log: Path, timeout: float = 120) -> None:
    """Wait for every process of the launch (torchrun, ranks, loader workers) to end."""
    deadline = time.time() + timeout
    alive = pids
    while time.time() < deadline:
        proc.poll()
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and
                 (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")]
        if not alive:
            proc.wait()
            return
        time.sleep(0.1)
    ps = subprocess.run(["ps", "-o", "pid,stat,wchan:20,args", "-p", ",".join(map(str, alive))], capture_output=True,
                        text=True).stdout
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise AssertionError(f"processes of the interrupted launch still alive after {timeout} s:\n{ps}\n"
                         f"{log.read_text()[-4000:]}")


def _our_tracebacks(text: str) -> list[str]:
    """Tracebacks from the trainer or its loader workers (torchrun prints its own for SIGINT and
    SIGTERM, a SignalException, which is torchrun's business)."""
    blocks = text.split("Traceback (most recent call last):")[1:]
    ours = ("/hpc/", "/medattn/", "nvidia/dali", "torch/utils/data", "KeyboardInterrupt")
    return [b[:2000] for b in blocks if any(o in b.split("\n\n")[0] for o in ours)]


def _resume_point(log_text: str) -> tuple[str, int] | None:
    """(stage, global step) a launch started training from: a resumed stage, or the first stage
    it trained from its beginning."""
    for line in log_text.splitlines():
        if "] resuming at epoch" in line:
            stage = line.split("[", 1)[1].split("]", 1)[0]
            return stage, int(line.rsplit("(global step ", 1)[1].split(")")[0])
        if "] initialised from" in line or "] epoch 1/" in line:
            return line.split("[", 1)[1].split("]", 1)[0], 0
    return None


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=128, size=48, seed=1)


# (kind, point, signal or "kill0"/"kill1"): what each interruption does at its moment.
KINDS = [
    ("usr2 at a step", "step", signal.SIGUSR2),
    ("kill one rank at a step", "step", "kill"),
    ("term during validation", "validation", signal.SIGTERM),
    ("kill rank 0 during a checkpoint write", "ckpt_write", "kill0"),
    ("int at a step", "step", signal.SIGINT),
    ("usr2 during a checkpoint write", "ckpt_write", signal.SIGUSR2),
    ("int during validation", "validation", signal.SIGINT),
    ("term at a step", "step", signal.SIGTERM),
]


ORDER = list(STEPS)
EPOCHS = {"global": 3, "local": 2, "fusion": 2}


OFFSET = {"global": 0, "local": 12, "fusion": 20}  # run steps before each stage
# One window of run steps (1..28) per interruption, in run order: three in the global stage,
# three in the local one, two in the fusion one.
WINDOWS = [(1, 4), (5, 8), (9, 12), (13, 15), (16, 17), (18, 20), (21, 24), (25, 28)]


def _position(out: Path) -> tuple[str, int, int]:
    """(stage, finished epochs, global step of the stage) where the next launch resumes."""
    from hpc.checkpoint import load

    done = json.loads((out / "state.json").read_text())["stages"] if (out / "state.json").is_file() else {}
    stage = next(s for s in ORDER if not done.get(s, {}).get("done"))
    last = out / "ckpt" / stage / "last.pt"
    if not last.is_file():
        return stage, 0, 0
    st = load(last)
    return stage, st["epoch"], st["global_step"]


def _hold_count(rng: random.Random, point: str, pos: tuple[str, int, int], window: tuple[int, int]) -> int:
    """N for MEDATTN_FAULT_HOLD=point@N: the hold falls at a random run step of ``window``
    (or right after the resume point, when the run is already past it)."""
    stage, epoch, gstep = pos
    now = OFFSET[stage] + gstep  # run steps done
    target = max(rng.randint(*window), now + 1)
    if point == "step":
        return target - now
    if point == "validation":  # at the end of every epoch still to validate, in order
        ends = [OFFSET[stage] + (e + 1) * 4 for e in range(epoch, EPOCHS[stage])]
        ends += [OFFSET[s] + (e + 1) * 4 for s in ORDER[ORDER.index(stage) + 1:] for e in range(EPOCHS[s])]
        return next((i + 1 for i, e in enumerate(ends) if e >= target), len(ends))
    return 1  # the next checkpoint write: within CKPT_EVERY steps, or at the epoch's end


@pytest.fixture(scope="module")
def reference(prep, tmp_path_factory) -> tuple[Path, float]:
    """(run, seconds): the same run uninterrupted, the steps and metrics every interrupted one must end with."""
    tmp = tmp_path_factory.mktemp("ref")
    t0 = time.time()
    ref = tmp / "ref"
    r = subprocess.run(_cmd(ref, prep), env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ref, time.time() - t0


def _assert_same_run(ref: Path, out: Path) -> None:
    """The same (stage, epoch, step) sequence, each epoch once, the same losses and metrics."""
    a, b = _records(ref), _records(out)
    assert [(x["stage"], x["epoch"], x["global_step"]) for x in b] == \
        [(x["stage"], x["epoch"], x["global_step"]) for x in a]
    assert [x["global_step"] for x in b if x["epoch"] == max(y["epoch"] for y in b if y["stage"] == x["stage"])] == \
        [STEPS[s] for s in ("global", "local", "fusion")]
    for x, y in zip(a, b):
        for k, v in x.items():
            if (k.startswith("val/") and not k.endswith("time_s")) or k in ("train/loss", "select/best"):
                assert y[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (x["stage"], x["epoch"], k)
    state = json.loads((out / "state.json").read_text())["stages"]
    assert all(state[s]["done"] for s in STEPS)
    assert not list(out.rglob(".*.tmp*")), "a temporary checkpoint file was left behind"


def test_chaos_interruptions_end_with_the_uninterrupted_run(prep, reference, tmp_path):
    ref, t_ref = reference

    rng = random.Random(20261202)
    plan = KINDS[:]
    rng.shuffle(plan)
    out = tmp_path / "run"
    events = []
    t1 = time.time()
    for i, ((kind, point, action), window) in enumerate(zip(plan, WINDOWS)):
        marks = tmp_path / f"marks{i}"
        marks.mkdir()
        n = _hold_count(rng, point, _position(out), window)
        log = tmp_path / f"launch{i}.log"
        proc = _launch(out, prep, marks, log, MEDATTN_FAULT_HOLD=f"{point}@{n}", MEDATTN_FAULT_HOLD_S=120)
        deadline = time.time() + 300
        found = []
        while time.time() < deadline and not found and proc.poll() is None:
            found = sorted(marks.glob(f"{point}.*"))
            time.sleep(0.02)
        assert found, f"launch {i} ({kind}) never reached {point}@{n} (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        time.sleep(0.2)  # let the other rank reach the same hold, when it has one
        found = sorted(marks.glob(f"{point}.*"))
        mark = json.loads(found[0].read_text())
        print(f"launch {i}: {kind} at {point}@{n} (window {window}), holding at {mark}", flush=True)
        everything = _tree(proc.pid)
        if action in ("kill", "kill0"):
            pids = [json.loads(p.read_text())["pid"] for p in found]
            victim = pids[0] if action == "kill0" else rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
        elif action == signal.SIGINT:
            os.killpg(proc.pid, action)  # Ctrl-C: the terminal's foreground group, torchrun passes it on
        else:
            _signal_job(proc.pid, action)  # SLURM: every process of the job step
        _wait_tree_gone(proc, everything, log)
        text = log.read_text()
        # A signal during the last validation of the last stage: the run completes instead.
        finished = f"done: {out}" in text
        if action not in ("kill", "kill0"):
            assert finished or f"stopped by signal {int(action)}" in text, f"{kind}:\n{text[-3000:]}"
            assert not _our_tracebacks(text), f"{kind}:\n{text[-3000:]}"
        events.append({"kind": kind, "at": f"{point}@{n}", "stage": mark["stage"],
                       "global_step": mark["global_step"], "log": log, "finished": finished})
        if finished:
            assert i == len(plan) - 1, "the run finished before the last planned interruption"

    # the last rerun, uninterrupted, finishes the run
    log = tmp_path / "final.log"
    proc = _launch(out, prep, tmp_path, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    t_chaos = time.time() - t1

    # steps lost per interruption: where the next launch resumed vs the last step taken
    logs = [e["log"] for e in events[1:]] + [log]
    lost = []
    for e, nxt in zip(events, logs):
        point = ("run finished", e["global_step"]) if e["finished"] else _resume_point(nxt.read_text())
        e["resumed"] = point
        assert point is not None, nxt.read_text()[-3000:]
        # steps taken before the interruption that the next launch trains again
        lost.append(max(0, e["global_step"] - point[1]) if point[0] == e["stage"] else 0)
        e["lost"] = lost[-1]
        if "kill" not in e["kind"]:
            assert e["lost"] == 0, e
        else:  # checkpoints every CKPT_EVERY steps and at every epoch end; a kill during the
            # write of one falls back to the one before
            assert e["lost"] <= CKPT_EVERY, e
    assert "a write interrupted by an earlier kill" in "".join(x.read_text() for x in logs)
    print(f"\nreference run {t_ref:.0f} s; {len(events)} interruptions + final rerun {t_chaos:.0f} s")
    for e in events:
        print(f"  {e['kind']:<40} {e['at']:<13} stage {e['stage'] or '-':<7} step {e['global_step']:>2} "
              f"-> resumed {e['resumed']} lost {e['lost']}")
    print(f"  steps lost in all: {sum(lost)}, all by SIGKILL (checkpoint every {CKPT_EVERY} steps)")

    # coverage: every kind, in every stage
    assert len(events) >= 6
    assert {e["stage"] for e in events} >= {"global", "local", "fusion"}, [(e["kind"], e["stage"]) for e in events]

    # the same run as without interruptions
    _assert_same_run(ref, out)


def test_an_unreadable_checkpoint_falls_back_and_the_run_ends_as_a_clean_one(prep, reference, tmp_path):
    """A node crash can leave last.pt truncated, empty or garbage (the rename reached the disk,
    the data did not). The rerun names the file, falls back to the checkpoint before it
    (last.prev.pt), or to the stage's start when that one is unreadable too, and the run ends
    with the same steps and metrics as the uninterrupted one."""
    from hpc.checkpoint import load

    ref, _ = reference
    out = tmp_path / "run"
    g, loc = out / "ckpt" / "global", out / "ckpt" / "local"

    # launch 1: a node lost right after the global stage's 7th step (checkpoints at 3, 4, 6)
    log1 = tmp_path / "launch1.log"
    proc = _launch(out, prep, tmp_path, log1, MEDATTN_FAULT_AFTER_STEPS=7)
    assert proc.wait(timeout=600) != 0, log1.read_text()[-3000:]
    prev = load(g / "last.prev.pt")
    assert load(g / "last.pt")["global_step"] == 6 and prev["global_step"] == 4, "one previous checkpoint is kept"
    data = (g / "last.pt").read_bytes()
    (g / "last.pt").write_bytes(data[: len(data) // 2])  # truncated

    # launch 2: falls back to last.prev.pt; held after the local stage's 7th step and killed
    marks = tmp_path / "marks2"
    marks.mkdir()
    log2 = tmp_path / "launch2.log"
    proc = _launch(out, prep, marks, log2, MEDATTN_FAULT_HOLD=f"step@{STEPS['global'] - 4 + 7}",
                   MEDATTN_FAULT_HOLD_S=120)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(marks.glob("step.*"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert len(list(marks.glob("step.*"))) == 2, log2.read_text()[-3000:]
    everything = _tree(proc.pid)
    for p in everything:
        os.kill(p, signal.SIGKILL)
    _wait_tree_gone(proc, everything, log2)
    text = log2.read_text()
    assert f"[global] {g / 'last.pt'}: unreadable checkpoint" in text, text[-3000:]
    assert f"falling back to {g / 'last.prev.pt'}" in text
    assert f"[global] resuming at epoch {prev['epoch'] + 1} step {prev['step']} (global step 4) from " \
           f"{g / 'last.prev.pt'}" in text
    assert (g / "last.unreadable.pt").read_bytes() == data[: len(data) // 2]  # kept for a post-mortem
    assert load(loc / "last.pt")["global_step"] == 6 and load(loc / "last.prev.pt")["global_step"] == 4

    # launch 3: the local stage's last.pt is empty and its previous one is not a torch file: the
    # stage starts again from the global stage's best weights, and the run finishes
    (loc / "last.pt").write_bytes(b"")
    (loc / "last.prev.pt").write_bytes(b"not a checkpoint\n" * 8)
    log3 = tmp_path / "launch3.log"
    proc = _launch(out, prep, tmp_path / "marks2", log3)
    assert proc.wait(timeout=600) == 0, log3.read_text()[-4000:]
    text = log3.read_text()
    assert f"[local] {loc / 'last.pt'}: unreadable checkpoint" in text, text[-3000:]
    assert f"[local] {loc / 'last.prev.pt'}: unreadable checkpoint" in text
    assert "falling back to the start of stage local" in text
    assert f"[local] initialised from {g / 'best.pt'}" in text
    assert "Traceback" not in text
    _assert_same_run(ref, out)
