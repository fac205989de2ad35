"""The measuring part of benchmarks/gpu_check.sh: selectors and one training epoch on the GPU, each stage
within its own time budget, so that a short GPU session always brings back the epoch table.

    python benchmarks/gpu_check.py --out OUT_DIR [--tests-xml cuda_tests.xml]   # on a CUDA machine
    python benchmarks/gpu_check.py --out OUT_DIR --cpu                          # dry run on a CPU (CI)
    python benchmarks/gpu_check.py --out OUT_DIR --cpu --selector-budget-s 0 --epoch-budget-s 0
                                                               # every row that may be skipped is skipped

Three stages, in this order:

1. Selectors at small global batches (256 to 1024): every selector (the study's five triplet miners and
   the hard-negative pair selector; 8 items per class, 64-D embeddings) on the GPU next to the same call
   on the CPU, ms per call (median of 5 calls after a warm-up call; one call where the warm-up call took
   over half a second). At most ``SMALL_SHARE`` of the selector budget.
2. One epoch of the study's online-triplet training (EmbeddingNet 2-D, random-hard, balanced batches of
   10 x 25): the library (``methods.build_training`` + ``trainer.run_epoch``) against the compute floor
   (forward, backward and Adam step on ready tensors of the same shapes, no mining), in the ways
   ``EPOCH_WAYS``: float32, bf16 autocast, compiled, then fp16 autocast with loss scaling. The warm-up of
   each way (the compilation, for the compiled one) is timed apart from the epoch. fp16 comes last: the
   issue asks for the first three, and fp16 (``--amp fp16``, meant for GPUs; on a CPU it is 10x slower)
   costs about one fp32 way, so it runs when the budget has room and never displaces the others.
   Fashion-MNIST from the usual places (``--root``, the system's dataset folders); random images of its
   shape where it is absent, said so in the output.
3. Selectors at larger global batches (2048 to 8192; the all-triplets selector stops at 1024, its output
   grows as B^2), with what the small batches left of the selector budget.

The budgets (seconds of ``time.perf_counter``; ``--selector-budget-s``, ``--epoch-budget-s``): before each
row a stage checks its own. A row is skipped when nothing is left, or when its predicted time (the same
selector's previous batch, scaled as B^2; for an epoch way, the fp32 way's time) exceeds what is left; a
row that runs past the budget is cut (SIGALRM) and counted as skipped. Every skipped row is named under
its table and in the JSON's ``skipped`` list with the reason: never a silent gap. The fp32 epoch, the
base of the epoch table, always runs; a slow compilation can cost only the compiled and fp16 rows.

Prints each table in Markdown (ready to paste), then the selectors in the shape of results/README.md's
GPU table, and writes ``OUT_DIR/gpu_check.json`` after every row (``status`` says whether it finished, so
even a run stopped by the shell script's hard time limit leaves what it measured): the budgets and time
spent per stage, the rows, what was skipped and why, and the CUDA tests' counts read from the JUnit XML
that the shell script's pytest run wrote. ``--cpu``: everything on the CPU at small sizes (batches 256
and 512, a few batches of the epoch), to check that this script runs.
"""

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import time
import xml.etree.ElementTree as ElementTree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import experiments  # noqa: E402
import methods  # noqa: E402
from bench_distributed import ALL_TRIPLETS_MAX_BATCH, MARGIN  # noqa: E402
from bench_selectors import balanced_batch  # noqa: E402
from bench_epoch import Limited, synchronize, time_epoch, time_floor, warm_up  # noqa: E402
from datasets import InMemoryDataset  # noqa: E402
from utils import HardNegativePairSelector  # noqa: E402

