"""Training loop for siamese, triplet and classification networks.

`fit` keeps the classic call shape
`fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, cuda, log_interval,
metrics, start_epoch)` and its data conventions:

- a batch is `(data, target)`; `data` is a tensor or a tuple/list of tensors and the model is
  called as `model(*data)`;
- `target` is a tensor, a tuple/list of tensors spread into separate loss arguments, or an empty
  tuple/list (e.g. TripletMNIST) meaning no target;
- the loss is called as `loss_fn(*outputs, *targets)` with the model outputs wrapped in a tuple:
  a plain tuple or list of outputs is spread into separate arguments, anything else (a tensor, a
  NamedTuple such as networks.AutoencoderOutput) is passed as one argument; when the loss returns
  a tuple (e.g. OnlineTripletLoss -> (loss, n_triplets)) its first element is the loss that is
  minimised;
- metrics are called as `metric(outputs, targets, loss_outputs)` with the same `outputs` tuple,
  and `targets` None when the batch has no target.

On top of that it chooses the device, steps the scheduler after the epoch's optimizer steps, shows
a tqdm progress bar, stops on a non-finite loss, and writes atomic checkpoints it can resume from
bit for bit. `run_epoch` is the single loop behind both training and validation epochs.

Importing this module changes no process-wide state. CPU flush-to-zero of denormal floats is a
per-thread mode: `fit` turns it on for the thread that calls it (`flush_denormal=True`, the
default; `flush_denormal=False` leaves the mode alone), and torch's worker threads copy it only when
they start, at torch's first parallel operation. So the one place that sets it for the whole
process is `flush_denormal_everywhere`, which the command lines (experiments.py, and omniglot.py and
autoencoders.py through it) call before any work; setting the environment variable
SIAMESE_TRIPLET_KEEP_DENORMALS=1 turns that off.

Several processes (torchrun): when the environment says WORLD_SIZE > 1 (torchrun sets it with RANK,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), `fit` initialises a torch.distributed process group unless
one is already initialised ("nccl" on CUDA, "gloo" otherwise, timeout `process_group_timeout()`), trains
the model wrapped in DistributedDataParallel (on CUDA on cuda:LOCAL_RANK), and lets only rank 0 print,
show progress bars and write checkpoints. Each rank must be fed its own share of the data:
datasets.DistributedBalancedBatchSampler or torch's DistributedSampler; a plain DataLoader is not
re-sharded, so every rank would then see the whole dataset. `setup_distributed`, `is_main_process`,
`barrier` and `broadcast_from_main` are what a script around fit (experiments.py) needs to do the same.
A rank that dies or hangs makes the others stop with a RuntimeError that says so (see `fit`).

Mixed precision and compilation: `fit(..., amp="bf16" | "fp16", compile=True)`, see `MixedPrecision`.
"""

import collections
import contextlib
import datetime
import math
import os
import random
import time
import types
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from metrics import ActiveFractionMetric, EmbeddingSpreadMetric, Metric
from utils import atomic_write, check_choice, check_flag, check_int

CHECKPOINT_NAME = "checkpoint.pt"
KEEP_DENORMALS = "SIAMESE_TRIPLET_KEEP_DENORMALS"  # =1: flush_denormal_everywhere leaves the mode alone
# Keys a checkpoint written by fit must hold; "generators" is optional (older checkpoints lack it).
CHECKPOINT_KEYS = frozenset({"epoch", "model", "optimizer", "scheduler", "history", "rng"})
# How far below train_loader / val_loader / loss_fn the search for private torch.Generators goes
# (loader.batch_sampler.sampler.generator is 3 deep), and the largest list/tuple/dict it looks
# into: a dataset's index lists can hold millions of items and no generator.
GENERATOR_SEARCH_DEPTH = 4
GENERATOR_SEARCH_MAX_ITEMS = 256
# Timeout of the process group fit initialises under torchrun: a rank that hangs makes the other
# ranks' next collective operation fail within this time instead of waiting forever (a rank that
# dies closes its connections, which the others notice at once). Long enough for rank 0 to evaluate
# and write a checkpoint while the others wait at a barrier; the environment variable overrides it.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
TIMEOUT_VARIABLE = "SIAMESE_TRIPLET_PG_TIMEOUT_S"  # seconds, e.g. 60 for tests of a hung rank
# fit(amp=...): the autocast dtype of each choice; "fp16" also scales the loss (torch.amp.GradScaler).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The collapse guard: fit warns when an epoch's embedding spread falls below this share of the largest
# spread of the run, at its start or at the end of an epoch (collapsed runs measured here: about 2 -> below
# 1e-3, batch-hard within its first epoch; a diverging softmax network 0.03 at the start, 170, then 0.2;
# healthy runs stay within 0.2-5x of their start and never fall far below their peak).
COLLAPSE_RATIO = 0.01
GUARD_KEYS = frozenset({"train_spread", "val_spread", "train_spread_at_start", "val_spread_at_start",
                        "train_active_fraction", "val_active_fraction"})


class EmbeddingCollapseWarning(UserWarning):
    """fit's warning that the embeddings have collapsed to nearly one point (see COLLAPSE_RATIO)."""


def flush_denormal_everywhere():
    """Turn CPU flush-to-zero of denormal floats on for this thread and for every worker thread torch
    starts after this call, unless the environment variable SIAMESE_TRIPLET_KEEP_DENORMALS is 1.

    Call it first thing in a program (the command lines do): torch's intra-op threads copy the mode
    when they start, at the first parallel operation, and keep it, so `fit`, which sets it for its
    own thread, cannot reach them (benchmarks/bench_denormal.py measures what they then cost).
    Returns True when the mode was turned on (False when opted out or the CPU lacks the mode).
    """
    if os.environ.get(KEEP_DENORMALS, "0") not in ("", "0"):
        return False
    return torch.set_flush_denormal(True)


