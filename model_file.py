"""The model file: one file carrying a trained model from training to the tools that use it.

``save_model`` writes the weights and everything needed to use them (architecture and arguments, image
size, channels, normalisation, class names, verification threshold, command, metrics, a fingerprint of
the weights) as plain data; ``load_model`` reads it back (torch.load with weights_only=True: no pickled
code runs) and rebuilds the network from ``networks.NETWORKS``; ``embed_images`` is the one place its
preprocessing (the stored normalisation) is applied; ``model_fingerprint`` hashes a state dict.

The format carries a version number (``MODEL_VERSION``). Every older file is turned into the current
layout by one function, ``upgrade_model_file``, one step per version, before anything else reads it: the
older Omniglot layout (``{"config", "state_dict", ...}``, written before the model file existed) is
version 0. A new version adds one step there; no reader keeps a rule per field.
"""

import hashlib
import numbers
import os

import torch
import torch.nn as nn

from networks import NETWORKS, build_network
from utils import atomic_write, check_choice, check_flag, check_int


def _rebuild(architecture, arguments):
    """The network a model file describes, before its weights are loaded. Pretrained starting weights are
    not read again (the state dict replaces them, and their file need not exist here); the model still
    records where they came from."""
    if "pretrained" not in arguments:
        return build_network(architecture, **arguments)
    model = build_network(architecture, **{**arguments, "pretrained": None})
    model.pretrained = arguments["pretrained"]
    return model


MODEL_FORMAT = "siamese-triplet-model"
MODEL_VERSION = 2
# What save_model writes besides the caller's extra keys (which must not reuse these names).
MODEL_KEYS = ("format", "version", "architecture", "arguments", "state_dict", "image_size", "channels",
              "normalization", "invert", "class_names", "embedding_dim", "threshold", "command", "metrics",
              "fingerprint")


