"""Online mining on several processes: what each rank mining its own rows costs, and what 2 processes buy.

    python benchmarks/bench_distributed.py            # all four tables (about 20 minutes on 2 cores)
    python benchmarks/bench_distributed.py --quick    # global batch 1024 only, one round, fewer steps, no epoch
                                                      # or memory

Every process runs with one thread (OMP_NUM_THREADS=1), on CPU with the gloo backend, launched by
``python -m torch.distributed.run`` (torchrun) on 127.0.0.1; the one-process rows run the same code
without a process group.

1. Mining and loss, per step, at global batches 1024 and 4096 (8 items per class, 64-D embeddings):
   forward and backward of the online loss with each selector. "local" is the library's form on 2
   processes: every rank gathers the global batch and mines only its own rows, the ``(B_r, N)`` block of
   their distances, and computes the terms whose anchor (first pair member) it owns. "whole" is the naive
   form: every rank gathers and mines and computes the whole global batch. "1 proc" is one process on the
   whole global batch.
2. A training step of the study's online-triplet method (EmbeddingNet, 2-D, random-hard, Adam) at
   global batch 10 x 25 = 250 and 40 x 25 = 1000, on 1 process and on 2 (DistributedDataParallel, each
   rank half of the batch). Then (2b) where the time of the step at 10 x 25 goes (forward, loss with its
   gathers, backward with the gradients' all-reduce, optimizer step) on one process with the whole batch,
   one process alone with the half a rank gets, and rank 0 of two; and each collective of that step timed
   on its own: right after a barrier, after 20 ms of compute on both ranks (where a step calls it: after
   the forward, the mining or the backward), waiting in the call or polling as the losses do
   (``distributed.completed``), and after 20 ms asleep.
3. One full Fashion-MNIST epoch of ``experiments.py --methods online-triplet --epochs 1`` on 1 process
   and on 2, with the resulting scores (each way from the same seed).
4. Memory per rank: the peak resident memory that one rank's online loss (forward and backward) adds, in a
   fresh process playing rank 0 of W (its rows of the gathered batch, the other ranks' candidates left
   out), at a global batch of 16,384 on 8 ranks, as a multiple of its ``(B_r, N)`` float32 distance block;
   then that multiple times the block's size (``distributed.share_bounds``) for global batches up to 65,536
   on 8 to 64 ranks, next to the ``(N, N)`` matrix one process would need.

Times are medians of several steps after warm-up steps, measured side by side in one run. Tables 1-3
measure one process and two processes in turn, ``--rounds`` times (default 3): on a shared machine one
measurement of each can land in a quiet and a busy spell, so each speed-up is given as the median of the
rounds' speed-ups with their range.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

import torch  # noqa: E402

import experiments  # noqa: E402

from bench_epoch import print_table_head  # noqa: E402
from bench_selectors import balanced_batch, median_ms  # noqa: E402
from launch import clean_environment, launcher  # noqa: E402

MARGIN = 1.0
LOSS_SELECTORS = ("hard-negative pairs", "all", "hardest", "random-hard", "semi-hard", "batch-hard")
ALL_TRIPLETS_MAX_BATCH = 1024  # the all-triplets selector's output grows as B^2 * per_class: 4096 would need GBs
STEP_BATCHES = ((10, 25), (40, 25))
EPOCH_KEYS = ("seconds_per_epoch", "precision_at_1", "map_at_r", "knn_accuracy", "final_train_loss")
STEP_PHASES = ("forward", "loss", "backward", "optimizer")
ROUNDS = 3  # 1 and 2 processes measured in turn this many times (--rounds)
WARMUP = 2  # untimed calls before the timed ones
COMPUTE_GAP_MS = 20  # compute before a collective in table 2b's "after compute" column: about a loss step's mining


# ------------------------------------------------------------------------------------ worker side

def _loss(name, gather):
    import experiments
    from losses import OnlineContrastiveLoss, OnlineTripletLoss
    from utils import HardNegativePairSelector
    if name == "hard-negative pairs":
        return OnlineContrastiveLoss(MARGIN, HardNegativePairSelector(), gather=gather)
    return OnlineTripletLoss(MARGIN, experiments.SELECTORS[name](MARGIN, torch.Generator().manual_seed(0)),
                             gather=gather)


def _rank_and_world():
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def worker_loss(batch, repeats):
    """{selector: {"local": ms, "whole": ms}} for this process's share of a global batch of ``batch``."""
    from distributed import global_batch, share_bounds
    rank, world = _rank_and_world()
    everything, labels = balanced_batch(batch)
    start, stop = share_bounds(batch, world, rank)
    embeddings = everything[start:stop].clone().requires_grad_()
    own_labels = labels[start:stop]
    times = {}
    for name in LOSS_SELECTORS:
        if name == "all" and batch > ALL_TRIPLETS_MAX_BATCH:
            continue
        local_loss, whole_loss = _loss(name, gather=True), _loss(name, gather=False)

        def local():
            value = local_loss(embeddings, own_labels)
            (value[0] if isinstance(value, tuple) else value).backward()

        def whole():  # gather as the library does, then every term of the global batch on every rank
            gathered, gathered_labels, _ = global_batch(embeddings, own_labels, True)
            value = whole_loss(gathered, gathered_labels)
            (value[0] if isinstance(value, tuple) else value).backward()

        times[name] = {"local": median_ms(local, repeats, WARMUP),
                       "whole": median_ms(whole, repeats, WARMUP) if world > 1 else None}
    return times


