"""What a sweep's shared prefix saves: one `medattn sweep` against the same trials as independent runs.

  python scripts/sweep_cost.py --data /tmp/prep --work /tmp/sweep-cost --trials 8 \\
      --json-out bench-out/sweep_cost.json -- stages.global.epochs=2 stages.local.epochs=1 stages.fusion.epochs=1

1. **Sweep.** Starts a Ray cluster of ``--nodes`` nodes on this host (one ``ray start --block``
   process each, token authentication, one CPU and one trial slot per node, as tests/test_sweep.py
   does), runs ``medattn sweep`` over ``--space`` (default ``tau=uniform(0.5,0.9)``) with
   ``--scheduler none`` (every trial trains to its end, so both sides do the same epochs), then stops
   the cluster.
2. **Independent runs.** For each trial of the sweep's results.csv, one ``medattn train`` on the
   trial's own resolved ``config.yaml`` (same τ, same everything), one after the other, each with
   ``--threads`` torch threads (default 1: what a sweep trial gets from ``--cpus-per-trial 1``).
3. **Projection.** Per-stage costs per image-epoch from the runs' epoch records (``train/time_s``
   per training image, ``val/time_s`` per validation image), scaled to ``--project-trials`` trials
   of the ``--project-epochs`` schedule on ``--project-train`` + ``--project-val`` images:
   sweep = G + T·(L + F) against T·(G + L + F).

CPU time of a phase is that of its whole process tree, Ray's included (GCS, raylets, dashboard
agents, every worker and every trainer, also those that exited long before the end). Two methods:

* ``cgroup`` (exact; default where a writable cgroup-v1 ``cpuacct`` hierarchy exists, which needs
  root): each phase's processes are started inside a fresh cgroup, which every descendant inherits;
  the kernel's ``cpuacct.usage`` counts all of them, alive or exited.
* ``proc`` (fallback): the sum over every process of the tree of its last sampled ``utime+stime``
  (/proc, every 0.2 s). Not ``getrusage(RUSAGE_CHILDREN)``: the raylet ignores SIGCHLD, so its
  workers (the trial actors, and through them the trainers) are reaped by the kernel and their
  time never reaches any parent's rusage. The sampler misses up to 0.2 s per process (the time
  after its last sample), so it is a lower bound; the JSON carries both where both ran.

Writes ``--json-out`` (atomically: an interrupted run leaves no half-written file) and prints a
Markdown table. docs/benchmarks.md ("Sweeps: shared global stage") records what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
TICK = os.sysconf("SC_CLK_TCK")
# The official split at the full count (prepare's default validation share of train_val_list.txt).
FULL_TRAIN, FULL_VAL = 78_146, 8_378


# ------------------------------------------------------------------------------------ CPU time
class TreeCPU:
    """CPU seconds of every process started through :meth:`popen` (and all their descendants)."""

    def __init__(self, name: str, method: str = "auto", interval: float = 0.2):
        self.cgroup: Path | None = None
        if method in ("auto", "cgroup") and os.access(CPUACCT, os.W_OK):
            self.cgroup = CPUACCT / f"medattn-{name}-{os.getpid()}"
            self.cgroup.mkdir()
        elif method == "cgroup":
            raise SystemExit(f"--cpu-accounting cgroup: {CPUACCT} is not writable (needs root and cgroup v1 cpuacct)")
        self.method = "cgroup" if self.cgroup else "proc"
        if self.cgroup is None and sys.platform.startswith("linux"):
            import ctypes

            # Orphans (a `ray start` that exits before its children) then stay in our tree.
            ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
        self.interval = interval
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start time) -> last utime+stime (s)
        self.kind: dict[tuple[int, int], str] = {}  # (pid, start time) -> trainer | driver | ray
        self._live: dict[int, str] = {}  # pid -> kind, for the children's classification
        self.cmd: dict[tuple[int, int], str] = {}  # (pid, start time) -> command line (start)
        self.series: list[tuple[float, float]] = []  # (time, CPU-s of the tree so far), cgroup only
        self.popens: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the sampling thread and close() both sample
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self.t0 = time.time()
        self._thread.start()

    # --- membership
    def _members(self) -> list[int]:
        if self.cgroup is not None:
            try:
                return [int(x) for x in (self.cgroup / "cgroup.procs").read_text().split()]
            except OSError:
                return []
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                st = _stat(int(d))
                if st:
                    parent[int(d)] = st[1]
        me, out, frontier = os.getpid(), [], {os.getpid()}
        while frontier:
            nxt = {p for p, pp in parent.items() if pp in frontier and p != me}
            out += list(nxt)
            frontier = nxt
        return out

    def _classify(self, cmd: str, ppid: int) -> str:
        """trainer: `medattn train` (torchrun included) and its loader workers; driver: `medattn
        sweep` and this script's other children; ray: the Ray nodes' processes (GCS, raylet,
        agents, the trial actors)."""
        if self._live.get(ppid) == "trainer":
            return "trainer"
        if "medattn train" in cmd or ("torch.distributed.run" in cmd and "medattn" in cmd):
            return "trainer"
        if "medattn sweep" in cmd:
            return "driver"
        return "ray" if ("ray" in cmd or self._live.get(ppid) == "ray") else "driver"

    def _sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        if self.cgroup is not None:
            try:
                self.series.append((time.time(), int((self.cgroup / "cpuacct.usage").read_text()) / 1e9))
            except OSError:
                pass
        for pid in self._members():
            st = _stat(pid)
            if st:
                key = (pid, st[3])
                # Classified again while its command line changes: a process caught between fork
                # and exec still shows its parent's. A zombie's is empty: it keeps its last one.
                cmd = _cmdline(pid)
                if cmd and (cmd != self.cmd.get(key) or key not in self.kind):
                    self.cmd[key] = cmd
                    self.kind[key] = self._classify(cmd, st[1])
                self.kind.setdefault(key, self._live.get(st[1], "ray"))
                self.cmd.setdefault(key, "")
                self._live[pid] = self.kind[key]
                self.seen[key] = st[2]

    def cpu_at(self, t: float) -> float:
        """The tree's CPU-s at time t (linear between samples; cgroup only)."""
        xs = self.series
        if not xs:
            return math.nan
        if t <= xs[0][0]:
            return xs[0][1]
        for (t0, c0), (t1, c1) in zip(xs, xs[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(1e-9, t1 - t0)
        return xs[-1][1]
        if self.cgroup is None:  # reap orphans handed to us (subreaper) that popen did not start
            mine = {p.pid for p in self.popens}
            for pid in self._members():
                st = _stat(pid)
                if st and st[0] == "Z" and st[1] == os.getpid() and pid not in mine:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    # --- processes
    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        if self.cgroup is not None:
            procs = str(self.cgroup / "cgroup.procs")

            def enter():  # in the child, before exec: it and all it starts are counted
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

            kw["preexec_fn"] = enter
        p = subprocess.Popen(cmd, **kw)
        self.popens.append(p)
        return p

    def run(self, cmd: list[str], timeout: float | None = None, **kw) -> int:
        p = self.popen(cmd, **kw)
        try:
            return p.wait(timeout=timeout)
        except BaseException:
            _kill_group(p)
            raise

    def close(self, settle_s: float = 60.0) -> dict[str, Any]:
        """Wait until the tree is gone (SIGKILL stragglers of our own tree after ``settle_s``)."""
        deadline = time.time() + settle_s
        while self._members() and time.time() < deadline:
            self._sample()
            time.sleep(self.interval)
        for pid in self._members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._sample()
        self._stop.set()
        self._thread.join()
        by_kind: dict[str, float] = {}
        for key, v in self.seen.items():
            by_kind[self.kind[key]] = by_kind.get(self.kind[key], 0.0) + v
        out: dict[str, Any] = {"method": self.method, "wall_s": time.time() - self.t0,
                               "sampled_cpu_s": sum(self.seen.values()), "processes_seen": len(self.seen),
                               "sampled_cpu_s_by_kind": by_kind,
                               "processes": sorted(({"pid": k[0], "kind": self.kind[k], "cpu_s": v, "cmd": self.cmd.get(k, "")[:160]}
                                                    for k, v in self.seen.items()), key=lambda d: -d["cpu_s"])}
        if self.cgroup is not None:
            while self._members():
                time.sleep(0.1)
            out["cpu_s"] = int((self.cgroup / "cpuacct.usage").read_text()) / 1e9
            us = dict(line.split() for line in (self.cgroup / "cpuacct.stat").read_text().splitlines())
            out["user_s"], out["sys_s"] = int(us["user"]) / TICK, int(us["system"]) / TICK
            self.cgroup.rmdir()
        else:
            out["cpu_s"] = out["sampled_cpu_s"]
        return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int, float, int] | None:
    """(state, ppid, utime+stime in s, start time in ticks) of a process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return f[0], int(f[1]), (int(f[11]) + int(f[12])) / TICK, int(f[19])


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


# ------------------------------------------------------------------------------------- Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, p: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if p.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"ray node did not start ({log}):\n{log.read_text(errors='replace')[-2000:]}")


def start_cluster(meter: TreeCPU, nodes: int, tmp: Path, env: dict[str, str]) -> tuple[str, list[subprocess.Popen]]:
    """``nodes`` Ray nodes on 127.0.0.1, one CPU and one ``medattn_slot`` each (one trial per node)."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    for i in range(nodes):
        name = "head" if i == 0 else f"worker{i}"
        role = (["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={_free_port()}"]
                if i == 0 else [f"--address={address}"])
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
               "--num-cpus=1", '--resources={"medattn_slot": 1}', "--disable-usage-stats",
               f"--temp-dir={tmp / name}", *role]
        log = tmp / f"{name}.log"
        with open(log, "wb") as f:
            procs.append(meter.popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_for(log, "Ray runtime started", procs[-1], 180)
    return address, procs


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):  # SIGTERM: `ray start --block` stops its node's processes
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                _kill_group(p)