def device_name(device):
    """What a result row says it ran on: the GPU's name for a CUDA ``device`` (e.g. "NVIDIA H200"), else
    the device type ("cpu", "mps")."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def resolve_device(device=None, cuda=None):
    """Pick the torch.device to train on.

    An explicit `device` (str or torch.device) wins; otherwise `cuda=True` means 'cuda' and
    `cuda=False` means 'cpu'; otherwise the best available of cuda, mps, cpu.
    Raises ValueError for an unknown device string or an accelerator that is not available.
    """
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0' or a torch.device, "
                            f"got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda', 'cuda:1' "
                             f"or 'mps'") from error
    elif cuda is not None:
        if not isinstance(cuda, bool):
            raise TypeError(f"cuda must be True, False or None (auto), got {cuda!r}")
        device = torch.device("cuda" if cuda else "cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but torch.cuda.is_available() is False; "
                         "pass device='cpu' (or cuda=None to choose automatically)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS was requested but torch.backends.mps.is_available() is False; "
                         "pass device='cpu' (or leave device=None to choose automatically)")
    return device


def metric_key(metric):
    """History key stem of a metric: its name() lower-cased with spaces -> underscores."""
    return str(metric.name()).strip().lower().replace(" ", "_")


def _to_device(value, device, channels_last=False):
    if isinstance(value, torch.Tensor):
        # non_blocking only overlaps copies with compute for pinned host memory -> CUDA.
        non_blocking = device.type == "cuda"
        if channels_last and value.dim() == 4:
            return value.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return value.to(device, non_blocking=non_blocking)
    return value


def _number_of_batches(loader):
    try:
        return len(loader)
    except TypeError:  # e.g. a DataLoader over an IterableDataset without __len__
        return None


def _format_metrics(metric_values):
    return "".join(f", {key} {value:.2f}" for key, value in metric_values.items())


def _batch_on_device(batch, phase, device, channels_last):
    """Split a (data, target) batch into (model inputs, loss targets), tuples of values on device.

    A tuple/list `data` holds several model inputs and a tuple/list `target` several loss
    arguments (empty: no target); anything else is one of each.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"each {phase} batch must be a (data, target) pair, "
                        f"got {type(batch).__name__}")
    data, target = batch
    data = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    targets = tuple(target) if isinstance(target, (tuple, list)) else (target,)
    return (tuple(_to_device(item, device, channels_last) for item in data),
            tuple(_to_device(item, device) for item in targets))


def _as_outputs(outputs):
    """The model's outputs as the tuple spread into the loss and handed to the metrics.

    Only a plain tuple or list is spread: a NamedTuple (e.g. networks.AutoencoderOutput) is one
    structured output that the loss takes as a single argument, so it is wrapped like a tensor.
    """
    return tuple(outputs) if type(outputs) in (tuple, list) else (outputs,)