def worker_step(n_classes, n_samples, repeats, shares=1, phases=False):
    """ms per training step of online-triplet (EmbeddingNet, random-hard, Adam) on this process's share of a
    global batch of ``n_classes x n_samples`` (one process: its first of ``shares`` shares). With ``phases``:
    ``{phase: ms}``, each phase's median, the phases timed one after the other in every step."""
    import torch.distributed as dist
    from distributed import data_parallel, share_bounds
    from losses import OnlineTripletLoss
    from networks import EmbeddingNet
    from utils import RandomNegativeTripletSelector
    rank, world = _rank_and_world()
    torch.manual_seed(0)
    model = EmbeddingNet(2)
    batch = n_classes * n_samples
    images = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n_classes).repeat_interleave(n_samples)
    start, stop = share_bounds(batch, world, rank) if world > 1 else share_bounds(batch, shares, 0)
    images, labels = images[start:stop], labels[start:stop]
    trained = data_parallel(model, torch.device("cpu"))  # DistributedDataParallel on 2 processes, as fit wraps it
    selector = RandomNegativeTripletSelector(MARGIN, generator=torch.Generator().manual_seed(0))
    loss_fn = OnlineTripletLoss(MARGIN, selector)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = {phase: [] for phase in STEP_PHASES}

    def step():
        moments = [time.perf_counter()]
        embeddings = trained(images)
        moments.append(time.perf_counter())
        loss, _ = loss_fn(embeddings, labels)  # with the gathers and the global mean on 2 processes
        moments.append(time.perf_counter())
        optimizer.zero_grad()
        loss.backward()  # with DistributedDataParallel's all-reduce of the gradients on 2 processes
        moments.append(time.perf_counter())
        optimizer.step()
        moments.append(time.perf_counter())
        for phase, begin, end in zip(STEP_PHASES, moments, moments[1:]):
            times[phase].append(1000 * (end - begin))

    milliseconds = median_ms(step, repeats, WARMUP)
    if world > 1:
        dist.barrier()
    if not phases:
        return milliseconds
    return {phase: statistics.median(values[WARMUP:]) for phase, values in times.items()}


def _computing(milliseconds):
    """Keep this process busy with small matmuls for ``milliseconds``, as a rank is between two collectives."""
    square = torch.ones(64, 64)
    end = time.perf_counter() + milliseconds / 1000
    while time.perf_counter() < end:
        torch.mm(square, square)


def _median_after(before, call, repeats):
    """ms, the median of ``repeats`` calls of ``call`` (after WARMUP more), each right after ``before()``,
    the ranks starting ``before`` together (a barrier)."""
    import torch.distributed as dist
    times = []
    for _ in range(WARMUP + repeats):
        dist.barrier()
        before()
        begin = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times[WARMUP:])


