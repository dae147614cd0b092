"""The GPU check (scripts/gpu-check.sh) in the GPU machine's environment, simulated on a CPU:
nvidia.dali, submitit and ray cannot be imported, the repository is not installed (a copy of the
checkout, on PYTHONPATH only, with the virtual environment's editable install hidden), the
interpreter comes from $PYTHON. And the DALI parts (scripts/split-wheel.py) and the compile modes
(what the check's CUDA-graph row runs) on a CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from prepfix import make_prepared

REPO = Path(__file__).resolve().parents[1]

# Imported by every Python the check starts (it is first on PYTHONPATH): the modules the GPU
# machine lacks raise ModuleNotFoundError (matplotlib is not in its list either), and the editable install of medattn (a meta-path
# finder of the virtual environment) is removed, so medattn and hpc come from PYTHONPATH or not
# at all.
BLOCKER = '''
import sys
BLOCKED = ("nvidia.dali", "submitit", "ray", "matplotlib")
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU machine has none)", name=name)
        return None
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in getattr(f, "__name__", "")]
sys.meta_path.insert(0, _Blocker())
'''
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "runs", "demo-out",
                                 "bench-out", ".whl", ".gl", ".tmp", ".dali-parts", "build", "dist", "*.egg-info")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_gpu_check_cpu_in_the_gpu_machines_environment(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=IGNORED)
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    # short names: the children's TMPDIR (WORK/t) holds Unix sockets, whose paths have <= 107 bytes
    home, tmpdir, cwd, out, work = (tmp_path / d for d in ("h", "s", "c", "o", "w"))
    for d in (home, tmpdir, cwd):
        d.mkdir()
    before = _snapshot(checkout)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDATTN_", "PYTHON", "TORCH", "CUDA"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(tmp_path / "blocker"), HOME=str(home), TMPDIR=str(tmpdir),
               OMP_NUM_THREADS="1")
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.Popen(["bash", str(checkout / "scripts" / "gpu-check.sh"), "--cpu", "--out", str(out),
                             "--work", str(work)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # The JSON is replaced atomically after every phase: every read parses, and reads during the
    # run see it before it is done.
    reads, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            f = out / "gpu-check.json"
            if f.is_file():
                reads.append(json.loads(f.read_text()))
            time.sleep(0.2)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        text, _ = proc.communicate(timeout=1500)
    finally:
        stop.set()
        t.join()
        if proc.poll() is None:  # the check and its children, when the test times out
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, text[-5000:]
    rec = json.loads((out / "gpu-check.json").read_text())
    assert rec["done"] and any(not r["done"] and r["phases"] for r in reads), [r.get("phases") for r in reads[:3]]

    # the environment: nothing of what the GPU machine lacks, medattn from the copied checkout
    imports = rec["machine"]["imports"]
    assert not imports["nvidia.dali"]["ok"] and not imports["submitit"]["ok"] and not imports["ray"]["ok"]
    assert "blocked" in imports["ray"]["error"]
    assert imports["medattn"]["file"] == str(checkout / "medattn" / "__init__.py")
    assert rec["loader"] == "torch"

    # every row, 0 host syncs per step in every training row
    ids = [r["id"] for r in rec["rows"]]
    want = ["loader torch w8", "loader torch w16"]
    for tag, stages in (("agcnn_resnet50 1gpu", ("global", "local", "fusion")),
                        ("agcnn_resnet50 8gpu", ("global", "local", "fusion")),
                        ("dualattendmed_resnet152 1gpu", ("main",))):
        want += [f"{tag} {s} b" for s in stages]
    for w in want:
        assert any(i.startswith(w) for i in ids), (w, ids)
    train = [r for r in rec["rows"] if "mode" in r]
    assert {r["mode"] for r in train} == {"trainer", "step"}
    for r in train:
        assert r["sync_ops_per_step"] == 0, r
        assert r["ops_per_step"] > 100 and r["images_per_s"] > 0 and r["ms_per_step"] > 0, r
    # --cpu runs each "1gpu" AG-CNN stage at its config batch / 8, each "8gpu" one at / 32
    batches = {(r["phase"], r["stage"]): r["global_batch"] for r in train}
    assert batches[("agcnn_paper", "global")] == 16 and batches[("agcnn_paper", "local")] == 8
    assert batches[("agcnn_8gpu", "global")] == 4 and batches[("agcnn_8gpu", "fusion")] == 2
    assert rec["phases"]["agcnn_8gpu_graphs"]["status"] == "skipped"

    # kill -9 mid-epoch, resumed from the last step checkpoint, exactly the planned steps
    res = rec["phases"]["resume"]
    assert res["exact"], res
    assert res["killed_at"] == ["global", 3] and res["resumed_at"] == ["global", 2]
    assert res["steps"] == res["planned"] == {"global": 4, "local": 4, "fusion": 4}
    # the trainer's flags, and the bench rows ran with the same ones
    assert rec["flags"]["trainer"] == {"cudnn_benchmark": False, "channels_last": False, "precision": "fp32",
                                       "compile_mode": None}
    assert rec["flags"]["bench_rows_equal_trainer"]
    assert all(p["status"] in ("ok", "skipped") for p in rec["phases"].values()), rec["phases"]
    assert "| row" in text and "exact" in text

    # what comes back: at most 8 files under 16 MiB; nothing written anywhere else but --work
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files), files
    assert sorted(p.name for p in files) == ["gpu-check.json", "gpu-check.log", "gpu-check.txt"]
    assert _snapshot(checkout) == before, "the check wrote into the checkout"
    assert not list(home.iterdir()) and not list(cwd.iterdir()) and not list(tmpdir.iterdir())
    assert rec["work"] == str(work) and rec["tmpdir"] == str(work / "t")


def _fake_wheel(path: Path, pkg: str, payload: bytes) -> Path:
    """A minimal valid wheel with one module ``pkg`` (pip installs it)."""
    dist = f"{pkg}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{pkg}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{pkg}/blob.bin", payload)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 1.0\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_dali_parts_split_join_install(tmp_path):
    split, check = _load("split-wheel"), _load("gpu_check")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    w1 = _fake_wheel(wheels / "probe_a-1.0-py3-none-any.whl", "probe_a", os.urandom(300_000))
    w2 = _fake_wheel(wheels / "probe_b-1.0-py3-none-any.whl", "probe_b", os.urandom(50_000))
    parts = tmp_path / "parts"
    m = split.split([w1, w2], parts, part_bytes=100_000)
    assert len(m["parts"]) == 4 and max(p["bytes"] for p in m["parts"]) <= 100_000
    assert sorted(p.name for p in parts.iterdir()) == sorted(["MANIFEST.json", *(p["name"] for p in m["parts"])])

    # joined byte for byte
    joined = check.join_parts(parts, tmp_path / "joined")
    assert sorted(p.name for p in joined) == [w1.name, w2.name]
    for p in joined:
        assert p.read_bytes() == (wheels / p.name).read_bytes()

    # a part that differs, or one not delivered: an error naming it
    bad = parts / m["parts"][2]["name"]
    good = bad.read_bytes()
    bad.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match=m["parts"][2]["name"]):
        check.join_parts(parts, tmp_path / "j2")
    bad.unlink()
    with pytest.raises(ValueError, match=f"{m['parts'][2]['name']}: missing"):
        check.join_parts(parts, tmp_path / "j3")
    bad.write_bytes(good)

    # installed as the check installs DALI: into WORK/site, put on its children's PYTHONPATH
    args = argparse.Namespace(cpu=True, out=str(tmp_path / "out"), work=str(tmp_path / "work"),
                              dali_parts=str(parts), budget=None)
    c = check.Check(args)
    res = check.install_dali(c, 120)
    assert res["wheels"] == [w1.name, w2.name], res
    site = tmp_path / "work" / "site"
    assert (site / "probe_a" / "__init__.py").is_file() and (site / "probe_b" / "blob.bin").is_file()
    r = subprocess.run([sys.executable, "-c", "import probe_a, probe_b; print(probe_a.VALUE, probe_a.__file__)"],
                       env=c.env, capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.split() == ["42", str(site / "probe_a" / "__init__.py")], r.stderr


@pytest.fixture(scope="module")
def tiny_prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=48, size=48, seed=0, classes=14, lung_boxes=True,
                         splits=(0.5, 0.25, 0.25))


@pytest.mark.slow
def test_compile_modes_train_and_resume(tiny_prep, tmp_path):
    """runtime.compile=true with compile_mode=default, killed (SIGKILL) mid-epoch, resumed with
    compile_mode=reduce-overhead (runtime keys may change on a resume): both modes train, the
    checkpoint of a compiled step resumes, and the run ends with exactly the planned steps.
    The smallest model that runs (timm's test_resnet, 32 px, the global stage): inductor still
    builds C++ kernels, ~1 min of CPU per mode on 2 cores (several minutes of wall time when the
    machine is shared)."""
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    base = [sys.executable, "-m", "medattn", "train", "--config", "demo", "--data", str(tiny_prep), "--out", str(out),
            "--stages", "global", "model.backbone=test_resnet", "data.image_size=32", "data.resize=40",
            "stages.global.epochs=1", "stages.global.batch_size=6", "runtime.ckpt_every_steps=2",
            "runtime.tensorboard=false", "runtime.log_every=1", "runtime.progress=log", "data.num_workers=1",
            "data.loader=torch", "runtime.compile=true"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TMPDIR=str(tmp_path))
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        p = subprocess.Popen([*base, "runtime.compile_mode=default"], stdout=f, stderr=subprocess.STDOUT,
                             env=dict(env, MEDATTN_FAULT_HOLD="step@3", MEDATTN_FAULT_DIR=str(marks),
                                      MEDATTN_FAULT_HOLD_S="300"), start_new_session=True)
        try:
            deadline = time.time() + 1200
            while time.time() < deadline and p.poll() is None and not list(marks.glob("step.*")):
                time.sleep(0.1)
            held = list(marks.glob("step.*"))
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert held, log.read_text()[-3000:]
    assert json.loads(held[0].read_text())["global_step"] == 3
    r = subprocess.run([*base, "runtime.compile_mode=reduce-overhead"], env=env, capture_output=True, text=True,
                       timeout=1200)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "[global] resuming at epoch 1 step 2 (global step 2)" in text, text[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["epoch"], x["global_step"]) for x in records] == [("global", 1, 4)]  # 24 images / 6
    assert math.isfinite(records[0]["train/loss"])
    prov = json.loads((out / "provenance.json").read_text())
    assert [p["runtime_flags"]["compile_mode"] for p in prov] == ["default", "reduce-overhead"]
