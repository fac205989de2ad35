"""Training on several processes: the one module that knows about torch.distributed process groups.

The model. A job of W processes (ranks 0 .. W-1), started by ``torchrun`` (or any launcher that sets
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), trains one model on global batches that the
ranks share:

- Set-up: ``setup(device)`` (``trainer.fit`` calls it; ``trainer.setup_distributed`` is the same after
  resolving a device) initialises the default process group when the environment says WORLD_SIZE > 1
  and none is initialised yet: backend "nccl" for a CUDA device, else "gloo", env:// rendezvous,
  timeout ``process_group_timeout()``; a group the caller initialised is used as it is, and fit leaves the
  group initialised when it returns. On CUDA the device becomes cuda:LOCAL_RANK. Call it before building
  the loaders, so that samplers find the group. ``close_distributed()`` is a program's last step (gloo can
  abort a process that exits with its group still open). With one process nothing is initialised and
  every function here answers as for rank 0 of 1.
- Data: fit does not shard the data; each rank's loaders must yield that rank's share of every global
  batch: ``datasets.DistributedBalancedBatchSampler`` (rank r yields ``global_batch[start:stop]``,
  ``share_bounds``; built with num_replicas / rank from the environment when the group does not exist
  yet) or torch's DistributedSampler. A plain DataLoader with a RandomSampler / SequentialSampler is not
  re-sharded: every rank would then see the whole dataset.
- Gradients: ``fit`` trains the model wrapped in DistributedDataParallel (``data_parallel``; then
  torch.compile with ``compile=True``), which averages the ranks' gradients, and validates on the plain
  model; the model itself keeps the weights, so checkpoints hold a plain state_dict that one process can
  resume from. The online losses mine over the global batch: ``global_batch`` gathers every rank's
  embeddings and labels (``GatherRows``: gradients flow back to the rank owning each row), each rank mines
  its own rows of it (``rows_to_mine``: the pairs / triplets whose first member / anchor it holds, so each
  goes to exactly one rank; ``gather_uneven`` pools the ranks' candidates where a selector chooses over the
  whole batch; ``owned`` picks a rank's tuples out of a selector that mines the whole batch), and
  ``global_mean`` scales a rank's terms so that DistributedDataParallel's average is one process's gradient
  of the mean over the global batch.
- Waiting: the losses' collectives on CPU tensors (gloo) are started asynchronously and polled until done
  (``completed``), not waited for in the call: on a machine whose CPUs are all busy, being woken by gloo's
  thread cost 3-4 ms each time on this project's CPU, many times the collective.
- One writer: only the main process (``is_main_process``: rank 0) prints, shows progress bars and writes
  files (checkpoints, results), followed by a ``barrier`` so that no rank runs ahead of a write; every
  rank reads a checkpoint on resume (a file system all ranks see). ``broadcast_from_main`` hands rank 0's
  answer (e.g. a results row) to every rank. ``rank_and_world_size`` answers "which rank of how many am I".
  The logged losses are what the loss returns on each rank (the online losses return the global batch's
  mean); rank 0 logs its own values, and every rank's fit returns its own history.
- Faults: a rank that dies (killed, out of memory, an exception) closes its connections, and the other
  ranks' next collective operation fails at once; a rank that hangs makes it fail within the process-group
  timeout (``process_group_timeout()``: PROCESS_GROUP_TIMEOUT, 10 minutes, unless the environment variable
  SIAMESE_TRIPLET_PG_TIMEOUT_S gives seconds). Inside ``collective_failures_explained`` such a failure
  becomes a RuntimeError saying what happened and naming the last checkpoint; running the same command
  again (resume) continues from it. (torchrun also stops the other ranks as soon as one fails.)
"""

import contextlib
import datetime
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mining_rows import Rows
from utils import _as_labels, check_int

# Timeout of the process group ``setup`` initialises: a rank that hangs makes the other ranks' next
# collective operation fail within this time instead of waiting forever (a rank that dies closes its
# connections, which the others notice at once). Long enough for rank 0 to evaluate and write a checkpoint
# while the others wait at a barrier; the environment variable overrides it.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
TIMEOUT_VARIABLE = "SIAMESE_TRIPLET_PG_TIMEOUT_S"  # seconds, e.g. 60 for tests of a hung rank
# How often a rank looks whether a collective on CPU tensors has finished (``completed``), in seconds: at
# first every POLL_INTERVAL, then less and less often, up to every LONGEST_POLL_INTERVAL for a long wait.
POLL_INTERVAL, LONGEST_POLL_INTERVAL = 50e-6, 1e-3


