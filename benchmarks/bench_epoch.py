"""One training epoch of each method, timed three ways side by side in one run.

    python benchmarks/bench_epoch.py                       # Fashion-MNIST, every method, full epochs
    python benchmarks/bench_epoch.py --fraction 0.1        # the first 10% of each epoch's batches

For each method of experiments.py (same network, same batch shapes, same number of batches):

- library: the loaders, wrappers, selectors and loss as ``experiments.build_training`` ships them
  (in-memory tensors, vectorised mining), one ``trainer.run_epoch`` training pass;
- plain: the same method through a plain pipeline - torchvision-style PIL-per-item loading
  (``IDXImageDataset`` with ``ToTensor`` + ``Normalize``) and, for the online methods, the
  brute-force loop selectors of ``tests/reference.py`` (given the distance matrix);
- floor: forward + backward + optimizer step of the same model on ready-made tensors of the same
  shapes, with a trivial loss: no loading, no mining. No pipeline can beat it.

It prints seconds per epoch and the two ratios: plain / library (what the library saves) and
library / floor (what is left to save); then the library and the floor again with the model and
inputs in channels-last memory format (``fit(..., channels_last=True)``), which lowers the floor
itself on CPUs.

A second table (``--table precision``; both by default) times the library's epoch of each method four
ways: float32, bfloat16 autocast and float16 autocast with loss scaling (``fit(..., amp=...)``) and
compiled (``fit(..., compile=True)``; the first call's compilation is done in a warm-up and not timed).

    python benchmarks/bench_epoch.py --table precision --fraction 0.1 --methods softmax,online-triplet
"""

import argparse
import itertools
import os
import random
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import experiments  # noqa: E402
import reference  # noqa: E402
from datasets import BalancedBatchSampler, SiameseMNIST, TripletMNIST  # noqa: E402
from known_datasets import load_dataset  # noqa: E402
from losses import OnlineContrastiveLoss, OnlineTripletLoss  # noqa: E402
from trainer import MixedPrecision, run_epoch  # noqa: E402
from utils import PairSelector, TripletSelector, pdist  # noqa: E402

METHODS = ("softmax", "siamese", "triplet", "online-contrastive", "online-triplet")


class LoopRandomHardSelector(TripletSelector):
    """The brute-force loop of tests/reference.py as a selector (random-hard negatives)."""

    def __init__(self, margin, seed=0):
        self.margin, self.rng = margin, random.Random(seed)

    def get_triplets(self, embeddings, labels):
        triplets = reference.ref_random_hard_triplets(pdist(embeddings.detach()), labels.tolist(),
                                                      self.margin, self.rng)
        return torch.tensor(triplets, dtype=torch.long).reshape(-1, 3)


class LoopHardNegativePairSelector(PairSelector):
    """The brute-force loops of tests/reference.py as a pair selector (hard negative pairs)."""

    def get_pairs(self, embeddings, labels):
        labels = labels.tolist()
        positives = reference.ref_all_positive_pairs(labels)
        negatives = reference.ref_hard_negative_pairs(pdist(embeddings.detach()), labels)
        return (torch.tensor(positives, dtype=torch.long).reshape(-1, 2),
                torch.tensor(negatives, dtype=torch.long).reshape(-1, 2))


def plain_training(method, pil_train, memory_train):
    """``(train_loader, loss_fn)`` of the plain pipeline: PIL-per-item data, loop selectors."""
    model, loss_fn, library_loader, _, _, _, _ = experiments.build_training(method, memory_train, memory_train)
    generator = torch.Generator().manual_seed(0)
    if method == "softmax":
        loader = DataLoader(pil_train, batch_size=library_loader.batch_size, shuffle=True, generator=generator)
    elif method in ("siamese", "triplet"):
        wrapper = SiameseMNIST if method == "siamese" else TripletMNIST
        loader = DataLoader(wrapper(pil_train), batch_size=library_loader.batch_size, shuffle=True,
                            generator=generator)
    else:
        sampler = library_loader.batch_sampler
        loader = DataLoader(pil_train, batch_sampler=BalancedBatchSampler(
            pil_train.targets, sampler.n_classes, sampler.n_samples, seed=0))
        if method == "online-contrastive":
            loss_fn = OnlineContrastiveLoss(loss_fn.margin, LoopHardNegativePairSelector())
        else:
            loss_fn = OnlineTripletLoss(loss_fn.margin, LoopRandomHardSelector(loss_fn.margin))
    return model, loss_fn, loader


class Limited:
    """The first ``n_batches`` batches of ``loader`` (keeps its sampler for set_epoch)."""

    def __init__(self, loader, n_batches):
        self.loader, self.n_batches = loader, n_batches
        self.batch_sampler = getattr(loader, "batch_sampler", None)

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n_batches)

    def __len__(self):
        return self.n_batches


def print_table_head(title, header):
    """Print a table's title (when given), its header line and a rule under it."""
    if title:
        print(title)
    print(header)
    print("-" * len(header))


