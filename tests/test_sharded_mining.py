"""Row-sharded mining: each process mines its own anchors, and together they select what one process
selects.

On 2 and 3 CPU processes (gloo on 127.0.0.1, bounded timeouts), every library selector, deterministic
and random, is called on each rank with that rank's rows of a gathered batch (``distributed.rows_to_mine``,
``utils.row_distances``); the ranks' selections, concatenated in rank order, must equal one process's
``get_pairs`` / ``get_triplets`` on the whole batch, exactly, over several batches (uneven shares, exact
ties on integer coordinates, a rank without rows) and over consecutive calls (the random selectors' keys
stay in step), with the random selectors' draw for small batches and with their proposals. Then, under a
dispatch mode that sees every tensor any operation makes, the online losses'
forward and backward on 2 processes never build a tensor larger than the rank's ``(B_r, N)`` block, and
the distances are computed for the rank's own rows only.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import distributed
import losses
import utils
from distributed import rows_to_mine, share_bounds
from launch import free_port, leave_passed_worker
import mining_rows
from mining_rows import Rows

REJECTION_FROM = mining_rows.REJECTION_FROM


def _seeded(seed=7):
    return torch.Generator().manual_seed(seed)


# name -> (make the selector, "pairs" or "triplets")
SELECTORS = {
    "all-positive-pairs balanced": (lambda: utils.AllPositivePairSelector(generator=_seeded()), "pairs"),
    "all-positive-pairs unbalanced": (lambda: utils.AllPositivePairSelector(balance=False), "pairs"),
    "hard-negative-pairs": (lambda: utils.HardNegativePairSelector(), "pairs"),
    "all-triplets": (lambda: utils.AllTripletSelector(), "triplets"),
    "hardest": (lambda: utils.HardestNegativeTripletSelector(1.0), "triplets"),
    "random-hard": (lambda: utils.RandomNegativeTripletSelector(1.0, generator=_seeded()), "triplets"),
    "semi-hard": (lambda: utils.SemihardNegativeTripletSelector(1.0, generator=_seeded()), "triplets"),
    "batch-hard": (lambda: utils.BatchHardTripletSelector(), "triplets"),
    "random-hard euclidean": (
        lambda: utils.RandomNegativeTripletSelector(0.5, generator=_seeded(), distance="euclidean"), "triplets"),
    "semi-hard euclidean": (
        lambda: utils.SemihardNegativeTripletSelector(0.5, generator=_seeded(), distance="euclidean"), "triplets"),
}


def _batches():
    """(embeddings (N, D), labels (N,)) batches: clustered floats of odd sizes, small-integer coordinates
    (many exact ties), unequal classes, and one of 2 items (a rank of 3 gets no row)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for n_classes, per_class, dim in [(12, 8, 16), (7, 5, 3), (9, 11, 8)]:
        labels = torch.arange(n_classes).repeat_interleave(per_class)[torch.randperm(n_classes * per_class,
                                                                                      generator=generator)]
        centres = torch.randn(n_classes, dim, generator=generator)
        batches.append((centres[labels] * 0.7 + torch.randn(len(labels), dim, generator=generator) * 0.5, labels))
    integers = torch.randint(-2, 3, (64, 3), generator=generator).float()
    batches.append((integers, torch.randint(0, 6, (64,), generator=generator)))
    batches.append((torch.randn(40, 4, generator=generator), torch.tensor([0] * 20 + [1] * 12 + [2] * 5 + [3] * 3)))
    batches.append((torch.randn(2, 4, generator=generator), torch.tensor([0, 0])))
    return batches


def _one_process(selector, kind, embeddings, labels):
    selection = selector.get_pairs(embeddings, labels) if kind == "pairs" else selector.get_triplets(embeddings, labels)
    return selection if kind == "pairs" else (selection,)


def _this_rank(selector, kind, embeddings, labels, rank, world_size):
    start, stop = share_bounds(len(labels), world_size, rank)
    rows = rows_to_mine((start, stop, world_size), len(labels))
    if selector.needs_distances:
        distances = utils.as_distance(utils.row_distances(embeddings, start, stop), getattr(selector, "distance",
                                                                                             "squared"))
    else:
        distances = None
    selection = selector.select_pairs(distances, labels, rows) if kind == "pairs" else \
        selector.select_triplets(distances, labels, rows)
    parts = selection if kind == "pairs" else (selection,)
    return tuple(distributed.gather_uneven(part) for part in parts)


