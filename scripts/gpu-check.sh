#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md): loader, AG-CNN ResNet-50 and DualAttendMed ResNet-152 steps,
# host syncs, peak memory, a kill -9 and a resume; <= 6 minutes on one GPU, no network.
#   scripts/gpu-check.sh --out OUT [--work DIR] [--dali-parts .dali-parts]   on the GPU machine
#   scripts/gpu-check.sh --cpu --out OUT                                     toy sizes on a CPU
# Runs from an uninstalled checkout: the checkout goes first on PYTHONPATH, the interpreter is
# $PYTHON (default python3). Installs nothing (DALI only from --dali-parts, into --work).
# OUT gets gpu-check.json (rewritten after every phase), gpu-check.log and gpu-check.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1   # the driver writes no byte code into the checkout (children: --work)
exec "${PYTHON:-python3}" "$root/scripts/gpu_check.py" "$@"
