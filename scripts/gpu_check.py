#!/usr/bin/env python3
"""The GPU check of docs/benchmarks.md: one command, one JSON, one table, <= 6 minutes on one GPU,
no network, nothing installed (except DALI from parts handed to it). Run it through
``scripts/gpu-check.sh``, which puts the checkout on PYTHONPATH and takes the interpreter from
``$PYTHON`` (default ``python3``):

    scripts/gpu-check.sh --out OUT [--work DIR] [--dali-parts .dali-parts]   # on the GPU machine
    scripts/gpu-check.sh --cpu --out OUT                                     # toy sizes on a CPU

The machine it is written for (docs/benchmarks.md): one H100 or H200, Python 3.12, torch 2.11,
torchvision, timm, numpy, pandas, pyarrow; no nvidia-dali, submitit or ray; no network; only
``OUT`` comes back, at most 8 files of at most 16 MiB. So:

* ``OUT`` receives three files: ``gpu-check.json`` (rewritten atomically after every phase, so a
  kill at the machine's time limit keeps every phase finished before it), ``gpu-check.log`` (the
  tail of each phase's output) and ``gpu-check.txt`` (the table). Data, runs, caches, temporary
  files and the full logs go to ``--work`` (default: a folder in the system's temporary folder),
  and every child process gets ``TMPDIR`` and torch's cache folders there, and writes no byte
  code: nothing is written in the checkout or the home folder.
* Every phase runs in a child process under a hard time limit (its process group is killed when
  the limit is reached); a phase that fails is recorded and the rest goes on. The limits add up
  to 6 minutes on a GPU (``CAPS``), whatever the phases do.

Phases and rows (each training row: img/s, ms/step, aten ops/step and host syncs/step counted
over steady-state steps, torch's ``set_sync_debug_mode("error")`` over them on CUDA, and the
row's own peak memory):

1. ``probe``: versions, the GPU, what imports (nvidia.dali, submitit, ray); with ``--dali-parts``
   the DALI bundle is joined, checked against its manifest and installed into ``WORK/site``
   (``pip install --no-deps --no-index --target``), and DALI is measured from there.
2. ``data``: fake prepared data at 512 px (the prepared size of ChestX-ray14 here).
3. ``loader``: the PyTorch loader, 512 -> 256 -> 224, with 8 and 16 workers (img/s, and img/s per
   busy core); the DALI loader too when it imports.
4. ``agcnn_paper``: AG-CNN ResNet-50 global/local/fusion at the paper's batch on one GPU
   (128/64/64), the trainer's step (``medattn bench train``, modes trainer and step).
5. ``agcnn_8gpu``: the same at the per-GPU batch of an 8-GPU run (16/8/8: ``--gpus 8``).
6. ``agcnn_8gpu_graphs``: the local stage at 8 per GPU with ``runtime.compile=true
   runtime.compile_mode=reduce-overhead`` (CUDA graphs). With ``--cpu`` it is skipped unless
   ``--cpu-compile`` is given (inductor builds C++ on a CPU: minutes).
7. ``dualattendmed``: DualAttendMed ResNet-152 at its config batch (16).
8. ``resume``: ``medattn train`` (demo config, loader workers on) killed with SIGKILL mid-epoch,
   rerun on the same ``--out``: it must resume from its last step checkpoint and end with exactly
   the planned optimizer steps in every stage and epoch. Its provenance gives the trainer's flags
   (cudnn.benchmark, channels_last, precision, compile mode), compared with the bench rows'.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Hard limit per phase, seconds, on a GPU: they add up to 360 s. (--cpu: CPU_CAPS.)
# dali: join + install (~50 s), then the probe again (within the budget).
CAPS = {"probe": 20, "dali": 60, "data": 25, "loader": 40, "agcnn_paper": 45, "agcnn_8gpu": 35,
        "agcnn_8gpu_graphs": 60, "dualattendmed": 30, "resume": 45}
CPU_CAPS = {k: 300 for k in CAPS}
LOG_TAIL = 6000  # characters of each phase's output copied into OUT/gpu-check.log
# Rows the check must produce (tests/test_gpu_check.py asserts them).
AGCNN_PAPER = {"global": 128, "local": 64, "fusion": 64}
AGCNN_8GPU = {"global": 16, "local": 8, "fusion": 8}
LOADER_WORKERS = (8, 16)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cpu = args.cpu
        self.t0 = time.time()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.gettempdir()) / "medattn-gpu-check"
        self.out.mkdir(parents=True, exist_ok=True)
        for d in ("t", "logs", "cache"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        # Children's TMPDIR: multiprocessing puts the Unix sockets through which DataLoader
        # workers pass tensors there, and a socket path is at most 107 bytes (a longer one: the
        # workers fail and the loader waits forever). A --work too deep for that gets a short
        # folder in the system's temporary folder instead, named in the JSON.
        self.tmpdir = self.work / "t"
        if len(str(self.tmpdir)) > 72:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="mgc-", dir="/tmp" if Path("/tmp").is_dir() else None))
        self.log = self.out / "gpu-check.log"
        self.log.write_text("")
        self.caps = CPU_CAPS if self.cpu else CAPS
        self.budget = args.budget if args.budget else (2400.0 if self.cpu else float(sum(
            v for k, v in CAPS.items() if k != "dali" or args.dali_parts)))
        w = self.work
        # Everything a child writes lands under WORK: temporary files, compiler and kernel caches
        # (inductor, triton, CUDA's JIT cache), torch hub, matplotlib. No byte code is written (a
        # PYTHONPYCACHEPREFIX would make every child compile torch's modules again).
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")]
                                                               if p),
                        PYTHONUNBUFFERED="1", MEDATTN_OFFLINE="1", TMPDIR=str(self.tmpdir),
                        PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=str(w / "cache"),
                        TORCH_HOME=str(w / "cache" / "torch"), TORCHINDUCTOR_CACHE_DIR=str(w / "cache" / "inductor"),
                        TRITON_CACHE_DIR=str(w / "cache" / "triton"), CUDA_CACHE_PATH=str(w / "cache" / "nv"),
                        MPLCONFIGDIR=str(w / "cache" / "mpl"), PIP_NO_CACHE_DIR="1",
                        PIP_DISABLE_PIP_VERSION_CHECK="1")
        if self.cpu:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.record: dict = {
            "check": "medattn GPU check (scripts/gpu_check.py)", "mode": "cpu" if self.cpu else "gpu",
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
            "python": platform.python_version(), "executable": sys.executable, "root": str(ROOT),
            "out": str(self.out), "work": str(self.work), "tmpdir": str(self.tmpdir), "budget_s": self.budget,
            "phases": {}, "rows": [], "done": False}
        self.write()

    # ---- bookkeeping
    def elapsed(self) -> float:
        return time.time() - self.t0

    def write(self) -> None:
        """OUT/gpu-check.json, replaced atomically: a reader (or a kill) never sees half of it."""
        self.record["seconds"] = round(self.elapsed(), 1)
        tmp = self.out / ".gpu-check.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(tmp, self.out / "gpu-check.json")

    def limit(self, phase: str) -> float:
        return max(5.0, min(float(self.caps[phase]), self.budget - self.elapsed()))

    def run(self, phase: str, cmd: list[str], limit: float, env: dict | None = None) -> tuple[int, str]:
        """Run ``cmd`` in its own process group under a hard limit (the whole group is killed:
        loader workers included); full output to WORK/logs, its tail to OUT/gpu-check.log.
        A timeout is exit status 124."""
        t0 = time.time()
        full = self.work / "logs" / f"{phase}.log"
        with open(full, "a") as f:
            f.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, cwd=self.work, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill_group(p)
                rc = 124
        text = full.read_text(errors="replace")
        with open(self.log, "a") as f:
            f.write(f"\n===== {phase}: exit {rc} after {time.time() - t0:.1f} s (limit {limit:.0f} s)\n"
                    f"$ {' '.join(shlex.quote(c) for c in cmd)}\n{text[-LOG_TAIL:]}\n")
        return rc, text

    def phase(self, name: str, fn) -> dict:
        entry = {"status": "running", "limit_s": round(self.limit(name)), "started_s": round(self.elapsed(), 1)}
        self.record["phases"][name] = entry
        self.write()
        t0 = time.time()
        try:
            entry.update(fn(self.limit(name)) or {})
            entry["status"] = entry.get("status", "running")
            if entry["status"] == "running":
                entry["status"] = "ok"
        except Exception as e:  # one phase's failure must not lose the others' figures
            entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        entry["seconds"] = round(time.time() - t0, 1)
        self.write()
        print(f"[{self.elapsed():5.0f} s] {name}: {entry['status']}"
              + (f" ({entry.get('error', '')[:200]})" if entry["status"] not in ("ok", "skipped") else ""),
              flush=True)
        return entry

    def child(self, phase: str, what: str, spec: dict, limit: float) -> dict:
        """Run one of this file's child functions (``--child WHAT``) in a fresh interpreter."""
        res = self.work / "logs" / f"{phase}.result.json"
        res.unlink(missing_ok=True)
        rc, text = self.run(phase, [sys.executable, str(Path(__file__).resolve()), "--child", what,
                                    "--spec", json.dumps(spec), "--result", str(res)], limit)
        if rc != 0 or not res.is_file():
            return {"status": "timeout" if rc == 124 else "failed", "exit": rc, "error": _tail_error(text)}
        return json.loads(res.read_text())

    def bench(self, phase: str, args: list[str], limit: float, row_id) -> dict:
        """``medattn bench train ARGS`` (the bench the docs quote), its rows into the record."""
        jdir = self.work / "bench" / phase
        if jdir.exists():
            shutil.rmtree(jdir)
        cmd = [sys.executable, "-m", "medattn", "bench", "train", *args, "--json-out", str(jdir)]
        rc, text = self.run(phase, cmd, limit)
        files = sorted(jdir.glob("train-*.json")) if jdir.is_dir() else []
        entry = {"command": " ".join(shlex.quote(c) for c in cmd[2:]), "exit": rc}
        if files:
            res = json.loads(files[-1].read_text())
            entry["machine"] = res.get("machine")
            for r in res.get("results", []):
                r = {k: v for k, v in r.items() if k != "note"}
                r["id"] = row_id(r)
                r["phase"] = phase
                self.record["rows"].append(r)
        if rc != 0:
            entry.update(status="timeout" if rc == 124 else "failed", error=_tail_error(text))
        return entry