def _compare_selections(rank, world_size):
    selected = dict.fromkeys(SELECTORS, 0)
    for way in ({}, {"REJECTION_FROM": 16}):  # the random selectors' small-batch draw, then their proposals
        for name, value in way.items():
            setattr(mining_rows, name, value)
        _compare_on_every_batch(rank, world_size, selected)
    mining_rows.REJECTION_FROM = REJECTION_FROM
    assert all(selected.values()), selected  # no selector selected nothing throughout


def _compare_on_every_batch(rank, world_size, selected):
    for case, (embeddings, labels) in enumerate(_batches()):
        for name, (make, kind) in SELECTORS.items():
            alone, shared = make(), make()
            for step in range(2):  # the random selectors' keys stay in step from call to call
                expected = _one_process(alone, kind, embeddings, labels)
                got = _this_rank(shared, kind, embeddings, labels, rank, world_size)
                context = f"{name}, batch {case}, step {step}, rank {rank} of {world_size}"
                assert all(torch.equal(a, b) for a, b in zip(got, expected)), context
                selected[name] += sum(map(len, expected))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns, and the operation."""

    largest, operation = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.largest:
                self.largest, self.operation = leaf.numel(), (func, tuple(leaf.shape))
        return output


def _check_block_bound(rank, world_size):
    """Forward and backward of every online loss whose selection is not everything: no tensor over the
    rank's (B_r, N) block, and distances asked for its own rows only."""
    n_items, dim = 256, 4  # shares of 128 >= utils.ROW_TILE rows; the (S, D) embeddings of the S tuples stay small
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(32).repeat_interleave(8)[torch.randperm(n_items, generator=generator)]
    embeddings = torch.randn(32, dim, generator=generator)[labels] * 0.5 + torch.randn(n_items, dim, generator=generator)
    start, stop = share_bounds(n_items, world_size, rank)
    rows_asked = []
    original = utils.row_distances

    def recording(vectors, first=0, last=None, out=None):
        rows_asked.append((len(vectors), first, last))
        return original(vectors, first, last, out=out)

    losses.row_distances = recording
    try:
        for name, (make, kind) in SELECTORS.items():
            if name in ("all-triplets", "all-positive-pairs unbalanced"):  # every tuple: the output is the size
                continue
            loss_fn = losses.OnlineContrastiveLoss(1.0, make()) if kind == "pairs" else \
                losses.OnlineTripletLoss(getattr(make(), "margin", 1.0), make(), distance=getattr(
                    make(), "distance", "squared"))
            mine = embeddings[start:stop].clone().requires_grad_()
            with LargestTensor() as recorder:
                output = loss_fn(mine, labels[start:stop])
                (output[0] if isinstance(output, tuple) else output).backward()
            assert recorder.largest <= (stop - start) * n_items < n_items ** 2, (name, recorder.operation)
    finally:
        losses.row_distances = original
    assert rows_asked and set(rows_asked) == {(n_items, start, stop)}


def _worker(rank, world_size, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _compare_selections(rank, world_size)
        if world_size == 2:
            _check_block_bound(rank, world_size)
    finally:
        distributed.close_distributed()  # a barrier, then destroy: no rank tears down while another works
    leave_passed_worker()  # reached only when every check passed


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ranks_together_select_what_one_process_selects(world_size):
    context = mp.spawn(_worker, args=(world_size, free_port()), nprocs=world_size, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {world_size}-process run did not finish in 240 s")


def test_one_process_is_the_rows_of_the_whole_batch():
    """``Rows(0, N)`` without pooling is ``get_*``: the W = 1 case of the same code."""
    for embeddings, labels in _batches():
        for name, (make, kind) in SELECTORS.items():
            distances = utils.as_distance(utils.row_distances(embeddings), getattr(make(), "distance", "squared"))
            expected = _one_process(make(), kind, embeddings, labels)
            selector = make()
            got = selector.select_pairs(distances, labels, Rows(0, len(labels))) if kind == "pairs" else \
                (selector.select_triplets(distances, labels, Rows(0, len(labels))),)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