def _finite_value(loss, what, epoch_label, batch_number):
    """The loss as a float (the one host sync per batch, for logging and this check); raises
    FloatingPointError naming `what`, the epoch and the batch when it is NaN or infinite."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{what} is {value} at {epoch_label}, batch {batch_number}; training stopped before "
            "the optimizer step (the last checkpoint on disk is unchanged). Lower the learning "
            "rate or check the data.")
    return value


def _minimised_loss(loss_outputs):
    """The tensor to minimise: the loss itself, or the first element of a tuple/list it returned."""
    loss = loss_outputs[0] if isinstance(loss_outputs, (tuple, list)) else loss_outputs
    if not isinstance(loss, torch.Tensor):
        raise TypeError("loss_fn must return a tensor, or a tuple whose first element "
                        f"is a tensor, got {type(loss).__name__}")
    return loss


class MixedPrecision:
    """How run_epoch computes: `amp` None (float32), "bf16" or "fp16" autocast on `device`'s type.

    "fp16" also scales the loss with a torch.amp.GradScaler (`scaler`), whose state fit saves in
    checkpoints: float16 gradients underflow without it. bfloat16 has float32's range and needs none.
    The losses compute distances and mine in float32 whatever the autocast (utils.float32_distances).
    """

    def __init__(self, amp, device):
        if amp is not None:
            check_choice(amp, tuple(AMP_DTYPES), "amp")
        self.amp, self.device_type = amp, torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if amp == "fp16" else None

    def autocast(self):
        """The autocast context of a forward pass (a no-op without amp)."""
        return torch.autocast(self.device_type, dtype=AMP_DTYPES.get(self.amp), enabled=self.amp is not None)

    def step(self, loss, optimizer):
        """Backpropagate `loss` and step `optimizer` (through the gradient scaler under "fp16", which
        skips the step when a gradient overflowed)."""
        optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


def run_epoch(loader, model, loss_fn, device, metrics=(), optimizer=None, *, epoch=1,
              n_epochs=None, progress=False, log_interval=100, channels_last=False, verbose=True,
              precision=None):
    """Run one pass over `loader`: a training epoch when `optimizer` is given, else evaluation.

    Training puts the model in train mode and steps the optimizer after every batch; evaluation
    puts it in eval mode and runs under torch.no_grad(). Metrics are reset first, then updated
    after every batch. `epoch` / `n_epochs` (1-based) only label the progress bar, the log lines
    and errors. With `progress=False` a line is printed every `log_interval` batches.
    `channels_last` hands 4-D inputs to the model in channels-last memory format.
    `verbose=False` shows no progress bar and prints nothing (fit's ranks other than 0).
    `precision`: a MixedPrecision (default: float32) for the forward passes and the optimizer steps.
    Returns (mean of the per-batch losses as a float, {metric key: value as a float}).
    Raises FloatingPointError on a NaN/inf loss, before the optimizer step of that batch.
    """
    training = optimizer is not None
    phase = "train" if training else "val"
    precision = MixedPrecision(None, device) if precision is None else precision
    model.train(training)
    for metric in metrics:
        metric.reset()
    n_batches = _number_of_batches(loader)
    epoch_label = f"epoch {epoch}" + (f"/{n_epochs}" if n_epochs is not None else "")
    total_loss = 0.0
    batch_count = 0

    def current_metric_values():
        return {metric_key(metric): float(metric.value()) for metric in metrics}

    # tqdm.auto's bar calls iter() on what it is given when it is built, and again when it is looped
    # over: handed the loader itself, every epoch would start (and discard) a second DataLoader
    # iterator, which advances the sampler's epoch, draws a seed from the RNG and starts the workers.
    progress = progress and verbose
    bar = tqdm(iter(loader), total=n_batches, desc=f"{epoch_label} {phase}", disable=not progress,
               dynamic_ncols=True)
    try:
        with torch.set_grad_enabled(training):
            for batch in bar:
                data, targets = _batch_on_device(batch, phase, device, channels_last)
                with precision.autocast():
                    outputs = _as_outputs(model(*data))
                    loss_outputs = loss_fn(*outputs, *targets)
                loss = _minimised_loss(loss_outputs)
                loss_value = _finite_value(loss, f"{phase} loss", epoch_label, batch_count + 1)
                if training:
                    precision.step(loss, optimizer)

                total_loss += loss_value
                batch_count += 1
                with torch.no_grad():
                    for metric in metrics:
                        metric(outputs, targets if targets else None, loss_outputs)

                if progress:
                    postfix = {"loss": f"{total_loss / batch_count:.4f}"}
                    postfix.update({key: f"{value:.2f}"
                                    for key, value in current_metric_values().items()})
                    bar.set_postfix(postfix, refresh=False)
                elif verbose and batch_count % log_interval == 0:
                    of_total = f"/{n_batches}" if n_batches is not None else ""
                    print(f"{phase} {epoch_label} [batch {batch_count}{of_total}]: "
                          f"loss {total_loss / batch_count:.6f}"
                          f"{_format_metrics(current_metric_values())}", flush=True)
    finally:
        bar.close()
    if batch_count == 0:
        raise ValueError(f"the {phase} loader yielded no batches; check its dataset and batch size")
    return total_loss / batch_count, current_metric_values()


def train_epoch(train_loader, model, loss_fn, optimizer, cuda, log_interval, metrics):
    """Classic entry point: one training epoch on `cuda` (True/False/None = auto).

    Returns (mean batch loss, metrics) like the classic function; read values with metric.value().
    """
    device = resolve_device(cuda=cuda)
    model.to(device)
    loss, _ = run_epoch(train_loader, model, loss_fn, device, metrics, optimizer,
                        progress=False, log_interval=log_interval)
    return loss, metrics


def test_epoch(val_loader, model, loss_fn, cuda, metrics):
    """Classic entry point: one evaluation epoch. Returns (mean batch loss, metrics)."""
    device = resolve_device(cuda=cuda)
    model.to(device)
    loss, _ = run_epoch(val_loader, model, loss_fn, device, metrics, progress=False)
    return loss, metrics


test_epoch.__test__ = False  # a library function, not a test, even when a test module imports it


def _set_epoch(loader, epoch_index):
    """Tell epoch-aware samplers (BalancedBatchSampler, DistributedSampler) which epoch runs."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(loader, "sampler", None)
    for candidate in (batch_sampler, None if sampler is batch_sampler else sampler):
        if callable(getattr(candidate, "set_epoch", None)):
            candidate.set_epoch(epoch_index)


def _rng_state():
    numpy_state = np.random.get_state(legacy=False)
    # The numpy key is stored as a tensor so the checkpoint loads with weights_only=True.
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


# Values the generator search never looks inside: they cannot hold a torch.Generator, or (tensors,
# arrays, sets) looking inside would be slow or in no fixed order.
_SEARCH_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, np.ndarray,
                  np.generic, torch.device, torch.dtype, type, set, frozenset, types.ModuleType,
                  types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _default_generators():
    """The global generators whose states _rng_state already saves."""
    defaults = [torch.default_generator]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        defaults.extend(torch.cuda.default_generators)
    return defaults


def _search_children(value):
    """(name, child) pairs the generator search looks at below `value`, in a fixed order."""
    if isinstance(value, (dict, list, tuple)) and len(value) > GENERATOR_SEARCH_MAX_ITEMS:
        return []
    if isinstance(value, dict):
        return [(str(key), child) for key, child in value.items()]
    if isinstance(value, (list, tuple)):
        return [(str(index), child) for index, child in enumerate(value)]
    try:
        attributes = vars(value)
    except TypeError:  # no __dict__ (e.g. __slots__ or a C type)
        return []
    if isinstance(value, nn.Module):
        # Submodules live in _modules; the other private entries are parameters, buffers, hooks.
        return list(value.named_children()) + [
            (name, child) for name, child in attributes.items() if not name.startswith("_")]
    return list(attributes.items())


def find_generators(roots):
    """Every private torch.Generator reachable from the values of `roots`, a {name: object} dict.

    Walks breadth-first, in attribute order, through instance attributes (vars()), nn.Module
    submodules and the items of small lists, tuples and dicts, at most GENERATOR_SEARCH_DEPTH
    steps below a root, visiting every object once. Skips iterators (e.g. a DataLoader's running
    iterator, which exists only while an epoch runs) and torch's default generators (saved with
    the global RNG state). Returns {dotted path of the first, shortest path found: generator},
    e.g. {'train_loader.generator': g, 'loss_fn.triplet_selector.generator': h}; objects built
    the same way give the same paths.
    """
    defaults = _default_generators()
    found, seen = {}, set()
    queue = collections.deque((name, root, 0) for name, root in roots.items())
    while queue:
        path, value, depth = queue.popleft()
        if id(value) in seen or isinstance(value, _SEARCH_LEAVES):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Generator):
            if not any(value is default for default in defaults):
                found[path] = value
        elif depth < GENERATOR_SEARCH_DEPTH and not isinstance(value, Iterator):
            queue.extend((f"{path}.{name}", child, depth + 1)
                         for name, child in _search_children(value))
    return found


