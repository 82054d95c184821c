#!/usr/bin/env bash
# One short GPU check (under 10 minutes on one H200): ResNet-50, synthetic 224x224 images, batch 256,
# in fp32 (TF32 off and on), amp (fp16), bf16 and master; then a GPT in bf16 and fp8 (tensorwise, rowwise;
# needs torchao: pip install -e .[fp8]). Prints markdown tables for docs/benchmarks.md and docs/precision.md.
#   bash scripts/gpu_check.sh            (from the repository root, on a machine with one CUDA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU"; exit 1; }
PY=${PYTHON:-python3}
if ! $PY -c "import mptrain, torch, hydra" 2>/dev/null; then
  $PY -m pip install -q -e . || $PY -m pip install -q --no-deps -e .
fi
export PYTHONUNBUFFERED=1
timeout 570 $PY scripts/gpu_check.py "$@"
