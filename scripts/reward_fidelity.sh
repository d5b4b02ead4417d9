#!/usr/bin/env bash
# The reward-fidelity benchmark on BCCD at L = 40 and L = 80 (resumable: rerun to continue).
# Estimator values and real gains are cached under docs/results/reward_fidelity/, the tables go to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MAGRAL_IMAGE_SIZE=320
for L in ${LABELED:-40 80}; do
  "${PYTHON:-.venv/bin/python}" -m benchmarks.proxy_fidelity --labeled "$L" --json "docs/results/reward_fidelity_L$L.json"
done
