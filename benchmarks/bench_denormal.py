"""Benchmark: does it matter *when* CPU flush-to-zero is turned on?

Flush-to-zero (torch.set_flush_denormal(True)) is a per-thread CPU mode. trainer.fit sets it on
the thread that calls it, which may be after torch's intra-op thread pool has started; the command
lines call trainer.flush_denormal_everywhere() first, before the pool starts. This script times the same
work on denormal float32 tensors under three modes, each in a fresh Python process so that no
mode or thread pool leaks from one to the next:

  none    flush-to-zero never turned on;
  before  turned on before torch's first parallel operation (flush_denormal_everywhere, the command lines);
  after   turned on after a parallel operation has started the thread pool (fit alone, in a notebook).

Every mode runs with torch.set_num_threads(2). It prints seconds per mode, their ratio to
'before', and the share of denormal inputs an elementwise op read as zero: 0.5 for 'after' means
the pool's worker thread, started before the mode was set, kept denormals for its half of the work.
Standard library and torch only; takes about 20 s on a 2-core machine.

Usage: python benchmarks/bench_denormal.py
"""

import json
import subprocess
import sys
import time

MODES = ("none", "before", "after")
THREADS = 2
MATRIX_SIZE = 1024
MATMULS = 3
ELEMENTWISE_SIZE = 1 << 22
ELEMENTWISE_REPEATS = 6


def _denormal_tensor(torch, shape):
    """Positive denormal float32 values (below float32's smallest normal, 1.18e-38).

    Built from raw bits, not by arithmetic: with flush-to-zero on, `torch.rand(...) * 1e-38`
    would give zeros, and the modes would not time the same inputs.
    """
    generator = torch.Generator().manual_seed(0)
    mantissas = torch.randint(1, 2 ** 23, shape, generator=generator, dtype=torch.int32)
    return mantissas.view(torch.float32)  # exponent bits 0: a denormal


def _measure(mode):
    """Run in a child process: set up `mode`, time the work, return {name: seconds}."""
    import torch

    if mode == "before":
        torch.set_flush_denormal(True)
    torch.set_num_threads(THREADS)
    # Parallel operations on normal floats start the thread pools (in every mode, so each one
    # times warm pools): a matmul starts the BLAS library's, an elementwise op on a large tensor
    # torch's own, whose worker threads run part of every later elementwise op.
    warm = torch.rand(MATRIX_SIZE, MATRIX_SIZE)
    warm @ warm
    torch.rand(ELEMENTWISE_SIZE) * 2.0
    if mode == "after":
        torch.set_flush_denormal(True)

    tiny = _denormal_tensor(torch, (MATRIX_SIZE, MATRIX_SIZE))
    ones = torch.ones(MATRIX_SIZE, MATRIX_SIZE)
    started = time.perf_counter()
    for _ in range(MATMULS):
        tiny @ ones
    matmul_seconds = time.perf_counter() - started

    values = _denormal_tensor(torch, (ELEMENTWISE_SIZE,))
    started = time.perf_counter()
    for _ in range(ELEMENTWISE_REPEATS):
        (values * 0.5 + values).sqrt()
    elementwise_seconds = time.perf_counter() - started
    # Share of denormal inputs read as zero: 1.0 when every thread that ran a chunk of the op
    # flushes; less when some worker threads keep denormals.
    flushed = float((values * 1.0 == 0).float().mean())
    return {"matmul": matmul_seconds, "elementwise": elementwise_seconds, "flushed": flushed}


def _run_mode(mode):
    completed = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"mode {mode!r} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.splitlines()[-1])


def main():
    results = {mode: _run_mode(mode) for mode in MODES}
    print(f"{MATMULS} matmuls {MATRIX_SIZE}x{MATRIX_SIZE} and {ELEMENTWISE_REPEATS} x "
          f"sqrt(x * 0.5 + x) over {ELEMENTWISE_SIZE} floats, denormal float32, "
          f"{THREADS} threads, each mode in a fresh process")
    print(f"{'mode':<8} {'matmul s':>9} {'x before':>9} {'elementwise s':>14} {'x before':>9}"
          f"  share of denormals flushed")
    base = results["before"]
    for mode, result in results.items():
        print(f"{mode:<8} {result['matmul']:9.3f} {result['matmul'] / base['matmul']:9.1f} "
              f"{result['elementwise']:14.3f} {result['elementwise'] / base['elementwise']:9.1f}"
              f"  {result['flushed']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in MODES:
        print(json.dumps(_measure(sys.argv[1])))
    elif len(sys.argv) == 1:
        main()
    else:
        sys.exit(f"usage: {sys.argv[0]} [{'|'.join(MODES)}] (no argument runs all modes)")
