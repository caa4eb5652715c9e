#!/usr/bin/env bash
# Fetch the wheels a CUDA machine without a package registry lacks, for benchmarks/gpu.sh.
# Run it where pip reaches a registry (CI does), from any directory:
#     bash benchmarks/gpu_wheels.sh            # -> wheels/gpu-a/ and wheels/gpu-b/ (git-ignored)
#
# The GPU machine has Python 3.12 and torch with typer, rich, click, fsspec, numpy, pillow,
# xarray, psutil (and so packaging, pygments, typing_extensions); it lacks memenc's av,
# decord2 and zarr (+ numcodecs, donfig, google-crc32c, PyYAML), pytest (+ pluggy,
# iniconfig) and the reference oracle (sam2, hydra-core, omegaconf, antlr4-python3-runtime,
# iopath, tqdm, portalocker). Only those are fetched: one version each, the version
# installed in $PYTHON's environment (default .venv, made by `scripts/setup.sh --test`),
# where memenc's CPU results were checked; cp312 manylinux x86-64 wheels, or py3-none-any
# wheels built here with `pip wheel --no-deps` for the sdist-only sam2 (SAM2_BUILD_CUDA=0),
# antlr4-python3-runtime and iopath. Never torch or numpy.
#
# Everything sent to the GPU machine in one call (working tree + carried paths) must fit in
# 64 MiB, and all of these are ~75 MB (av 36, decord2 27, numcodecs 9), so they come in two
# folders of at most LIMIT_MIB each, carried in two calls while the machine stays warm
# (gpu.sh installs outside the repo, in /tmp/memenc-gpu-site, which survives between calls):
#     wheels/gpu-a  av, zarr & co, pytest, the oracle     call 1: carry wheels/gpu-a
#                                                         `bash benchmarks/gpu.sh --install-only`
#     wheels/gpu-b  decord2                               call 2: carry wheels/gpu-b
#                                                         `bash benchmarks/gpu.sh "$OUT"`
# The script fails if a folder exceeds LIMIT_MIB (default 60, leaving room for the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST="${MEMENC_WHEELS:-wheels}"
LIMIT_MIB="${LIMIT_MIB:-60}"

[ -x "$PY" ] || command -v "$PY" >/dev/null || {
  echo "gpu_wheels.sh: $PY not found; run 'bash scripts/setup.sh --test' first or set PYTHON" >&2
  exit 1
}
LISTS="$PY benchmarks/gpu_wheels.py" # the folders' lists and the checks live there
SDIST_ONLY="$($LISTS sdist-only)"    # pure Python, only sdists on the registry
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
version_of() { # the version installed in $PY's environment
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || {
    echo "gpu_wheels.sh: $1 is not installed in $PY's environment (scripts/setup.sh --test)" >&2
    return 1
  }
}
BINARY=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)

fetch() { # folder, package names
  local dir="$DEST/$1" name ver
  shift
  mkdir -p "$dir"
  for name in "$@"; do
    ver="$(version_of "$name")"
    if [[ " $SDIST_ONLY " == *" $name "* ]]; then
      [ -n "$(find "$dir" -iname "$(echo "$name" | tr - _)-$ver-py3-none-any.whl")" ] && continue
      # --no-build-isolation: sam2 declares torch as a build requirement; $PY has it
      SAM2_BUILD_CUDA=0 pip wheel --no-deps --no-build-isolation -w "$dir" "$name==$ver"
    else
      pip download --no-deps "${BINARY[@]}" -d "$dir" "$name==$ver"
    fi
  done
}

for group in gpu-a gpu-b; do
  # shellcheck disable=SC2046
  fetch "$group" $($LISTS names "$group")
done
$LISTS check --limit-mib "$LIMIT_MIB" "$DEST/gpu-a" "$DEST/gpu-b"
