#!/bin/bash
cd /work/wt-reward
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MAGRAL_IMAGE_SIZE=320
for L in 40 80; do
  /work/main/.venv/bin/python -m benchmarks.proxy_fidelity --labeled $L --json docs/results/reward_fidelity_L$L.json
done
