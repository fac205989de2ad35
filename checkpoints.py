"""Checkpoints of a training run: what ``trainer.fit`` writes after every epoch and resumes from.

What a checkpoint holds. ``checkpoint_dir/checkpoint.pt`` (CHECKPOINT_NAME), written atomically
(``utils.atomic_write``: a crash mid-write never leaves a truncated file) and read with
``torch.load(weights_only=True)`` (plain data and tensors, never pickled code), is a dict of:

- ``format_version``: FORMAT_VERSION (3); a file without it is version 1 (see below);
- ``epoch``: the number of epochs done; ``history``: fit's history of those epochs;
- ``model``, ``optimizer``, ``scheduler`` (None without one): their state_dicts (the model's plain
  state_dict, never a DistributedDataParallel or torch.compile wrapper's, so one process can resume a
  run of several);
- ``rng``: the torch (CPU and CUDA), numpy and python global RNG states;
- ``generators``: the state of every private torch.Generator that ``find_generators`` reaches from the
  train loader, the validation loader and the loss (a DataLoader's or sampler's ``generator``, a triplet
  selector's ``generator``, ...), keyed by attribute path, e.g. ``"train_loader.generator"``;
- ``grad_scaler``: the torch.amp.GradScaler's state under fp16 mixed precision, else None;
- ``loss_state``: the loss's ``state_dict`` when it holds any state (a ``CrossBatchMemory``'s queue), else
  None.

The exact-resume contract. ``fit(..., resume=True)`` continues from checkpoint_dir/checkpoint.pt when it
exists (otherwise starts normally); ``resume=<path>`` from that file or that directory's checkpoint.pt.
The checkpoint's epoch count then replaces ``start_epoch``. A resumed run replays exactly the batches
and updates of an uninterrupted one (the same weights and history, bit for bit), provided its loaders
and loss are built the same way and draw their randomness from the global RNGs, from generators kept in
their attributes, or from samplers with ``set_epoch`` (fit calls it with the 0-based epoch index before
every epoch). Resuming raises ValueError, before anything of the run changes, when the file is truncated
or not a checkpoint of fit, when it was written with other metrics or another kind of scheduler, or when
its private generators are at other attribute paths than this run's (the run was built differently).

Older files. ``upgrade_checkpoint`` is the one place that turns an older checkpoint into the current
format. Version 1 (no ``format_version``: every checkpoint written before the number existed) may lack
``generators`` (written before they were saved: the run resumes with its own generators as they are) and
``grad_scaler`` (before mixed precision: none is restored); versions 1 and 2 lack ``loss_state`` (written
before a loss could hold state: None). Any checkpoint whose history lacks only the
collapse guard's keys (GUARD_KEYS: written before the guard existed, or with ``collapse_guard=False``)
resumes under the guard with NaN for those keys in its epochs.
"""

import collections
import math
import os
import random
import types
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from utils import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 3
# Keys every checkpoint holds, of any version; the current version also holds CURRENT_KEYS.
CHECKPOINT_KEYS = frozenset({"epoch", "model", "optimizer", "scheduler", "history", "rng"})
CURRENT_KEYS = CHECKPOINT_KEYS | {"format_version", "generators", "grad_scaler", "loss_state"}
# The history keys fit's collapse guard adds (trainer); a checkpoint written without the guard lacks them.
GUARD_KEYS = frozenset({"train_spread", "val_spread", "train_spread_at_start", "val_spread_at_start",
                        "train_active_fraction", "val_active_fraction"})
# How far below train_loader / val_loader / loss_fn the search for private torch.Generators goes
# (loader.batch_sampler.sampler.generator is 3 deep), and the largest list/tuple/dict it looks
# into: a dataset's index lists can hold millions of items and no generator.
GENERATOR_SEARCH_DEPTH = 4
GENERATOR_SEARCH_MAX_ITEMS = 256


# ---------------------------------------------------------------------------------------------------
# Where the checkpoint is


def _check_path(value, what):
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    return os.fspath(value)


def check_checkpoint_dir(checkpoint_dir):
    """fit's ``checkpoint_dir`` as a str (None stays None); TypeError unless a path, ValueError when it
    exists and is not a directory."""
    if checkpoint_dir is None:
        return None
    checkpoint_dir = _check_path(checkpoint_dir, "checkpoint_dir")
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise ValueError(f"checkpoint_dir {checkpoint_dir!r} exists and is not a directory")
    return checkpoint_dir


def checkpoint_path(checkpoint_dir):
    """checkpoint_dir/checkpoint.pt, or None without a checkpoint_dir."""
    return None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_NAME)


def resume_path(checkpoint_dir, resume):
    """The checkpoint file fit resumes from, or None to start afresh.

    `resume=False`: None. `resume=True`: checkpoint_dir/checkpoint.pt when it exists, else None
    (the first run of a restartable job); ValueError without checkpoint_dir. A path: that file, or
    that directory's checkpoint.pt; FileNotFoundError when it does not exist.
    """
    if isinstance(resume, bool):
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass resume=<checkpoint path>)")
        path = checkpoint_path(checkpoint_dir) if resume else None
        return path if path is not None and os.path.exists(path) else None
    path = _check_path(resume, "resume")
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume checkpoint {path!r} does not exist")
    return path


# ---------------------------------------------------------------------------------------------------
# The global RNGs and the private generators


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


# ---------------------------------------------------------------------------------------------------
# Save, load, upgrade, restore


