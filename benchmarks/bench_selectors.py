"""Benchmark of the pair and triplet selectors of utils.py against the brute-force references.

Run from the repository root:

    python benchmarks/bench_selectors.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_selectors.py --quick    # B = 250 and 400 only, fewer repeats
    python benchmarks/bench_selectors.py --sharding-tables --threads 1   # before / after and compute floor only

For every selector, batch shape (classes x samples per class: 10x25, 100x4 and 128x8, that is
B = 250, 400 and 1024) and embedding dimension (2 and 128), it prints the library time (median of
several calls after a warm-up), the time of the pure-Python loop reference of tests/reference.py
and their ratio; for the hardest / random-hard / semi-hard selectors also a "classic-style"
implementation (Python loop over (anchor, positive) pairs, numpy over the negatives). Two reference
times are printed: "full ref" is the whole brute-force pipeline from embeddings to selection (the
distance matrix by the loop `ref_pdist`, then the selection loops), which is what the library call
does and what the ratio target is judged on; "select ref" hands the loops `utils.pdist`'s matrix
and times the selection alone. Classic-style times also start from `utils.pdist`. The slow
references run fewer times (once when a call takes over 0.5 s).

Then the selectors of commit ``BEFORE`` (each on the whole ``(B, B)`` matrix) beside today's, on the same
batches of 250 to 1024 at 64-D, and every selector against the compute floor at B = 4096, 64-D (the rows'
distances plus one masked reduction per row), on two kinds of batch (few and many hard negatives).

Then, at B = 1024, it measures the peak memory of each library selector in a fresh subprocess
(increase of the peak RSS across one call) next to the size of the selector's output, plus the
all-triplets selector at 32x32, whose output alone is about 750 MB, to show that building it in
chunks keeps the peak close to the output size.
"""

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import reference  # noqa: E402
import utils  # noqa: E402

MARGIN = 1.0
FULL_SHAPES = [(10, 25), (100, 4), (128, 8)]
QUICK_SHAPES = [(10, 25), (100, 4)]
DIMS = [2, 128]
TARGET_SPEEDUP = 50
TARGET_BATCH = 250
SELECTORS = ["AllPositivePair", "HardNegativePair", "AllTriplet", "Hardest", "RandomNegative",
             "Semihard", "BatchHard"]
WITH_CLASSIC = {"Hardest", "RandomNegative", "Semihard"}


