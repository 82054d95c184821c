#!/usr/bin/env bash
# The GPU check, offline: installs the carried wheels (.whl/, made by scripts/gpu_wheels.sh where an index is
# reachable) into /tmp/site with no index, puts that and the repository on PYTHONPATH, says in one line each what
# is missing, then runs scripts/gpu_check.py (a smoke run of every preset, ResNet-50 and a GPT; under 8 minutes on
# one H200). Its last output is the markdown for docs/benchmarks.md's GPU section.
#   bash scripts/gpu_check.sh [gpu_check.py options]      (from anywhere; on the machine with the GPU)
# Rehearsed offline on CPU with GPU_CHECK_CPU=1 (docs/benchmarks.md says how).
set -uo pipefail  # no -e: a missing piece is reported, not fatal
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
missing=0
CPU=${GPU_CHECK_CPU:-0}  # 1: rehearse on CPU at toy sizes (passes --cpu)
if [ "$CPU" = 1 ]; then set -- --cpu "$@"
else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || { echo "gpu_check: nvidia-smi failed (no NVIDIA driver visible)"; missing=1; }
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "gpu_check: the offline install of .whl/ failed (see pip's message above)"
else
  echo "gpu_check: no .whl/ here (run scripts/gpu_wheels.sh where an index is reachable, and carry .whl)"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
for mod in torch torchvision hydra omegaconf antlr4 yaml numpy tqdm rich mptrain; do
  $PY -c "import $mod" 2>/dev/null || { echo "gpu_check: cannot import $mod (needed)"; missing=1; }
done
$PY -c "import torchao" 2>/dev/null || echo "gpu_check: cannot import torchao (optional: the fp8 rows are left out)"
$PY -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count())" || missing=1
if [ "$missing" != 0 ]; then echo "gpu_check: stopping before the runs: a needed piece is missing (above)"; exit 1; fi
[ -n "${OUT:-}" ] && set -- --json "$OUT/gpu_check.json" "$@"  # the device tool brings $OUT back
timeout "${GPU_CHECK_TIMEOUT:-470}" $PY scripts/gpu_check.py "$@"
rc=$?
[ $rc = 124 ] && echo "gpu_check: stopped at its time limit (${GPU_CHECK_TIMEOUT:-470} s)"
exit $rc
