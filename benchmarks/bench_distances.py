"""Benchmark of ``distances.indexed_squared_distances`` beside the indexing it replaced in the online losses.

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
"""

import argparse
import os
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distances import indexed_squared_distances, paired_squared_distances  # noqa: E402

CASES = ((1024, 64, 7168), (4096, 64, 28672), (4096, 64, 57344), (4096, 128, 28672), (16384, 64, 114688))


def forward_and_backward(way, embeddings, first, second, weights):
    embeddings = embeddings.detach().requires_grad_()
    if way == "indexing":
        distances = paired_squared_distances(embeddings[first], embeddings[second])
    else:
        distances = indexed_squared_distances(embeddings, first, second)
    (distances * weights).sum().backward()
    return embeddings.grad


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
        times = {}
        for way in ("indexing", "indexed"):
            timer = benchmark.Timer("run(way, embeddings, first, second, weights)", globals={
                "run": forward_and_backward, "way": way, "embeddings": embeddings, "first": first, "second": second,
                "weights": weights}, num_threads=arguments.threads)
            times[way] = timer.blocked_autorange(min_run_time=arguments.min_run_time).median * 1e3
        print(f"{n_rows:>7}{dim:>5}{n_pairs:>8}{times['indexing']:>10.2f}{times['indexed']:>10.2f}"
              f"{times['indexing'] / times['indexed']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