SMALL_BATCHES, LARGE_BATCHES = (256, 512, 1024), (2048, 4096, 8192)
DRY_SMALL_BATCHES, DRY_LARGE_BATCHES = (256,), (512,)
# batch-hard-soft is the batch-hard miner under another name (its loss differs, not its mining): timed once
SELECTOR_NAMES = ("hard-negative pairs",) + tuple(name for name in methods.SELECTORS if name != "batch-hard-soft")
EPOCH_WAYS = ("fp32", "bf16", "compiled", "fp16")  # in order of priority: fp32 always runs
DRY_EPOCH_BATCHES = 4
REPEATS, DRY_REPEATS = 5, 2
SLOW_CALL_S = 0.5  # a call slower than this is timed once
SELECTOR_BUDGET_S = 70.0  # both selector stages together
SMALL_SHARE = 0.35  # of the selector budget, at most, for the small batches
EPOCH_BUDGET_S = 100.0


class OutOfTime(BaseException):
    """A stage's budget ran out in the middle of a row (a BaseException, so that no ``except Exception``
    on the way, e.g. in torch.compile, mistakes it for a failure of its own)."""


@contextlib.contextmanager
def cut_after(seconds):
    """Raise ``OutOfTime`` inside the ``with`` block once ``seconds`` have passed (SIGALRM: main thread,
    POSIX); at once when ``seconds`` is not positive."""
    if seconds <= 0:
        raise OutOfTime()

    def ring(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Report:
    """The JSON report, written again (atomically) after every row, so a run stopped from outside still
    leaves what it measured; ``status`` is ``running: <stage>`` until the end."""

    def __init__(self, path, **fields):
        self.path = path
        self.data = dict(fields, status="starting", stages={}, selectors=[], epoch=[], skipped=[])

    def save(self):
        """Write the JSON (a temporary file renamed over the old one)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as file:
            json.dump(self.data, file, indent=1)
        os.replace(self.path + ".tmp", self.path)


class Stage:
    """One stage of the check: its time budget (seconds from its start), and the rows it skipped for lack of
    time, recorded in the report and printed under its table."""

    def __init__(self, report, key, budget_s):
        self.report, self.key, self.budget_s = report, key, budget_s
        self.started, self.skipped = time.perf_counter(), []
        report.data["status"] = f"running: {key}"
        report.data["stages"][key] = {"budget_s": budget_s, "spent_s": None, "skipped": 0}
        report.save()

    def left(self):
        """Seconds left of the budget (negative once it is spent)."""
        return self.budget_s - (time.perf_counter() - self.started)

    def too_long(self, predicted_s):
        """Why a row predicted to take ``predicted_s`` seconds (None: unknown) must be skipped, or None."""
        left = self.left()
        if left <= 0:
            return f"budget of {self.budget_s:g} s spent"
        if predicted_s is not None and predicted_s > left:
            return f"predicted {predicted_s:.1f} s, {left:.1f} s left of {self.budget_s:g} s"
        return None

    def skip(self, row, reason):
        """Record ``row`` (its identifying fields) as skipped for ``reason``."""
        self.skipped.append(dict(row, reason=reason))
        self.report.data["skipped"].append(dict(row, stage=self.key, reason=reason))
        self.report.save()

    def close(self):
        """Print what was skipped (or that nothing was) and the time spent; record both."""
        spent = time.perf_counter() - self.started
        self.report.data["stages"][self.key].update(spent_s=round(spent, 2), skipped=len(self.skipped))
        self.report.save()
        if self.skipped:
            by_reason = {}
            for row in self.skipped:
                label = " ".join(str(value) for key, value in row.items() if key != "reason")
                by_reason.setdefault(row["reason"], []).append(label)
            print(f"\nSkipped for lack of time, {len(self.skipped)} rows: "
                  + "; ".join(f"{', '.join(labels)} ({reason})" for reason, labels in by_reason.items()) + ".")
        else:
            print("\nNothing skipped.")
        print(f"Time: {spent:.1f} s of a budget of {self.budget_s:g} s.\n", flush=True)


def markdown_row(*cells):
    """One line of a Markdown table."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def print_markdown_head(title, columns):
    """Print a Markdown heading, then a table's header and rule."""
    print(f"### {title}\n\n{markdown_row(*columns)}\n{markdown_row(*['---'] * len(columns))}", flush=True)


def selector_call(name, embeddings, labels):
    """A function running selector ``name`` once on the batch (a fresh generator on the batch's device)."""
    if name == "hard-negative pairs":
        selector = HardNegativePairSelector()
        return lambda: selector.get_pairs(embeddings, labels)
    generator = torch.Generator(device=embeddings.device).manual_seed(0)
    selector = methods.SELECTORS[name](MARGIN, generator)
    return lambda: selector.get_triplets(embeddings, labels)


def call_seconds(function, repeats, device):
    """``(median seconds, calls timed)`` of ``function()`` over ``repeats`` calls after one warm-up call,
    or over one call when the warm-up call took over SLOW_CALL_S; the device's queue is waited for."""
    def timed():
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - started

    calls = 1 if timed() > SLOW_CALL_S else repeats
    return statistics.median(timed() for _ in range(calls)), calls


def predicted_row_s(previous, batch, repeats):
    """Seconds a selector row at ``batch`` should take, from the same selector's row at a smaller batch
    (``previous``: its batch and the ms of one call on each side), scaled as B^2; None without one."""
    if previous is None:
        return None
    scale = (batch / previous["batch"]) ** 2
    calls = (scale * previous[side] / 1000 for side in ("device_ms", "cpu_ms"))
    return sum(call * (1 + (1 if call > SLOW_CALL_S else repeats)) for call in calls)


def selector_stage(report, key, title, budget_s, device, batches, repeats):
    """Time every selector at ``batches`` on ``device`` and on the CPU within ``budget_s`` seconds, appending
    rows to the report; the Markdown table headed ``title`` as it goes, then what was skipped."""
    stage = Stage(report, key, budget_s)
    print_markdown_head(f"{title}, batches {', '.join(map(str, batches))}: ms per call, {device} next to cpu "
                        f"(budget {budget_s:g} s)", ("batch", "selector", f"{device} ms", "cpu ms", f"cpu / {device}"))
    for batch in batches:
        on_device, on_cpu = balanced_batch(batch, device), balanced_batch(batch, "cpu")
        for name in SELECTOR_NAMES:
            if name == "all" and batch > ALL_TRIPLETS_MAX_BATCH:
                continue
            row = {"batch": batch, "selector": name}
            earlier = [r for r in report.data["selectors"] if r["selector"] == name]
            reason = stage.too_long(predicted_row_s(earlier[-1] if earlier else None, batch, repeats))
            if reason is None:
                try:
                    with cut_after(stage.left()):
                        device_s, device_calls = call_seconds(selector_call(name, *on_device), repeats, device)
                        cpu_s, cpu_calls = call_seconds(selector_call(name, *on_cpu), repeats, "cpu")
                except OutOfTime:
                    reason = f"cut when the budget of {budget_s:g} s ran out"
            if reason is not None:
                stage.skip(row, reason)
                print(markdown_row(batch, name, "skipped", "skipped", "(no time)"), flush=True)
                continue
            row.update(device_ms=1000 * device_s, cpu_ms=1000 * cpu_s, device_calls=device_calls,
                       cpu_calls=cpu_calls)
            report.data["selectors"].append(row)
            report.save()
            print(markdown_row(batch, name, f"{1000 * device_s:.2f}", f"{1000 * cpu_s:.2f}",
                               f"{cpu_s / device_s:.1f}x"), flush=True)
    stage.close()


def training_set(root):
    """``(Fashion-MNIST train set, "fashion-mnist")``, or random images of its shape and ``"synthetic"``."""
    try:
        return experiments.load_splits("fashion-mnist", root)[0], "fashion-mnist"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        data = torch.randn(60000, 1, 28, 28, generator=generator)
        targets = torch.arange(10).repeat(6000)
        return InMemoryDataset(data, targets, classes=[str(k) for k in range(10)]), "synthetic"


def epoch_way(way, train_set, n_batches, device, progress=None):
    """``{way, batches, warm_up_s, library_s, floor_s}`` of one way of the online-triplet epoch: the warm-up
    (the compilation, for the compiled way) timed apart from the library's epoch and the floor's.
    ``progress["phase"]`` (a dict, when given) says which of them runs, for the message of a cut."""
    progress = {} if progress is None else progress
    progress["phase"] = "warm-up (compilation included)" if way == "compiled" else "warm-up"
    torch.manual_seed(0)
    model, loss_fn, loader, _, metrics, _, _ = methods.build_training("online-triplet", train_set, None)
    amp = way if way in ("bf16", "fp16") else None
    trained = torch.compile(model) if way == "compiled" else None
    shape = next(iter(loader))[0].shape
    synchronize(device)
    started = time.perf_counter()
    warm_up(model, shape, 1, device)
    time_epoch(model, loss_fn, Limited(loader, 2), metrics, amp=amp, trained=trained, device=device)
    time_floor(model, shape, 1, 2, device=device, amp=amp, trained=trained)  # compiles for the floor's loss
    warm_up_s = time.perf_counter() - started
    progress["phase"] = "library epoch"
    library = time_epoch(model, loss_fn, Limited(loader, n_batches), metrics, amp=amp, trained=trained,
                         device=device)
    progress["phase"] = "floor epoch"
    floor = time_floor(model, shape, 1, n_batches, device=device, amp=amp, trained=trained)
    return {"way": way, "batches": n_batches, "warm_up_s": warm_up_s, "library_s": library, "floor_s": floor}


def epoch_stage(report, budget_s, device, train_set, n_batches):
    """The online-triplet epoch in each of EPOCH_WAYS within ``budget_s`` seconds, fp32 always: rows
    appended to the report, the Markdown table as it goes, then what was skipped."""
    stage = Stage(report, "epoch", budget_s)
    print_markdown_head(f"2. One online-triplet epoch on {device} ({n_batches} batches of 10 x 25), seconds "
                        f"(budget {budget_s:g} s)",
                        ("way", "warm-up s", "library s", "floor s", "library / floor", "fp32 / this"))
    for way in EPOCH_WAYS:
        rows = report.data["epoch"]
        reason = None
        if way != "fp32":
            base = rows[0]["warm_up_s"] + rows[0]["library_s"] + rows[0]["floor_s"] if rows else None
            reason = stage.too_long(base)
        if reason is None:
            progress, started = {"phase": "set-up"}, time.perf_counter()
            try:
                with contextlib.nullcontext() if way == "fp32" else cut_after(stage.left()):
                    row = epoch_way(way, train_set, n_batches, device, progress)
            except OutOfTime:
                reason = (f"cut in its {progress['phase']} after {time.perf_counter() - started:.1f} s, when the "
                          f"budget of {budget_s:g} s ran out")
                torch._dynamo.reset()
        if reason is not None:
            stage.skip({"way": way}, reason)
            print(markdown_row(way, "skipped", "skipped", "skipped", "(no time)", ""), flush=True)
            continue
        rows.append(row)
        report.save()
        print(markdown_row(way, f"{row['warm_up_s']:.1f}", f"{row['library_s']:.2f}", f"{row['floor_s']:.2f}",
                           f"{row['library_s'] / row['floor_s']:.2f}x",
                           f"{rows[0]['library_s'] / row['library_s']:.2f}x"),
              flush=True)
    stage.close()


def short_ms(ms):
    """Milliseconds as results/README.md writes them: one decimal under 10, none above."""
    return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def print_selector_summary(report, device, batches):
    """The selectors as results/README.md's GPU table: a row per batch, ms on the device (on the CPU)."""
    measured = {(row["batch"], row["selector"]): row for row in report.data["selectors"]}
    skipped = {(row.get("batch"), row.get("selector")) for row in report.data["skipped"]}
    print_markdown_head(f"Summary: selectors, ms per call on {device} (cpu in brackets)", ("batch",) + SELECTOR_NAMES)
    for batch in batches:
        cells = []
        for name in SELECTOR_NAMES:
            row = measured.get((batch, name))
            cells.append(f"{short_ms(row['device_ms'])} ({short_ms(row['cpu_ms'])})" if row
                         else "skipped (time)" if (batch, name) in skipped else "-")
        print(markdown_row(batch, *cells))
    print(f"\n-: not timed (the all-triplets selector stops at {ALL_TRIPLETS_MAX_BATCH}); skipped (time): "
          "no time left in the stage's budget.\n", flush=True)


def test_counts(path, exit_status=None, budget_s=None):
    """``{tests, failures, errors, skipped}`` of a JUnit XML file (None when there is none), with the
    pytest run's exit status and time limit when given (exit status 124: stopped at the limit)."""
    counts = None
    if path is not None and os.path.exists(path):
        root = ElementTree.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    if exit_status is None:
        return counts
    return dict(counts or {}, exit_status=exit_status, timed_out=exit_status == 124, budget_s=budget_s)


def parse_arguments(argv):
    """The command line (``argv``, or sys.argv's when None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes")
    parser.add_argument("--root", default="data", help="where to look for Fashion-MNIST")
    parser.add_argument("--tests-xml", default=None, help="JUnit XML of the CUDA tests' pytest run")
    parser.add_argument("--tests-status", type=int, default=None, help="that pytest run's exit status")
    parser.add_argument("--tests-budget-s", type=float, default=None, help="that pytest run's time limit")
    parser.add_argument("--selector-budget-s", type=float, default=SELECTOR_BUDGET_S,
                        help=f"seconds for both selector stages (default {SELECTOR_BUDGET_S:g}; at most "
                             f"{SMALL_SHARE:g} of it for the small batches)")
    parser.add_argument("--epoch-budget-s", type=float, default=EPOCH_BUDGET_S,
                        help=f"seconds for the epoch table (default {EPOCH_BUDGET_S:g}; fp32 always runs)")
    return parser.parse_args(argv)


def run_stages(report, args, device, train_set):
    """Small selector batches, the epoch table, larger selector batches, each within its budget."""
    repeats = DRY_REPEATS if args.cpu else REPEATS
    small, large = (DRY_SMALL_BATCHES, DRY_LARGE_BATCHES) if args.cpu else (SMALL_BATCHES, LARGE_BATCHES)
    started = time.perf_counter()
    selector_stage(report, "selectors-small", "1. Selectors at small batches",
                   round(SMALL_SHARE * args.selector_budget_s, 1), device, small, repeats)
    small_spent = time.perf_counter() - started
    n_batches = DRY_EPOCH_BATCHES if args.cpu else len(train_set) // 250
    epoch_stage(report, args.epoch_budget_s, device, train_set, n_batches)
    selector_stage(report, "selectors-large", "3. Selectors at larger batches",
                   round(max(0.0, args.selector_budget_s - small_spent), 1), device, large, repeats)
    print_selector_summary(report, device, small + large)


def main(argv=None):
    """Run the check with the command line ``argv``: the report's data (also written to OUT_DIR)."""
    args = parse_arguments(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu for the dry run")
    started = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    torch.manual_seed(0)
    train_set, data = training_set(args.root)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"torch {torch.__version__}, {device} ({gpu or platform.processor() or 'CPU'}), "
          f"{torch.get_num_threads()} CPU threads, data: {data}\n")
    report = Report(os.path.join(args.out, "gpu_check.json"), device=device, gpu=gpu, torch=torch.__version__,
                    cpu_threads=torch.get_num_threads(), data=data,
                    cuda_tests=test_counts(args.tests_xml, args.tests_status, args.tests_budget_s),
                    budgets={"selectors_s": args.selector_budget_s,
                             "small_selectors_s": round(SMALL_SHARE * args.selector_budget_s, 1),
                             "epoch_s": args.epoch_budget_s, "cuda_tests_s": args.tests_budget_s})
    try:
        run_stages(report, args, device, train_set)
        report.data["status"] = "complete"
    except KeyboardInterrupt:  # the shell script's hard time limit (timeout -s INT)
        report.data["status"] = f"stopped from outside during {report.data['status'].replace('running: ', '')}"
        print(f"\n{report.data['status']}", flush=True)
    report.data["wall_s"] = round(time.perf_counter() - started, 2)
    report.save()
    print(f"Written {report.path} ({report.data['status']}, {report.data['wall_s']:.0f} s)")
    return report.data


if __name__ == "__main__":
    main()
