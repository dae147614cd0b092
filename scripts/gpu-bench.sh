#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one command (run on a GPU node, in the medattn env):
#   scripts/gpu-bench.sh            # or: make bench-gpu
# Prints tables and writes JSON records under $OUT (default bench-out/gpu). Uses fake prepared
# data (no dataset needed); set DATA=/path/to/prep to use a real prepared directory instead.
set -euo pipefail
OUT=${OUT:-bench-out/gpu}
N=${N:-16384}            # fake images (512 px: ~4.3 GB in RAM while written)
STEPS=${STEPS:-50}
WORKERS=${WORKERS:-8}     # DALI threads / external-source workers per GPU
if [ -n "${DATA:-}" ]; then SRC=(--data "$DATA"); else SRC=(--fake-data "$N" --fake-size 512); fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== loader alone: DALI GPU operators vs DALI CPU operators vs DataLoader (512 -> 256 -> 224, batch 256)"
medattn bench loader "${SRC[@]}" --batch 256 --steps "$STEPS" --workers "$WORKERS" --loaders dali,torch --device cuda --json-out "$OUT"
medattn bench loader "${SRC[@]}" --batch 256 --steps "$STEPS" --workers "$WORKERS" --loaders dali --device cpu --json-out "$OUT"

echo "== AG-CNN ResNet-50, all stages, bf16 + channels_last (the paper's batch 128/64/64, and 256)"
medattn bench train --config agcnn_resnet50 "${SRC[@]}" --steps "$STEPS" --warmup 10 --device cuda --json-out "$OUT" model.weights=none
medattn bench train --config agcnn_resnet50 "${SRC[@]}" --steps "$STEPS" --warmup 10 --device cuda --batch 256 --json-out "$OUT" model.weights=none data.num_workers="$WORKERS"
echo "== the same with torch.compile"
medattn bench train --config agcnn_resnet50 "${SRC[@]}" --steps "$STEPS" --warmup 20 --device cuda --batch 256 --json-out "$OUT" model.weights=none runtime.compile=true data.num_workers="$WORKERS"

echo "== DualAttendMed ResNet-152 (layer4 stride 1)"
medattn bench train --config dualattendmed_resnet152 "${SRC[@]}" --steps "$STEPS" --warmup 10 --device cuda --batch 64 --modes trainer,step,loader --json-out "$OUT" model.weights=none || echo "(dualattendmed config not available)"
echo "records in $OUT; copy the tables into docs/benchmarks.md with the device name"
