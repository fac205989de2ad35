"""The training loop: ``fit`` and ``run_epoch``, the device and mixed precision, the collapse guard.

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
bit for bit (checkpoints.py: what they hold, the exact-resume contract). `run_epoch` is the single
loop behind both training and validation epochs. Several processes (torchrun): distributed.py.

Device and flush-to-zero. `resolve_device` picks the device (an explicit one, else `cuda` True/False,
else the best of cuda, mps, cpu). As weights settle, activations and gradients below 1.2e-38 appear,
and every operation on such denormal floats costs the CPU many cycles: measured here, EmbeddingNet
epochs on Fashion-MNIST slowed from 14 s to 30 s over 20 epochs without flush-to-zero and stayed at
14 s with it, at the same accuracy. Importing this module changes no process-wide state. Flush-to-zero
is a per-thread mode: `fit` turns it on for the thread that calls it (`flush_denormal=True`, the
default, on a CPU; left on when fit returns; `flush_denormal=False` leaves the mode alone), and torch's
worker threads copy it only when they start, at torch's first parallel operation, so the share of an
operation they run still pays for denormals (benchmarks/bench_denormal.py measures it). The one place
that sets it for the whole process is `flush_denormal_everywhere`, which the command lines call before
any work; setting the environment variable SIAMESE_TRIPLET_KEEP_DENORMALS=1 turns that off.
`channels_last=True` puts the model's weights and the 4-D inputs in channels-last memory format, which
convolutions and pooling run faster in on CPUs with oneDNN (same results up to float rounding;
benchmarks/bench_epoch.py).

Mixed precision and compilation: `fit(..., amp="bf16" | "fp16", compile=True)`. "bf16" runs the forward
passes under bfloat16 autocast, "fp16" under float16 autocast with a torch.amp.GradScaler (saved in
checkpoints and restored on resume), on CUDA and on CPUs alike (`MixedPrecision`); the library's losses
still compute distances and mine in float32. `compile=True` trains through torch.compile(model) (after
the DistributedDataParallel wrap; validation runs the plain model); the first batches then take longer.

The collapse guard (`collapse_guard=True`, the default): fit adds two metrics.EmbeddingSpreadMetric (the
embeddings' spread, the root mean square distance between two items of a batch, from the first model
output or an AutoencoderOutput's mean) and, for a loss that reports its selections (the online losses'
`last_selection`), metrics.ActiveFractionMetric (the share of mined pairs or triplets with a non-zero
loss), so the history, the progress bar and the log lines show 'spread' (of the epoch's last batch),
'spread_at_start' (of its first batch) and 'active_fraction' for training and validation; and it warns
once, with an EmbeddingCollapseWarning saying what to try, when an epoch's training spread falls below
COLLAPSE_RATIO of the largest spread of the run: the one it started from (the first epoch's first batch,
before any step) or an earlier epoch's (a run that grew its embeddings before shrinking them). A
checkpoint written without the guard resumes with NaN for those keys in its epochs (checkpoints.py).
`collapse_guard=False` adds nothing.
"""

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import checkpoints
import distributed
from metrics import ActiveFractionMetric, EmbeddingSpreadMetric, Metric
from utils import check_choice, check_flag, check_int, moved_attribute

KEEP_DENORMALS = "SIAMESE_TRIPLET_KEEP_DENORMALS"  # =1: flush_denormal_everywhere leaves the mode alone
# fit(amp=...): the autocast dtype of each choice; "fp16" also scales the loss (torch.amp.GradScaler).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The collapse guard: fit warns when an epoch's embedding spread falls below this share of the largest spread
# of the run, at its start or at the end of an epoch (collapsed runs measured here: about 2 -> below 1e-3,
# batch-hard within its first epoch; a diverging softmax network 0.03 at the start, 170, then 0.2; healthy
# runs stay within 0.2-5x of their start and never fall far below their peak).
COLLAPSE_RATIO = 0.01


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


def setup_distributed(device=None, cuda=None):
    """This process's device and place among the processes: ``(device, rank, world_size)``.

    Takes `device` / `cuda` as fit does (`resolve_device`), then joins the process group under torchrun
    (``distributed.setup``: WORLD_SIZE > 1 in the environment; a CUDA device becomes cuda:LOCAL_RANK). Call
    it before building the loaders, so that DistributedBalancedBatchSampler and DistributedSampler find the
    group. One process: ``(device, 0, 1)`` and nothing initialised.
    """
    return distributed.setup(resolve_device(device, cuda))


