#!/usr/bin/env bash
# Fetch, on a machine with an index, the wheels that the offline GPU machine lacks into .whl/ (git-ignored).
# That machine (docs/benchmarks.md, GPU section) has Python 3.12 and torch 2.11 with numpy, pyyaml, tqdm, rich,
# tensorboard, matplotlib, scikit-learn, torchvision and packaging already; it has no hydra-core, omegaconf,
# antlr4 or torchao. Versions are exact: hydra-core 1.3 needs omegaconf 2.3 and antlr4 4.9.3 (its parser);
# (the versions of the dev venv); torchao 0.18.0 is the first release whose extensions load on torch 2.11 (its floor), so it fits there.
#   bash scripts/gpu_wheels.sh        (then scripts/gpu_check.sh on the GPU machine installs .whl/ offline)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
BINARY=(hydra-core==1.3.8 omegaconf==2.3.1 torchao==0.18.0)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)  # published as an sdist only; pure Python, so built into a wheel here
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
failed=0
for spec in "${BINARY[@]}"; do
  args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$DEST" -q)
  for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
  $PY -m pip download "${args[@]}" "$spec" || { echo "gpu_wheels: could not download $spec"; failed=1; }
done
for spec in "${SOURCE_ONLY[@]}"; do
  $PY -m pip wheel --no-deps -q -w "$DEST" "$spec" || { echo "gpu_wheels: could not build a wheel of $spec"; failed=1; }
done
# one version of each package: two make the offline install stop
dups=$(ls "$DEST"/*.whl 2>/dev/null | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dups" ]; then echo "gpu_wheels: more than one wheel of: $dups (remove the older from $DEST/)"; failed=1; fi
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
exit $failed
