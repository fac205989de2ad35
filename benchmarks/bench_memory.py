"""Benchmark of the cross-batch memory (cross_batch_memory.CrossBatchMemory): the cost of one training step
of the study's network when its online loss mines a memory of M embeddings, side by side with M = 0.

Run from the repository root:

    python benchmarks/bench_memory.py                 # M = 0, 4096, 65536; about 2 minutes on 2 CPU cores
    python benchmarks/bench_memory.py --threads 1 --sizes 0,4096

One step: the classic EmbeddingNet at 64-D (28 px grey images) embeds a balanced batch of 10 classes x 25
images, the loss mines it against the memory (filled beforehand with the network's embeddings of M other
random images, labelled at random among the 10 classes, so every step mines a full queue), backward, SGD step; the batch is then pushed, as in training. Losses:
OnlineTripletLoss with the random-hard selector, OnlineContrastiveLoss with the hard-negative pair selector
and MultiSimilarityLoss. Printed per loss and M: the median time of a step (ms, after warm-up steps), its
ratio to M = 0 measured in the same run, the queue's bytes and the largest block the step builds, the
anchors' distances to batch and memory, ``(B, B + M)`` float32. A second table gives the peak memory of one
step (increase of the peak RSS in a fresh subprocess per loss and M).
"""

import argparse
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import losses  # noqa: E402
import utils  # noqa: E402
from bench_selectors import median_ms, peak_rss_kb, reset_peak_rss  # noqa: E402
from cross_batch_memory import CrossBatchMemory  # noqa: E402
from networks import EmbeddingNet  # noqa: E402

DIM = 64
BATCH = (10, 25)
SIZES = (0, 4096, 65536)
FILL_BATCH = 1024
LOSSES = {
    "triplet, random-hard": lambda memory: losses.OnlineTripletLoss(
        1.0, utils.RandomNegativeTripletSelector(1.0, generator=torch.Generator().manual_seed(0)), memory=memory),
    "contrastive, hard-negative pairs": lambda memory: losses.OnlineContrastiveLoss(
        1.0, utils.HardNegativePairSelector(), memory=memory),
    "multi-similarity": lambda memory: losses.MultiSimilarityLoss(memory=memory),
}


def training_step(loss_name, size, seed=0):
    """A function running one training step with a memory of ``size`` (filled), and the memory."""
    torch.manual_seed(seed)
    model = EmbeddingNet(DIM)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    memory = None
    if size:  # filled with the model's own embeddings of other images, as training would fill it
        memory = CrossBatchMemory(size, DIM)
        with torch.no_grad():
            for start in range(0, size, FILL_BATCH):
                count = min(FILL_BATCH, size - start)
                memory.push(model(torch.rand(count, 1, 28, 28)), torch.randint(BATCH[0], (count,)))
    loss_fn = LOSSES[loss_name](memory)
    images = torch.rand(BATCH[0] * BATCH[1], 1, 28, 28)
    labels = torch.arange(BATCH[0]).repeat_interleave(BATCH[1])

    def step():
        optimizer.zero_grad()
        output = loss_fn(model(images), labels)
        (output[0] if isinstance(output, tuple) else output).backward()
        optimizer.step()

    return step


def memory_child(loss_name, size):
    """Run in a fresh process: print the increase of the peak RSS (kB) across one step, after one warm-up."""
    step = training_step(loss_name, size)
    step()
    reset_peak_rss()
    before = peak_rss_kb()
    step()
    print(peak_rss_kb() - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="memory sizes M, comma-separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per case (median)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS, metavar=("LOSS", "SIZE"))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    if arguments.memory_child:
        memory_child(arguments.memory_child[0], int(arguments.memory_child[1]))
        return
    sizes = [int(size) for size in arguments.sizes.split(",")]
    n_batch = BATCH[0] * BATCH[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; EmbeddingNet {DIM}-D, batch "
          f"{BATCH[0]}x{BATCH[1]}; ms per training step, median of {arguments.repeats} after 2 warm-up steps\n")
    print("| loss | M | ms per step | vs M = 0 | queue MB | (B, B + M) block MB | peak RSS increase MB |")
    print("|---|---|---|---|---|---|---|")
    for loss_name in LOSSES:
        base = None
        for size in sizes:
            time_ms = median_ms(training_step(loss_name, size), arguments.repeats, warmup=2)
            base = time_ms if size == 0 else base
            peak = subprocess.run([sys.executable, __file__, "--threads", str(arguments.threads), "--memory-child",
                                   loss_name, str(size)], capture_output=True, text=True, check=True).stdout
            queue_mb = size * (DIM * 4 + 8) / 2 ** 20
            block_mb = n_batch * (n_batch + size) * 4 / 2 ** 20
            ratio = f"{time_ms / base:.2f}x" if base else "-"
            print(f"| {loss_name} | {size} | {time_ms:.1f} | {ratio} | {queue_mb:.1f} | {block_mb:.1f} | "
                  f"{int(peak) / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