# ---------------------------------------------------------------------------------------------------
# One epoch, and the classic entry points


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
    The losses compute distances and mine in float32 whatever the autocast (distances.float32_distances).
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


# ---------------------------------------------------------------------------------------------------
# fit


def fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, cuda=None,
        log_interval=100, metrics=(), start_epoch=0, *, device=None, progress=True,
        checkpoint_dir=None, resume=False, channels_last=False, flush_denormal=True, amp=None,
        compile=False, collapse_guard=True):
    """Train `model` for epochs start_epoch+1 .. n_epochs, validating after each epoch; returns the history.

    Takes loaders of (data, target) batches (`val_loader` may be None; the conventions: module docstring),
    an nn.Module, a loss callable, an optimizer over the model's parameters, an optional LR scheduler
    (stepped once after each epoch's optimizer steps; ReduceLROnPlateau gets the validation loss, else the
    training loss), `n_epochs` = total number of epochs, a list of `Metric` instances, and `start_epoch` =
    epochs already done (the scheduler is fast-forwarded that many steps). Options, one line each:

    - `cuda`, `device`: where to train (`resolve_device`); under torchrun cuda:LOCAL_RANK (distributed.py).
    - `log_interval`: without progress bars, a printed line every that many batches (and one per epoch).
    - `progress`: tqdm progress bars (on stderr) instead of the printed lines.
    - `checkpoint_dir`: write checkpoint_dir/checkpoint.pt after every epoch (checkpoints.py: what it holds).
    - `resume`: True or a checkpoint path: continue exactly where it stopped (checkpoints.py: the contract).
    - `channels_last`: the weights and 4-D inputs in channels-last memory format (module docstring).
    - `flush_denormal`: CPU flush-to-zero of denormal floats for this thread (module docstring).
    - `amp`: None (float32), "bf16" or "fp16" mixed precision (`MixedPrecision`).
    - `compile`: train through torch.compile(model); validation runs the plain model.
    - `collapse_guard`: record the spread and warn (EmbeddingCollapseWarning) on a collapse (module docstring).

    Several processes (torchrun, WORLD_SIZE > 1): fit sets up the process group, trains through
    DistributedDataParallel, and only rank 0 prints and writes checkpoints; each rank must be fed its own
    share of the data, and a rank that dies or hangs stops the others with a RuntimeError (distributed.py).
    Returns the history: per-epoch lists 'epoch' (1-based), 'train_loss', 'val_loss' (None without
    val_loader), 'lr' (of the first param group, as used during the epoch), 'seconds', and 'train_<metric>' /
    'val_<metric>' per metric; a resumed run's includes the epochs before its checkpoint.
    Raises FloatingPointError on a NaN/inf loss (before that batch's optimizer step).
    """
    metrics, keys, checkpoint_dir = _check_fit_arguments(
        train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, log_interval,
        metrics, start_epoch, {"channels_last": channels_last, "progress": progress,
                               "flush_denormal": flush_denormal, "compile": compile,
                               "collapse_guard": collapse_guard}, checkpoint_dir)
    metrics, keys = _with_guard_metrics(metrics, keys, loss_fn) if collapse_guard else (metrics, keys)
    resume_from = checkpoints.resume_path(checkpoint_dir, resume)
    device, _, _ = setup_distributed(device, cuda)
    writer, precision = distributed.is_main_process(), MixedPrecision(amp, device)
    _place_model(model, device, channels_last, flush_denormal)
    generators = checkpoints.find_generators({"train_loader": train_loader, "val_loader": val_loader,
                                              "loss_fn": loss_fn})
    history, start_epoch = _starting_point(resume_from, keys, start_epoch, model, optimizer, scheduler,
                                           generators, precision.scaler, loss_fn)
    if checkpoint_dir is not None and writer:
        os.makedirs(checkpoint_dir, exist_ok=True)
    models = (_training_model(model, device, compile), model)
    options = {"n_epochs": n_epochs, "progress": progress, "log_interval": log_interval,
               "channels_last": channels_last, "verbose": writer, "precision": precision}
    warned, kept = False, checkpoints.checkpoint_path(checkpoint_dir)
    for epoch_index in range(start_epoch, n_epochs):
        with distributed.collective_failures_explained(epoch_index + 1, kept):
            _fit_epoch(history, epoch_index, (train_loader, val_loader), models, loss_fn, optimizer,
                       scheduler, metrics, device, options)
            if collapse_guard and writer and not warned:
                warned = _warn_if_collapsed(history)
            if checkpoint_dir is not None:
                if writer:
                    checkpoints.save_checkpoint(checkpoint_dir, epoch_index + 1, model, optimizer, scheduler,
                                                history, generators, precision.scaler, loss_fn)
                distributed.barrier()
    return history


