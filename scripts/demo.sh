#!/usr/bin/env bash
# Set up .venv, then run memenc on the bundled sample: encode samples/ball.mp4 (its masks
# are found beside it, in samples/ball_masks/) with seeded random weights, then inspect the
# store and draw a preview of frame 10. Outputs go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEMENC_VENV:-.venv}"
mkdir -p out
"$VENV/bin/memenc" encode samples/ball.mp4 --weights random --image-size 512 -o out/ball.zarr "$@"
"$VENV/bin/memenc" inspect out/ball.zarr
"$VENV/bin/memenc" preview out/ball.zarr --frame 10 --object 1 -o out/ball_frame10.png
