#!/usr/bin/env python3
"""The GPU check of docs/benchmarks.md: one command, one JSON, one table, <= 8 minutes on one GPU,
no network. Run from the repository root on the GPU machine:

    scripts/gpu-check.sh                 # (= python3 scripts/gpu_check.py --out bench-out/gpu-check)
    scripts/gpu-check.sh --cpu           # the same plumbing at toy sizes on a CPU (how it is tested)

What it does, each step under its own time limit (a step that fails is recorded, the rest goes on):

1. DALI: imported if installed; else installed from wheels beside the repository (``.whl/`` or
   ``--wheels DIR``: nvidia-dali-cuda130 and the nvidia-nvimgcodec/nvjpeg/... wheels it needs,
   downloaded where pip has a network; see docs/benchmarks.md); if that fails, the PyTorch
   DataLoader path is measured instead, and the JSON says so.
2. Fake prepared data written once (uint8, bounded memory): every later step reads it.
3. The loader alone (``medattn bench loader``): images/s at batch 256, 256 -> 224.
4. AG-CNN ResNet-50, bf16, channels_last: the global, local and fusion trainer steps at the paper's
   batch on one GPU and at 1/8 of it (what each GPU of an 8-GPU run sees), with the aten ops and
   host syncs per step counted, torch's sync checker (``set_sync_debug_mode("error")``) over the
   counted steps, and peak memory; the full 50/50/50 schedule projected from the measured rates.
5. DualAttendMed ResNet-152 (layer4 stride 1): the same, its one stage.
6. A short three-stage run on the GPU, SIGUSR2 in the middle of it (a checkpoint, exit 3), and the
   rerun that resumes and finishes.

Writes ``OUT/gpu-check.json`` (machine, commands, every figure) and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], timeout: float, env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run a command, tee its output to ``log``; (exit status, output). A timeout is status 124."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = 124
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}   # {time.time() - t0:.1f} s, exit {rc}\n{out}\n")
    return rc, out


def newest_json(d: Path, prefix: str) -> dict | None:
    files = sorted(d.glob(f"{prefix}-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def ensure_dali(wheels: Path, env: dict[str, str], log: Path) -> tuple[str, str]:
    """('dali' or 'torch', how)."""
    py = [sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"]
    rc, out = sh(py, 120, env, log)
    if rc == 0:
        return "dali", f"DALI {out.strip().splitlines()[-1]} installed"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return "torch", f"DALI not installed and no wheels in {wheels}: measuring the PyTorch loader"
    target = Path(env.get("MEDATTN_WHEEL_TARGET", "/tmp/medattn-site"))
    rc, out = sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--target", str(target), *map(str, found)], 300, env, log)
    if rc == 0:
        env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
        rc, out = sh(py, 120, env, log)
        if rc == 0:
            return "dali", f"DALI {out.strip().splitlines()[-1]} installed from {len(found)} wheel(s) in {wheels}"
    return "torch", f"DALI could not be installed from {wheels} (see the log): measuring the PyTorch loader"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/gpu-check", help="folder for the JSON, the log and the data")
    p.add_argument("--cpu", action="store_true", help="toy sizes on a CPU: tests the script, measures nothing")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder with DALI wheels (used if DALI is missing)")
    p.add_argument("--images", type=int, default=4096, help="fake images (256 px)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default 480 = 8 min; 1800 with --cpu)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1800.0 if args.cpu else 480.0
    t_start = time.time()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu-check.log"
    log.write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", MEDATTN_OFFLINE="1")
    medattn = [sys.executable, "-m", "medattn"]
    cpu = args.cpu
    dev = "cpu" if cpu else "cuda"
    record: dict = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mode": "cpu" if cpu else "gpu",
                    "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                    "python": platform.python_version(), "steps": {}}
    rc, smi = sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], 30,
                 env, log) if not cpu else (1, "")
    record["gpu"] = smi.strip() if rc == 0 else None

    def left() -> float:
        return args.budget - (time.time() - t_start)

    def step(name: str, cmd: list[str], share: float, bench: str | None = None) -> dict:
        limit = max(20.0, min(left() - 5, share))
        rc, text = sh(cmd, limit, env, log)
        entry = {"command": " ".join(shlex.quote(c) for c in cmd), "exit": rc, "seconds": None}
        if bench:
            res = newest_json(out / name, bench)
            if res:
                entry["results"] = res.get("results")
                entry["projection"] = res.get("projection")
                entry["machine"] = res.get("machine")
        if rc != 0:
            entry["error_tail"] = text[-1500:]
        record["steps"][name] = entry
        print(f"[{time.time() - t_start:5.0f} s] {name}: exit {rc}", flush=True)
        return entry

    # 1. DALI
    loader, how = ensure_dali(Path(args.wheels), env, log)
    record["loader"] = {"kind": loader, "how": how}
    print(how, flush=True)
    # 2. data, once
    data = out / "data"
    n, size = (96, 48) if cpu else (args.images, 256)
    t0 = time.time()
    if not (data / "dataset.json").is_file():
        rc, text = sh([sys.executable, "-c",
                       "import sys; from medattn.data.fake import write_fake_prepared as w; "
                       f"w(sys.argv[1], n={n}, size={size}, classes=14, lung_boxes=True, splits=(0.9, 0.05, 0.05), "
                       "shard_size=4096)", str(data)], 300, env, log)
        if rc != 0:
            print(text[-2000:], file=sys.stderr)
            return 1
    record["data"] = {"images": n, "size": size, "seconds": round(time.time() - t0, 1)}
    small = ["data.image_size=32", "data.resize=40", "model.backbone=resnet18", "data.num_workers=0"] if cpu else \
        [f"data.num_workers={min(8, os.cpu_count() or 8)}"]
    common = ["--data", str(data), "--device", dev, "--count-syncs", "--json-out"]
    # 3. loader alone
    step("loader", [*medattn, "bench", "loader", "--data", str(data), "--batch", "16" if cpu else "256", "--steps",
                    "3" if cpu else "30", "--workers", "0" if cpu else "8", "--loaders", loader, "--device", dev,
                    "--image-size", "32" if cpu else "224", "--resize", "40" if cpu else "256",
                    "--json-out", str(out / "loader")], 60 if cpu else 60, "loader")
    steps = ["--steps", "2" if cpu else "30", "--warmup", "1" if cpu else "10"]
    ag = ["--config", "agcnn_resnet50", *steps, "--modes", "trainer,step,eval",
          *([] if cpu else ["--sync-debug"])]
    over = ["model.weights=none", f"data.loader={loader}", *small]
    # 4. AG-CNN ResNet-50 at the paper's batch (128/64/64: stages.*) and at 1/8 of it per GPU
    step("agcnn_resnet50", [*medattn, "bench", "train", *ag, *common, str(out / "agcnn_resnet50"), *over,
                            *(["stages.*.batch_size=8"] if cpu else [])], 300 if cpu else 150, "train")
    step("agcnn_resnet50_per_gpu", [*medattn, "bench", "train", *ag, "--per-gpu-batch", "4" if cpu else "16",
                                    *common, str(out / "agcnn_resnet50_per_gpu"), *over], 300 if cpu else 110, "train")
    # 5. DualAttendMed ResNet-152
    dam = ["--config", "dualattendmed_resnet152", *steps, "--modes", "trainer,step",
           *([] if cpu else ["--sync-debug"])]
    step("dualattendmed_resnet152", [*medattn, "bench", "train", *dam, "--batch", "8" if cpu else "64", *common,
                                     str(out / "dualattendmed_resnet152"), *over], 300 if cpu else 100, "train")
    step("dualattendmed_resnet152_per_gpu", [*medattn, "bench", "train", *dam, "--per-gpu-batch", "4" if cpu else "8",
                                             *common, str(out / "dualattendmed_resnet152_per_gpu"), *over],
         300 if cpu else 60, "train")
    # 6. three stages, a stop signal, the resume
    run = out / "run"
    train = [*medattn, "train", "--config", "demo", "--data", str(data), "--out", str(run), "stages.*.epochs=1",
             "data.max_samples=" + ("48" if cpu else "512"), "runtime.log_every=2", "runtime.tensorboard=false",
             f"data.loader={loader}", f"runtime.device={dev}", *small[:2]]
    entry = {"command": " ".join(map(shlex.quote, train))}
    if run.exists():
        import shutil

        shutil.rmtree(run)
    marks = out / "marks"
    marks.mkdir(exist_ok=True)
    for m in marks.glob("*"):
        m.unlink()
    env_hold = dict(env, MEDATTN_FAULT_HOLD="step@3", MEDATTN_FAULT_DIR=str(marks), MEDATTN_FAULT_HOLD_S="120")
    t0 = time.time()
    proc = subprocess.Popen(train, cwd=ROOT, env=env_hold, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + max(30.0, left() - 60)
    while time.time() < deadline and proc.poll() is None and not list(marks.glob("step.*")):
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGUSR2)
    try:
        text, _ = proc.communicate(timeout=max(30.0, left() - 40))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
    entry["first_exit"] = proc.returncode
    entry["stopped"] = "stopped by signal 12" in text
    with open(log, "a") as f:
        f.write(f"\n$ {entry['command']}  (SIGUSR2 at step 3)\n{text}\n")
    rc, text = sh(train, max(30.0, left() - 10), env, log)
    entry["rerun_exit"] = rc
    entry["resumed"] = "resuming at epoch" in text
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").is_file() else {}
    entry["stages_done"] = [s for s, v in state.get("stages", {}).items() if v.get("done")]
    entry["ok"] = entry["first_exit"] == 3 and entry["stopped"] and rc == 0 and entry["resumed"] and \
        entry["stages_done"] == ["global", "local", "fusion"]
    entry["seconds"] = round(time.time() - t0, 1)
    record["steps"]["stop_and_resume"] = entry
    print(f"[{time.time() - t_start:5.0f} s] stop_and_resume: {'ok' if entry['ok'] else 'FAILED'}", flush=True)

    record["seconds"] = round(time.time() - t_start, 1)
    (out / "gpu-check.json").write_text(json.dumps(record, indent=2, default=str))
    print_summary(record)
    print(f"\nwrote {out / 'gpu-check.json'} (log: {log}) in {record['seconds']:.0f} s")
    failed = [k for k, v in record["steps"].items() if v.get("exit", 0) != 0 or v.get("ok") is False]
    return 1 if failed else 0


def print_summary(record: dict) -> None:
    rows = []
    for name, entry in record["steps"].items():
        for r in entry.get("results") or []:
            rows.append([name, r.get("stage", r.get("loader", "")), r.get("mode", ""), r.get("global_batch", r.get("batch", "")),
                         f"{r['images_per_s']:,.0f}" if "images_per_s" in r else "",
                         _fmt(r.get("ops_per_step")), _fmt(r.get("sync_ops_per_step")),
                         _fmt(r.get("peak_memory_gib")), r.get("cuda_sync_debug", "")])
    head = ["check", "stage", "mode", "batch", "img/s", "ops/step", "syncs/step", "peak GiB", "sync debug"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    print("\n| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(v).rjust(w) for v, w in zip(row, widths)) + " |")
    for name, entry in record["steps"].items():
        proj = entry.get("projection")
        if proj:
            tot = {k: v for k, v in proj.items() if k.startswith("total_s_")}
            print(f"{name}: projected schedule " + ", ".join(f"{k[8:]}: {v / 60:.1f} min" for k, v in tot.items()))
    sr = record["steps"].get("stop_and_resume")
    if sr:
        print(f"stop and resume: first exit {sr.get('first_exit')}, rerun {sr.get('rerun_exit')}, "
              f"stages done {sr.get('stages_done')} -> {'ok' if sr.get('ok') else 'FAILED'}")


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" if isinstance(v, float) and v < 100 else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


if __name__ == "__main__":
    sys.exit(main())