def save_checkpoint(checkpoint_dir, epoch, model, optimizer, scheduler, history, generators, grad_scaler=None,
                    loss_fn=None):
    """Write checkpoint_dir/checkpoint.pt atomically with everything a resumed run needs after `epoch`
    (1-based) epochs (see the module docstring); `generators` as ``find_generators`` returns them."""
    with atomic_write(checkpoint_path(checkpoint_dir)) as file:
        torch.save({
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "history": history,
            "rng": _rng_state(),
            "generators": {name: generator.get_state() for name, generator in generators.items()},
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            "loss_state": _loss_state(loss_fn) or None,
        }, file)


def _loss_state(loss_fn):
    """The loss's state_dict (empty for a loss without buffers or one that is not an nn.Module)."""
    return loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {}


def upgrade_checkpoint(checkpoint, history_keys):
    """`checkpoint` (a dict read from a file, of any version) in the current format, for a run whose
    history has `history_keys`: the one place older checkpoints are turned into today's (see the module
    docstring). Version 1 gets ``generators`` None (no states saved: the run's own are left as they are)
    and ``grad_scaler`` None where they are missing; a history that lacks only GUARD_KEYS of
    `history_keys` gets NaN for them in each of its epochs. Returns a new dict (the history too);
    ValueError for a format_version this library does not know."""
    version = checkpoint.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version {version!r} is not one this library reads (1 to "
                         f"{FORMAT_VERSION}); it was written by another version of the library")
    upgraded = dict(checkpoint, format_version=FORMAT_VERSION)
    if version == 1:
        upgraded.setdefault("generators", None)
        upgraded.setdefault("grad_scaler", None)
    if version <= 2:
        upgraded.setdefault("loss_state", None)
    history = dict(checkpoint["history"])
    missing = [key for key in history_keys if key not in history]
    if set(missing) <= GUARD_KEYS and history.keys() <= set(history_keys):
        for key in missing:
            history[key] = [math.nan] * len(history["epoch"])
    upgraded["history"] = history
    return upgraded


def _read(path):
    """The object torch.load reads from `path`; ValueError naming the file when its bytes are not a
    readable torch file."""
    # Opened here so that a file we may not read fails as itself (PermissionError, ...), while
    # anything torch.load raises is about the bytes in it.
    with open(path, "rb") as file:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
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


def load_checkpoint(path, history_keys, scheduler):
    """Read a checkpoint written by fit from `path`, upgrade it (``upgrade_checkpoint``) and check that
    it suits this run.

    Takes the history keys of this run (its metrics) and its scheduler (or None). Returns the
    checkpoint dict in the current format. Raises ValueError when the file is not a readable checkpoint
    written by fit (truncated, garbage, another kind of file, an unknown format version) or was written
    with other metrics or scheduler.
    """
    checkpoint = _read(path)
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise ValueError(f"{path!r} is not a checkpoint written by trainer.fit")
    try:
        checkpoint = upgrade_checkpoint(checkpoint, history_keys)
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from error
    if not CURRENT_KEYS <= checkpoint.keys():
        raise ValueError(f"{path!r} is not a checkpoint written by trainer.fit (format_version "
                         f"{FORMAT_VERSION} without {sorted(CURRENT_KEYS - checkpoint.keys())})")
    if checkpoint["history"].keys() != set(history_keys):
        raise ValueError(f"the checkpoint was written with history keys "
                         f"{sorted(checkpoint['history'])}; resume with the same metrics "
                         f"(got {sorted(history_keys)})")
    if (checkpoint["scheduler"] is None) != (scheduler is None):
        written = "without" if scheduler is not None else "with"
        raise ValueError(f"the checkpoint was written {written} a scheduler; resume with the "
                         "same kind of scheduler")
    return checkpoint


def read_model_weights(path):
    """The model's ``state_dict`` saved in the checkpoint at `path` (e.g. to save a finished run's model
    without training it again), read, checked and upgraded as ``load_checkpoint`` reads a checkpoint to
    resume. Raises ValueError naming the file when it is not a checkpoint written by fit."""
    checkpoint = _read(path)
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise ValueError(f"{path!r} is not a checkpoint written by trainer.fit")
    try:
        return upgrade_checkpoint(checkpoint, checkpoint["history"].keys())["model"]
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from error


def restore_checkpoint(checkpoint, path, model, optimizer, scheduler, generators, grad_scaler=None, loss_fn=None):
    """Put the model, optimizer, scheduler, global RNGs, private generators, the gradient scaler (fp16 amp;
    when the checkpoint has one) and the loss's state (a memory's queue) in the states of `checkpoint`
    (``load_checkpoint``'s, read from `path`). Returns (history so far, epochs done)."""
    states = checkpoint["generators"]
    if states is not None:  # checked before anything changes, so a mismatch leaves the run's objects untouched
        _check_generator_paths(states, generators, path)
    loss_state = checkpoint["loss_state"] or {}
    if loss_state.keys() != _loss_state(loss_fn).keys():
        raise ValueError(f"checkpoint {path!r} holds a loss state of {sorted(loss_state) or 'nothing'}, but this "
                         f"run's loss holds {sorted(_loss_state(loss_fn)) or 'nothing'}: the loss was built "
                         "differently (e.g. with or without a memory); build it as the run that wrote the "
                         "checkpoint did, or pass resume=False to start over")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    _set_rng_state(checkpoint["rng"])
    for name, state in (states or {}).items():
        generators[name].set_state(state)
    if grad_scaler is not None and checkpoint["grad_scaler"] is not None:
        grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    if loss_state:
        loss_fn.load_state_dict(loss_state)
    return checkpoint["history"], checkpoint["epoch"]