# ---------------------------------------------------------------------------------------------------
# Set-up, close, and where this process stands


def process_group_timeout():
    """The timeout of the process group ``setup`` initialises: PROCESS_GROUP_TIMEOUT, or the seconds given
    by the environment variable SIAMESE_TRIPLET_PG_TIMEOUT_S (ValueError unless a number > 0)."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return PROCESS_GROUP_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def _env_world_size():
    """WORLD_SIZE from the environment (set by torchrun), 1 when unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise ValueError(f"WORLD_SIZE must be an int, got {os.environ['WORLD_SIZE']!r}") from error


def _distributed_device(device):
    """Under torchrun (WORLD_SIZE > 1) a CUDA device becomes cuda:LOCAL_RANK, made current; any other
    device is returned as it is."""
    if device.type != "cuda" or _env_world_size() <= 1 or "LOCAL_RANK" not in os.environ:
        return device
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def _distributed_setup(device):
    """(is_distributed, rank, world_size) after initialising the default process group when the
    environment has WORLD_SIZE > 1 and none is initialised yet (see the module docstring). (False, 0, 1)
    when there is no group of more than one process."""
    if not dist.is_available():
        if _env_world_size() > 1:
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        return False, 0, 1
    if not dist.is_initialized() and _env_world_size() > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=process_group_timeout())
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return False, 0, 1
    return True, dist.get_rank(), dist.get_world_size()


def setup(device):
    """This process's device and place among the processes: ``(device, rank, world_size)``.

    Takes a torch.device (``trainer.resolve_device``'s answer). Under torchrun (WORLD_SIZE > 1) it
    initialises the default process group (see the module docstring), and a CUDA device becomes
    cuda:LOCAL_RANK. One process: ``(device, 0, 1)`` and nothing initialised.
    """
    device = _distributed_device(torch.device(device))
    _, rank, world_size = _distributed_setup(device)
    return device, rank, world_size


def close_distributed():
    """Destroy the default process group, if there is one (a program's last step under torchrun), after a
    barrier: a rank that tore its connections down while another still wrote its files or finished a
    collective was seen to abort at exit (gloo, "terminate called without an active exception"). A barrier
    that fails because another rank is gone already is no reason to keep the group open."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()


def _is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size():
    """``(rank, world_size)`` of this process in the default process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if _is_distributed() else (0, 1)


def is_main_process():
    """True on the process that prints and writes files: rank 0, or the only process."""
    return not _is_distributed() or dist.get_rank() == 0


def barrier():
    """Wait until every process of the default group gets here (nothing to wait for in one process)."""
    if _is_distributed():
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object) on every process; `value` itself in one process."""
    if not _is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(model, device):
    """The model every rank trains: `model` wrapped in DistributedDataParallel (its gradients averaged over
    the ranks; on CUDA on `device`) when there is a process group of several processes, else `model` itself
    (also when it is a DistributedDataParallel already). `model` keeps the weights either way."""
    if not _is_distributed() or isinstance(model, DistributedDataParallel):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------------
# Faults: another rank died or hung


def _collective_failure(error):
    """True when `error` is a collective operation failing because another process died or hung."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    said = str(error).lower()
    return any(word in said for word in ("gloo", "nccl", "connection", "timed out"))


def _stopped_by_another_rank(error, epoch, checkpoint):
    """The RuntimeError raised instead of a collective operation's failure in `epoch`: what happened,
    what was kept (`checkpoint`, the path of the last checkpoint, or None), and how to resume."""
    kept = (f"the last checkpoint is {checkpoint}" if checkpoint
            else "no checkpoint_dir was given, so nothing was kept")
    return RuntimeError(
        f"rank {dist.get_rank()} of {dist.get_world_size()} stopped in epoch {epoch}: a collective "
        "operation failed, so another process died (killed, out of memory, an exception: see its log) "
        f"or hung for longer than the process-group timeout ({process_group_timeout()}; "
        f"{TIMEOUT_VARIABLE} sets it). {kept}; run the same command again to resume from it. "
        f"torch.distributed said: {str(error).splitlines()[0][:300] if str(error) else type(error).__name__}")


@contextlib.contextmanager
def collective_failures_explained(epoch, checkpoint):
    """Turn a collective operation's failure inside the block (another rank died or hung) into
    `_stopped_by_another_rank`'s RuntimeError, naming `epoch` (1-based) and `checkpoint` (the path of the
    last checkpoint, or None); every other error passes unchanged."""
    try:
        yield
    except RuntimeError as error:
        if not _is_distributed() or not _collective_failure(error):
            raise
        raise _stopped_by_another_rank(error, epoch, checkpoint) from error


