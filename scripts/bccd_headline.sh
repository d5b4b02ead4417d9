#!/usr/bin/env bash
# The headline active-learning run on BCCD (resumable: rerun to continue from docs/results/bccd_headline/rounds,
# committed, so a later checkout continues too). Pool = train, results on test, 5 seeds, 20 initial + 20 per
# round, 5 rounds, 320 px, every round trained from the ImageNet trunk (the paper's protocol); strategies
# random, entropy_max, coreset, ppal and magral with the default reward. Two one-thread processes: seeds 0-3
# one seed per process, then seed 4's strategies split over both, then the reports and the full-pool model.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MAGRAL_THREADS=1 MAGRAL_IMAGE_SIZE=320
MAGRAL="${MAGRAL:-.venv/bin/magral}"
OUT="${OUT:-docs/results/bccd_headline}"
STORE="$OUT/rounds"
common=(simulate --data ../shared/data/bccd --pool-split train --test-split test
        --strategies random,entropy_max,coreset,ppal,magral --initial 20 --budget 20 --rounds 5
        --store "$STORE" --no-progress)
"$MAGRAL" "${common[@]}" --seeds 0,1,2,3 --jobs 2 --out runs/bccd-headline/part1
"$MAGRAL" "${common[@]}" --seeds 4 --jobs 2 --out runs/bccd-headline/part2
"$MAGRAL" "${common[@]}" --seeds 0,1,2,3,4 --full-pool --out "$OUT"