def worker_collectives(repeats):
    """{collective: {when: ms}}, rank 0's median time of each collective a training step of the study makes on
    2 processes (the batch of STEP_BATCHES[0], EmbeddingNet 2-D), called on its own: right after a barrier
    ("alone"), after COMPUTE_GAP_MS of compute on both ranks (as in a step, where each collective follows the
    forward, the mining or the backward) waiting in the call ("after compute") or as the losses wait, polling
    (``distributed.completed``), and after as long asleep."""
    import torch.distributed as dist

    from distributed import completed, share_bounds
    from networks import EmbeddingNet
    rank, world = _rank_and_world()
    batch = STEP_BATCHES[0][0] * STEP_BATCHES[0][1]
    start, stop = share_bounds(batch, world, rank)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    label_columns = 8 // 4  # an int64 label's bytes as float32 columns, packed beside the rows (GatherRows)
    rows = [torch.zeros(stop - start, 2 + label_columns) for _ in range(world)]
    gradient_rows, totals = torch.zeros(batch, 2), torch.zeros(3, dtype=torch.float64)
    gradients = torch.zeros(sum(parameter.numel() for parameter in EmbeddingNet(2).parameters()))
    calls = {"all_gather of the shares' sizes": (dist.all_gather, sizes, torch.zeros(1, dtype=torch.long)),
             f"all_gather of embeddings and labels ({stop - start}, 2 + {label_columns})":
                 (dist.all_gather, rows, torch.zeros(stop - start, 2 + label_columns)),
             "all_reduce of the loss totals (3,)": (dist.all_reduce, totals),
             f"all_reduce of embedding gradients ({batch}, 2)": (dist.all_reduce, gradient_rows),
             f"all_reduce of the weights' gradients ({len(gradients):,})": (dist.all_reduce, gradients)}
    befores = {"alone": lambda: None, "after compute": lambda: _computing(COMPUTE_GAP_MS),
               "polled": lambda: _computing(COMPUTE_GAP_MS), "after sleep": lambda: time.sleep(COMPUTE_GAP_MS / 1000)}
    return {name: {when: _median_after(before, (lambda: completed(*call)) if when == "polled" else
                                       (lambda: call[0](*call[1:])), 10 * repeats)
                   for when, before in befores.items()}
            for name, call in calls.items()}


def worker(arguments):
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    kind, *numbers = arguments
    numbers = [int(number) for number in numbers]
    if kind == "loss":
        result = worker_loss(*numbers)
    elif kind == "collectives":
        result = worker_collectives(*numbers)
    else:
        result = worker_step(*numbers, phases=kind == "phases")
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ driver side

