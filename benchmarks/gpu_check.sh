#!/usr/bin/env bash
# One-command GPU check of the FusedNorm path (target: well under 8 minutes on an H100/H200).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [OUT_DIR]
#
#   OUT_DIR   defaults to $OUT, else $TMPDIR/bnexport-gpu-check
#   --wheels  the offline wheel folder made by benchmarks/prepare_gpu_wheels.sh on a machine
#             with network (default: $BNEXPORT_GPU_WHEELS, else benchmarks/gpu_wheels/ when
#             it exists). Nothing is ever downloaded: the GPU machine has no network.
#   --dry-run check the dependencies (read-only) and print every step it would run, in order.
#
# Steps (each under its own time limit; a failing step does not stop the later ones, except
# the dependency check, which stops the run when something needed is missing):
#   1. deps: every import the check needs, NVRTC 13, the driver, torch's CUDA
#      (gpu_check.py --deps, standard library only); names what is missing and which of it
#      the wheel folder carries. NumPy, torch and NVRTC are never carried (torch's NumPy only);
#   2. install: the missing wheels, offline (pip --no-index --no-deps --target), and the
#      bnexport wheel when bnexport is not installed, into a temporary folder on PYTHONPATH;
#   3. deps_after: the same check again (all must import; an installed bnexport must match
#      this checkout file by file, else the wheel is stale);
#   4. env: nvidia-smi, driver, NVRTC and kernel image;
#   5. gpu_tests: the kernels vs the NumPy reference on the device, NVRTC/PTX-ISA checks,
#      cuda_api (pytest, junit XML). A GPU test that skips here is reported as a failure;
#   6. kernel_bench.py --json: effective GB/s of every kernel beside a device copy and torch,
#      timed from CUDA graphs (launch overhead reported apart);
#   7. gpu_check.py --json: our kernels vs torch.nn.functional.batch_norm (cuDNN) on the same
#      tensors, eval and train mode, numerics and CUDA-graph timing.
# Writes OUT_DIR/{deps.txt,env.txt,gpu_tests.xml,gpu_tests.log,kernel_bench.json,
# gpu_check.json,summary.json}. Exit status: 0 when every step passed, 1 otherwise.
#
# Works from a plain checkout: when bnexport is neither installed nor in the wheel folder,
# bnexport_plugins (the plugins/ folder) is made importable through a symlink in a temporary
# folder on PYTHONPATH. Needs python3 (3.12 for the wheel folder) with pip.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
WHEELS="${BNEXPORT_GPU_WHEELS:-}"
OUT_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#--wheels=}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) OUT_ARG="$1" ;;
  esac
  shift
done
if [ -z "$WHEELS" ] && [ -d "$REPO/benchmarks/gpu_wheels" ]; then
  WHEELS="$REPO/benchmarks/gpu_wheels"
fi
OUT_DIR="${OUT_ARG:-${OUT:-${TMPDIR:-/tmp}/bnexport-gpu-check}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 1

export PYTHONUNBUFFERED=1
export BNEXPORT_CACHE_DIR="$WORK/cache"   # a fresh NVRTC compile, as a new machine does
SITE="$WORK/site"
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
PYFLAGS=()   # -P (no current folder on sys.path) once bnexport comes from its wheel

declare -A STATUS
STEPS=(deps install deps_after env gpu_tests kernel_bench gpu_check)
step() {  # step NAME SECONDS COMMAND... : run with a time limit, record the exit status
  local name="$1" limit="$2"
  shift 2
  if [ "$DRY" -eq 1 ]; then
    local cmd
    printf -v cmd '%q ' "$@"
    printf '[dry-run] %-12s (limit %4ss): %s\n' "$name" "$limit" "$cmd"
    STATUS[$name]=0
    return 0
  fi
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  STATUS[$name]=$rc
  echo "=== $name: exit $rc in $((SECONDS - t0)) s ==="
  return "$rc"
}

summary() {
  local failed=0 text="{" name rc
  for name in "${STEPS[@]}"; do
    [ -n "${STATUS[$name]+set}" ] || continue   # a step that was not needed (install)
    rc=${STATUS[$name]}
    [ "$rc" -eq 0 ] || failed=1
    text="$text\"$name\": $rc, "
  done
  text="${text}\"dry_run\": $([ "$DRY" -eq 1 ] && echo true || echo false), \"seconds\": $SECONDS}"
  if [ "$DRY" -eq 0 ]; then
    echo "$text" > "$OUT_DIR/summary.json"
    echo "exit status per step: $text"
    echo "results in $OUT_DIR"
  else
    [ "${STATUS[deps]:-0}" -eq 0 ] || echo "[dry-run] deps: a real run would stop after step 1"
    echo "[dry-run] would write $OUT_DIR/summary.json; nothing was run on a GPU"
    failed=0   # a dry run checks the script and the dependencies, it fails no step
  fi
  exit "$failed"
}

# 1. dependencies, up front (standard library only: runs before NumPy is known to be there)
echo "=== deps: what the check needs, and the wheel folder ${WHEELS:-(none)} ==="
"$PY" benchmarks/gpu_check.py --deps ${WHEELS:+--wheels "$WHEELS"} \
  --install-list "$WORK/install.txt" 2>&1 | tee "$OUT_DIR/deps.txt"