def synchronize(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock read after it is fair."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_epoch(model, loss_fn, loader, metrics=(), channels_last=False, amp=None, trained=None, device="cpu"):
    """Seconds of one ``run_epoch`` training pass of ``model`` (through ``trained``, e.g. its compiled
    form, when given) with ``amp`` autocast, on ``device``."""
    device = torch.device(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    precision = MixedPrecision(amp, device)
    synchronize(device)
    started = time.perf_counter()
    run_epoch(loader, model if trained is None else trained, loss_fn, device, metrics, optimizer,
              channels_last=channels_last, precision=precision)
    synchronize(device)
    return time.perf_counter() - started


def time_floor(model, batch_shapes, n_inputs, n_batches, channels_last=False, device="cpu", amp=None,
               trained=None):
    """Forward + backward + Adam step on random tensors: ``n_inputs`` inputs per step (2 for
    siamese, 3 for triplet), each of ``batch_shapes``, for ``n_batches`` steps, on ``device``, with
    ``amp`` autocast and through ``trained`` (e.g. the compiled model) when given."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    inputs = [torch.randn(batch_shapes, device=device).contiguous(memory_format=memory_format)
              for _ in range(n_inputs)]
    precision, trained = MixedPrecision(amp, device), model if trained is None else trained
    synchronize(device)
    started = time.perf_counter()
    for _ in range(n_batches):
        with precision.autocast():
            outputs = trained(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            loss = sum(F.mse_loss(output, torch.zeros_like(output)) for output in outputs)
        precision.step(loss, optimizer)
    synchronize(device)
    return time.perf_counter() - started


def warm_up(model, batch_shapes, n_inputs, device="cpu"):
    """A few steps first in both memory formats, so one-off kernel set-up is not charged to
    whichever way runs first."""
    time_floor(model, batch_shapes, n_inputs, 3, channels_last=True, device=device)
    time_floor(model, batch_shapes, n_inputs, 3, channels_last=False, device=device)


def precision_table(methods, memory_train, fraction):
    """The library's epoch of each method in float32, bf16 and fp16 autocast, and compiled."""
    header = (f"{'method':<20}{'batches':>8}{'fp32 s':>9}{'bf16 s':>9}{'fp16 s':>9}{'compiled s':>12}"
              f"{'fp32/bf16':>11}{'fp32/fp16':>11}{'fp32/compiled':>15}")
    print_table_head(None, header)
    for method in methods:
        times = {}
        for way in ("fp32", "bf16", "fp16", "compiled"):
            torch.manual_seed(0)
            model, loss_fn, loader, _, metrics, _, _ = experiments.build_training(method, memory_train, memory_train)
            n_batches = max(1, round(len(loader) * fraction))
            amp = way if way in ("bf16", "fp16") else None
            trained = torch.compile(model) if way == "compiled" else None
            time_epoch(model, loss_fn, Limited(loader, 2), metrics, amp=amp, trained=trained)  # warm-up, compiling
            times[way] = time_epoch(model, loss_fn, Limited(loader, n_batches), metrics, amp=amp, trained=trained)
        print(f"{method:<20}{n_batches:>8}{times['fp32']:>9.1f}{times['bf16']:>9.1f}{times['fp16']:>9.1f}"
              f"{times['compiled']:>12.1f}{times['fp32'] / times['bf16']:>10.2f}x"
              f"{times['fp32'] / times['fp16']:>10.2f}x{times['fp32'] / times['compiled']:>14.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=experiments.DATASETS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="time this fraction of each epoch's batches (default: the whole epoch)")
    parser.add_argument("--root", default="data")
    parser.add_argument("--table", default="both", choices=("main", "precision", "both"),
                        help="main: library / plain / floor; precision: fp32 / bf16 / fp16 / compiled")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        raise SystemExit("--fraction must be in (0, 1]")

    memory_train, _ = experiments.load_splits(args.dataset, args.root)
    pil_train = load_dataset(args.dataset, root=args.root, train=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dataset} train set "
          f"({len(memory_train)} images), fraction of each epoch timed: {args.fraction}; load average "
          f"at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    if args.table in ("precision", "both"):
        precision_table(args.methods.split(","), memory_train, args.fraction)
        print()
    if args.table == "precision":
        return
    header = (f"{'method':<20}{'batches':>8}{'library s':>11}{'plain s':>10}{'floor s':>10}"
              f"{'plain/library':>15}{'library/floor':>15}{'library CL s':>14}{'floor CL s':>12}"
              f"{'plain/lib CL':>14}{'lib CL/floor':>14}")
    print_table_head(None, header)
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model, loss_fn, loader, _, metrics, _, _ = experiments.build_training(method, memory_train, memory_train)
        n_batches = max(1, round(len(loader) * args.fraction))
        first = next(iter(loader))[0]
        n_inputs = len(first) if isinstance(first, (tuple, list)) else 1
        batch_shape = (first[0] if isinstance(first, (tuple, list)) else first).shape
        warm_up(model, batch_shape, n_inputs)

        library_s = time_epoch(model, loss_fn, Limited(loader, n_batches), metrics)
        plain_model, plain_loss, plain_loader = plain_training(method, pil_train, memory_train)
        plain_s = time_epoch(plain_model, plain_loss, Limited(plain_loader, n_batches))
        floor_s = time_floor(plain_model, batch_shape, n_inputs, n_batches)
        # The lowered floor: the same, with weights and inputs in channels-last memory format.
        library_cl_s = time_epoch(model, loss_fn, Limited(loader, n_batches), metrics, channels_last=True)
        floor_cl_s = time_floor(plain_model, batch_shape, n_inputs, n_batches, channels_last=True)
        print(f"{method:<20}{n_batches:>8}{library_s:>11.1f}{plain_s:>10.1f}{floor_s:>10.1f}"
              f"{plain_s / library_s:>14.2f}x{library_s / floor_s:>14.2f}x{library_cl_s:>14.1f}"
              f"{floor_cl_s:>12.1f}{plain_s / library_cl_s:>13.2f}x{library_cl_s / floor_cl_s:>13.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
