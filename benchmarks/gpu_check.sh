#!/usr/bin/env bash
# One-command GPU check of the FusedNorm path (target: well under 8 minutes on an H100/H200).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/bnexport-gpu-check
#
# Steps (each under its own time limit; a failing step does not stop the next ones):
#   1. environment: nvidia-smi, driver, python packages (cuda-bindings, NVRTC, torch);
#   2. GPU tests: the kernels vs the NumPy reference on the device, NVRTC/PTX-ISA checks,
#      cuda_api (pytest, junit XML). A GPU test that skips here is reported as a failure;
#   3. kernel_bench.py --json: effective GB/s of every kernel beside a device copy and torch;
#   4. gpu_check.py --json: our kernels vs torch.nn.functional.batch_norm (cuDNN) on the same
#      tensors, eval and train mode, numerics and interleaved timing.
# Writes OUT_DIR/{env.txt,gpu_tests.xml,gpu_tests.log,kernel_bench.json,gpu_check.json,summary.json}.
# Exit status: 0 when every step passed, 1 otherwise.
#
# Works from a plain checkout: when bnexport is not installed, bnexport_plugins (the plugins/
# folder) is made importable through a symlink in a temporary folder on PYTHONPATH. Needs
# python3 with numpy, ml_dtypes, onnx, pytest, cuda-bindings + NVRTC of one CUDA major, torch.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-${TMPDIR:-/tmp}/bnexport-gpu-check}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 1

export PYTHONUNBUFFERED=1
export BNEXPORT_CACHE_DIR="$WORK/cache"   # a fresh NVRTC compile, as a new machine does
if ! "$PY" -c "import bnexport_plugins, bnexport" 2>/dev/null; then
  mkdir -p "$WORK/site"
  ln -s "$REPO/plugins" "$WORK/site/bnexport_plugins"
  export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

declare -A STATUS
step() {  # step NAME SECONDS COMMAND... : run with a time limit, record the exit status
  local name="$1" limit="$2"
  shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  STATUS[$name]=$rc
  echo "=== $name: exit $rc in $((SECONDS - t0)) s ==="
  return "$rc"
}

step env 60 bash -c '
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$0" -c "import sys, platform; print(\"python\", platform.python_version(), sys.executable)"
  "$0" -m pip list 2>/dev/null | grep -i -E "^(cuda-|nvidia-cuda-nvrtc|nvidia-nvjitlink|torch |numpy |onnx |ml.dtypes|pytest )" || true
  "$0" -c "
from bnexport.runtime.cuda_api import driver_version
from bnexport_plugins.fused_norm.nvrtc_build import nvrtc_version, ptx_isa_for_driver, image_kind_for_driver
d = driver_version(); n = nvrtc_version()
print(\"driver CUDA\", d, \"| NVRTC\", n, \"| image\", image_kind_for_driver(d, n), \"| PTX ISA cap\", ptx_isa_for_driver(d))
"' "$PY" 2>&1 | tee "$OUT_DIR/env.txt"
STATUS[env]=${PIPESTATUS[0]}

# -m "": no marker filter, whatever addopts says (GPU tests must not be deselected)
step gpu_tests 300 "$PY" -m pytest -q -p no:cacheprovider -rs -m "" \
  --junitxml="$OUT_DIR/gpu_tests.xml" \
  tests/plugins/test_fused_norm_gpu_kernel.py \
  tests/plugins/test_fused_norm_nvrtc_build.py \
  tests/plugins/test_fused_norm_launch.py \
  tests/runtime/test_runtime_cuda_api.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
STATUS[gpu_tests]=${PIPESTATUS[0]}
# a GPU test that skipped on a GPU machine verified nothing: count it as a failure
if grep -q "^SKIPPED .*test_fused_norm_gpu_kernel" "$OUT_DIR/gpu_tests.log" ||
   ! grep -q "test_fused_norm_gpu_kernel" "$OUT_DIR/gpu_tests.xml" 2>/dev/null; then
  echo "GPU kernel tests were skipped or did not run on this machine: see gpu_tests.log"
  STATUS[gpu_tests]=1
fi

step kernel_bench 150 "$PY" benchmarks/kernel_bench.py --sizes-mib 4 64 256 --iters 20 \
  --json "$OUT_DIR/kernel_bench.json"

step gpu_check 150 "$PY" benchmarks/gpu_check.py --sizes-mib 4 64 256 --iters 20 \
  --junit "$OUT_DIR/gpu_tests.xml" --json "$OUT_DIR/gpu_check.json"

FAILED=0
SUMMARY="{"
for name in env gpu_tests kernel_bench gpu_check; do
  rc=${STATUS[$name]:-127}
  [ "$rc" -eq 0 ] || FAILED=1
  SUMMARY="$SUMMARY\"$name\": $rc, "
done
SUMMARY="${SUMMARY}\"seconds\": $SECONDS}"
echo "$SUMMARY" > "$OUT_DIR/summary.json"
echo "exit status per step: $SUMMARY"
echo "results in $OUT_DIR"
exit "$FAILED"
