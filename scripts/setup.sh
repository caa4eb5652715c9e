#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install memenc into it.
# With --test, also the test tools and the reference oracle (Meta's SAM 2, sam2==1.1.0,
# installed without its dependencies or CUDA extension, see shared/REFERENCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEMENC_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: 2.13.0 is the CPU build this project is developed on; an unpinned
# torch would pull a multi-GB CUDA build. Any torch>=2.5 works for memenc itself.
pip install "torch==${MEMENC_TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "--test" ]; then
  pip install -e ".[test]"
  SAM2_BUILD_CUDA=0 pip install --no-deps "sam2==1.1.0"
  pip install hydra-core iopath tqdm
else
  pip install -e .
fi
