#!/usr/bin/env bash
# The reward-fidelity benchmark on BCCD at L = 40 and L = 80 (resumable: rerun to continue), with real gains
# from the ImageNet trunk (the round's schedule, seeds 0, 1) and warm-started from the round's detector
# (3 epochs, seeds 0-3). Estimator values and real gains are cached under docs/results/reward_fidelity/,
# the tables go to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MAGRAL_IMAGE_SIZE=320
for L in ${LABELED:-40 80}; do
  "${PYTHON:-.venv/bin/python}" -m benchmarks.proxy_fidelity --labeled "$L" --json "docs/results/reward_fidelity_L$L.json"
  "${PYTHON:-.venv/bin/python}" -m benchmarks.proxy_fidelity --labeled "$L" --warm-epochs 3 --seeds 0,1,2,3 \
    --json "docs/results/reward_fidelity_L${L}_warm3.json"
done
