#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md): loader, AG-CNN ResNet-50 and DualAttendMed ResNet-152 steps,
# host syncs, peak memory, a stop and a resume on the GPU; <= 8 minutes, no network.
#   scripts/gpu-check.sh                  on the GPU machine, from the repository root
#   scripts/gpu-check.sh --cpu            toy sizes on a CPU (tests the plumbing)
# Writes bench-out/gpu-check/gpu-check.json and prints one table. See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" scripts/gpu_check.py "$@"
