"""Benchmark of the online losses' two distance computations beside the code they replaced.

Run from the repository root:

    python benchmarks/bench_distances.py            # one thread, the pair counts of the online losses
    python benchmarks/bench_distances.py --threads 2

For a batch of N embeddings of D dimensions and P pairs of its rows (the online losses' selected pairs: at
a global batch of 4096 with 8 items per class, 28,672 positive pairs and as many hard negatives, or that
many anchor-positive and anchor-negative pairs of the triplet miners), it times forward and backward of
the pairs' squared distances both ways, side by side in one run (torch.utils.benchmark, median):

- "indexing": ``paired_squared_distances(embeddings[first], embeddings[second])``, what the losses did before;
- "indexed": ``indexed_squared_distances(embeddings, first, second)``, what they do now;

and prints the ratio. Both give the same values bitwise (tests/test_distances.py).

Then the rows' block of ``distances.row_distances`` (all N rows against the batch, no autograd, written into
one kept block as the losses do), beside the same tiles computed the way it did before: ``squared_distances``
per tile of ``ROW_TILE`` rows (an addmm onto the gallery's norms, then the rows' norms added and the result
clamped: two more passes over each tile) against one matmul of ``[x, 1, |x|^2]`` and ``[-2 y, |y|^2, 1]``.
"""

import argparse
import os
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distances import (ROW_TILE, indexed_squared_distances, paired_squared_distances, row_distances,  # noqa: E402
                       squared_distances)

CASES = ((1024, 64, 7168), (4096, 64, 28672), (4096, 64, 57344), (4096, 128, 28672), (16384, 64, 114688))
BLOCKS = ((1024, 64), (4096, 64), (4096, 128), (8192, 64))


def forward_and_backward(way, embeddings, first, second, weights):
    embeddings = embeddings.detach().requires_grad_()
    if way == "indexing":
        distances = paired_squared_distances(embeddings[first], embeddings[second])
    else:
        distances = indexed_squared_distances(embeddings, first, second)
    (distances * weights).sum().backward()
    return embeddings.grad


def addmm_tiles(embeddings, out):
    """The rows' block as row_distances computed it before: squared_distances per tile, into ``out``."""
    centred = embeddings - embeddings.mean(dim=0, keepdim=True)
    norms = centred.pow(2).sum(-1)
    for first in range(0, len(centred), ROW_TILE):
        squared_distances(centred[first:first + ROW_TILE], centred, norms, out=out[first:first + ROW_TILE])
    return out


def milliseconds(statement, threads, min_run_time, **names):
    timer = benchmark.Timer(statement, globals=names, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def block_table(threads, min_run_time):
    print(f"\nthe rows' (N, N) block, no autograd, into a kept block, ms (median), {threads} thread(s)")
    print(f"{'N':>7}{'D':>5}{'addmm tiles':>13}{'one matmul':>12}{'speed-up':>10}")
    generator = torch.Generator().manual_seed(0)
    for n_rows, dim in BLOCKS:
        embeddings, out = torch.randn(n_rows, dim, generator=generator), torch.empty(n_rows, n_rows)
        before = milliseconds("run(embeddings, out)", threads, min_run_time, run=addmm_tiles, embeddings=embeddings,
                              out=out)
        after = milliseconds("run(embeddings, out=out)", threads, min_run_time, run=row_distances,
                             embeddings=embeddings, out=out)
        print(f"{n_rows:>7}{dim:>5}{before:>13.2f}{after:>12.2f}{before / after:>9.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    print(f"forward and backward of P pairs' squared distances, ms (median), {arguments.threads} thread(s)")
    print(f"{'N':>7}{'D':>5}{'P':>8}{'indexing':>10}{'indexed':>10}{'speed-up':>10}")
    generator = torch.Generator().manual_seed(0)
    for n_rows, dim, n_pairs in CASES:
        embeddings = torch.randn(n_rows, dim, generator=generator)
        first = torch.randint(0, n_rows, (n_pairs,), generator=generator).sort().values
        second = torch.randint(0, n_rows, (n_pairs,), generator=generator)
        weights = torch.randn(n_pairs, generator=generator)
        times = {way: milliseconds("run(way, embeddings, first, second, weights)", arguments.threads,
                                   arguments.min_run_time, run=forward_and_backward, way=way, embeddings=embeddings,
                                   first=first, second=second, weights=weights)
                 for way in ("indexing", "indexed")}
        print(f"{n_rows:>7}{dim:>5}{n_pairs:>8}{times['indexing']:>10.2f}{times['indexed']:>10.2f}"
              f"{times['indexing'] / times['indexed']:>9.2f}x", flush=True)
    block_table(arguments.threads, arguments.min_run_time)


if __name__ == "__main__":
    main()