def run_worker(processes, *arguments):
    """The worker's result (rank 0's RESULT line) on ``processes`` processes."""
    done = subprocess.run(launcher(processes) + [os.path.abspath(__file__), "--worker", *map(str, arguments)],
                          env=clean_environment(REPO_ROOT), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"worker {arguments} on {processes} processes failed:\n{done.stdout}\n{done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def alternating(rounds, measure):
    """``[(measure(1), measure(2)), ...]``: one process, then two, ``rounds`` times in turn, so that a slow
    spell of the shared machine falls on both sides rather than on one."""
    return [(measure(1), measure(2)) for _ in range(rounds)]


def spread(ratios):
    """``'median (lowest-highest)'`` of the per-round speed-ups."""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def loss_table(batches, repeats, rounds):
    print_table_head(f"1. Mining + loss, forward and backward per step (ms, medians of {rounds} round(s); 2 processes: "
                     "rank 0's time)",
                     f"{'global batch':>12}  {'selector':<20}{'1 proc':>10}{'2 proc local':>14}{'2 proc whole':>14}"
                     f"{'whole/local':>13}  {'speed-up, median (range)':<26}")
    rows = []
    for batch in batches:
        measured = alternating(rounds, lambda processes: run_worker(processes, "loss", batch, repeats))
        for name in measured[0][1]:
            alone = [one[name]["local"] for one, _ in measured]
            local = [two[name]["local"] for _, two in measured]
            whole = statistics.median(two[name]["whole"] for _, two in measured)
            ratios = [one / two for one, two in zip(alone, local)]
            print(f"{batch:>12}  {name:<20}{statistics.median(alone):>10.1f}{statistics.median(local):>14.1f}"
                  f"{whole:>14.1f}{whole / statistics.median(local):>12.2f}x  {spread(ratios):<26}", flush=True)
            rows.append({"batch": batch, "selector": name, "one_process_ms": alone, "local_ms": local,
                         "whole_ms": whole, "speed_up": ratios})
    return rows


def step_table(repeats, rounds):
    print_table_head(f"\n2. Training step of online-triplet (EmbeddingNet 2-D, random-hard, Adam), ms per step "
                     f"(medians of {rounds} round(s))",
                     f"{'global batch':>14}{'1 proc':>10}{'2 proc':>10}  {'speed-up, median (range)':<26}")
    rows = []
    for n_classes, n_samples in STEP_BATCHES:
        measured = alternating(rounds, lambda processes: run_worker(processes, "step", n_classes, n_samples, repeats))
        alone, shared = [one for one, _ in measured], [two for _, two in measured]
        label = f"{n_classes}x{n_samples}"
        print(f"{label:>14}{statistics.median(alone):>10.1f}{statistics.median(shared):>10.1f}  "
              f"{spread([one / two for one, two in measured]):<26}", flush=True)
        rows.append({"batch": label, "one_process_ms": alone, "two_processes_ms": shared})
    return rows


def phases_table(repeats):
    """Where the time of a study step (B = 250) goes on 1 and 2 processes, and what each collective costs."""
    n_classes, n_samples = STEP_BATCHES[0]
    columns = {"1 proc, whole batch": run_worker(1, "phases", n_classes, n_samples, repeats, 1),
               "1 proc, half batch": run_worker(1, "phases", n_classes, n_samples, repeats, 2),
               "2 proc, rank 0": run_worker(2, "phases", n_classes, n_samples, repeats, 2)}
    print_table_head(f"\n2b. The phases of a training step at {n_classes}x{n_samples}, ms (median of {repeats} steps); "
                     "'half batch': one process alone on the share a rank of two gets",
                     f"{'phase':<12}" + "".join(f"{name:>22}" for name in columns))
    for phase in (*STEP_PHASES, "total"):
        values = [sum(times.values()) if phase == "total" else times[phase] for times in columns.values()]
        print(f"{phase:<12}" + "".join(f"{value:>22.1f}" for value in values), flush=True)
    collectives = run_worker(2, "collectives", repeats)
    print(f"\nEach collective of that step on its own, 2 processes, rank 0, ms (median of {10 * repeats}): right "
          f"after a barrier, after {COMPUTE_GAP_MS} ms of compute on both ranks (waiting in the call, or polling as "
          f"the losses do: distributed.completed), after {COMPUTE_GAP_MS} ms asleep")
    whens = next(iter(collectives.values()))
    print(f"  {'collective':<64}" + "".join(f"{when:>15}" for when in whens))
    for name, times in collectives.items():
        print(f"  {name:<64}" + "".join(f"{times[when]:>15.2f}" for when in whens), flush=True)
    return {"phases": columns, "collectives": collectives}


def study_epoch(root, processes):
    """The row of ``experiments.py --methods online-triplet --epochs 1`` on ``processes`` processes, run in a
    fresh folder: seconds per epoch and the scores."""
    with tempfile.TemporaryDirectory() as work:
        command = launcher(processes) + [
            os.path.join(REPO_ROOT, "experiments.py"), "--dataset", "fashion-mnist", "--methods",
            "online-triplet", "--epochs", "1", "--no-progress", "--root", os.path.abspath(root)]
        done = subprocess.run(command, cwd=work, env=clean_environment(REPO_ROOT), capture_output=True, text=True,
                              timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        settings = experiments.StudySettings("fashion-mnist", methods=("online-triplet",), epochs=1)
        with open(os.path.join(work, settings.outputs().results, "fashion-mnist.json")) as file:
            row = json.load(file)[0]
    return {"processes": processes, **{key: row[key] for key in EPOCH_KEYS}}


def epoch_table(root, rounds):
    print_table_head("\n3. One Fashion-MNIST epoch of experiments.py --methods online-triplet (random-hard, 2-D, "
                     f"seed 0), 1 and 2 processes in turn, {rounds} rounds",
                     f"{'round':>6}{'processes':>10}{'s/epoch':>10}{'P@1':>8}{'MAP@R':>8}{'kNN acc':>9}"
                     f"{'train loss':>12}")
    measured = alternating(rounds, lambda processes: study_epoch(root, processes))
    for number, pair in enumerate(measured, 1):
        for row in pair:
            print(f"{number:>6}{row['processes']:>10}{row['seconds_per_epoch']:>10.1f}{row['precision_at_1']:>8.3f}"
                  f"{row['map_at_r']:>8.3f}{row['knn_accuracy']:>9.3f}{row['final_train_loss']:>12.4f}", flush=True)
    ratios = [one["seconds_per_epoch"] / two["seconds_per_epoch"] for one, two in measured]
    print(f"2 processes against 1: {spread(ratios)}", flush=True)
    return [row for pair in measured for row in pair]


# ------------------------------------------------------------------------------------ memory per rank

MEMORY_BATCH, MEMORY_WORLD = 16384, 8  # where the multiple of the block is measured
MEMORY_TABLE = ((4096, (8, 16)), (16384, (8, 16, 32, 64)), (65536, (8, 16, 32, 64)))


def memory_child(name, batch, world):
    """In a fresh process: rank 0 of ``world`` on a global batch of ``batch``; prints the peak RSS that its
    loss's forward and backward add, in MB."""
    from bench_selectors import peak_rss_kb, reset_peak_rss
    from distributed import share_bounds
    import losses
    from mining_rows import Rows
    everything, labels = balanced_batch(batch)
    start, stop = share_bounds(batch, world, 0)
    # rank 0's rows of the batch handed in as the gathered one, its candidates alone pooled
    losses.rows_to_mine = lambda share, n_items, n_anchors=None: Rows(share[0], share[1], lambda tensor: tensor,
                                                                      n_anchors)
    losses.global_batch = lambda embeddings, target, gather, *more: (
        embeddings, target, (*share_bounds(len(embeddings), world, 0), world), *more)
    losses.global_mean = lambda terms, share: (terms.mean(), len(terms), int((terms > 0).sum()))
    loss_fn = _loss(name, gather=True)
    gathered = everything.clone().requires_grad_()
    small = balanced_batch(512)[0].requires_grad_()
    output = loss_fn(small, balanced_batch(512)[1])  # kernels and allocator set up
    (output[0] if isinstance(output, tuple) else output).backward()
    reset_peak_rss()
    before = peak_rss_kb()
    output = loss_fn(gathered, labels)
    (output[0] if isinstance(output, tuple) else output).backward()
    print("RESULT " + json.dumps({"peak_mb": (peak_rss_kb() - before) / 1024,
                                  "block_mb": 4 * (stop - start) * batch / 2 ** 20}))


def memory_table():
    print_table_head(f"\n4. Memory per rank: one rank's loss (forward + backward) at global batch {MEMORY_BATCH} on "
                     f"{MEMORY_WORLD} ranks, peak RSS added, as a multiple of its (B_r, N) float32 block",
                     f"{'selector':<22}{'block MB':>10}{'peak MB':>10}{'x block':>9}")
    multiples = {}
    for name in LOSS_SELECTORS:
        if name == "all":
            continue
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", name, str(MEMORY_BATCH),
                               str(MEMORY_WORLD)], env=clean_environment(REPO_ROOT), capture_output=True, text=True,
                              timeout=1800, check=True)
        result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        multiples[name] = result["peak_mb"] / result["block_mb"]
        print(f"{name:<22}{result['block_mb']:>10.0f}{result['peak_mb']:>10.0f}{multiples[name]:>8.1f}x", flush=True)
    from distributed import share_bounds
    worst = max(multiples.values())
    print(f"\nPer rank, GB: the (B_r, N) block, and {worst:.1f} x it (the largest multiple above); one process's "
          "(N, N) float32 matrix for comparison")
    print(f"{'global batch':>12}{'ranks':>7}{'B_r':>7}{'block GB':>10}{'working GB':>12}{'(N, N) GB':>11}")
    rows = []
    for batch, worlds in MEMORY_TABLE:
        for world in worlds:
            start, stop = share_bounds(batch, world, 0)
            block = 4 * (stop - start) * batch / 2 ** 30
            print(f"{batch:>12}{world:>7}{stop - start:>7}{block:>10.2f}{worst * block:>12.2f}"
                  f"{4 * batch * batch / 2 ** 30:>11.1f}", flush=True)
            rows.append({"batch": batch, "ranks": world, "rows": stop - start, "block_gb": block,
                         "working_gb": worst * block})
    return {"multiples": multiples, "table": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="global batch 1024 only, one round, fewer steps, no epoch or memory table")
    parser.add_argument("--root", default="data", help="where experiments.py looks for Fashion-MNIST")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="times 1 and 2 processes are measured in turn; the tables give medians and ranges")
    parser.add_argument("--json", default=None, help="also write the tables to this JSON file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.worker:
        return worker(args.worker)
    if args.memory_child:
        torch.set_num_threads(1)
        return memory_child(args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2]))
    print(f"torch {torch.__version__}, 1 thread per process, gloo on 127.0.0.1; load average at start "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    repeats = 5 if args.quick else 10
    rounds = 1 if args.quick else args.rounds
    tables = {"loss": loss_table((1024,) if args.quick else (1024, 4096), repeats, rounds),
              "step": step_table(repeats, rounds), "phases": phases_table(repeats)}
    if not args.quick:
        tables["epoch"] = epoch_table(args.root, rounds)
        tables["memory"] = memory_table()
    if args.json:
        with open(args.json, "w") as file:
            json.dump(tables, file, indent=1)


if __name__ == "__main__":
    main()
