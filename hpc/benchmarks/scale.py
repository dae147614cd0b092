"""Cost against the image count: every phase of a user's first day, on an NIH-layout tree of N
films (the real metadata sampled to N images, patients kept whole; tiny pixels, since the count
is what is measured), each phase in its own process(es) as a user runs it.

Phases: build (the tree; not a user phase), inspect, prepare, loader_dali and loader_torch (two
epochs each, workers on: time to the first batch of each epoch), train (torchrun, 2 processes:
one epoch of AG-CNN's global stage on the whole train split at tiny size, validation included),
train_model (the three-stage model that the next phases use: one epoch per stage on the first
--model-samples films of each split, a cost that does not grow with the count), eval (the whole
test split, patient-clustered intervals for the three branches, localisation table), report,
predict (a folder of 2,000 films). Peak memory is that of the whole process tree (ranks and loader workers
included), sampled from /proc: RSS summed over the tree and PSS (shared pages counted once).

  medattn bench scale --images 7000 --work /tmp/scale --json-out scale-7000.json
  medattn bench scale --images 112120 --work /scratch/scale --json-out scale-112120.json --keep

Nothing is written outside --work and the JSON file (the phases' temporary files and caches
point into --work); the JSON is written at the end in one rename, so an interrupted run leaves
none. docs/benchmarks.md keeps the figures at 7,000 / 28,000 / 112,120 images.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpc.run import Run

PHASES = ("build", "inspect", "prepare", "loader_dali", "loader_torch", "train", "train_model", "eval", "report",
          "predict")
FULL_COUNT = 112_120
IMAGES_PER_FOLDER = 10_000  # NIH's archives hold ~10,000 films each (images_001 ... images_012)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, required=True, metavar="N",
                   help=f"films in the tree (patients kept whole, so the count lands at or just under N; "
                        f"{FULL_COUNT} takes every film)")
    p.add_argument("--work", required=True, metavar="DIR",
                   help="work folder: the tree, the prepared data, the run (removed at the end unless --keep)")
    p.add_argument("--metadata", metavar="DIR", default=None,
                   help="NIH metadata folder (Data_Entry, BBox list, official lists); default: the copy "
                        "shipped with medattn")
    p.add_argument("--size", type=int, default=64, metavar="S", help="side of the written films (default 64)")
    p.add_argument("--prep-size", type=int, default=64, metavar="S", help="prepare --size (default 64)")
    p.add_argument("--input-size", type=int, default=32, metavar="S",
                   help="network input side for train/eval/predict (default 32)")
    p.add_argument("--backbone", default=None,
                   help="backbone of the trained run (default timm's test_resnet, a ResNet of 0.5 M parameters, "
                        "where timm is installed, else resnet18): the count is measured, not the network")
    p.add_argument("--batch", type=int, default=64, help="global batch of every stage (default 64)")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes for train (default 2)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank (default 2)")
    p.add_argument("--bootstrap", type=int, default=1000, help="eval bootstrap resamples (default 1000)")
    p.add_argument("--predict-images", type=int, default=2000, help="films in the predict folder (default 2000)")
    p.add_argument("--model-samples", type=int, default=1024, metavar="K",
                   help="films per split for the three-stage model that eval/report/predict use (default 1024)")
    p.add_argument("--phases", default=",".join(p for p in PHASES if p != "train_model"),
                   help="comma list of phases to run (build always runs; later phases need the earlier ones; "
                        "train includes train_model)")
    p.add_argument("--seed", type=int, default=0, help="patient sampling seed (default 0)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--reuse", action="store_true",
                   help="run --phases again on the --work of an earlier --keep run (its tree, prepared data and "
                        "runs), e.g. eval,report after a change")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples (default 0.2)")


# --------------------------------------------------------------------------------------------
# The NIH-layout tree
# --------------------------------------------------------------------------------------------
def _open_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def _find(meta: Path, name: str) -> Path:
    for cand in (meta / name, meta / (name + ".gz")):
        if cand.is_file():
            return cand
    from medattn.errors import DataError

    raise DataError(meta / name, "missing from the metadata folder (give --metadata DIR with the NIH files)")


def sample_images(entry_text: str, n: int, seed: int) -> tuple[list[str], set[str]]:
    """The Data_Entry lines to keep: whole patients in a seeded random order until the next
    patient would pass ``n`` images (every line when ``n`` >= the file's count)."""
    lines = entry_text.splitlines()
    header, rows = lines[0], [ln for ln in lines[1:] if ln.strip()]
    if n >= len(rows):
        return [header] + rows, {r.split(",", 1)[0] for r in rows}
    patients = np.array([int(r.split(",")[3]) for r in rows])
    uniq, counts = np.unique(patients, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    total = np.cumsum(counts[order])
    take = set(uniq[order[: int(np.searchsorted(total, n, side="right"))]].tolist())
    kept = [r for r, pid in zip(rows, patients) if pid in take]
    return [header] + kept, {r.split(",", 1)[0] for r in kept}


def _png_pool(size: int, k: int = 64, seed: int = 0) -> list[bytes]:
    """``k`` distinct small grey films (a bright field, two dark lungs, noise) as PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = []
    for _ in range(k):
        lungs = np.exp(-(((xx - 0.3) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
            np.exp(-(((xx - 0.7) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        img = 200 - 120 * lungs + rng.normal(0, 12, (size, size))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_tree(root: Path, n: int, metadata: Path, size: int, seed: int) -> dict[str, Any]:
    """Write an NIH-layout tree (Kaggle layout: images_XXX/images/*.png, the metadata files at
    the top) of about ``n`` films. Metadata lines are copied byte for byte from the real files,
    filtered to the sampled images."""
    root.mkdir(parents=True, exist_ok=True)
    entry_path = _find(metadata, "Data_Entry_2017_v2020.csv")
    kept, images = sample_images(_open_text(entry_path), n, seed)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(kept) + "\n")
    box_lines = _open_text(_find(metadata, "BBox_List_2017.csv")).splitlines()
    boxes = [box_lines[0]] + [ln for ln in box_lines[1:] if ln.split(",", 1)[0] in images]
    (root / "BBox_List_2017.csv").write_text("\n".join(boxes) + "\n")
    for name in ("train_val_list.txt", "test_list.txt"):
        ids = [s for s in _open_text(_find(metadata, name)).split() if s in images]
        (root / name).write_text("\n".join(ids) + "\n")
    pool = _png_pool(size)
    names = sorted(images)
    for k, name in enumerate(names):
        folder = root / f"images_{k // IMAGES_PER_FOLDER + 1:03d}" / "images"
        if k % IMAGES_PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(pool[k % len(pool)])
    patients = {ln.split(",")[3] for ln in kept[1:]}
    return {"images": len(names), "patients": len(patients), "boxes": len(boxes) - 1}


# --------------------------------------------------------------------------------------------
# Measuring a process tree
# --------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        out.append(pid)
        frontier.extend(kids.get(pid, ()))
    return out


def _rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; PSS counts a page shared by k processes as 1/k."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = pss = int(f.read().split()[1]) * _PAGE
        except OSError:
            pass
    return rss, pss


def _shm_used() -> int:
    """Bytes in use on /dev/shm (loader workers hand batches over through it)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class TreeMonitor:
    """Samples the summed RSS/PSS and the process count of a process tree in a thread."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.shm0 = _shm_used()
        self.peak_shm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scale-monitor", daemon=True)

    def __enter__(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            pids = tree_pids(self.pid)
            rss = pss = 0
            for p in pids:
                r, s = _rss_pss(p)
                rss, pss = rss + r, pss + s
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.peak_shm = max(self.peak_shm, _shm_used() - self.shm0)
            if self._stop.wait(self.interval):
                return


def _cpu_of_children() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_phase(name: str, argv: Sequence[str], env: dict[str, str], log: Path, interval: float) -> dict[str, Any]:
    """Run one phase as its own process group; its wall time, CPU time and peak tree memory."""
    c0, t0 = _cpu_of_children(), time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            with TreeMonitor(proc.pid, interval) as mon:
                rc = proc.wait()
        except BaseException:
            # Ctrl-C (or any error) here: the phase's whole tree goes too.
            _kill_group(proc)
            raise
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"phase {name} failed (exit {rc}); last lines of {log}:\n{tail}")
    return {"seconds": round(wall, 2), "cpu_seconds": round(_cpu_of_children() - c0, 2),
            # the machine's 1-minute load at the end: a shared machine's wall times read with it
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "peak_rss_mib": round(mon.peak_rss / 2**20, 1), "peak_pss_mib": round(mon.peak_pss / 2**20, 1),
            "peak_processes": mon.peak_procs, "peak_shm_mib": round(mon.peak_shm / 2**20, 1)}


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the phase's whole process group (its loader workers too) and wait until it is gone,
    so nothing writes into --work while it is removed."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def disk_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------------------------
# One loader phase (runs in its own process: python -m hpc.benchmarks.scale loader ...)
# --------------------------------------------------------------------------------------------
def _loader_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="hpc.benchmarks.scale loader")
    p.add_argument("--data", required=True)
    p.add_argument("--kind", required=True, choices=["dali", "torch"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch

    from hpc.loader import EvalLoader, TrainLoader, TrainPlan
    from medattn.config import load_config
    from medattn.data.prepared import PreparedDataset

    torch.set_num_threads(1)
    ds = PreparedDataset.open(a.data)
    data = load_config("demo", [f"data.image_size={a.input_size}", f"data.resize={a.input_size + a.input_size // 8}",
                                f"data.num_workers={a.workers}"]).data
    train_idx, val_idx = ds.indices("train"), ds.indices("val")
    plan = TrainPlan(train_idx, a.batch, 1, seed=0)
    dev = torch.device("cpu")
    loader = TrainLoader(ds, data, plan, 0, dev, 0, hires=True, kind=a.kind)
    val = EvalLoader(ds, data, val_idx, a.batch, 0, 1, dev, hires=True, kind=a.kind)
    epochs = []
    for e in range(a.epochs):
        rec: dict[str, Any] = {}
        for what, it in (("train", lambda: loader.epoch(e)), ("val", lambda: iter(val))):
            t0 = time.perf_counter()
            first, n = None, 0
            for b in it():
                if first is None:
                    first = time.perf_counter() - t0
                n += int(b["valid"].sum()) if what == "val" else b["image"].shape[0]
            wall = time.perf_counter() - t0
            rec[what] = {"first_batch_s": round(first or 0.0, 3), "seconds": round(wall, 2), "images": n,
                         "images_per_s": round(n / wall, 1) if wall > 0 else None}
        epochs.append(rec)
    loader.close()
    val.close()
    Path(a.out).write_text(json.dumps({"epochs": epochs, "steps_per_epoch": plan.steps_per_epoch}))
    return 0


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------
def _env(work: Path) -> dict[str, str]:
    """The phases' environment: temporary files and caches inside --work, one thread per
    process for the BLAS pools (2 cores are shared by the ranks and workers)."""
    env = dict(os.environ)
    tmp = work / "tmp"
    for d in ("tmp", "cache", "mpl"):
        (work / d).mkdir(parents=True, exist_ok=True)
    env.update(TMPDIR=str(tmp), TMP=str(tmp), TEMP=str(tmp), XDG_CACHE_HOME=str(work / "cache"),
               MPLCONFIGDIR=str(work / "mpl"), TORCHINDUCTOR_CACHE_DIR=str(work / "cache" / "inductor"),
               PYTHONUNBUFFERED="1")
    # The repository this module runs from comes first on the phases' path.
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _train_overrides(a: argparse.Namespace) -> list[str]:
    resize = a.input_size + a.input_size // 8
    return [f"model.backbone={a.backbone}", "model.weights=none", f"data.image_size={a.input_size}",
            f"data.resize={resize}", f"data.num_workers={a.workers}", "runtime.progress=log",
            "runtime.log_every=50"] + \
        [f"stages.{s}.{k}={v}" for s in ("global", "local", "fusion")
         for k, v in (("epochs", 1), ("batch_size", a.batch))]


def _stage_seconds(run: Path) -> dict[str, dict[str, float]]:
    """Training and validation seconds of each stage, from the run's epoch records."""
    out: dict[str, dict[str, float]] = {}
    for r in Run(run).records():
        st = r.get("stage")
        if st is None or "train/time_s" not in r:
            continue
        d = out.setdefault(st, {"train_s": 0.0, "val_s": 0.0})
        d["train_s"] = round(d["train_s"] + float(r["train/time_s"]), 2)
        d["val_s"] = round(d["val_s"] + float(r.get("val/time_s") or 0.0), 2)
        d["train_images_per_s"] = round(float(r.get("train/images_per_s") or 0.0), 1)
    return out


def exponent(x0: float, y0: float, x1: float, y1: float) -> float | None:
    """Growth exponent b of y = a * x**b between two points (None when undefined)."""
    if min(x0, x1, y0, y1) <= 0 or x0 == x1:
        return None
    return float(np.log(y1 / y0) / np.log(x1 / x0))


def run(args: argparse.Namespace) -> int:
    from hpc.benchmarks.common import machine_info, print_table
    from medattn.data.nih import bundled_nih_dir
    from medattn.errors import MedattnError

    if args.images < 100:
        raise MedattnError(f"--images {args.images}: use at least 100 (patients are kept whole)")
    wanted = [s.strip() for s in args.phases.split(",") if s.strip()]
    bad = [s for s in wanted if s not in PHASES or s == "train_model"]
    if bad:
        raise MedattnError(f"--phases: unknown {bad}; choose from {', '.join(PHASES)}")
    out_json = Path(args.json_out)
    if out_json.suffix != ".json":
        out_json = out_json / f"scale-{args.images}.json"
    work = Path(args.work).resolve()
    if args.reuse:
        if not (work / "nih" / "Data_Entry_2017_v2020.csv").is_file():
            raise MedattnError(f"--reuse: {work} holds no tree of an earlier --keep run")
    elif work.exists() and any(work.iterdir()):
        raise MedattnError(f"--work {work}: not empty (give a new or empty folder, or --reuse an earlier --keep run)")
    meta = Path(args.metadata) if args.metadata else bundled_nih_dir()
    if args.backbone is None:
        import importlib.util

        args.backbone = "test_resnet" if importlib.util.find_spec("timm") else "resnet18"
    work.mkdir(parents=True, exist_ok=True)
    env = _env(work)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    nih, prep, runs = work / "nih", work / "prep", work / "run"
    phases: dict[str, Any] = {}
    record: dict[str, Any] = {"benchmark": "scale", "images": None, "requested_images": args.images,
                              "phases": phases, "disk_bytes": {}}

    def say(msg: str) -> None:
        print(msg, flush=True)

    def phase(name: str, argv: list[str]) -> dict[str, Any]:
        say(f"[scale {args.images}] {name} ...")
        res = run_phase(name, argv, env, logs / f"{name}.log", args.interval)
        phases[name] = res
        say(f"[scale {args.images}] {name}: {res['seconds']:.1f} s, peak {res['peak_rss_mib']:.0f} MiB RSS "
            f"/ {res['peak_pss_mib']:.0f} MiB PSS over {res['peak_processes']} processes")
        return res

    try:
        say(f"[scale {args.images}] build: NIH-layout tree in {nih}")
        t0 = time.perf_counter()
        if args.reuse:
            lines = (nih / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]
            tree = {"images": len(lines), "patients": len({ln.split(",")[3] for ln in lines}),
                    "boxes": len((nih / "BBox_List_2017.csv").read_text().splitlines()) - 1, "reused": True}
        else:
            tree = build_tree(nih, args.images, meta, args.size, args.seed)
        phases["build"] = {"seconds": round(time.perf_counter() - t0, 2), **tree}
        record["images"], record["patients"] = tree["images"], tree["patients"]
        record["disk_bytes"]["tree"] = disk_bytes(nih)
        say(f"[scale {args.images}] build: {tree['images']:,} films of {tree['patients']:,} patients, "
            f"{tree['boxes']} boxes, {phases['build']['seconds']:.1f} s")
        medattn = [py, "-m", "medattn"]
        if "inspect" in wanted:
            phase("inspect", medattn + ["inspect", "--nih-root", str(nih), "--json"])
        if "prepare" in wanted:
            phase("prepare", medattn + ["prepare", "--nih-root", str(nih), "--out", str(prep), "--size",
                                        str(args.prep_size), "--split", "official"])
            record["disk_bytes"]["prepared"] = disk_bytes(prep)
        for kind in ("dali", "torch"):
            name = f"loader_{kind}"
            if name in wanted:
                res_file = work / f"{name}.json"
                res = phase(name, [py, "-m", "hpc.benchmarks.scale", "loader", "--data", str(prep), "--kind", kind,
                                   "--batch", str(args.batch), "--workers", str(args.workers),
                                   "--input-size", str(args.input_size), "--out", str(res_file)])
                res.update(json.loads(res_file.read_text()))
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
        if "train" in wanted:
            # One epoch of the global stage on the whole train split, its validation included:
            # what grows with the count.
            res = phase("train", torchrun + ["-m", "medattn", "train", "--config", "demo", "--data", str(prep),
                                             "--out", str(work / "run-global"), "--stages", "global"]
                        + _train_overrides(args))
            res["stage_seconds"] = _stage_seconds(work / "run-global")
            # The three-branch model that eval, report and predict use: every stage, one epoch
            # each on the first --model-samples films of each split (its cost does not depend
            # on the count; eval then runs on the whole test split).
            res = phase("train_model", torchrun + ["-m", "medattn", "train", "--config", "demo", "--data", str(prep),
                                                   "--out", str(runs)]
                        + _train_overrides(args) + [f"data.max_samples={args.model_samples}"])
            res["stage_seconds"] = _stage_seconds(runs)
        if "eval" in wanted:
            res = phase("eval", medattn + ["eval", "--run", str(runs), "--split", "test", "--bootstrap",
                                           str(args.bootstrap)])
            timing = json.loads(Run(runs).evaluation("test").metrics_path.read_text()).get("timing_s") or {}
            res.update({f"{k}_s": round(v, 2) for k, v in timing.items()})
            # what the target of docs/benchmarks.md counts: the eval phase less its forward passes
            res["without_forward_s"] = round(res["seconds"] - timing.get("forward", 0) - timing.get("forward_val", 0), 2)
        if "report" in wanted:
            res = phase("report", medattn + ["report", "--run", str(runs)])
            html = runs / "report" / "index.html"
            if html.is_file():
                res["html_bytes"] = html.stat().st_size
        if "predict" in wanted:
            folder = work / "predict-in"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            films = sorted(nih.glob("images_*/images/*.png"))[: args.predict_images]
            for f in films:
                os.link(f, folder / f.name)
            res = phase("predict", medattn + ["predict", "--run", str(runs), str(folder),
                                              "--out", str(work / "predict.csv")])
            res["images"] = len(films)
        if runs.exists():
            record["disk_bytes"]["run"] = disk_bytes(runs)
    except KeyboardInterrupt:
        say(f"[scale {args.images}] interrupted: no JSON written")
        if not (args.keep or args.reuse):
            shutil.rmtree(work, ignore_errors=True)
        return 130
    except BaseException:
        if not args.keep:
            say(f"[scale {args.images}] failed; the work folder is kept for its logs: {work}")
        raise
    record["machine"] = machine_info()
    record["command"] = "medattn bench scale " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "scale"]
                                                         else sys.argv[1:])
    record["settings"] = {k: getattr(args, k) for k in ("size", "prep_size", "input_size", "backbone", "batch",
                                                        "nproc", "workers", "bootstrap", "predict_images", "seed")}
    record["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = [{"phase": k, "seconds": v["seconds"], "peak_rss_mib": v.get("peak_rss_mib", ""),
             "peak_pss_mib": v.get("peak_pss_mib", ""), "processes": v.get("peak_processes", "")}
            for k, v in phases.items()]
    print_table(rows)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    from medattn.fileio import write_text

    write_text(out_json, json.dumps(record, indent=2, default=str))
    say(f"wrote {out_json}")
    if not (args.keep or args.reuse):  # --reuse never removes an earlier run's folder
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: seconds, CPU-seconds and peak PSS/RSS per phase at each count, and the growth
    exponents between the two largest counts (docs/benchmarks.md)."""
    recs = sorted(records, key=lambda r: r["images"])
    names = [p for p in PHASES if any(p in r["phases"] for r in recs)]
    counts = [r["images"] for r in recs]
    head = ["phase"] + [f"{c:,}: s / CPU-s / PSS / RSS MiB" for c in counts]
    if len(recs) >= 2:
        head += [f"exponent {counts[-2]:,} -> {counts[-1]:,}: time (CPU) / PSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for r in recs:
            ph = r["phases"].get(name)
            if ph is None:
                cells.append("")
            elif "peak_pss_mib" in ph:
                cells.append(f"{ph['seconds']:.1f} / {ph['cpu_seconds']:.1f} / {ph['peak_pss_mib']:.0f} / "
                             f"{ph['peak_rss_mib']:.0f}")
            else:
                cells.append(f"{ph['seconds']:.1f}")
        if len(recs) >= 2:
            a, b = recs[-2]["phases"].get(name), recs[-1]["phases"].get(name)
            if a and b:
                fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
                t = exponent(counts[-2], a["seconds"], counts[-1], b["seconds"])
                cpu = exponent(counts[-2], a.get("cpu_seconds", 0), counts[-1], b.get("cpu_seconds", 0))
                mem = exponent(counts[-2], a.get("peak_pss_mib", 0), counts[-1], b.get("peak_pss_mib", 0))
                cells.append(f"{fmt(t)} ({fmt(cpu)}) / {fmt(mem)}")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        print(table([json.loads(Path(f).read_text()) for f in sys.argv[2:]]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "loader":
        sys.exit(_loader_main(sys.argv[2:]))
    sys.exit("usage: python -m hpc.benchmarks.scale loader ...  (the benchmark is `medattn bench scale`)")
