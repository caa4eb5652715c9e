#!/usr/bin/env bash
# The device check, for a CUDA machine with no package registry (runs on one with, too):
#     bash benchmarks/gpu.sh [--dry-run] [--install-only] OUTDIR
#
# 1. Installs the carried wheels (wheels/gpu-a, wheels/gpu-b, made beforehand where pip works
#    by benchmarks/gpu_wheels.sh) with `pip install --no-index --no-deps --target` into
#    $MEMENC_GPU_SITE (default /tmp/memenc-gpu-site, outside the repo, so it survives between
#    calls on a warm machine), skipping wheels installed there by an earlier call. The folders
#    are carried one per call (each call may send 64 MiB with the working tree):
#        call 1: carry wheels/gpu-a   bash benchmarks/gpu.sh --install-only
#        call 2: carry wheels/gpu-b   bash benchmarks/gpu.sh "$OUT"
#    Uses the machine's own python3 ($PYTHON) and torch: never installs torch, never runs
#    scripts/setup.sh. Where memenc's dependencies are importable already, nothing is needed.
# 2. Puts the repo and that folder on PYTHONPATH; prints nvidia-smi and the versions.
# 3. Runs the CUDA tests (tests/test_cuda.py) and the TF32 switch test.
# 4. Runs the benchmark: python -m benchmarks.run --device cuda --suite gpu --out OUTDIR, and
#    the options in $GPU_SH_BENCH_ARGS after those (e.g. "--suite gpu512 --only whole").
# Each step runs under its own `timeout` within an 8-minute budget ($GPU_SH_BUDGET_S); what
# every step printed is in OUTDIR/gpu.log, step results in OUTDIR/summary.md, test results
# in OUTDIR/tests.xml, the errors the CUDA tests measured in OUTDIR/parity.jsonl, the
# benchmark's table in OUTDIR/benchmark.md and .json. Exit status 1 when a step failed.
#
# --dry-run does everything short of the first CUDA call, on any machine (CI runs it): checks
# the wheels (present, cp312/py3 manylinux x86-64, sizes), installs them into a scratch
# folder with pip's --python-version 3.12 --platform flags, checks the import list against
# this python, runs tests/test_cuda.py (its CUDA tests are skipped here) and the benchmark's
# --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
SITE="${MEMENC_GPU_SITE:-/tmp/memenc-gpu-site}"
WHEELS="${MEMENC_WHEELS:-wheels}"
export PIP_ROOT_USER_ACTION=ignore # pip as root on the GPU machine: no warning
BUDGET="${GPU_SH_BUDGET_S:-480}"
TESTS_S="${GPU_SH_TESTS_S:-150}"
DRY=0 INSTALL_ONLY=0 OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu.sh: unknown option $arg (--dry-run, --install-only)" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
if [ -z "$OUTDIR" ]; then
  [ "$INSTALL_ONLY" = 1 ] || { echo "usage: gpu.sh [--dry-run] [--install-only] OUTDIR" >&2; exit 2; }
  OUTDIR="$(mktemp -d)"
fi
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
exec > >(tee -a "$OUTDIR/gpu.log") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID"' EXIT # the log is whole when the script returns
command -v "$PY" >/dev/null || { echo "gpu.sh: $PY not found (set PYTHON)"; exit 1; }
LISTS=("$PY" "$REPO/benchmarks/gpu_wheels.py")
FAILED=0
echo "| step | result | seconds |" >"$OUTDIR/summary.md"
echo "|---|---|---|" >>"$OUTDIR/summary.md"
record() { # step, rc, seconds
  local result="ok"
  [ "$2" = 0 ] || { result="failed (exit $2)"; FAILED=1; }
  case "$2" in 124 | 137) result="timed out" ;; none) result="not run: budget spent" ;; esac
  echo "| $1 | $result | $3 |" >>"$OUTDIR/summary.md"
  echo "== $1: $result after ${3}s"
}
step() { # name, max seconds, command...: run under timeout within what is left of the budget
  local name="$1" max="$2" left=$((BUDGET - SECONDS - 10)) t0=$SECONDS rc
  shift 2
  [ "$max" -lt "$left" ] || max="$left"
  if [ "$max" -lt 5 ]; then record "$name" none 0; return 124; fi
  echo "== $name (timeout ${max}s)"
  timeout --kill-after=10 "$max" "$@"
  rc=$?
  record "$name" "$rc" $((SECONDS - t0))
  return "$rc"
}
echo "gpu.sh $(date -u +%FT%TZ) dry_run=$DRY install_only=$INSTALL_ONLY python=$PY site=$SITE"

