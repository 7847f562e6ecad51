#!/usr/bin/env bash
# Make the offline wheel folder benchmarks/gpu_check.sh installs from on a GPU machine
# that has no network (run this where pip can reach its index).
#
#   bash benchmarks/prepare_gpu_wheels.sh [DIR] [--with-nvjitlink]
#
#   DIR  default benchmarks/gpu_wheels/ (git-ignored; carry it to the GPU machine)
#
# What goes in: wheels for CPython 3.12 on manylinux x86_64 (the GPU image's Python) of
# every requirement of the check the image may lack (benchmarks/gpu_check.py REQUIREMENTS
# marked carry: ml-dtypes, pytest and its dependencies, cuda-bindings 13, cuda-pathfinder),
# and a wheel of bnexport itself built from this checkout. Never numpy (the check uses
# torch's: a second NumPy beside torch's breaks one of them), torch or nvidia-cuda-nvrtc
# (58 MB; the image ships both). --with-nvjitlink adds nvidia-nvjitlink (46 MB) for the
# PTX-assembly tests, which otherwise skip. The folder must stay under 64 MiB (what a
# device run can carry); the script fails if it does not. gpu_check.sh installs only what
# its dependency check finds missing, with pip --no-index --no-deps.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR=""
NVJITLINK=0
for arg in "$@"; do
  case "$arg" in
    --with-nvjitlink) NVJITLINK=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) DIR="$arg" ;;
  esac
done
DIR="${DIR:-$REPO/benchmarks/gpu_wheels}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LIMIT_MIB=64

rm -rf "$DIR"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

# the carried requirements, read from the one list (gpu_check.py REQUIREMENTS)
mapfile -t DISTS < <("$PY" - "$REPO" <<'PY'
import sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import gpu_check
pins = {"cuda-bindings": "cuda-bindings>=13,<14"}
for req in gpu_check.REQUIREMENTS:
    if req.carry:
        print(pins.get(req.dist, req.dist))
PY
)
[ "$NVJITLINK" -eq 1 ] && DISTS+=("nvidia-nvjitlink>=13,<14")
echo "downloading (CPython 3.12, manylinux x86_64, no dependencies resolved): ${DISTS[*]}"
"$PY" -m pip download --quiet --disable-pip-version-check --dest "$DIR" --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  "${DISTS[@]}"

echo "building the bnexport wheel from $REPO"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$DIR" "$REPO"

if ls "$DIR" | grep -qi '^numpy-'; then
  echo "error: a numpy wheel ended up in $DIR; the check must use torch's NumPy" >&2
  exit 1
fi
BYTES=$(du -sb "$DIR" | cut -f1)
ls -l "$DIR"
printf 'total %.1f MiB (limit %d MiB)\n' "$(echo "$BYTES / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$BYTES" -ge $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "error: $DIR is over $LIMIT_MIB MiB" >&2
  exit 1
fi
echo "carry it with the checkout, then: bash benchmarks/gpu_check.sh --wheels ${DIR#"$REPO"/}"