def make_batch(n_classes, per_class, dim, seed=0):
    """Embeddings (B, dim) float32 around one random centre per class, and shuffled labels (B,).

    Centres and spread are of the same order, so with margin 1 a fair share of the triplets is
    hard and the random selectors have work to do.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    centres = torch.randn(n_classes, dim, generator=generator)
    noise = torch.randn(len(labels), dim, generator=generator)
    return (centres[labels] + noise) / math.sqrt(dim), labels


def balanced_batch(batch, device="cpu", per_class=8, dim=64):
    """A global batch of ``batch`` embeddings ``(B, dim)``, one unit-variance cluster of ``per_class`` items
    per class around random centres (a few hard negatives per anchor at margin 1), in shuffled order, and
    their labels ``(B,)``, on ``device`` (seeded): bench_distributed's and gpu_check's batches."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(batch // per_class).repeat_interleave(per_class)
    labels = labels[torch.randperm(batch, generator=generator)]
    centres = torch.randn(batch // per_class, dim, generator=generator)
    embeddings = centres[labels] + torch.randn(batch, dim, generator=generator)
    return embeddings.to(device), labels.to(device)


def library_selector(name, seed=0, module=utils):
    """Selector ``name`` of ``module`` (the library's utils, or another version of it: ``selectors_of``)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "AllPositivePair": lambda: module.AllPositivePairSelector(generator=generator),
        "HardNegativePair": lambda: module.HardNegativePairSelector(),
        "AllTriplet": lambda: module.AllTripletSelector(),
        "Hardest": lambda: module.HardestNegativeTripletSelector(MARGIN),
        "RandomNegative": lambda: module.RandomNegativeTripletSelector(MARGIN, generator=generator),
        "Semihard": lambda: module.SemihardNegativeTripletSelector(MARGIN, generator=generator),
        "BatchHard": lambda: module.BatchHardTripletSelector(),
    }[name]()


def library_call(name, embeddings, labels, module=utils):
    """A zero-argument function running ``module``'s selector once (a fresh generator, seed 0)."""
    selector = library_selector(name, module=module)
    if hasattr(selector, "get_pairs"):
        return lambda: selector.get_pairs(embeddings, labels)
    return lambda: selector.get_triplets(embeddings, labels)


DISTANCE_BASED = {"HardNegativePair", "Hardest", "RandomNegative", "Semihard", "BatchHard"}


def reference_call(name, embeddings, labels, loop_distances):
    """A zero-argument function running the brute-force reference once.

    With `loop_distances` the distance-based references start from embeddings, like the library:
    the distance matrix comes from the loop `ref_pdist` inside the timed call (the full brute-force
    pipeline). Without it they are handed `utils.pdist`'s matrix and only the selection is timed.
    """
    label_list = labels.tolist()
    rng = random.Random(0)

    def distances():
        return reference.ref_pdist(embeddings) if loop_distances else utils.pdist(embeddings)

    return {
        "AllPositivePair": lambda: reference.ref_balanced_pairs(label_list, rng),
        "HardNegativePair": lambda: reference.ref_hard_negative_pairs(distances(), label_list),
        "AllTriplet": lambda: reference.ref_all_triplets(label_list),
        "Hardest": lambda: reference.ref_hardest_negative_triplets(distances(), label_list, MARGIN),
        "RandomNegative": lambda: reference.ref_random_hard_triplets(distances(), label_list,
                                                                     MARGIN, rng),
        "Semihard": lambda: reference.ref_semihard_triplets(distances(), label_list, MARGIN, rng),
        "BatchHard": lambda: reference.ref_batch_hard_triplets(distances(), label_list),
    }[name]


def classic_call(name, embeddings, labels):
    """A zero-argument function running the classic-style numpy loop once."""
    label_array = labels.numpy()
    rng = np.random.default_rng(0)

    def distances():
        return utils.pdist(embeddings).numpy()

    return {
        "Hardest": lambda: reference.classic_style_hardest(distances(), label_array, MARGIN),
        "RandomNegative": lambda: reference.classic_style_random_hard(distances(), label_array,
                                                                      MARGIN, rng),
        "Semihard": lambda: reference.classic_style_semihard(distances(), label_array, MARGIN,
                                                             rng),
    }[name]


def median_ms(function, repeats, warmup=1):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def slow_ms(function, max_repeats):
    """Median of up to `max_repeats` runs, stopping after the first one if it took over 0.5 s."""
    times = []
    for _ in range(max_repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        if times[0] > 0.5:
            break
    return 1000 * statistics.median(times), len(times)


def timing_table(shapes, library_repeats, slow_repeats):
    header = (f"{'selector':<17}{'shape':>7}{'B':>6}{'dim':>5}{'library ms':>12}"
              f"{'full ref ms':>13}{'ratio':>8}{'select ref ms':>15}{'ratio':>8}"
              f"{'classic ms':>12}{'ratio':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for n_classes, per_class in shapes:
        for dim in DIMS:
            embeddings, labels = make_batch(n_classes, per_class, dim)
            for name in SELECTORS:
                torch.manual_seed(0)
                library_ms = median_ms(library_call(name, embeddings, labels), library_repeats)
                select_ms, _ = slow_ms(reference_call(name, embeddings, labels, False), slow_repeats)
                if name in DISTANCE_BASED:
                    full_ms, _ = slow_ms(reference_call(name, embeddings, labels, True), slow_repeats)
                else:
                    full_ms = select_ms  # nothing to compute but the enumeration itself
                line = (f"{name:<17}{f'{n_classes}x{per_class}':>7}{len(labels):>6}{dim:>5}"
                        f"{library_ms:>12.2f}{full_ms:>13.1f}{full_ms / library_ms:>7.0f}x"
                        f"{select_ms:>15.1f}{select_ms / library_ms:>7.0f}x")
                if name in WITH_CLASSIC:
                    classic_ms, _ = slow_ms(classic_call(name, embeddings, labels), slow_repeats)
                    line += f"{classic_ms:>12.1f}{classic_ms / library_ms:>7.0f}x"
                print(line, flush=True)
                results.append((name, len(labels), dim, full_ms / library_ms))
    return results


# ----------------------------------------------------------------------------- memory

def reset_peak_rss():
    """Lower the peak RSS to the current RSS (Linux >= 4.0), so that the next increase of the peak
    is the peak of what follows, not hidden under the transient peak of importing torch."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb():
    """This process's peak resident set size in kB.

    VmHWM from /proc/self/status is the kernel counter behind ru_maxrss, but for this process's
    own address space only: ru_maxrss of a child started with fork/vfork + exec never drops below
    the parent's RSS at the fork, which would hide the child's own peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(name, n_classes, per_class, dim):
    """Runs in a fresh interpreter: one selector call, prints JSON with the peak RSS increase."""
    small_embeddings, small_labels = make_batch(4, 4, dim)
    library_call(name, small_embeddings, small_labels)()  # one-off kernel and allocator set-up
    embeddings, labels = make_batch(n_classes, per_class, dim)
    call = library_call(name, embeddings, labels)
    was_reset = reset_peak_rss()
    before_kb = peak_rss_kb()
    output = call()
    after_kb = peak_rss_kb()
    tensors = output if isinstance(output, tuple) else (output,)
    output_bytes = sum(t.numel() * t.element_size() for t in tensors)
    rows = "+".join(str(len(t)) for t in tensors)
    print(json.dumps({"peak_increase_mb": (after_kb - before_kb) / 1024,
                      "output_mb": output_bytes / 2 ** 20, "rows": rows, "reset": was_reset}))


def memory_table(quick):
    print()
    print("Peak memory of one library call at B = 1024, each in a fresh subprocess: peak RSS"
          " (VmHWM, the process's own ru_maxrss) after the call minus before it, the peak being"
          " reset to the current RSS just before the call via /proc/self/clear_refs, after a"
          " warm-up call on a 4x4 batch:")
    header = (f"{'selector':<17}{'shape':>7}{'B':>6}{'dim':>5}{'output rows':>16}"
              f"{'output MB':>11}{'peak MB':>10}")
    print(header)
    print("-" * len(header))
    cases = [(name, 128, 8, 128) for name in SELECTORS]
    if not quick:
        cases.append(("AllTriplet", 32, 32, 128))
    for name, n_classes, per_class, dim in cases:
        completed = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()),
             "--memory-child", name, str(n_classes), str(per_class), str(dim)],
            capture_output=True, text=True, check=True)
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        note = "" if result["reset"] else "  (peak reset unavailable: lower bound)"
        print(f"{name:<17}{f'{n_classes}x{per_class}':>7}{n_classes * per_class:>6}{dim:>5}"
              f"{result['rows']:>16}{result['output_mb']:>11.1f}{result['peak_increase_mb']:>10.1f}"
              f"{note}", flush=True)