# ---------------------------------------------------------------------------------------------------
# Sharing a batch between ranks


def process_group_shape(num_replicas, rank):
    """(num_replicas, rank), each defaulting to this process's world size and rank (``rank_and_world_size``:
    1 and 0 without a process group), checked: TypeError unless ints, ValueError unless
    ``0 <= rank < num_replicas``."""
    default_rank, default_world_size = rank_and_world_size()
    num_replicas = default_world_size if num_replicas is None else num_replicas
    rank = default_rank if rank is None else rank
    num_replicas, rank = check_int(num_replicas, "num_replicas", 1), check_int(rank, "rank", 0)
    if rank >= num_replicas:
        raise ValueError(f"need 0 <= rank < num_replicas, got num_replicas={num_replicas}, rank={rank}")
    return num_replicas, rank


def share_bounds(batch_size, num_replicas, rank):
    """``(start, stop)`` of rank ``rank``'s contiguous share of a batch of ``batch_size`` items split
    between ``num_replicas`` processes: the first ``batch_size % num_replicas`` ranks get one item more
    (``torch.tensor_split``'s rule), so the shares, in rank order, are the batch again."""
    base, extra = divmod(batch_size, num_replicas)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# ---------------------------------------------------------------------------------------------------
# The global batch: gathering every rank's rows, which terms a rank owns, their mean over ranks


def completed(collective, *arguments):
    """Run ``collective(*arguments)`` (a ``torch.distributed`` operation, e.g. ``dist.all_reduce``) and return
    when it has finished on this rank.

    On CPU tensors (gloo) the operation runs asynchronously and this rank looks whether it is done, every
    POLL_INTERVAL at first and less often as the wait goes on, instead of sleeping until gloo's thread wakes
    it. Woken that way right after 20 ms of compute, a collective took up to 3.5 ms on this project's 2-core
    machine against 0.2-0.8 ms on its own (about one tick of its kernel's 250 Hz scheduler; table 2b of
    benchmarks/bench_distributed.py, results/README.md), and a loss step makes three or four. Other devices
    (NCCL) run the operation as it is: it is queued on the GPU, and polling would make the CPU wait for the
    GPU. A failure (another rank died, or the timeout passed) is raised as it would be without polling."""
    tensor = next(argument for argument in arguments if isinstance(argument, torch.Tensor))
    if tensor.device.type != "cpu":
        return collective(*arguments)
    work, interval = collective(*arguments, async_op=True), POLL_INTERVAL
    while not work.is_completed():
        time.sleep(interval)
        interval = min(1.05 * interval, LONGEST_POLL_INTERVAL)  # 1 ms after about 20 ms of waiting
    work.wait()


