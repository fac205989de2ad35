#!/usr/bin/env bash
# The prepared GPU check: run it whenever a machine with a CUDA GPU is at hand. No network needed. Its
# hard limits add up to 5 minutes on one GPU (75 s of tests, 210 s of measuring, each with a few seconds
# to stop), so a short GPU session always brings back the epoch table.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # on a CUDA machine
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu    # dry run on a CPU (what CI runs): small sizes, no GPU
#
# 1. The tests marked `cuda` (they skip without a GPU, and `make test` leaves them out), JUnit XML in
#    OUT_DIR/cuda_tests.xml, stopped at TESTS_LIMIT_S by SIGINT: pytest then still writes the XML of the
#    tests that ran, and the JSON says the run was cut (exit status 124).
# 2. benchmarks/gpu_check.py, stopped at MEASURE_LIMIT_S (its own budgets, 70 s of selectors and 100 s for
#    the epoch table, leave room for start-up): every selector at global batches 256 to 1024 on the GPU
#    next to the CPU, then one epoch of online-triplet Fashion-MNIST training (library vs compute floor;
#    fp32, bf16, compiled, fp16; the warm-up and compilation timed apart), then the selectors at 2048 to
#    8192 with what is left of their budget. A stage out of time skips its remaining rows and names them.
# It prints the tables in Markdown and writes OUT_DIR/gpu_check.json after every row (status "complete"
# at the end). Python: $PYTHON, else .venv/bin/python, else python3. Fashion-MNIST is read from data/ or
# the system's dataset folders (random images of its shape where it is absent).
set -euo pipefail

TESTS_LIMIT_S=75
MEASURE_LIMIT_S=210

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
rm -f "$out/cuda_tests.xml"

# Every test marked cuda lives in tests/test_cuda.py (tests/test_gpu_check.py checks it), so only that file is
# collected: the others import the notebook packages, which a bare GPU image may lack.
echo "== tests marked cuda (limit ${TESTS_LIMIT_S} s)"
set +e
timeout -s INT -k 5 "$TESTS_LIMIT_S" "$python" -m pytest -q -m cuda tests/test_cuda.py \
    --junitxml="$out/cuda_tests.xml" -p no:cacheprovider
tests_status=$?
set -e
# 5: nothing collected would mean the marker went missing; skips are expected without a GPU
if [ "$tests_status" -eq 124 ]; then
    echo "the cuda tests reached their limit of ${TESTS_LIMIT_S} s; the XML holds those that ran" >&2
elif [ "$tests_status" -ne 0 ]; then
    echo "the cuda tests failed (pytest exit $tests_status)" >&2
fi

echo "== selectors and one training epoch (limit ${MEASURE_LIMIT_S} s)"
set +e
timeout -s INT -k 10 "$MEASURE_LIMIT_S" "$python" benchmarks/gpu_check.py --out "$out" \
    --tests-xml "$out/cuda_tests.xml" --tests-status "$tests_status" --tests-budget-s "$TESTS_LIMIT_S" $mode
measure_status=$?
set -e
echo "== done in ${SECONDS} s"
if [ "$measure_status" -ne 0 ]; then
    echo "benchmarks/gpu_check.py stopped with exit status $measure_status" >&2
    exit "$measure_status"
fi
exit "$tests_status"