# 1. the wheels that travelled
folders=()
for f in "$WHEELS"/gpu-a "$WHEELS"/gpu-b; do [ -d "$f" ] && folders+=("$f"); done
if [ "${#folders[@]}" -gt 0 ]; then
  step "check wheels" 30 "${LISTS[@]}" check "${folders[@]}"
  pyv="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$DRY" = 1 ]; then # install for the GPU machine's Python into scratch, then forget
    target="$(mktemp -d)"
    mapfile -t pending < <("${LISTS[@]}" pending "$target" "${folders[@]}")
    step "pip install --target (3.12, manylinux x86-64)" 120 "$PY" -m pip install \
      --disable-pip-version-check -q --no-index --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --abi cp312 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --target "$target" "${pending[@]}"
    for m in $("${LISTS[@]}" modules); do
      [ -e "$target/$m" ] || [ -e "$target/$m.py" ] || { echo "not installed: $m"; FAILED=1; }
    done
    rm -rf "$target"
    [ "$pyv" = 3.12 ] || echo "(this is Python $pyv: the 3.12 wheels are not put on PYTHONPATH)"
  else
    mapfile -t pending < <("${LISTS[@]}" pending "$SITE" "${folders[@]}")
    if [ "${#pending[@]}" -gt 0 ]; then
      mkdir -p "$SITE/.memenc-installed"
      if "$PY" -m pip --version >/dev/null 2>&1; then
        install=("$PY" -m pip install --disable-pip-version-check -q --no-index --no-deps
                 --upgrade --target "$SITE")
      else # a python without pip: unpack the wheels as pip would
        install=("${LISTS[@]}" unpack "$SITE")
      fi
      if step "install ${#pending[@]} wheels into $SITE" 120 "${install[@]}" "${pending[@]}"; then
        for w in "${pending[@]}"; do touch "$SITE/.memenc-installed/${w##*/}"; done
      fi
    else
      echo "== wheels: all installed in $SITE by an earlier call"
    fi
  fi
elif [ "$DRY" = 1 ]; then
  echo "gpu.sh: no $WHEELS/gpu-a or gpu-b to check; run benchmarks/gpu_wheels.sh first"
  record "check wheels" 1 0
else
  echo "== no $WHEELS/gpu-a or gpu-b here: using what $PY imports already"
fi

# 2. environment and facts
if [ "$DRY" = 1 ] && [ "${pyv:-}" != 3.12 ]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "PYTHONPATH=$PYTHONPATH"
if [ "$DRY" = 1 ]; then
  echo "== nvidia-smi: skipped (dry run)"
else
  timeout 30 nvidia-smi || echo "nvidia-smi: not available"
fi
# shellcheck disable=SC2046
step "versions and imports" 60 "$PY" - $("${LISTS[@]}" modules) <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
missing = []
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except Exception as e:  # noqa: BLE001 - report every missing one
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
        missing.append(name)
import memenc
print(f"memenc {memenc.__version__} from {memenc.__file__}")
oracle = {"sam2", "hydra", "omegaconf", "antlr4", "iopath", "tqdm", "portalocker"}
needed = [m for m in missing if m not in oracle]
if missing and not needed:
    print("the reference oracle is missing: the oracle comparisons will be skipped")
sys.exit(1 if needed else 0)
EOF
if [ "$INSTALL_ONLY" = 1 ]; then
  echo "gpu.sh: --install-only: installed into $SITE; run again with the other folder and OUTDIR"
  exit 0 # missing modules are expected until the other folder has travelled
fi

# 3. the CUDA tests (skipped, with the reason, where there is no CUDA)
export MEMENC_PARITY_OUT="$OUTDIR/parity.jsonl" # each CUDA comparison's measured errors
step "pytest tests/test_cuda.py" "$TESTS_S" "$PY" -m pytest tests/test_cuda.py -p no:cacheprovider \
  -q -rs --junitxml="$OUTDIR/tests.xml"

# 4. the benchmark (benchmarks/run.py)
if [ -f benchmarks/run.py ]; then
  # the benchmark's own budget ends 20 s before this step's timeout, so it skips what would
  # not fit (and says so) and writes its last table instead of being killed mid-table
  bench=("$PY" -m benchmarks.run --device cuda --suite gpu --out "$OUTDIR"
         --budget-s $((BUDGET - SECONDS - 30)))
  # shellcheck disable=SC2206 # words on purpose: extra options, e.g. "--suite gpu512 --only whole"
  bench+=(${GPU_SH_BENCH_ARGS:-})
  [ "$DRY" = 1 ] && bench+=(--dry-run)
  step "benchmark (benchmarks.run --suite gpu)" "$BUDGET" "${bench[@]}"
else # the benchmark lands separately; a live run without it has failed its purpose
  echo "| benchmark | benchmarks/run.py is not in this tree: no benchmark ran | 0 |" \
    >>"$OUTDIR/summary.md"
  echo "gpu.sh: benchmarks/run.py is not in this tree; no benchmark ran"
  [ "$DRY" = 1 ] || FAILED=1
fi
echo "== summary ($SECONDS s)"
cat "$OUTDIR/summary.md"
exit "$FAILED"