def model_fingerprint(state_dict):
    """The sha256 hex digest of a state dict: every entry's name, dtype, shape and bytes, in key order. Equal
    weights give equal fingerprints on any device; any changed value, name or order changes it."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value, what):
    """``value`` as plain data (dicts, lists, tuples, str, int, float, bool, None), which torch.load reads
    with weights_only=True and json can write: numpy and 0-d tensor scalars become Python numbers, arrays
    and tensors nested lists. Raises TypeError naming ``what`` for anything else."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, tensors
        return _plain(value.tolist(), what)
    if isinstance(value, dict):
        return {_plain(key, f"a key of {what}"): _plain(item, f"{what}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, f"{what}[{index}]") for index, item in enumerate(value))
    raise TypeError(f"{what} must be plain data (dict, list, str, number, bool or None), got {type(value).__name__}")


def _check_normalization(normalization, channels):
    """``{"mean": [...], "std": [...]}`` with ``channels`` floats each (std > 0), or None."""
    if normalization is None:
        return None
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise TypeError("normalization must be None or a dict {'mean': [...], 'std': [...]} with one value per "
                        "channel")
    checked = {}
    for key in ("mean", "std"):
        values = torch.as_tensor(normalization[key], dtype=torch.float64).reshape(-1)
        if len(values) != channels or not torch.isfinite(values).all():
            raise ValueError(f"normalization['{key}'] must hold {channels} finite values (one per channel), got "
                             f"{values.tolist()}")
        checked[key] = values.tolist()
    if min(checked["std"]) <= 0:
        raise ValueError(f"normalization['std'] must be > 0, got {checked['std']}")
    return checked


def _check_threshold(threshold):
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be None or a similarity in [0, 1], got {type(threshold).__name__}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a similarity 1 / (1 + distance) in [0, 1], got {threshold}")
    return float(threshold)


def save_model(path, model, architecture, arguments, *, image_size, channels, normalization=None, invert=False,
               class_names=None, threshold=None, command=None, metrics=None, **extra):
    """Write ``model`` and everything needed to use it to one file at ``path`` (folders created; written to
    a temporary file, then renamed, so an interrupted save never leaves half a file). Returns the path.

    - ``architecture``: a name of ``NETWORKS``; ``arguments``: the dict it was built with (its ``config()``;
      None takes ``model.config()``). The file is checked to load: the rebuilt network must accept the
      model's state dict.
    - ``image_size`` (int): the side the images are resized to; ``channels`` (int): 1 grey, 3 RGB;
    - ``normalization``: ``{"mean": [...], "std": [...]}``, one value per channel, applied as
      ``(x - mean) / std`` by ``embed_images``, or None;
    - ``invert`` (bool): the model was trained on inverted images, ``1 - x`` of images in [0, 1] (Omniglot's
      white ink on black), which ``embed_images`` applies before the normalisation;
    - ``class_names``: the training classes' names (list of str or int), or None;
    - ``threshold``: the verification threshold on the similarity ``1 / (1 + distance)``, or None;
    - ``command`` (str) that trained it, ``metrics`` (dict) of its evaluation, and any ``extra`` keys:
      plain data (numpy and tensor scalars are converted).

    The file holds a dict of plain data only (see MODEL_KEYS), with ``fingerprint``
    (``model_fingerprint`` of the state dict) and ``embedding_dim``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(architecture, NETWORKS, "architecture")
    if arguments is None and callable(getattr(model, "config", None)):
        arguments = model.config()
    if not isinstance(arguments, dict):
        raise TypeError(f"arguments must be the dict of constructor arguments the model was built with, got "
                        f"{type(arguments).__name__}")
    arguments = _plain(arguments, "arguments")
    image_size = check_int(image_size, "image_size", 1)
    channels = check_int(channels, "channels", 1)
    for name, value in (("image_size", image_size), ("channels", channels)):
        own = getattr(model, "in_channels" if name == "channels" else name, value)
        if own != value:
            raise ValueError(f"{name} is {value} but the model takes {own}; pass the model's own")
    if class_names is not None:
        class_names = list(class_names)
        if not all(isinstance(name, (str, int)) and not isinstance(name, bool) for name in class_names):
            raise TypeError("class_names must be a list of str (or int) names, one per training class")
    if command is not None and not isinstance(command, str):
        raise TypeError(f"command must be None or a str, got {type(command).__name__}")
    if metrics is not None and not isinstance(metrics, dict):
        raise TypeError(f"metrics must be None or a dict, got {type(metrics).__name__}")
    reused = sorted(set(extra) & set(MODEL_KEYS))
    if reused:
        raise ValueError(f"extra keys {reused} are the model file's own; rename them")
    state_dict = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    try:
        _rebuild(architecture, arguments).load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"the model's weights do not fit architecture {architecture!r} built with {arguments}; "
                         f"pass the arguments the model was built with: {error}") from None
    saved = {
        "format": MODEL_FORMAT, "version": MODEL_VERSION, "architecture": architecture, "arguments": arguments,
        "state_dict": state_dict, "image_size": image_size, "channels": channels,
        "normalization": _check_normalization(normalization, channels), "invert": check_flag(invert, "invert"),
        "class_names": class_names,
        "embedding_dim": getattr(model, "embedding_dim", None), "threshold": _check_threshold(threshold),
        "command": command, "metrics": _plain(metrics or {}, "metrics"),
        "fingerprint": model_fingerprint(state_dict),
        **{key: _plain(value, key) for key, value in extra.items()},
    }
    path = os.fspath(path)
    with atomic_write(path) as file:
        torch.save(saved, file)
    return path


def upgrade_model_file(contents, path):
    """The contents of a model file (what torch.load read from ``path``) in the current layout, whatever
    version wrote it: the one place older files are turned into the current one, step by step.

    - the older Omniglot layout, ``{"config", "state_dict", ...}`` without ``format``, becomes version 0
      (``_from_old_omniglot_file``);
    - version 0 -> 1: a file of version 0 carries no fingerprint; it gets its weights' own;
    - version 1 -> 2: ``invert`` is new; a "siamese-network" file (the architecture only ``omniglot.py``
      trains, always on inverted images) gets True, any other False.
    Each step fills what the next version added, so ``load_model`` reads one layout; ``version`` keeps the
    number the file was written with (what ``load_model``'s info reports). Raises ValueError naming ``path``
    when the contents are not a model file, or are of a version newer than ``MODEL_VERSION``.
    """
    if isinstance(contents, dict) and isinstance(contents.get("config"), dict) and "state_dict" in contents \
            and "format" not in contents:
        contents = _from_old_omniglot_file(contents)
    if not isinstance(contents, dict) or contents.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a model file written by save_model (it holds a {type(contents).__name__} "
                         f"without format {MODEL_FORMAT!r})")
    version = contents.get("version")
    if version not in range(MODEL_VERSION + 1) or isinstance(version, bool):
        raise ValueError(f"{path} is a model file of version {version!r}; this library reads version "
                         f"{MODEL_VERSION}: update it")
    if version < 1 and contents.get("fingerprint") is None:
        state_dict = contents.get("state_dict")
        if isinstance(state_dict, dict) and all(isinstance(value, torch.Tensor) for value in state_dict.values()):
            contents = {**contents, "fingerprint": model_fingerprint(state_dict)}
    if version < 2 and "invert" not in contents:
        contents = {**contents, "invert": contents.get("architecture") == "siamese-network"}
    return contents


def _from_old_omniglot_file(saved):
    """The model-file dict (version 0) of a file in the older Omniglot layout, ``{"config", "state_dict", ...}``
    (as omniglot.save_omniglot_model wrote before the model file): a SiameseNetwork; its other keys stay as
    extra keys, and the threshold is its saved evaluation's verification threshold, when it has one."""
    config = saved["config"]
    evaluation = saved.get("evaluation")
    verification = evaluation.get("verification") if isinstance(evaluation, dict) else None
    threshold = verification.get("threshold") if isinstance(verification, dict) else None
    extra = {key: value for key, value in saved.items() if key not in ("config", "state_dict") + MODEL_KEYS}
    return {"format": MODEL_FORMAT, "version": 0, "architecture": "siamese-network", "arguments": config,
            "state_dict": saved["state_dict"], "image_size": config.get("image_size"),
            "channels": config.get("in_channels", 1), "normalization": None, "class_names": None,
            "embedding_dim": config.get("embedding_dim"), "threshold": threshold,
            "command": saved.get("command"), "metrics": {}, "fingerprint": None, **extra}


def load_model(path, device="cpu"):
    """Read a model file written by ``save_model``. Returns ``(model, info)``: the network rebuilt from its
    architecture and arguments with the saved weights (loaded strictly), in eval mode on ``device``, and
    the file's other keys (``info``: everything but the state dict, see MODEL_KEYS, plus extra keys).

    Reads with torch.load(weights_only=True): plain data and tensors only, never pickled code. An older
    file is read through ``upgrade_model_file`` (the older Omniglot layout as a SiameseNetwork, with
    ``version`` 0). Raises FileNotFoundError naming a missing ``path`` and ValueError naming a file that
    is not a model file (another torch file, anything else, a truncated or altered one).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}; write one with save_model (or train one)")
    not_a_model_file = f"{path} is not a model file written by save_model"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{not_a_model_file} (it could not be read as plain data: {reason[:200]})") from None
    saved = upgrade_model_file(saved, path)
    missing = [key for key in MODEL_KEYS if key not in saved]
    if missing:
        raise ValueError(f"{not_a_model_file} (keys {missing} are missing)")
    state_dict = saved["state_dict"]
    if not isinstance(state_dict, dict) or not isinstance(saved["arguments"], dict):
        raise ValueError(f"{not_a_model_file} (its state_dict or arguments is not a dict)")
    if model_fingerprint(state_dict) != saved["fingerprint"]:
        raise ValueError(f"{path}: the weights do not match the fingerprint saved with them; the file was altered "
                         "or damaged, save the model again")
    try:
        model = _rebuild(saved["architecture"], saved["arguments"])
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: its weights do not load into architecture {saved['architecture']!r} built with "
                         f"{saved['arguments']}: {error}") from None
    info = {key: value for key, value in saved.items() if key != "state_dict"}
    return model.to(device).eval(), info


def embed_images(model, images, batch_size=256, normalization=None, invert=False):
    """Embeddings ``(N, D)`` of images ``(N, C, H, W)`` (floats, e.g. in [0, 1]) by ``model.get_embedding``:
    the preprocessing a model file records, applied in one place. Each batch of ``batch_size`` is moved to
    the model's device, with ``invert`` (a model file's) turned into ``1 - x``, and with ``normalization``
    (a model file's ``{"mean", "std"}``, one value per channel) standardised as ``(x - mean) / std``. Runs in eval mode under no_grad and restores the
    model's mode. Returns the embeddings on the model's device."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_embedding", None)):
        raise TypeError("model must be an nn.Module with a get_embedding method, e.g. load_model's")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floats, got {images.dtype}; scale them (e.g. uint8 / 255) first")
    if len(images) == 0:
        raise ValueError("images is empty (N = 0); pass at least one image")
    batch_size = check_int(batch_size, "batch_size", 1)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    normalization = _check_normalization(normalization, images.shape[1])
    if normalization is not None:
        mean, std = (torch.tensor(normalization[key], dtype=images.dtype, device=device).view(1, -1, 1, 1)
                     for key in ("mean", "std"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = []
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device)
                if invert:
                    batch = 1 - batch
                if normalization is not None:
                    batch = (batch - mean) / std
                batches.append(model.get_embedding(batch))
    finally:
        model.train(was_training)
    return torch.cat(batches)
