#!/usr/bin/env bash
# One short GPU check (under 8 minutes on one H200): ResNet-50, synthetic 224x224 images, batch 256,
# in fp32 (TF32 off and on), amp (fp16), bf16 and master. Prints a markdown table for docs/benchmarks.md.
#   bash scripts/gpu_check.sh            (from the repository root, on a machine with one CUDA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU"; exit 1; }
PY=${PYTHON:-python3}
if ! $PY -c "import mptrain, torch, hydra" 2>/dev/null; then
  $PY -m pip install -q -e . || $PY -m pip install -q --no-deps -e .
fi
export PYTHONUNBUFFERED=1
timeout 450 $PY scripts/gpu_check.py "$@"