def _descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (from /proc): a trainer a child started in a session of its
    own is not in the child's process group, and must not outlive the phase's limit."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        q = todo.pop()
        kids = [c for c, pp in parent.items() if pp == q]
        out += kids
        todo += kids
    return out


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL ``p``, its process group and every descendant."""
    victims = _descendants(p.pid)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _tail_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-12:])[-2000:]


# ---------------------------------------------------------------------------------------------
# DALI from parts
# ---------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def join_parts(parts_dir: Path, dest: Path) -> list[Path]:
    """Join the bundle that scripts/split-wheel.py cut (``MANIFEST.json`` + parts) into ``dest``,
    checking every part and the whole against the manifest, and unpack its wheels there.
    Returns the wheel files. Raises ValueError naming the part that is missing or differs."""
    import tarfile

    mf = parts_dir / "MANIFEST.json"
    if not mf.is_file():
        raise ValueError(f"{mf}: no manifest (make the parts with scripts/split-wheel.py)")
    manifest = json.loads(mf.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    bundle = dest / manifest["bundle"]
    h = hashlib.sha256()
    with open(bundle, "wb") as out:
        for part in manifest["parts"]:
            p = parts_dir / part["name"]
            if not p.is_file():
                raise ValueError(f"{p}: missing ({len(manifest['parts'])} parts expected; deliver every part)")
            data = p.read_bytes()
            if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise ValueError(f"{p}: differs from MANIFEST.json (size {len(data)}, expected {part['bytes']})")
            h.update(data)
            out.write(data)
    if h.hexdigest() != manifest["sha256"]:
        raise ValueError(f"{bundle}: joined bundle differs from MANIFEST.json")
    wheels = []
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            if not (m.isfile() and m.name.endswith(".whl") and "/" not in m.name):
                raise ValueError(f"{bundle}: unexpected member {m.name!r}")
            tar.extract(m, dest)
            wheels.append(dest / m.name)
    bundle.unlink()
    return wheels


def install_dali(check: Check, limit: float) -> dict:
    parts = Path(check.args.dali_parts).resolve()
    t0 = time.time()
    wheels = join_parts(parts, check.work / "wheels")
    site = check.work / "site"
    if site.exists():
        shutil.rmtree(site)
    rc, text = check.run("dali", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                                  "--target", str(site), *map(str, wheels)], max(5.0, limit - (time.time() - t0)))
    how = "pip"
    if rc != 0 and "No module named pip" in text:
        # No pip on that Python: a wheel is a zip archive laid out as site-packages.
        import zipfile

        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        rc, how = 0, "unzipped (no pip)"
    for w in wheels:
        w.unlink()
    if rc != 0:
        return {"status": "failed", "error": _tail_error(text)}
    check.env["PYTHONPATH"] = os.pathsep.join([str(site), check.env["PYTHONPATH"]])
    return {"wheels": [w.name for w in wheels], "installed_into": str(site), "how": how}


# ---------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=False, help="folder that comes back: gpu-check.json, .log, .txt")
    p.add_argument("--work", default=None, help="data, runs, caches, full logs (default: TMP/medattn-gpu-check)")
    p.add_argument("--dali-parts", default=None, help="folder with the DALI bundle's parts (scripts/split-wheel.py)")
    p.add_argument("--cpu", action="store_true", help="toy sizes on a CPU: tests the check, measures nothing")
    p.add_argument("--cpu-compile", action="store_true", help="with --cpu, also run the compile phase (minutes)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default: the caps' sum)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = CHILDREN[args.child](json.loads(args.spec))
        Path(args.result).write_text(json.dumps(res, default=str))
        return 0
    if not args.out:
        p.error("--out DIR is required")
    check = Check(args)
    cpu = check.cpu
    dev = "cpu" if cpu else "cuda"

    # 1. what this machine is, DALI from parts
    def probe(limit):
        return check.child("probe", "probe", {}, limit)
    check.record["machine"] = check.phase("probe", probe)
    if args.dali_parts:
        if (Path(args.dali_parts) / "MANIFEST.json").is_file():
            check.phase("dali", lambda limit: install_dali(check, limit))
            # the probe again (inside the dali phase's share of the budget): does DALI import now?
            check.record["machine"]["imports_after_dali"] = check.child("probe", "probe", {}, check.limit("probe")).get(
                "imports")
        else:
            check.record["phases"]["dali"] = {"status": "skipped",
                                              "reason": f"{args.dali_parts}: no MANIFEST.json (no parts delivered)"}
    imports = check.record["machine"].get("imports_after_dali") or check.record["machine"].get("imports") or {}
    dali = bool(imports.get("nvidia.dali", {}).get("ok"))
    loader = "dali" if dali else "torch"
    check.record["loader"] = loader

    # 2. data: 512 px prepared images (--cpu: 64 px), written once per size into WORK
    n, size = (64, 64) if cpu else (1024, 512)
    data = check.work / f"data-{n}-{size}"
    check.phase("data", lambda limit: check.child("data", "data", {"dir": str(data), "n": n, "size": size}, limit))

    # 3. the loader alone
    def loader_phase(limit):
        spec = {"data": str(data), "device": dev, "batch": 16 if cpu else 256, "steps": 3 if cpu else 20,
                "image_size": 32 if cpu else 224, "resize": 40 if cpu else 256,
                "runs": [["torch", w] for w in LOADER_WORKERS] + ([["dali", 8]] if dali else [])}
        res = check.child("loader", "loader", spec, limit)
        for r in res.pop("rows", []):
            r["id"] = f"loader {r['kind']} w{r['workers']}"
            r["phase"] = "loader"
            check.record["rows"].append(r)
        return res
    check.phase("loader", loader_phase)

    # 4-7. training steps
    small = ["data.image_size=32", "data.resize=40", "model.backbone=resnet18"] if cpu else []
    over = ["model.weights=none", f"data.loader={loader}", f"data.num_workers={2 if cpu else 8}", *small]
    steps = ["--steps", "2" if cpu else "20", "--warmup", "1" if cpu else "5", "--sync-steps", "1" if cpu else "3",
             "--count-syncs", "--project", ""] + ([] if cpu else ["--sync-debug"])
    base = ["--data", str(data), "--device", dev, "--modes", "trainer,step", *steps]

    def rid(tag):
        return lambda r: f"{tag} {r['stage']} b{r['global_batch']} {r['mode']}"
    # --cpu: the batches / 8 (the "8gpu" rows / 32: BatchNorm needs 2 samples), or the CPU takes minutes
    def gpus(n):
        return ["--gpus", str({1: 8, 8: 32}[n] if cpu else n)] if (n > 1 or cpu) else []
    check.phase("agcnn_paper", lambda limit: check.bench(
        "agcnn_paper", ["--config", "agcnn_resnet50", *gpus(1), *base, *over], limit, rid("agcnn_resnet50 1gpu")))
    check.phase("agcnn_8gpu", lambda limit: check.bench(
        "agcnn_8gpu", ["--config", "agcnn_resnet50", *gpus(8), *base, *over], limit, rid("agcnn_resnet50 8gpu")))
    if cpu and not args.cpu_compile:
        check.record["phases"]["agcnn_8gpu_graphs"] = {
            "status": "skipped", "reason": "--cpu: torch.compile builds C++ kernels on a CPU (minutes); "
            "--cpu-compile runs it, tests/test_gpu_check.py trains and resumes both compile modes on a CPU"}
        check.write()
    else:
        check.phase("agcnn_8gpu_graphs", lambda limit: check.bench(
            "agcnn_8gpu_graphs", ["--config", "agcnn_resnet50", *gpus(8), "--stages", "local",
                                  *base, *over, "runtime.compile=true", "runtime.compile_mode=reduce-overhead"],
            limit, rid("agcnn_resnet50 8gpu reduce-overhead")))
    check.phase("dualattendmed", lambda limit: check.bench(
        "dualattendmed", ["--config", "dualattendmed_resnet152", *gpus(1), *base, *over], limit,
        rid("dualattendmed_resnet152 1gpu")))

    # 8. kill -9 mid-epoch and resume
    def resume(limit):
        spec = {"data": str(data), "run": str(check.work / "run"), "marks": str(check.work / "marks"),
                "device": dev, "loader": loader, "cpu": cpu, "env": check.env}
        return check.child("resume", "resume", spec, limit)
    check.phase("resume", resume)
    r = check.record["phases"]["resume"]
    bench_flags = {tuple((k, row.get(k)) for k in FLAG_KEYS) for row in check.record["rows"]
                   if "mode" in row and row.get("compile_mode") is None}
    if r.get("trainer_flags"):
        trainer = tuple((k, r["trainer_flags"].get(k)) for k in FLAG_KEYS)
        check.record["flags"] = {"trainer": r["trainer_flags"],
                                 "bench_rows_equal_trainer": bench_flags == {trainer}}
    check.record["done"] = True
    check.write()
    table = summary(check.record)
    (check.out / "gpu-check.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {check.out / 'gpu-check.json'} in {check.elapsed():.0f} s (work: {check.work})")
    bad = [k for k, v in check.record["phases"].items() if v.get("status") not in ("ok", "skipped")]
    return 1 if bad or not r.get("exact") else 0


FLAG_KEYS = ("cudnn_benchmark", "channels_last", "precision", "compile_mode")


def summary(record: dict) -> str:
    head = ["row", "img/s", "ms/step", "ops/step", "syncs/step", "sync debug", "peak GiB", "flags"]
    rows = []
    for r in record["rows"]:
        if "kind" in r:  # loader
            rows.append([r["id"], _fmt(r.get("images_per_s")), _fmt(r.get("ms_per_step")), "", "", "", "",
                         f"{_fmt(r.get('images_per_s_per_core'))} img/s per core, {r.get('view')}"])
        else:
            flags = f"{r.get('loader')} {r.get('precision')} cl={int(bool(r.get('channels_last')))} " \
                    f"cudnn.bench={int(bool(r.get('cudnn_benchmark_set')))} compile={r.get('compile_mode') or 'off'}"
            rows.append([r["id"], _fmt(r.get("images_per_s")), _fmt(r.get("ms_per_step")), _fmt(r.get("ops_per_step")),
                         _fmt(r.get("sync_ops_per_step")), r.get("cuda_sync_debug", "-"), _fmt(r.get("peak_memory_gib")),
                         flags])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(v).ljust(w) if i in (0, 7) else str(v).rjust(w)
                                for i, (v, w) in enumerate(zip(row, widths))) + " |" for row in rows]
    m = record.get("machine", {})
    lines.append(f"machine: {m.get('gpu') or 'cpu'} | python {m.get('python')} | torch {m.get('torch')} | "
                 f"loader {record.get('loader')} | dali "
                 f"{(m.get('imports_after_dali') or m.get('imports', {})).get('nvidia.dali', {}).get('version')}")
    r = record["phases"].get("resume", {})
    lines.append(f"kill -9 at global step {r.get('killed_at')} -> resumed at {r.get('resumed_at')} "
                 f"(checkpoint every {r.get('ckpt_every')}), steps per stage {r.get('steps')} "
                 f"planned {r.get('planned')}: {'exact' if r.get('exact') else 'NOT EXACT'}")
    if record.get("flags"):
        lines.append(f"trainer flags {record['flags']['trainer']}; bench rows the same: "
                     f"{record['flags']['bench_rows_equal_trainer']}")
    for name, ph in record["phases"].items():
        lines.append(f"phase {name}: {ph.get('status')} in {ph.get('seconds', '-')} s (limit {ph.get('limit_s', '-')})"
                     + (f": {ph.get('reason') or ph.get('error', '').splitlines()[-1:]}"
                        if ph.get("status") not in ("ok",) else ""))
    lines.append(f"total {record.get('seconds')} s")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# children (run in fresh interpreters by the driver)
# ---------------------------------------------------------------------------------------------
def child_probe(spec: dict) -> dict:
    import importlib

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "imports": {}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    for name in ("medattn", "nvidia.dali", "submitit", "ray", "torchvision", "timm"):
        try:
            m = importlib.import_module(name)
            out["imports"][name] = {"ok": True, "version": getattr(m, "__version__", None),
                                    "file": getattr(m, "__file__", None)}
        except Exception as e:
            out["imports"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return out


def child_data(spec: dict) -> dict:
    from medattn.data.fake import write_fake_prepared

    d = Path(spec["dir"])
    if not (d / "dataset.json").is_file():
        tmp = d.with_name(d.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        # Every disease and a lung box per image: every method's config runs on it.
        write_fake_prepared(tmp, n=spec["n"], size=spec["size"], classes=14, lung_boxes=True,
                            splits=(0.9, 0.05, 0.05), shard_size=4096)
        os.replace(tmp, d)
        return {"images": spec["n"], "size": spec["size"], "written": True}
    return {"images": spec["n"], "size": spec["size"], "written": False}


def child_loader(spec: dict) -> dict:
    import torch

    from hpc.benchmarks.loader import measure
    from medattn.data.prepared import PreparedDataset

    ds = PreparedDataset.open(spec["data"])
    device = torch.device(spec["device"])
    rows = []
    for kind, workers in spec["runs"]:
        r = measure(ds, kind, device, spec["batch"], spec["image_size"], spec["resize"], spec["steps"], workers)
        # Per busy core: CPU seconds of the process tree (workers included) over the timed batches;
        # None when too few clock ticks were counted to divide by (toy sizes).
        busy = r["cpu_cores_busy"]
        r.update(kind=kind, ms_per_step=1000 * spec["batch"] / r["images_per_s"],
                 images_per_s_per_core=r["images_per_s"] / busy if busy > 0.05 else None)
        rows.append(r)
    return {"rows": rows}


def child_resume(spec: dict) -> dict:
    """``medattn train`` killed with SIGKILL at a held step, then the same command again."""
    run, marks = Path(spec["run"]), Path(spec["marks"])
    for d in (run, marks):
        if d.exists():
            shutil.rmtree(d)
    marks.mkdir(parents=True)
    cpu = spec["cpu"]
    batch, every, kill_at = (4 if cpu else 32), 2, 3
    steps_per_epoch = 4
    epochs = {"global": 1, "local": 1, "fusion": 1}
    cmd = [sys.executable, "-m", "medattn", "train", "--config", "demo", "--data", spec["data"], "--out", str(run),
           *[f"stages.{s}.epochs={e}" for s, e in epochs.items()], f"stages.*.batch_size={batch}",
           f"data.max_samples={batch * steps_per_epoch}", f"runtime.ckpt_every_steps={every}",
           "runtime.log_every=1", "runtime.progress=log", "runtime.tensorboard=false", "data.num_workers=2",
           f"data.loader={spec['loader']}", f"runtime.device={spec['device']}",
           *(["data.image_size=32", "data.resize=40"] if cpu else [])]
    env = dict(spec["env"], MEDATTN_FAULT_HOLD=f"step@{kill_at}", MEDATTN_FAULT_DIR=str(marks),
               MEDATTN_FAULT_HOLD_S="120")
    log1 = run.with_name("resume-first.log")
    with open(log1, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None and not list(marks.glob("step.*")):
            time.sleep(0.05)
        held = sorted(marks.glob("step.*"))
        _kill_group(p)  # SIGKILL to the trainer and its loader workers: no checkpoint, no cleanup
    if not held:
        return {"status": "failed", "error": "the trainer never reached step 3:\n" + _tail_error(log1.read_text())}
    mark = json.loads(held[0].read_text())
    env = {k: v for k, v in spec["env"].items() if not k.startswith("MEDATTN_FAULT")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = r.stdout + r.stderr
    run.with_name("resume-rerun.log").write_text(text)
    m = re.search(r"\[(\w+)\] resuming at epoch (\d+) step (\d+) \(global step (\d+)\)", text)
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").is_file() else {}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    # The fusion stage's epoch-0 record ("initial": its starting head validated) is no training epoch.
    per_epoch = [(x["stage"], x["epoch"], x["global_step"]) for x in records if not x.get("initial")]
    planned = {s: e * steps_per_epoch for s, e in epochs.items()}
    expected_epochs = [(s, e, e * steps_per_epoch) for s, n in epochs.items() for e in range(1, n + 1)]
    got = {s: v.get("global_step") for s, v in state.get("stages", {}).items()}
    prov = run / "provenance.json"  # one record per launch; the rerun's is the last
    launches = json.loads(prov.read_text()) if prov.is_file() else []
    flags = launches[-1].get("runtime_flags") if launches else None
    resumed = (m.group(1), int(m.group(4))) if m else None
    exact = (r.returncode == 0 and mark["stage"] == "global" and mark["global_step"] == kill_at
             and resumed == ("global", kill_at - kill_at % every) and got == planned and per_epoch == expected_epochs)
    return {"command": " ".join(shlex.quote(c) for c in cmd[2:]), "killed_at": [mark["stage"], mark["global_step"]],
            "resumed_at": list(resumed) if resumed else None, "ckpt_every": every, "rerun_exit": r.returncode,
            "steps": got, "planned": planned, "epochs": per_epoch, "exact": exact, "trainer_flags": flags,
            **({} if exact else {"status": "failed", "error": _tail_error(text)})}


CHILDREN = {"probe": child_probe, "data": child_data, "loader": child_loader, "resume": child_resume}

if __name__ == "__main__":
    sys.exit(main())