STATUS[deps]=${PIPESTATUS[0]}
if [ "${STATUS[deps]}" -ne 0 ] && [ "$DRY" -eq 0 ]; then
  echo "missing dependencies (see above): nothing else was run"
  summary
fi
mapfile -t MISSING < <(grep -v '^bnexport$' "$WORK/install.txt" 2>/dev/null)
BNEXPORT_WHEEL=0
grep -qx 'bnexport' "$WORK/install.txt" 2>/dev/null && BNEXPORT_WHEEL=1

# 2. offline install of what is missing (never numpy, torch or NVRTC: not in the folder)
if [ "${#MISSING[@]}" -gt 0 ] || [ "$BNEXPORT_WHEEL" -eq 1 ]; then
  DISTS=("${MISSING[@]}")
  [ "$BNEXPORT_WHEEL" -eq 1 ] && DISTS+=(bnexport)
  step install 120 "$PY" -m pip install --no-index --no-deps --disable-pip-version-check \
    --quiet --find-links "$WHEELS" --target "$SITE" "${DISTS[@]}"
fi
AGAINST=()
if [ "$BNEXPORT_WHEEL" -eq 1 ]; then
  PYFLAGS=(-P)   # the installed wheel, not ./bnexport, is what is checked
  AGAINST=(--against-tree "$REPO")
elif ! "$PY" -c "import bnexport_plugins, bnexport" 2>/dev/null; then
  mkdir -p "$WORK/link"
  ln -s "$REPO/plugins" "$WORK/link/bnexport_plugins"
  export PYTHONPATH="$WORK/link:$REPO:$PYTHONPATH"
fi

# 3. everything imports now (and an installed bnexport is this checkout's)
step deps_after 120 "$PY" "${PYFLAGS[@]}" benchmarks/gpu_check.py --deps --no-probe "${AGAINST[@]}"
if [ "${STATUS[deps_after]}" -ne 0 ]; then
  echo "dependencies still missing after the install: nothing else was run"
  summary
fi

# 4. environment
if [ "$DRY" -eq 1 ]; then
  step env 60 nvidia-smi ";" "$PY" "${PYFLAGS[@]}" -c "driver_version(), nvrtc_version(), image"
else
  step env 60 bash -c '
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$0" -c "import sys, platform; print(\"python\", platform.python_version(), sys.executable)"
    "$0" -m pip list 2>/dev/null | grep -i -E "^(cuda-|nvidia-cuda-nvrtc|nvidia-nvjitlink|torch |numpy |ml.dtypes|pytest )" || true
    "$0" $1 -c "
from bnexport.cuda_api import driver_version
from bnexport_plugins.fused_norm.nvrtc_build import nvrtc_version, ptx_isa_for_driver, image_kind_for_driver
d = driver_version(); n = nvrtc_version()
print(\"driver CUDA\", d, \"| NVRTC\", n, \"| image\", image_kind_for_driver(d, n), \"| PTX ISA cap\", ptx_isa_for_driver(d))
"' "$PY" "${PYFLAGS[*]}" 2>&1 | tee "$OUT_DIR/env.txt"
  STATUS[env]=${PIPESTATUS[0]}
fi

# 5. GPU tests. -m "": no marker filter, whatever addopts says (GPU tests must not be deselected)
step gpu_tests 300 "$PY" "${PYFLAGS[@]}" -m pytest -q -p no:cacheprovider -rs -m "" \
  --junitxml="$OUT_DIR/gpu_tests.xml" \
  tests/plugins/test_fused_norm_gpu_kernel.py \
  tests/plugins/test_fused_norm_nvrtc_build.py \
  tests/plugins/test_fused_norm_launch.py \
  tests/runtime/test_runtime_cuda_api.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
STATUS[gpu_tests]=${PIPESTATUS[0]}   # step ran in the pipeline's subshell
if [ "$DRY" -eq 0 ]; then
  # a GPU test that skipped on a GPU machine verified nothing: count it as a failure
  if grep -q "^SKIPPED .*test_fused_norm_gpu_kernel" "$OUT_DIR/gpu_tests.log" ||
     ! grep -q "test_fused_norm_gpu_kernel" "$OUT_DIR/gpu_tests.xml" 2>/dev/null; then
    echo "GPU kernel tests were skipped or did not run on this machine: see gpu_tests.log"
    STATUS[gpu_tests]=1
  fi
fi

# 6. kernel timings (CUDA graphs: no Python in the timed region; launch overhead apart)
step kernel_bench 150 "$PY" "${PYFLAGS[@]}" benchmarks/kernel_bench.py --sizes-mib 4 64 256 \
  --iters 20 --reps 20 --json "$OUT_DIR/kernel_bench.json"

# 7. our kernels vs cuDNN
step gpu_check 150 "$PY" "${PYFLAGS[@]}" benchmarks/gpu_check.py --sizes-mib 4 64 256 \
  --iters 20 --reps 20 --junit "$OUT_DIR/gpu_tests.xml" --json "$OUT_DIR/gpu_check.json"

summary