def gather_rows_of(tensor, sizes):
    """``torch.cat`` over ranks of each rank's ``tensor (n_r, ...)``, in rank order; ``sizes`` lists every
    rank's ``n_r`` (the rows are padded to the largest, as all_gather needs equal shapes). No autograd."""
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    completed(dist.all_gather, parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class GatherRows(torch.autograd.Function):
    """Autograd-aware gather of rows: forward ``gather_rows_of``; backward sums the gradient of the
    gathered batch over ranks (every rank's loss may use every row) and hands each rank its own rows.
    ``GatherRows.apply(rows (n_r, D), sizes, start, labels)``: with ``labels`` (integers ``(n_r,)``, else
    None) the labels travel in the same message, their bytes appended to the rows as extra columns, and
    come back as a second output (no gradient): one collective instead of two, each a point where every
    rank waits for the slowest (the values are copied bit for bit).

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather``, which is
    deprecated (torch 2.x) in favour of a private functional collective, and needs equal row counts;
    an all_reduce works on every backend (gloo included) and with unequal shares."""

    @staticmethod
    def forward(ctx, rows, sizes, start, labels):
        ctx.share = (start, start + len(rows))
        if labels is None:
            return gather_rows_of(rows, sizes)
        width = rows.shape[1]
        label_bytes = labels.to(torch.int64).view(rows.dtype).view(len(rows), 8 // rows.element_size())
        gathered = gather_rows_of(torch.cat([rows, label_bytes], dim=1), sizes)
        gathered_labels = gathered[:, width:].contiguous().view(torch.int64).flatten().to(labels.dtype)
        ctx.mark_non_differentiable(gathered_labels)
        return gathered[:, :width].contiguous(), gathered_labels

    @staticmethod
    def backward(ctx, grad, *no_gradient):
        grad = grad.contiguous().clone()
        completed(dist.all_reduce, grad)
        start, stop = ctx.share
        return grad[start:stop], None, None, None


def _sizes_of_ranks(n_rows, device):
    """Every rank's ``n_rows`` (an int here), as a list in rank order (one all_gather)."""
    size = torch.tensor([n_rows], device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    completed(dist.all_gather, sizes, size)
    return [int(n) for n in sizes]


def gather_uneven(tensor):
    """``torch.cat`` over ranks of each rank's ``tensor (k_r, ...)``, in rank order, the ``k_r`` free to
    differ (two all_gathers: the sizes, then the padded rows). No autograd. How the selectors pool their
    per-rank candidates for a choice over the whole global batch (``mining_rows.Rows.concatenate``)."""
    return gather_rows_of(tensor, _sizes_of_ranks(len(tensor), tensor.device))


def rows_to_mine(share, n_items, n_anchors=None):
    """The rows of a gathered batch of ``n_items`` that this rank mines, as ``utils``' selectors take them
    (``mining_rows.Rows``): its ``share`` (``global_batch``'s ``(start, stop, W)``) with ``gather_uneven``
    to pool candidates; every row and nothing to pool when ``share`` is None (one process). ``n_anchors``:
    only the first so many items are the batch (the rest are a memory's candidates; None: all)."""
    if share is None:
        return Rows(0, n_items if n_anchors is None else n_anchors, None, n_anchors)
    return Rows(share[0], share[1], gather_uneven, n_anchors)


def global_batch(embeddings, labels, gather, *more):
    """The batch to mine: ``(embeddings (N, D), labels (N,), share, *more)``. With ``gather`` on and a
    process group of world size W > 1, ``N`` is the sum of every rank's ``B_r`` (rank order, gradients
    flowing back to the owning rank) and ``share = (start, stop, W)`` marks this rank's rows; otherwise the
    inputs themselves and ``share = None``. ``embeddings (B_r, D)`` and the integer ``labels (B_r,)`` travel
    in one collective (``GatherRows``), after one that gathers the ranks' ``B_r``. ``more``: other ``(B_r,
    ...)`` tensors gathered the same way (with gradients; None stays None)."""
    labels = _as_labels(labels, embeddings)  # integers: they travel as raw bytes beside the embeddings
    if not (gather and _is_distributed()):
        return (embeddings, labels, None, *more)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = _sizes_of_ranks(len(embeddings), embeddings.device)
    start = sum(sizes[:rank])
    gathered, gathered_labels = GatherRows.apply(embeddings, sizes, start, labels)
    more = [None if tensor is None else GatherRows.apply(tensor, sizes, start, None) for tensor in more]
    return (gathered, gathered_labels, (start, start + len(embeddings), world_size), *more)


def owned(first, share):
    """``(S,)`` bool: which pairs / triplets of the gathered batch this rank computes, given their first
    index ``first (S,)`` (a pair's first member, a triplet's anchor): those in this rank's share, so each
    goes to exactly one rank and no rank repeats another's terms. All of them when ``share`` is None."""
    if share is None:
        return torch.ones_like(first, dtype=torch.bool)
    start, stop, _ = share
    return (first >= start) & (first < stop)


def global_mean(terms, share):
    """The mean over every rank's terms, for DistributedDataParallel: ``(mean, n_terms, n_nonzero)``.

    Takes this rank's ``terms (S_r,)`` and its ``share`` of a gathered batch (``global_batch``; W ranks).
    One all_reduce (no gradient) gives the totals over ranks, ``S`` terms of sum ``T`` of which
    ``n_nonzero`` are > 0. ``mean`` has the value ``T / S``, the same on every rank (for logging), and the
    gradient of ``W * sum(terms) / S``, so that DistributedDataParallel's average of the ranks' gradients
    (sum / W) is the gradient of ``T / S``, one process's mean over the whole global batch; None when no
    rank has a term. The counts are ints.
    """
    detached = terms.detach().double()
    totals = torch.stack([torch.tensor(float(len(terms)), dtype=torch.float64, device=terms.device),
                          detached.sum(), (detached > 0).sum().double()])
    completed(dist.all_reduce, totals)
    n_terms, total, n_nonzero = totals.tolist()
    if n_terms == 0:
        return None, 0, int(n_nonzero)
    scaled = terms.sum() * (share[2] / n_terms)
    value = torch.tensor(total / n_terms, dtype=scaled.dtype, device=scaled.device)
    # value of the global mean, gradient of the scaled local sum
    return scaled + (value - scaled.detach()), int(n_terms), int(n_nonzero)