def _generator_states(generators):
    return {path: generator.get_state() for path, generator in generators.items()}


def _check_generator_paths(states, generators, path):
    """Raise ValueError unless a checkpoint's generator states (read from `path`) are for exactly
    the private generators of this run."""
    if states.keys() != generators.keys():
        raise ValueError(
            f"checkpoint {path!r} holds the states of private torch.Generators at "
            f"{sorted(states) or 'no paths'}, but this run's loaders and loss hold them at "
            f"{sorted(generators) or 'no paths'}: the run was built differently. Build the "
            "loaders, samplers and loss as the run that wrote the checkpoint did (each with or "
            "without its own generator), or pass resume=False to start over")


def _save_checkpoint(checkpoint_dir, checkpoint):
    """Write checkpoint_dir/checkpoint.pt atomically (utils.atomic_write), so a crash mid-write never
    leaves a truncated checkpoint behind."""
    with atomic_write(os.path.join(checkpoint_dir, CHECKPOINT_NAME)) as file:
        torch.save(checkpoint, file)


def _checkpoint(checkpoint_dir, epoch, model, optimizer, scheduler, history, generators, grad_scaler=None):
    """Save everything a resumed run needs after `epoch` (1-based) epochs: see fit."""
    _save_checkpoint(checkpoint_dir, {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": history,
        "rng": _rng_state(),
        "generators": _generator_states(generators),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
    })


def _load_checkpoint(path, history_keys, scheduler):
    """Read a checkpoint written by fit from `path` and check that it suits this run.

    Takes the history keys of this run (its metrics) and its scheduler (or None). Returns the
    checkpoint dict. Raises ValueError when the file is not a readable checkpoint written by fit
    (truncated, garbage, another kind of file) or was written with other metrics or scheduler.
    """
    # Opened here so that a file we may not read fails as itself (PermissionError, ...), while
    # anything torch.load raises is about the bytes in it.
    with open(path, "rb") as file:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as error:
            # torch reports a truncated file as "PytorchStreamReader failed reading zip archive"
            # or an OSError, other bytes as EOFError, UnpicklingError, IndexError, ...: none names
            # the file or says what to do.
            said = (str(error).splitlines() or [type(error).__name__])[0][:200]
            raise ValueError(
                f"{path!r} is not a readable checkpoint written by trainer.fit (it may be "
                "truncated or corrupt); delete it, or pass resume=False (experiments.py: --fresh) "
                f"to start over. torch.load said: {said}") from error
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise ValueError(f"{path!r} is not a checkpoint written by trainer.fit")
    written = checkpoint["history"]
    if history_keys - written.keys() <= GUARD_KEYS and written.keys() <= history_keys:
        # written before fit's collapse guard: its epochs have no spread or active fraction
        for key in history_keys - written.keys():
            written[key] = [math.nan] * len(written["epoch"])
    if written.keys() != history_keys:
        raise ValueError(f"the checkpoint was written with history keys "
                         f"{sorted(checkpoint['history'])}; resume with the same metrics "
                         f"(got {sorted(history_keys)})")
    if (checkpoint["scheduler"] is None) != (scheduler is None):
        written = "without" if scheduler is not None else "with"
        raise ValueError(f"the checkpoint was written {written} a scheduler; resume with the "
                         "same kind of scheduler")
    return checkpoint


