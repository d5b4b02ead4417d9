#!/usr/bin/env bash
# Regenerate the README's screenshots in docs/screenshots/ from the browser test's own output:
# runs tests/e2e/test_first_project.py (a real Label Studio 1.23.2, `magral serve`, Debian's Chromium) with
# MAGRAL_SCREENSHOTS pointing at a temporary directory, then shrinks each PNG (crop, resize, palette) under
# 300 KB. About 5 minutes; needs what `make test` needs (the .venv, ../shared/data/bccd, Redis not required).
#
#   scripts/screenshots.sh [SHOTS_DIR]   reuse SHOTS_DIR's PNGs if it already has both (no test run)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
OUT="$REPO/docs/screenshots"
SHOTS="${1:-}"
cd "$REPO"

if [[ -z "$SHOTS" ]]; then
    SHOTS="$(mktemp -d -t magral-shots-XXXXXX)"
fi
if [[ ! -f "$SHOTS/task_with_pre_annotations.png" || ! -f "$SHOTS/status_dashboard.png" ]]; then
    MAGRAL_SCREENSHOTS="$SHOTS" OMP_NUM_THREADS=1 "$PY" -m pytest -q -s tests/e2e/test_first_project.py
fi
mkdir -p "$OUT"
"$PY" - "$SHOTS" "$OUT" <<'PYTHON'
"""Shrink the test's screenshots for the README: at most 1000 px wide (the dashboard also cut to its first
project's learning curve, forecast, next tasks and rounds), 256-colour PNG, at most 300 KB each."""
import sys
from pathlib import Path

from PIL import Image

LIMIT = 300 * 1024
shots, out = Path(sys.argv[1]), Path(sys.argv[2])
for name, max_height in (("task_with_pre_annotations.png", 960), ("status_dashboard.png", 2400)):
    image = Image.open(shots / name).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, max_height)))
    width = 1000
    while True:
        scaled = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        target = out / name
        scaled.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
        if target.stat().st_size <= LIMIT or width <= 500:
            break
        width -= 100
    print(f"{target}: {scaled.width}x{scaled.height}, {target.stat().st_size // 1024} KB")
PYTHON