# ----------------------------------------------------------------------------- before / after, floor

BEFORE = "86ceab2"  # the last commit whose selectors mined the whole (B, B) matrix on every process
FLOOR_BATCH = 4096  # 512 classes x 8, 64-D: the batch of the compute-floor table
FLOOR_DIM = 64


def selectors_of(revision):
    """utils.py as it was at git ``revision``, imported as a module of its own (its selectors need nothing
    else of the repository), or None when git or the revision is not at hand."""
    import importlib.util
    import tempfile
    try:
        source = subprocess.run(["git", "show", f"{revision}:utils.py"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = tempfile.mkdtemp(prefix="selectors-before-")
    path = os.path.join(folder, "utils_before.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("utils_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def before_after_table(shapes, repeats, dim=FLOOR_DIM):
    """The selectors of ``BEFORE`` and of today, side by side on the same batches (``dim``-D)."""
    before = selectors_of(BEFORE)
    if before is None:
        print(f"\n(no git checkout with commit {BEFORE}: the before / after table is left out)")
        return []
    print(f"\nBefore (commit {BEFORE}: every selector on the whole (B, B) matrix) and after (today: the rows' "
          f"block), {dim}-D, ms per call (median of {repeats}):")
    header = f"{'selector':<17}{'shape':>7}{'B':>6}{'before ms':>11}{'after ms':>10}{'before/after':>14}"
    print(header)
    print("-" * len(header))
    rows = []
    for n_classes, per_class in shapes:
        embeddings, labels = make_batch(n_classes, per_class, dim)
        for name in SELECTORS:
            if name == "AllTriplet" and n_classes * per_class > 1024:
                continue
            times = [median_ms(library_call(name, embeddings, labels, module), repeats) for module in (before, utils)]
            print(f"{name:<17}{f'{n_classes}x{per_class}':>7}{n_classes * per_class:>6}{times[0]:>11.2f}"
                  f"{times[1]:>10.2f}{times[0] / times[1]:>13.2f}x", flush=True)
            rows.append((name, n_classes * per_class, times[0], times[1]))
    return rows


def floor_table(repeats, batch=FLOOR_BATCH, dim=FLOOR_DIM, per_class=8, spread=False):
    """Every selector against the compute floor at one batch: the rows' distances (``row_distances``) plus
    one masked reduction per row (each anchor's closest negative), measured in the same run. The batch is
    ``balanced_batch``'s (a few hard negatives per anchor), or with ``spread`` ``make_batch``'s (centres and
    spread scaled by 1/sqrt(dim): many)."""
    embeddings, labels = make_batch(batch // per_class, per_class, dim) if spread else \
        balanced_batch(batch, per_class=per_class, dim=dim)
    print(f"\n{'make_batch' if spread else 'balanced_batch'}:", end="")

    def floor():
        distances = utils.row_distances(embeddings)
        return distances.masked_fill(labels[:, None] == labels, math.inf).min(dim=1)

    floor_ms = median_ms(floor, repeats)
    print(f" compute floor at B = {batch} ({batch // per_class} x {per_class}), {dim}-D, "
          f"{torch.get_num_threads()} thread(s): the distance matrix plus one masked reduction per row, "
          f"{floor_ms:.1f} ms (median of {repeats}).")
    header = f"{'selector':<17}{'ms':>10}{'x floor':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in SELECTORS:
        if name == "AllTriplet":  # its output is B^2 * per_class triplets: no floor of this kind
            continue
        milliseconds = median_ms(library_call(name, embeddings, labels), repeats)
        print(f"{name:<17}{milliseconds:>10.1f}{milliseconds / floor_ms:>9.2f}x", flush=True)
        rows.append((name, milliseconds / floor_ms))
    return floor_ms, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only B = 250 and 400, fewer repeats, no 32x32 memory case")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--sharding-tables", action="store_true",
                        help=f"only the before / after table (against commit {BEFORE}) and the compute-floor tables")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's own choice; on a machine "
                             "busy with other work, --threads 1 avoids OpenMP threads waiting "
                             "on each other)")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS,
                        metavar=("SELECTOR", "CLASSES", "PER_CLASS", "DIM"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, n_classes, per_class, dim = args.memory_child
        memory_child(name, int(n_classes), int(per_class), int(dim))
        return

    torch.manual_seed(0)
    if args.sharding_tables:
        before_after_table([(10, 25), (32, 8), (64, 8), (128, 8)], 11)
        floor_table(5)
        floor_table(5, spread=True)
        return
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    library_repeats, slow_repeats = (3, 1) if args.quick else (11, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, margin {MARGIN}; "
          f"library: median of {library_repeats} calls after 1 warm-up; reference and "
          f"classic-style: median of up to {slow_repeats} calls (a single call when it takes over "
          f"0.5 s); ratio = other / library.")
    print("Shapes are classes x samples per class; the B = 1024 shape is 128x8. Load average "
          f"at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes skew "
          "the times).\n")
    start = time.perf_counter()
    results = timing_table(shapes, library_repeats, slow_repeats)
    slowest = {}
    for name, batch_size, _, ratio in results:
        if batch_size == TARGET_BATCH:
            slowest[name] = min(ratio, slowest.get(name, math.inf))
    print()
    print(f"Target: library >= {TARGET_SPEEDUP}x faster than the loop reference "
          f"at B = {TARGET_BATCH}:")
    for name in SELECTORS:
        verdict = "ok" if slowest[name] >= TARGET_SPEEDUP else "MISSED"
        print(f"  {name:<17} worst ratio {slowest[name]:>8.0f}x  {verdict}")
    before_after_table(shapes if args.quick else [(10, 25), (32, 8), (64, 8), (128, 8)], library_repeats)
    if not args.quick:
        floor_table(5)
        floor_table(5, spread=True)
    if not args.no_memory:
        memory_table(args.quick)
    print(f"\nTotal time {time.perf_counter() - start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