def _place_model(model, device, channels_last, flush_denormal):
    """fit's set-up of the computation: flush-to-zero for this thread (a CPU `device`, with
    `flush_denormal`), the model moved to `device`, in channels-last memory format with `channels_last`."""
    if flush_denormal and device.type == "cpu":
        torch.set_flush_denormal(True)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)


def _starting_point(resume_from, keys, start_epoch, model, optimizer, scheduler, generators, grad_scaler, loss_fn):
    """``(history so far, epochs done)`` of a fit: read from the checkpoint `resume_from` (every state of
    the run restored from it, checkpoints.py), or an empty history and `start_epoch`, the scheduler then
    fast-forwarded that many steps (the classic start_epoch)."""
    history = _empty_history(keys)
    if resume_from is not None:
        checkpoint = checkpoints.load_checkpoint(resume_from, history.keys(), scheduler)
        return checkpoints.restore_checkpoint(checkpoint, resume_from, model, optimizer, scheduler, generators,
                                              grad_scaler, loss_fn)
    if start_epoch > 0 and scheduler is not None and not isinstance(
            scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        _fast_forward(scheduler, start_epoch)
    return history, start_epoch


def _fit_epoch(history, epoch_index, loaders, models, loss_fn, optimizer, scheduler, metrics, device, options):
    """One epoch of fit (0-based `epoch_index`): the training pass over ``loaders[0]`` through the training
    model ``models[0]``, validation over ``loaders[1]`` (if any) on the plain model ``models[1]``, the
    scheduler's step, and the epoch appended to `history` (and printed). `options`: run_epoch's."""
    (train_loader, val_loader), (train_model, model) = loaders, models
    started = time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])
    options = {"epoch": epoch_index + 1, **options}
    _set_epoch(train_loader, epoch_index)
    train = run_epoch(train_loader, train_model, loss_fn, device, metrics, optimizer, **options)
    val = (None, dict.fromkeys(metric_key(metric) for metric in metrics))
    if val_loader is not None:
        _set_epoch(val_loader, epoch_index)
        val = run_epoch(val_loader, model, loss_fn, device, metrics, **options)
    _step_scheduler(scheduler, val[0] if val[0] is not None else train[0])
    _record_epoch(history, epoch_index + 1, options["n_epochs"], train, val, lr, time.perf_counter() - started,
                  options["progress"], verbose=options["verbose"])


def _training_model(model, device, compile):
    """What fit's training epochs call: `model`, wrapped in DistributedDataParallel across several
    processes (distributed.data_parallel), then compiled (torch.compile) with `compile`. `model` itself keeps
    the weights, so validation, checkpoints and the caller use it unwrapped."""
    # Built after the resume, so rank 0's (identical) restored weights are what DDP broadcasts.
    train_model = distributed.data_parallel(model, device)
    return torch.compile(train_model) if compile else train_model


def _check_loader(loader, what):
    if not isinstance(loader, Iterable):
        raise TypeError(f"{what} must be an iterable of (data, target) batches such as a "
                        f"DataLoader, got {type(loader).__name__}")
    if isinstance(loader, Iterator):
        raise TypeError(f"{what} is a one-shot iterator that would be empty after the first "
                        "epoch; pass a re-iterable object such as a DataLoader or a list")


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
    return metrics, keys, checkpoints.check_checkpoint_dir(checkpoint_dir)


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


# ---------------------------------------------------------------------------------------------------
# The collapse guard


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
        "every selector of the study train (methods.RECIPES; results/README.md, Recipes): a BatchNorm at the "
        "embedding (EmbeddingNet(batch_norm=True)), which keeps a batch from shrinking to a point, and for "
        "the hardest selectors the loss of an easier one added (OnlineTripletLoss(..., "
        "easy_selector=RandomNegativeTripletSelector(margin))).",
        EmbeddingCollapseWarning,
        stacklevel=3)
    return True


def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)
