"""The measuring part of benchmarks/gpu_check.sh: selectors and one training epoch on the GPU.

    python benchmarks/gpu_check.py --out OUT_DIR [--tests-xml cuda_tests.xml]   # on a CUDA machine
    python benchmarks/gpu_check.py --out OUT_DIR --cpu                          # dry run on a CPU (CI)

1. Every selector (the study's five triplet miners and the hard-negative pair selector) at global
   batches 256 to 8192 (8 items per class, 64-D embeddings; the all-triplets selector up to 1024, its
   output grows as B^2) on the GPU, next to the same call on the CPU, with the ratio.
2. One epoch of the study's online-triplet training (EmbeddingNet 2-D, random-hard, balanced batches of
   10 x 25) on the GPU: the library (``experiments.build_training`` + ``trainer.run_epoch``) against the
   compute floor (forward, backward and Adam step on ready tensors of the same shapes, no mining), each
   in float32, bf16 autocast, fp16 autocast with loss scaling, and compiled. Fashion-MNIST from the usual
   places (``--root``, the system's dataset folders); random images of its shape where it is absent,
   said so in the output.

Prints the tables and writes ``OUT_DIR/gpu_check.json`` (with the CUDA tests' counts read from the
JUnit XML that the shell script's pytest run wrote). ``--cpu``: everything on the CPU, at small sizes
(batches 256 and 512, a few batches of the epoch), to check that this script runs.
"""

import argparse
import json
import os
import platform
import sys
import xml.etree.ElementTree as ElementTree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import experiments  # noqa: E402
from bench_distributed import ALL_TRIPLETS_MAX_BATCH, MARGIN, balanced_batch  # noqa: E402
from bench_epoch import Limited, print_table_head, time_epoch, time_floor, warm_up  # noqa: E402
from datasets import InMemoryDataset  # noqa: E402
from utils import HardNegativePairSelector  # noqa: E402

BATCHES = (256, 512, 1024, 2048, 4096, 8192)
DRY_BATCHES = (256, 512)
# batch-hard-soft is the batch-hard miner under another name (its loss differs, not its mining): timed once
SELECTOR_NAMES = ("hard-negative pairs",) + tuple(name for name in experiments.SELECTORS if name != "batch-hard-soft")
EPOCH_WAYS = ("fp32", "bf16", "fp16", "compiled")
DRY_EPOCH_BATCHES = 4


def selector_call(name, embeddings, labels):
    """A function running selector ``name`` once on the batch (a fresh generator on the batch's device)."""
    if name == "hard-negative pairs":
        selector = HardNegativePairSelector()
        return lambda: selector.get_pairs(embeddings, labels)
    generator = torch.Generator(device=embeddings.device).manual_seed(0)
    selector = experiments.SELECTORS[name](MARGIN, generator)
    return lambda: selector.get_triplets(embeddings, labels)


def milliseconds(function, repeats):
    """Median milliseconds of ``function()`` over ``repeats`` calls after one warm-up call; CUDA work is
    waited for (torch.utils.benchmark synchronises)."""
    function()
    timer = benchmark.Timer(stmt="function()", globals={"function": function})
    return 1000 * timer.timeit(repeats).median


def selector_table(device, batches, repeats):
    print_table_head(f"1. Selectors, ms per call: {device} next to cpu",
                     f"{'batch':>6}  {'selector':<20}{device + ' ms':>12}{'cpu ms':>12}{'cpu/' + device:>12}")
    rows = []
    for batch in batches:
        on_device, on_cpu = balanced_batch(batch, device), balanced_batch(batch, "cpu")
        for name in SELECTOR_NAMES:
            if name == "all" and batch > ALL_TRIPLETS_MAX_BATCH:
                continue
            device_ms = milliseconds(selector_call(name, *on_device), repeats)
            cpu_ms = milliseconds(selector_call(name, *on_cpu), repeats)
            print(f"{batch:>6}  {name:<20}{device_ms:>12.2f}{cpu_ms:>12.2f}{cpu_ms / device_ms:>11.1f}x", flush=True)
            rows.append({"batch": batch, "selector": name, "device_ms": device_ms, "cpu_ms": cpu_ms})
    return rows


def training_set(root):
    """``(Fashion-MNIST train set, "fashion-mnist")``, or random images of its shape and ``"synthetic"``."""
    try:
        return experiments.load_splits("fashion-mnist", root)[0], "fashion-mnist"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        data = torch.randn(60000, 1, 28, 28, generator=generator)
        targets = torch.arange(10).repeat(6000)
        return InMemoryDataset(data, targets, classes=[str(k) for k in range(10)]), "synthetic"


def epoch_table(device, train_set, n_batches):
    print_table_head(f"\n2. One online-triplet epoch on {device} ({n_batches} batches of 10 x 25), seconds",
                     f"{'way':<10}{'library s':>11}{'floor s':>10}{'library/floor':>15}{'fp32/this':>11}")
    rows = []
    for way in EPOCH_WAYS:
        torch.manual_seed(0)
        model, loss_fn, loader, _, metrics, _, _ = experiments.build_training("online-triplet", train_set, None)
        amp = way if way in ("bf16", "fp16") else None
        trained = torch.compile(model) if way == "compiled" else None
        shape = next(iter(loader))[0].shape
        warm_up(model, shape, 1, device)
        time_epoch(model, loss_fn, Limited(loader, 2), metrics, amp=amp, trained=trained, device=device)
        time_floor(model, shape, 1, 2, device=device, amp=amp, trained=trained)  # compiles for the floor's loss
        library = time_epoch(model, loss_fn, Limited(loader, n_batches), metrics, amp=amp, trained=trained,
                             device=device)
        floor = time_floor(model, shape, 1, n_batches, device=device, amp=amp, trained=trained)
        rows.append({"way": way, "library_s": library, "floor_s": floor})
        print(f"{way:<10}{library:>11.2f}{floor:>10.2f}{library / floor:>14.2f}x"
              f"{rows[0]['library_s'] / library:>10.2f}x", flush=True)
    return rows


def test_counts(path):
    """{tests, failures, errors, skipped} of a JUnit XML file, or None when there is none."""
    if path is None or not os.path.exists(path):
        return None
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes")
    parser.add_argument("--root", default="data", help="where to look for Fashion-MNIST")
    parser.add_argument("--tests-xml", default=None, help="JUnit XML of the CUDA tests' pytest run")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu for the dry run")
    device = "cpu" if args.cpu else "cuda"
    torch.manual_seed(0)
    train_set, data = training_set(args.root)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"torch {torch.__version__}, {device} ({gpu or platform.processor() or 'CPU'}), "
          f"{torch.get_num_threads()} CPU threads, data: {data}\n")
    n_batches = DRY_EPOCH_BATCHES if args.cpu else len(train_set) // 250
    report = {"device": device, "gpu": gpu, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
              "data": data, "cuda_tests": test_counts(args.tests_xml),
              "selectors": selector_table(device, DRY_BATCHES if args.cpu else BATCHES, 2 if args.cpu else 5),
              "epoch": epoch_table(device, train_set, n_batches)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as file:
        json.dump(report, file, indent=1)
    print(f"\nWritten {path}")
    return report


if __name__ == "__main__":
    main()