def _restore(checkpoint, path, model, optimizer, scheduler, generators, grad_scaler=None):
    """Put the model, optimizer, scheduler, global RNGs, private generators and the gradient scaler
    (fp16 amp; when the checkpoint has one) in the states of `checkpoint` (read from `path`).
    Returns (history so far, epochs done)."""
    states = checkpoint.get("generators")
    if states is None:  # written before fit saved private generators: restore none
        states = {}
    else:  # checked before anything changes, so a mismatch leaves the run's objects untouched
        _check_generator_paths(states, generators, path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    _set_rng_state(checkpoint["rng"])
    for name, state in states.items():
        generators[name].set_state(state)
    if grad_scaler is not None and checkpoint.get("grad_scaler") is not None:
        grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    return checkpoint["history"], checkpoint["epoch"]


def _check_loader(loader, what):
    if not isinstance(loader, Iterable):
        raise TypeError(f"{what} must be an iterable of (data, target) batches such as a "
                        f"DataLoader, got {type(loader).__name__}")
    if isinstance(loader, Iterator):
        raise TypeError(f"{what} is a one-shot iterator that would be empty after the first "
                        "epoch; pass a re-iterable object such as a DataLoader or a list")


def _check_path(value, what):
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    return os.fspath(value)


def _check_training_objects(train_loader, val_loader, model, loss_fn, optimizer, scheduler):
    """Raise TypeError/ValueError unless fit's loaders, model, loss, optimizer and scheduler have
    the right kinds (duck-typed where the library accepts look-alikes)."""
    _check_loader(train_loader, "train_loader")
    if val_loader is not None:
        _check_loader(val_loader, "val_loader")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not hasattr(optimizer, "param_groups") or not all(
            callable(getattr(optimizer, method, None))
            for method in ("step", "zero_grad", "state_dict", "load_state_dict")):
        raise TypeError("optimizer must be a torch.optim.Optimizer (built on the model's "
                        f"parameters), got {type(optimizer).__name__}")
    if scheduler is not None:
        if not all(callable(getattr(scheduler, method, None))
                   for method in ("step", "state_dict", "load_state_dict")):
            raise TypeError("scheduler must be a torch.optim.lr_scheduler scheduler or None, "
                            f"got {type(scheduler).__name__}")
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("scheduler was built for a different optimizer; build it on the "
                             "optimizer passed to fit")


def _check_metrics(metrics):
    """fit's `metrics` (None or a list/tuple of Metric) -> (tuple of them, their history keys)."""
    if metrics is None:
        metrics = ()
    if isinstance(metrics, Metric) or not isinstance(metrics, (list, tuple)):
        raise TypeError("metrics must be a list of Metric instances (wrap a single metric in a "
                        f"list), got {type(metrics).__name__}")
    for metric in metrics:
        if not isinstance(metric, Metric):
            raise TypeError("every metric must be a metrics.Metric instance (e.g. "
                            f"AccumulatedAccuracyMetric()), got {type(metric).__name__}")
    keys = [metric_key(metric) for metric in metrics]
    if len(set(keys)) != len(keys) or "loss" in keys:
        raise ValueError(f"metric names must be distinct and not 'loss', got {keys}")
    return tuple(metrics), keys


def _check_fit_arguments(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs,
                         log_interval, metrics, start_epoch, flags, checkpoint_dir):
    """Check fit's arguments, in the order of its signature, raising TypeError/ValueError naming
    the argument. `flags` maps the names of fit's boolean options to their values.
    Returns (metrics as a tuple, their history keys, checkpoint_dir as a str or None)."""
    _check_training_objects(train_loader, val_loader, model, loss_fn, optimizer, scheduler)
    check_int(n_epochs, "n_epochs", 0)
    check_int(log_interval, "log_interval", 1)
    check_int(start_epoch, "start_epoch", 0)
    if start_epoch > n_epochs:
        raise ValueError(f"start_epoch ({start_epoch}) is larger than n_epochs ({n_epochs}); "
                         "n_epochs is the total number of epochs, not the number still to run")
    metrics, keys = _check_metrics(metrics)
    for name, value in flags.items():
        check_flag(value, name)
    if checkpoint_dir is not None:
        checkpoint_dir = _check_path(checkpoint_dir, "checkpoint_dir")
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} exists and is not a directory")
    return metrics, keys, checkpoint_dir


def _resume_path(checkpoint_dir, resume):
    """The checkpoint file fit resumes from, or None to start afresh.

    `resume=False`: None. `resume=True`: checkpoint_dir/checkpoint.pt when it exists, else None
    (the first run of a restartable job); ValueError without checkpoint_dir. A path: that file, or
    that directory's checkpoint.pt; FileNotFoundError when it does not exist.
    """
    if isinstance(resume, bool):
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass resume=<checkpoint path>)")
        resume_path = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if resume else None
        return resume_path if resume_path is not None and os.path.exists(resume_path) else None
    resume_path = _check_path(resume, "resume")
    if os.path.isdir(resume_path):
        resume_path = os.path.join(resume_path, CHECKPOINT_NAME)
    if not os.path.isfile(resume_path):
        raise FileNotFoundError(f"resume checkpoint {resume_path!r} does not exist")
    return resume_path


def _fast_forward(scheduler, start_epoch):
    """Classic behaviour of start_epoch: replay the schedule of the epochs done elsewhere."""
    # No optimizer step precedes these scheduler steps on purpose, so PyTorch's order warning
    # does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        for _ in range(start_epoch):
            scheduler.step()


