#!/usr/bin/env python3
"""Cut the DALI wheel (and the small wheels it imports) into parts that can travel to the GPU
machine one call at a time (docs/benchmarks.md, "DALI on the GPU machine").

    python scripts/split-wheel.py --out .dali-parts                 # pip download, then split
    python scripts/split-wheel.py --out .dali-parts --wheels DIR    # wheels already downloaded

The wheels are packed into one uncompressed tar (wheels are zip files already) and cut into the
fewest equal parts of at most ``--part-mib`` MiB (default 56: a part plus the ~4 MiB checkout
stays under the device tool's 64 MiB a call), with ``MANIFEST.json`` (the sha256 of each part and
of the whole). ``scripts/gpu_check.py --dali-parts DIR`` checks them, joins them and installs
the wheels with ``pip install --no-deps --no-index --target`` under its --work folder.

Which wheels: ``nvidia-dali-cuda130`` (no dependencies) plus what ``import nvidia.dali`` and
its PyTorch plugin need that the GPU machine lacks: astunparse, gast and optree (built for the
GPU machine's Python, ``--python-version``). Measured here with them blocked from import:
without any of the three (or six) the import fails; libcst, makefun, nvtx, nvidia-nvimgcodec
and nvidia-libnvcomp are not needed for the loader's CPU pipeline (its decoders are not used:
prepared shards are raw pixels).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

DALI = "nvidia-dali-cuda130=={version}"
DEPS = ["astunparse", "gast", "optree"]


def download(dest: Path, version: str, python_version: str) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    subprocess.run([*pip, DALI.format(version=version)], check=True)
    subprocess.run([*pip, "--python-version", python_version, "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", *DEPS], check=True)
    return sorted(dest.glob("*.whl"))


def split(wheels: list[Path], out: Path, part_bytes: int) -> dict:
    """Pack ``wheels`` into one tar, cut it into equal parts of at most ``part_bytes`` in ``out``;
    returns the manifest (also written to ``out/MANIFEST.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("bundle.tar.part-*")) + [out / "MANIFEST.json"]:
        old.unlink(missing_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for w in sorted(wheels, key=lambda p: p.name):
            info = tar.gettarinfo(str(w), arcname=w.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(w, "rb") as f:
                tar.addfile(info, f)
    data = buf.getvalue()
    n = max(1, -(-len(data) // part_bytes))
    size = -(-len(data) // n)
    parts = []
    for i in range(n):
        chunk = data[i * size:(i + 1) * size]
        name = f"bundle.tar.part-{i + 1}-of-{n}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"bundle": "bundle.tar", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "wheels": [{"name": w.name, "bytes": w.stat().st_size} for w in sorted(wheels, key=lambda p: p.name)],
                "parts": parts}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the parts and MANIFEST.json (an ignored folder)")
    p.add_argument("--wheels", default=None, help="folder with the wheels (default: pip download them)")
    p.add_argument("--download-to", default=".tmp/dali-wheels", help="where pip downloads the wheels")
    p.add_argument("--dali-version", default="2.4.0")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (for optree's wheel)")
    p.add_argument("--part-mib", type=float, default=56.0, help="largest part, MiB (default 56)")
    args = p.parse_args(argv)
    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else \
        download(Path(args.download_to), args.dali_version, args.python_version)
    if not wheels:
        p.error(f"no wheels in {args.wheels}")
    m = split(wheels, Path(args.out), int(args.part_mib * 2**20))
    for part in m["parts"]:
        print(f"{Path(args.out) / part['name']}  {part['bytes'] / 2**20:.1f} MiB")
    print(f"{len(m['wheels'])} wheels, {m['bytes'] / 2**20:.1f} MiB in {len(m['parts'])} parts; "
          f"manifest {Path(args.out) / 'MANIFEST.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