# ---------------------------------------------------------------------------------- records
def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def epoch_costs(runs: list[Path], stages: list[str], skip: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Median seconds per epoch of each stage (train and validation apart) over the runs' records;
    records of stages in ``skip`` are left out (stages a run did not train itself)."""
    per: dict[str, dict[str, list[float]]] = {s: {"train_s": [], "val_s": []} for s in stages if s not in skip}
    for run in runs:
        for r in records(run):
            if r["stage"] in per:
                per[r["stage"]]["train_s"].append(float(r["train/time_s"]))
                per[r["stage"]]["val_s"].append(float(r.get("val/time_s") or 0.0))
    return {s: {k: statistics.median(v) for k, v in d.items() if v} | {"epochs_measured": len(d["train_s"])}
            for s, d in per.items()}


def split_sizes(data: Path) -> dict[str, int]:
    import pandas as pd

    m = pd.read_parquet(data / "manifest.parquet", columns=["split"])
    return {k: int(v) for k, v in m["split"].value_counts().items()}


def watch_epochs(proc: subprocess.Popen, metrics: Path, poll_s: float = 0.1) -> list[float]:
    """Wait for ``proc``; the time each epoch record appeared in ``metrics`` (to within poll_s)."""
    ends: list[float] = []
    while True:
        done = proc.poll() is not None
        try:
            n = sum(1 for x in metrics.read_text().splitlines() if x.strip())
        except OSError:
            n = 0
        ends += [time.time()] * (n - len(ends))
        if done:
            return ends
        time.sleep(poll_s)


def epoch_cpu(meter: "TreeCPU", runs: list[Path], ends: list[list[float]]) -> dict[str, dict[str, float]]:
    """Median CPU-s of one epoch of each stage (training and validation together), from the tree's
    CPU time series between the epoch's start (its record's time minus train/time_s + val/time_s)
    and its record. Only with one run at a time and cgroup accounting (empty otherwise)."""
    if meter.cgroup is None:
        return {}
    per: dict[str, list[float]] = {}
    for run, t_ends in zip(runs, ends):
        for r, t in zip(records(run), t_ends):
            t0 = t - float(r["train/time_s"]) - float(r.get("val/time_s") or 0.0)
            per.setdefault(r["stage"], []).append(meter.cpu_at(t) - meter.cpu_at(t0))
    return {s: {"cpu_s": statistics.median(v), "epochs_measured": len(v)} for s, v in per.items()}


def sharing_check(sweep: Path, trial_dirs: list[Path], prefix: list[str]) -> dict[str, Any]:
    """Was the prefix trained once (in the base run) and only linked into the trials?"""
    bases = sorted((sweep / "base").iterdir()) if (sweep / "base").is_dir() else []
    out: dict[str, Any] = {"base_runs": len(bases), "prefix": prefix, "trials_retraining_prefix": []}
    if len(bases) == 1:
        base = bases[0]
        out["base_prefix_epochs_trained"] = sum(r["stage"] in prefix for r in records(base))
        out["base_launches"] = sum(x.startswith("=== ") for x in (base / "train.log").read_text().splitlines())
        inodes = {(d / "ckpt" / s / "best.pt").stat().st_ino for d in [base, *trial_dirs] for s in prefix}
        out["prefix_checkpoint_copies"] = len(inodes)
    for d in trial_dirs:
        log = (d / "train.log").read_text(errors="replace")
        if any(f"[{s}] epoch" in log for s in prefix):
            out["trials_retraining_prefix"].append(d.name)
    out["ok"] = (len(bases) == 1 and not out["trials_retraining_prefix"]
                 and out.get("prefix_checkpoint_copies") == len(prefix))
    return out


# ------------------------------------------------------------------------------- projection
def stage_cost(c: dict[str, float], n_train: int, n_val: int, epochs: int, size: dict[str, int]) -> float:
    """Seconds of one stage of ``epochs`` epochs on n_train + n_val images, from per-image rates."""
    if "cpu_s" in c:  # training and validation measured together: per image of either
        return epochs * c["cpu_s"] / (size["train"] + size["val"]) * (n_train + n_val)
    return epochs * (c["train_s"] / size["train"] * n_train + c.get("val_s", 0.0) / size["val"] * n_val)


def asha_epoch_fraction(max_t: int, grace: int, rf: float) -> float:
    """Expected share of a trial's epochs that ASHA lets it train (synchronous successive halving:
    every trial reaches the grace rung, 1/rf of those the next rung, ...; rungs at grace·rf^k)."""
    rungs = [grace]
    while rungs[-1] * rf < max_t:
        rungs.append(int(round(rungs[-1] * rf)))
    rungs.append(max_t)
    total, prev, share = 0.0, 0, 1.0
    for r in rungs:
        total += share * (r - prev)
        prev, share = r, share / rf
    return total / max_t


def project(costs: dict[str, dict[str, float]], size: dict[str, int], prefix: list[str], stages: list[str],
            trials: int, epochs: dict[str, int], n_train: int, n_val: int) -> dict[str, Any]:
    per = {s: stage_cost(costs[s], n_train, n_val, epochs[s], size) for s in stages}
    shared = sum(per[s] for s in prefix)
    own = sum(per[s] for s in stages if s not in prefix)
    sweep, indep = shared + trials * own, trials * (shared + own)
    # What the trial-owned part may cost (as a share of its full epochs) to reach 40 %.
    need = (0.40 * indep - shared) / (trials * own) if own else math.nan
    out = {"trials": trials, "epochs": epochs, "images": {"train": n_train, "val": n_val},
           "stage_s": per, "sweep_s": sweep, "independent_s": indep, "ratio": sweep / indep,
           "limit_ratio": own / (shared + own), "trial_share_for_40pct": need}
    # ASHA with medattn's defaults (grace min(5, max_t), reduction factor 3) on the trial-owned epochs.
    own_stages = [s for s in stages if s not in prefix]
    max_t = sum(epochs[s] for s in own_stages)
    grace, rf = min(5, max_t), 3.0
    # cost of the trial-owned epochs in the order trained, weighted by the share of trials reaching each
    per_epoch = [per[s] / epochs[s] for s in own_stages for _ in range(epochs[s])]
    rungs = [grace]
    while rungs[-1] * rf < max_t:
        rungs.append(int(round(rungs[-1] * rf)))
    expected, share, prev = 0.0, 1.0, 0
    for r in rungs + [max_t]:
        expected += share * sum(per_epoch[prev:r])
        prev, share = r, share / rf
    a_sweep = shared + trials * expected
    out["asha"] = {"grace_period": grace, "reduction_factor": rf, "max_t": max_t, "rungs": rungs,
                   "epoch_fraction": asha_epoch_fraction(max_t, grace, rf), "cost_fraction": expected / own,
                   "sweep_s": a_sweep, "ratio": a_sweep / indep}
    return out


# ------------------------------------------------------------------------------------- main
def atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="prepared directory")
    p.add_argument("--work", required=True, type=Path, help="work folder (sweep/ and independent/ go here)")
    p.add_argument("--config", default="sweep_demo")
    p.add_argument("--space", action="append", default=None, help="default: 'tau=uniform(0.5,0.9)'")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--nodes", type=int, default=2, help="local Ray nodes (one trial each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each independent run (default 1, "
                   "as a sweep trial with --cpus-per-trial 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-accounting", choices=("auto", "cgroup", "proc"), default="auto")
    p.add_argument("--skip-independent", action="store_true", help="only the sweep (and the projection from it)")
    p.add_argument("--project-trials", type=int, default=24)
    p.add_argument("--project-epochs", default="50,50,50", help="epochs per stage, in stage order")
    p.add_argument("--project-train", type=int, default=FULL_TRAIN)
    p.add_argument("--project-val", type=int, default=FULL_VAL)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    a = p.parse_args(argv)
    space = a.space or ["tau=uniform(0.5,0.9)"]

    sys.path.insert(0, str(REPO))
    import pandas as pd

    from hpc.benchmarks.common import machine_info
    from medattn.config import load_config
    from sweeps import reuse
    from sweeps.space import build_space

    data = a.data.resolve()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(a.config, a.overrides)
    prefix = reuse.shared_prefix(base_cfg, build_space(space, base_cfg))
    stages = base_cfg.stage_names()
    size = split_sizes(data)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               RAY_USAGE_STATS_ENABLED="0", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    result: dict[str, Any] = {"machine": machine_info(), "argv": sys.argv, "config": a.config,
                              "overrides": a.overrides, "space": space, "trials": a.trials, "nodes": a.nodes,
                              "prefix": prefix, "stages": stages, "split_sizes": size,
                              "loadavg_start": os.getloadavg()}

    # -- 1. the sweep on a local Ray cluster
    sweep = work / "sweep"
    if sweep.exists():
        shutil.rmtree(sweep)
    ray_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), OMP_NUM_THREADS="1")
    tmp = Path(tempfile.mkdtemp(prefix="msc", dir="/tmp"))  # short: Ray's socket paths
    print(f"sweep_cost: sweep of {a.trials} trials on {a.nodes} Ray nodes -> {sweep}", flush=True)
    meter = TreeCPU("sweep", a.cpu_accounting)
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    try:
        address, procs = start_cluster(meter, a.nodes, tmp, ray_env)
        t_up = time.time()
        cmd = [sys.executable, "-m", "medattn", "sweep", "--config", a.config, "--data", str(data), "--out", str(sweep),
               *[x for s in space for x in ("--space", s)], "--num-samples", str(a.trials), "--search", "random",
               "--seed", str(a.seed), "--scheduler", "none", "--max-concurrent", str(a.nodes),
               "--trial-resource", "medattn_slot=1", "--address", address, "--quiet", *a.overrides]
        with open(work / "sweep-driver.log", "wb") as f:
            rc = meter.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ray_env)
        t_driver = time.time()
    finally:
        stop_cluster(procs)
    cpu = meter.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if rc != 0:
        print((work / "sweep-driver.log").read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"sweep_cost: medattn sweep exited {rc}")
    res = pd.read_csv(sweep / "results.csv")
    trial_dirs = [Path(x) for x in res["run_dir"]]
    base_run = next(iter(sorted((sweep / "base").iterdir())), None) if prefix else None
    result["sweep"] = {"command": cmd, "cpu": cpu, "wall_s": time.time() - t0, "cluster_start_s": t_up - t0,
                       "driver_wall_s": t_driver - t_up, "states": res["state"].value_counts().to_dict(),
                       "sharing": sharing_check(sweep, trial_dirs, prefix),
                       "epoch_costs_trials": epoch_costs(trial_dirs, stages, skip=tuple(prefix)),
                       "epoch_costs_base": epoch_costs([base_run], prefix) if base_run else {}}
    print(f"sweep_cost: sweep {cpu['cpu_s']:.0f} CPU-s, {result['sweep']['wall_s']:.0f} s wall", flush=True)

    # -- 2. the same trials, each an independent run, one after the other
    if not a.skip_independent:
        indep = work / "independent"
        if indep.exists():
            shutil.rmtree(indep)
        names = [n.split("=", 1)[0] for n in space]
        runs = []
        meter = TreeCPU("independent", a.cpu_accounting)
        t0 = time.time()
        per_run, epoch_ends = [], []
        for _, row in res.sort_values("trial_id").iterrows():
            cfg_path = Path(row["run_dir"]) / "config.yaml"
            cfg = load_config(cfg_path)
            if "tau" in names and not math.isclose(float(cfg.agcnn.tau), float(row["tau"]), rel_tol=1e-9):
                raise SystemExit(f"{cfg_path}: tau {cfg.agcnn.tau} != results.csv {row['tau']}")
            out = indep / row["trial_id"]
            runs.append(out)
            cmd_i = [sys.executable, "-m", "medattn", "train", "--config", str(cfg_path), "--data", str(data),
                     "--out", str(out)]
            print(f"sweep_cost: independent run {len(runs)}/{len(res)} ({row['trial_id']}, "
                  + ", ".join(f"{n}={row[n]}" for n in names if n in row) + ")", flush=True)
            t1 = time.time()
            out.mkdir(parents=True)
            with open(out / "train.log", "wb") as f:
                proc = meter.popen(cmd_i, stdout=f, stderr=subprocess.STDOUT,
                                   env=dict(env, OMP_NUM_THREADS=str(a.threads)), start_new_session=True)
                ends = watch_epochs(proc, out / "metrics.jsonl")
                rc = proc.returncode
            epoch_ends.append(ends)
            if rc != 0:
                raise SystemExit(f"sweep_cost: {' '.join(cmd_i)} exited {rc}; see {out / 'train.log'}")
            per_run.append(time.time() - t1)
        cpu_epochs = epoch_cpu(meter, runs, epoch_ends)
        cpu_i = meter.close()
        result["independent"] = {"threads": a.threads, "cpu": cpu_i, "wall_s": time.time() - t0,
                                 "run_wall_s": per_run, "epoch_costs": epoch_costs(runs, stages),
                                 "epoch_cpu_costs": cpu_epochs,
                                 "command": "python -m medattn train --config SWEEP/trials/<id>/config.yaml "
                                            f"--data {data} --out WORK/independent/<id>"}
        result["ratio"] = {"cpu": cpu["cpu_s"] / cpu_i["cpu_s"], "wall": result["sweep"]["wall_s"] / (time.time() - t0)}
        print(f"sweep_cost: independent {cpu_i['cpu_s']:.0f} CPU-s, {result['independent']['wall_s']:.0f} s wall",
              flush=True)

    atomic_json(work / "measured.json", result)  # kept even if the projection below fails

    # -- 3. projection from per-stage costs per image-epoch
    epochs = dict(zip(stages, (int(x) for x in a.project_epochs.split(","))))
    proj = {}
    if "independent" in result and result["independent"]["epoch_cpu_costs"]:
        proj["from_independent_runs_cpu"] = project(result["independent"]["epoch_cpu_costs"], size, prefix, stages,
                                                    a.project_trials, epochs, a.project_train, a.project_val)
    if "independent" in result:
        proj["from_independent_runs"] = project(result["independent"]["epoch_costs"], size, prefix, stages,
                                                a.project_trials, epochs, a.project_train, a.project_val)
    costs_sweep = {**result["sweep"]["epoch_costs_base"], **result["sweep"]["epoch_costs_trials"]}
    if set(costs_sweep) == set(stages):
        proj["from_sweep"] = project(costs_sweep, size, prefix, stages, a.project_trials, epochs,
                                     a.project_train, a.project_val)
    result["projection"] = proj
    result["loadavg_end"] = os.getloadavg()
    if a.json_out:
        atomic_json(a.json_out, result)
    print_summary(result)
    return 0 if result["sweep"]["sharing"]["ok"] else 1


def print_summary(r: dict[str, Any]) -> None:
    s = r["sweep"]
    print(f"\nsharing: {json.dumps(s['sharing'])}")
    print("\n| | CPU-s | wall s |\n|---|---:|---:|")
    print(f"| sweep ({r['trials']} trials, {r['nodes']} Ray nodes, cluster start/stop included) "
          f"| {s['cpu']['cpu_s']:.0f} | {s['wall_s']:.0f} |")
    if "independent" in r:
        i = r["independent"]
        print(f"| {r['trials']} independent runs, one after the other | {i['cpu']['cpu_s']:.0f} | {i['wall_s']:.0f} |")
        print(f"| sweep / independent | {r['ratio']['cpu']:.0%} | {r['ratio']['wall']:.0%} |")
    for name, p in r["projection"].items():
        print(f"\nprojection ({name}): {p['trials']} trials, epochs {p['epochs']}, "
              f"{p['images']['train']:,} + {p['images']['val']:,} images")
        for st, sec in p["stage_s"].items():
            print(f"  {st}: {sec / 3600:.1f} h per run (this machine's per-image rates)")
        print(f"  sweep / independent = {p['ratio']:.1%} (limit for many trials {p['limit_ratio']:.1%}); "
              f"40 % needs trials to train <= {p['trial_share_for_40pct']:.0%} of their own epochs' cost")
        a = p["asha"]
        print(f"  with ASHA (grace {a['grace_period']}, rf {a['reduction_factor']:g}, rungs {a['rungs']}): "
              f"{a['epoch_fraction']:.1%} of the epochs, {a['cost_fraction']:.1%} of their cost, "
              f"sweep / independent = {a['ratio']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