def _step_scheduler(scheduler, monitored_loss):
    """One scheduler step after an epoch; ReduceLROnPlateau watches `monitored_loss`."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored_loss)
    elif scheduler is not None:
        scheduler.step()


def _empty_history(keys):
    history = {"epoch": [], "train_loss": [], "val_loss": [], "lr": [], "seconds": []}
    for key in keys:
        history[f"train_{key}"] = []
        history[f"val_{key}"] = []
    return history


def _record_epoch(history, epoch, n_epochs, train, val, lr, seconds, progress, verbose=True):
    """Append one epoch to `history` and, without progress bars (and with `verbose`), print its
    summary line.
    `train` and `val` are run_epoch's (loss, {metric key: value}); val's loss may be None."""
    (train_loss, train_metrics), (val_loss, val_metrics) = train, val
    history["epoch"].append(epoch)
    history["train_loss"].append(train_loss)
    history["val_loss"].append(val_loss)
    history["lr"].append(lr)
    history["seconds"].append(seconds)
    for key, value in train_metrics.items():
        history[f"train_{key}"].append(value)
        history[f"val_{key}"].append(val_metrics[key])
    if verbose and not progress:
        line = f"Epoch {epoch}/{n_epochs}: train loss {train_loss:.4f}"
        line += _format_metrics(train_metrics)
        if val_loss is not None:
            line += f" | val loss {val_loss:.4f}{_format_metrics(val_metrics)}"
        print(f"{line} | lr {lr:.3g} | {seconds:.1f} s", flush=True)


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


def process_group_timeout():
    """The timeout of the process group fit initialises: PROCESS_GROUP_TIMEOUT, or the seconds given
    by the environment variable SIAMESE_TRIPLET_PG_TIMEOUT_S."""
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


def _distributed_setup(device):
    """(is_distributed, rank, world_size) for fit.

    Initialises the default process group when the environment has WORLD_SIZE > 1 and none is
    initialised yet: backend "nccl" for a CUDA `device`, else "gloo", from torchrun's environment
    variables (env:// rendezvous), timeout `process_group_timeout()`. A group already initialised (by
    the caller) is used as it is. (False, 0, 1) when there is no group of more than one process.
    """
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


def setup_distributed(device=None, cuda=None):
    """This process's device and place among the processes: ``(device, rank, world_size)``.

    Takes `device` / `cuda` as fit does (resolve_device). Under torchrun (WORLD_SIZE > 1) it
    initialises the default process group as fit would (see `_distributed_setup`), and a CUDA device
    becomes cuda:LOCAL_RANK; call it before building the loaders, so that DistributedBalancedBatchSampler
    and DistributedSampler find the group. One process: ``(device, 0, 1)`` and nothing initialised.
    """
    device = _distributed_device(resolve_device(device, cuda))
    _, rank, world_size = _distributed_setup(device)
    return device, rank, world_size


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


def close_distributed():
    """Destroy the default process group, if there is one (a program's last step under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_failure(error):
    """True when `error` is a collective operation failing because another process died or hung."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    said = str(error).lower()
    return any(word in said for word in ("gloo", "nccl", "connection", "timed out"))


def _stopped_by_another_rank(error, epoch, checkpoint_dir):
    """The RuntimeError fit raises instead of a collective operation's failure: what happened, what
    was kept, and how to resume."""
    kept = (f"the last checkpoint is {os.path.join(checkpoint_dir, CHECKPOINT_NAME)}" if checkpoint_dir
            else "no checkpoint_dir was given, so nothing was kept")
    return RuntimeError(
        f"rank {dist.get_rank()} of {dist.get_world_size()} stopped in epoch {epoch}: a collective "
        "operation failed, so another process died (killed, out of memory, an exception: see its log) "
        f"or hung for longer than the process-group timeout ({process_group_timeout()}; "
        f"{TIMEOUT_VARIABLE} sets it). {kept}; run the same command again to resume from it. "
        f"torch.distributed said: {str(error).splitlines()[0][:300] if str(error) else type(error).__name__}")


def fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, cuda=None,
        log_interval=100, metrics=(), start_epoch=0, *, device=None, progress=True,
        checkpoint_dir=None, resume=False, channels_last=False, flush_denormal=True, amp=None,
        compile=False, collapse_guard=True):
    """Train `model` for epochs start_epoch+1 .. n_epochs, validating after each epoch.

    Takes loaders of (data, target) batches (`val_loader` may be None), an nn.Module, a loss
    callable, an optimizer over the model's parameters, an optional LR scheduler, `n_epochs` =
    total number of epochs, and a list of `Metric` instances. The scheduler is stepped once after
    each epoch's optimizer steps (never per batch); ReduceLROnPlateau gets the validation loss, or
    the training loss without a validation loader. `start_epoch` = epochs already done: the
    scheduler is fast-forwarded that many steps.

    Device: explicit `device` wins, else `cuda` True/False, else auto (cuda, mps, cpu).
    `progress=False` replaces the tqdm bars by a printed line every `log_interval` batches and
    one per epoch. `channels_last=True` puts the model's weights and the 4-D inputs in
    channels-last memory format, which convolutions and pooling run faster in on CPUs with oneDNN
    (same results up to float rounding; see benchmarks/bench_epoch.py).
    `flush_denormal=True` (training on a CPU) turns on flush-to-zero of denormal floats for the
    thread that calls fit (`torch.set_flush_denormal(True)`, a per-thread mode, left on when fit
    returns); importing this module does not touch it. As weights settle, activations and
    gradients below 1.2e-38 appear, and every operation on such denormal floats costs the CPU many
    cycles: measured here, EmbeddingNet epochs on Fashion-MNIST slowed from 14 s to 30 s over 20
    epochs without it and stayed at 14 s with it, at the same accuracy. Worker threads that torch
    started for its intra-op pool before fit keep their own mode, so the share of an operation
    they run still pays for denormals (benchmarks/bench_denormal.py measures it); for the full
    effect a program calls `flush_denormal_everywhere()` before torch's first parallel operation,
    as the command lines do. `flush_denormal=False` opts out: fit leaves the mode as it is.

    `checkpoint_dir`: after every epoch, atomically writes checkpoint_dir/checkpoint.pt holding the
    model, optimizer and scheduler states, the epoch count, the history, the torch (CPU and
    CUDA), numpy and python RNG states, and the state of every private torch.Generator that
    `find_generators` reaches from train_loader, val_loader and loss_fn (a DataLoader's or
    sampler's `generator`, a triplet selector's `generator`, ...), keyed by attribute path.
    `resume=True` continues from checkpoint_dir/checkpoint.pt when it exists (otherwise starts
    normally); `resume=<path>` continues from that file (or that directory's checkpoint.pt). The
    checkpoint's epoch count then replaces `start_epoch`. A resumed run replays exactly the
    batches and updates of an uninterrupted one, provided its loaders and loss are built the same
    way and draw their randomness from the global RNGs, from generators kept in their attributes,
    or from samplers with set_epoch (called with the 0-based epoch index before every epoch).
    Resuming raises ValueError when the file is truncated or not a checkpoint of fit, when it was
    written with other metrics or another kind of scheduler, or when its private generators are
    at other attribute paths than this run's (the run was built differently); a checkpoint from
    before generators were saved resumes with this run's generators as they are.

    Several processes: run under torchrun (WORLD_SIZE > 1 in the environment), fit initialises the
    default torch.distributed process group unless one is initialised already (backend "nccl" when
    the device is CUDA, else "gloo"; timeout `process_group_timeout()`, so a dead rank makes the others
    fail within that time) and leaves it initialised when it returns. On CUDA the device becomes
    cuda:LOCAL_RANK. Training runs the model wrapped in DistributedDataParallel (gradients averaged
    over the ranks, validation on the plain model); `model` itself holds the trained weights, and
    checkpoints store its state_dict, so a single process can resume from them. fit does not shard
    the data: each rank's loaders must yield that rank's share, e.g. with
    datasets.DistributedBalancedBatchSampler (built with num_replicas / rank from the environment
    when the group does not exist yet) or torch's DistributedSampler; a plain DataLoader with a
    RandomSampler / SequentialSampler gives every rank the whole dataset. Only rank 0 prints, shows
    progress bars and writes checkpoints, followed by a barrier so that no rank runs ahead of the
    write; every rank reads the checkpoint on resume (a file system all ranks see). The logged
    losses are what loss_fn returns on each rank (the online losses return the global batch's
    mean); rank 0 logs its own values, and every rank returns its own history. A script that calls
    fit under torchrun should end with `close_distributed()` (gloo can abort a process that exits
    with its group still open).
    Faults: when another rank dies (killed, out of memory, an exception) or hangs, the collective
    operation waiting for it fails, at once for a dead rank and within the process-group timeout
    (`process_group_timeout()`, 10 minutes unless SIAMESE_TRIPLET_PG_TIMEOUT_S says otherwise) for a
    hung one, and fit raises a RuntimeError saying so and naming the last checkpoint; running the same
    command again (resume=True) continues from it. (torchrun also stops the other ranks as soon as
    one fails.)

    Accelerators: `amp` None (float32, the default), "bf16" (bfloat16 autocast) or "fp16" (float16
    autocast with a torch.amp.GradScaler, saved in checkpoints and restored on resume) runs the
    forward passes in mixed precision (MixedPrecision), on CUDA and on CPUs alike; the library's losses
    still compute distances and mine in float32. `compile=True` trains through torch.compile(model)
    (after the DistributedDataParallel wrap; validation runs the plain model); the first batches then
    take longer while it compiles.

    Collapse guard (`collapse_guard=True`, the default): fit adds two metrics.EmbeddingSpreadMetric (the
    embeddings' spread, the root mean square distance between two items of a batch, from the first
    model output or an AutoencoderOutput's mean) and, for a loss that reports its selections (the
    online losses' `last_selection`), metrics.ActiveFractionMetric (the share of mined pairs or
    triplets with a non-zero loss) to the metrics, so the history, the progress bar and the log lines
    show 'spread' (of the epoch's last batch), 'spread_at_start' (of its first batch) and
    'active_fraction' for training and validation; and it warns once, with an EmbeddingCollapseWarning
    saying what to try, when an epoch's training spread falls below COLLAPSE_RATIO of the largest spread
    of the run: the one it started from (the first epoch's first batch, before any step) or an earlier
    epoch's (a run that grew its embeddings before shrinking them). A checkpoint written before the guard
    existed resumes with NaN for those keys in its epochs. `collapse_guard=False` adds nothing.

    Returns the history: a dict of per-epoch lists, 'epoch' (1-based), 'train_loss', 'val_loss'
    (None without val_loader), 'lr' (of the first param group, as used during the epoch),
    'seconds', and 'train_<metric>' / 'val_<metric>' per metric. A resumed run returns the full
    history, including the epochs before the checkpoint.
    Raises FloatingPointError on a NaN/inf loss (before that batch's optimizer step).
    """
    metrics, keys, checkpoint_dir = _check_fit_arguments(
        train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, log_interval,
        metrics, start_epoch, {"channels_last": channels_last, "progress": progress,
                               "flush_denormal": flush_denormal, "compile": compile,
                               "collapse_guard": collapse_guard}, checkpoint_dir)
    if collapse_guard:
        metrics, keys = _with_guard_metrics(metrics, keys, loss_fn)
    warned = False
    resume_path = _resume_path(checkpoint_dir, resume)
    device, _, _ = setup_distributed(device, cuda)
    distributed, writer = _is_distributed(), is_main_process()
    precision = MixedPrecision(amp, device)

    if flush_denormal and device.type == "cpu":
        torch.set_flush_denormal(True)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    history = _empty_history(keys)
    generators = find_generators({"train_loader": train_loader, "val_loader": val_loader,
                                  "loss_fn": loss_fn})
    if resume_path is not None:
        checkpoint = _load_checkpoint(resume_path, history.keys(), scheduler)
        history, start_epoch = _restore(checkpoint, resume_path, model, optimizer, scheduler,
                                        generators, precision.scaler)
    elif start_epoch > 0 and scheduler is not None and not isinstance(
            scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        _fast_forward(scheduler, start_epoch)
    if checkpoint_dir is not None and writer:
        os.makedirs(checkpoint_dir, exist_ok=True)
    train_model = _training_model(model, device, distributed, compile)

    for epoch_index in range(start_epoch, n_epochs):
        with _collective_failures_explained(epoch_index + 1, checkpoint_dir):
            started = time.perf_counter()
            lr = float(optimizer.param_groups[0]["lr"])
            options = {"epoch": epoch_index + 1, "n_epochs": n_epochs, "progress": progress,
                       "log_interval": log_interval, "channels_last": channels_last,
                       "verbose": writer, "precision": precision}
            _set_epoch(train_loader, epoch_index)
            train = run_epoch(train_loader, train_model, loss_fn, device, metrics, optimizer,
                              **options)
            val = (None, dict.fromkeys(keys))
            if val_loader is not None:
                _set_epoch(val_loader, epoch_index)
                val = run_epoch(val_loader, model, loss_fn, device, metrics, **options)
            _step_scheduler(scheduler, val[0] if val[0] is not None else train[0])
            _record_epoch(history, epoch_index + 1, n_epochs, train, val, lr,
                          time.perf_counter() - started, progress, verbose=writer)
            if collapse_guard and writer and not warned:
                warned = _warn_if_collapsed(history)
            if checkpoint_dir is not None:
                if writer:
                    _checkpoint(checkpoint_dir, epoch_index + 1, model, optimizer, scheduler,
                                history, generators, precision.scaler)
                barrier()
    return history


def _with_guard_metrics(metrics, keys, loss_fn):
    """fit's metrics and history keys with the collapse guard's: EmbeddingSpreadMetric, and
    ActiveFractionMetric for a loss that reports its selections (``last_selection``), unless the
    caller passed them already."""
    added = []
    for at_start in (False, True):
        if not any(isinstance(metric, EmbeddingSpreadMetric) and metric.at_start == at_start for metric in metrics):
            added.append(EmbeddingSpreadMetric(at_start=at_start))
    if hasattr(loss_fn, "last_selection") and not any(isinstance(metric, ActiveFractionMetric)
                                                      for metric in metrics):
        added.append(ActiveFractionMetric(loss_fn))
    new_keys = [metric_key(metric) for metric in added]
    if set(new_keys) & set(keys):
        raise ValueError(f"metric names {sorted(set(new_keys) & set(keys))} are the collapse guard's; rename "
                         "yours or pass collapse_guard=False")
    return tuple(metrics) + tuple(added), list(keys) + new_keys


def _warn_if_collapsed(history):
    """Warn (EmbeddingCollapseWarning) when the last epoch's embedding spread is below COLLAPSE_RATIO of
    the largest spread of the run: the spread it started from (its first batch, before any training step)
    or an earlier epoch's, so that a run which grew its embeddings and then shrank them is caught too.
    Returns True when it warned."""
    spreads, starts = history.get("train_spread") or [], history.get("train_spread_at_start") or []
    start = next((value for value in starts if math.isfinite(value)), math.nan)  # NaN: resumed from before the guard
    if not spreads or not start > 0:
        return False
    earlier = [value for value in spreads[:-1] if math.isfinite(value)]
    peak = max([start] + earlier)
    if not spreads[-1] < COLLAPSE_RATIO * peak:  # also False for NaN
        return False
    active = (history.get("train_active_fraction") or [math.nan])[-1]
    active_text = "" if not math.isfinite(active) else f", and {active:.0%} of the mined pairs or triplets are active"
    warnings.warn(
        f"the embeddings collapsed: in epoch {history['epoch'][-1]} their spread (root mean square distance "
        f"between two items of a batch) was {spreads[-1]:.3g}, {spreads[-1] / peak:.2%} of the {peak:.3g} "
        f"{'the run started from' if peak == start else 'it reached before'}{active_text}. Every item is "
        "mapped to nearly one point, where the loss sits at the margin and retrieval is random. Try what made "
        "every selector of the study train (experiments.RECIPES; README, Recipes): a BatchNorm at the "
        "embedding (EmbeddingNet(batch_norm=True)), which keeps a batch from shrinking to a point, and for "
        "the hardest selectors the loss of an easier one added (OnlineTripletLoss(..., "
        "easy_selector=RandomNegativeTripletSelector(margin))).",
        EmbeddingCollapseWarning,
        stacklevel=3)
    return True


def _training_model(model, device, distributed, compile):
    """What fit's training epochs call: `model`, wrapped in DistributedDataParallel across several
    processes, then compiled (torch.compile) with `compile`. `model` itself keeps the weights, so
    validation, checkpoints and the caller use it unwrapped."""
    train_model = model
    if distributed and not isinstance(model, DistributedDataParallel):
        # Built after the resume, so rank 0's (identical) restored weights are what it broadcasts.
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(train_model) if compile else train_model


@contextlib.contextmanager
def _collective_failures_explained(epoch, checkpoint_dir):
    """Turn a collective operation's failure inside the block (another rank died or hung) into
    `_stopped_by_another_rank`'s RuntimeError; every other error passes unchanged."""
    try:
        yield
    except RuntimeError as error:
        if not _is_distributed() or not _collective_failure(error):
            raise
        raise _stopped_by_another_rank(error, epoch, checkpoint_dir) from error
