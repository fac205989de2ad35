#!/usr/bin/env bash
# The prepared GPU check: run it whenever a machine with a CUDA GPU is at hand. No network needed;
# under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # on a CUDA machine
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu    # dry run on a CPU (what CI runs): small sizes, no GPU
#
# 1. The tests marked `cuda` (they skip without a GPU, and `make test` leaves them out), JUnit XML in
#    OUT_DIR/cuda_tests.xml.
# 2. benchmarks/gpu_check.py: every selector at global batch 256 to 8192 on the GPU next to the CPU, and
#    one epoch of online-triplet Fashion-MNIST training (library vs compute floor; fp32, amp, compile).
# It prints the tables and writes OUT_DIR/gpu_check.json. Python: $PYTHON, else .venv/bin/python, else
# python3. Fashion-MNIST is read from data/ or the system's dataset folders (random images of its
# shape where it is absent).
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#--}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--cpu]" >&2
    exit 2
fi
out=$1
mode=${2:-}
if [ -n "$mode" ] && [ "$mode" != "--cpu" ]; then
    echo "unknown option $mode; the only option is --cpu (a dry run on the CPU)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Every test marked cuda lives in tests/test_cuda.py (tests/test_gpu_check.py checks it), so only that file is
# collected: the others import the notebook packages, which a bare GPU image may lack.
echo "== tests marked cuda"
set +e
timeout 240 "$python" -m pytest -q -m cuda tests/test_cuda.py --junitxml="$out/cuda_tests.xml" -p no:cacheprovider
tests_status=$?
set -e
# 5: nothing collected would mean the marker went missing; skips are expected without a GPU
if [ "$tests_status" -ne 0 ]; then
    echo "the cuda tests failed (pytest exit $tests_status)" >&2
fi

echo "== selectors and one training epoch"
timeout 420 "$python" benchmarks/gpu_check.py --out "$out" --tests-xml "$out/cuda_tests.xml" $mode
exit "$tests_status"
