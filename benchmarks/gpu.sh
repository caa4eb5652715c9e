#!/usr/bin/env bash
# The device check: set up (torch from the registry as the GPU machine has it), then
# speed side by side with the reference at S=1024 in fp32 and bf16, and the parity
# tests on the GPU's machine. Prints Markdown tables. About 10 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMENC_TORCH_VERSION="${MEMENC_TORCH_VERSION:-2.13.0}" bash scripts/setup.sh --test >/dev/null
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for prec in fp32 bf16; do
  timeout 240 "$PY" benchmarks/speed.py --device cuda --precision "$prec" --image-size 1024 \
    --frames 96 --batch-size 16 --repeats 3 || echo "speed $prec: failed or timed out"
done
