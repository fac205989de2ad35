"""Feature extractors for the autoencoder experiments, and an on-disk cache of what they compute.

Each extractor maps images to one feature vector per image, ``(N, F)`` float32:

- ``pixel_features``: the pixels themselves, flattened in (C, H, W) order and scaled to [0, 1];
- ``hog_features``: histograms of oriented gradients (scikit-image's ``skimage.feature.hog``);
- ``resnet_features``: the 2048-d penultimate activations of torchvision's ImageNet ResNet-50. The
  weights are read from torchvision's cache or from a file you name; nothing is ever downloaded and
  a model is never run with random weights (``resnet50_weights_path`` says how to provide them).

Images may be given as uint8 arrays, channels last, as datasets store them ((N, H, W) grey or
(N, H, W, C)); as float tensors (N, C, H, W) in [0, 1]; or as a dataset whose items are
``(image (C, H, W) float in [0, 1], label)`` (e.g. an ``ImageFolder`` with ``ToTensor``), which is read
batch by batch. ``extract_features(name, images, **params)`` dispatches by name and
``cached_features(...)`` computes a split's features once and then reads them from
``<cache_dir>/<dataset>/<split>-<extractor>-<key>.pt``, the key hashing the extractor's parameters and
a fingerprint of the images (and of the weights file), so a change of either recomputes.
"""

import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from utils import atomic_write

EXTRACTORS = ("pixels", "hog", "resnet")
# torchvision's current ImageNet weights for ResNet-50: their file name in torch.hub's cache and the
# normalisation they were trained with.
RESNET50_WEIGHTS = torchvision.models.ResNet50_Weights.DEFAULT


# ---------------------------------------------------------------------------------------------------
# image batches


def image_batches(images, batch_size=256):
    """Yield float32 batches ``(B, C, H, W)`` in [0, 1] of ``images`` (see the module docstring for
    the accepted kinds)."""
    if isinstance(images, Dataset) and not torch.is_tensor(images):
        for batch in DataLoader(images, batch_size=batch_size):
            pixels = batch[0] if isinstance(batch, (list, tuple)) else batch
            yield _check_float_images(pixels)
        return
    images = _as_image_tensor(images)
    for start in range(0, len(images), batch_size):
        yield _to_float_images(images[start:start + batch_size])


def _as_image_tensor(images):
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a uint8 array (N, H, W[, C]), a float tensor (N, C, H, W) or a dataset "
                        f"of (image, label) items, got {type(images).__name__}")
    if images.dtype == torch.uint8 and images.dim() in (3, 4):
        return images
    if images.is_floating_point() and images.dim() == 4:
        return images
    raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, C), or float (N, C, H, W) in [0, 1]; "
                     f"got {images.dtype} of shape {tuple(images.shape)}")


def _to_float_images(images):
    """uint8 channels-last (B, H, W[, C]) -> float (B, C, H, W) / 255; float images pass through."""
    if images.dtype == torch.uint8:
        images = images.unsqueeze(-1) if images.dim() == 3 else images
        return images.permute(0, 3, 1, 2).float().div_(255)
    return _check_float_images(images)


def _check_float_images(images):
    if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError("dataset items must be (image, label) with float images (C, H, W) in [0, 1]; "
                         "give the dataset a transforms.ToTensor()")
    return images.float()


# ---------------------------------------------------------------------------------------------------
# extractors


def pixel_features(images, batch_size=1024):
    """Flattened pixels: images -> ``(N, C * H * W)`` float32 in [0, 1], in (C, H, W) order."""
    return torch.cat([batch.flatten(1) for batch in image_batches(images, batch_size)])


def hog_features(images, orientations=9, pixels_per_cell=None, cells_per_block=2, progress=False):
    """Histograms of oriented gradients (Dalal and Triggs, 2005) by ``skimage.feature.hog``.

    Takes images (grey or colour; colour images get one histogram from the strongest channel's
    gradient, scikit-image's ``channel_axis`` behaviour), ``orientations`` bins, cells of
    ``pixels_per_cell`` pixels (an int for square cells, or a (rows, columns) pair; default: a quarter
    of the image side, 7 for 28 x 28, 8 for 32 x 32) and blocks of ``cells_per_block`` cells, L2-Hys
    normalised. Returns ``(N, F)`` float32; F is 324 with the defaults (3 x 3 blocks x 2 x 2 cells x 9
    bins).
    """
    from skimage.feature import hog

    rows = []
    bar = tqdm(total=len(images), desc="HOG features", disable=not progress, leave=False)
    for batch in image_batches(images):
        side = batch.shape[-1]
        cell = pixels_per_cell or max(side // 4, 1)
        cell = tuple(cell) if isinstance(cell, (tuple, list)) else (cell, cell)
        channel_axis = -1 if batch.shape[1] > 1 else None
        pixels = batch.permute(0, 2, 3, 1).numpy()  # skimage wants (H, W[, C])
        for image in pixels:  # scikit-image computes one image per call
            image = image if channel_axis is not None else image[..., 0]
            rows.append(hog(image, orientations=orientations, pixels_per_cell=cell,
                            cells_per_block=(cells_per_block, cells_per_block), block_norm="L2-Hys",
                            channel_axis=channel_axis, feature_vector=True).astype(np.float32))
        bar.update(len(batch))
    bar.close()
    return torch.from_numpy(np.stack(rows))


def resnet50_weights_path(weights=None):
    """The file to read ResNet-50 weights from.

    ``weights``: a path to a state_dict of ``torchvision.models.resnet50`` (e.g. the file torchvision
    downloads, or ``torch.save(model.state_dict(), path)``); None means torchvision's cache,
    ``<torch.hub.get_dir()>/checkpoints/<file name of ResNet50_Weights.DEFAULT>``. Raises
    FileNotFoundError, saying how to provide the weights, when the file is not there.
    """
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ResNet-50 weights file {path!r} does not exist; pass the path of a "
                                    "torchvision resnet50 state_dict, or weights=None to use torchvision's cache")
        return path
    file_name = os.path.basename(RESNET50_WEIGHTS.url)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if os.path.isfile(cached):
        return cached
    raise FileNotFoundError(
        f"ResNet-50 weights not found: there is no {cached} (torchvision's cache) and no weights file was "
        "given. They are never downloaded here, and random weights would give meaningless features. Either\n"
        f"  - on a machine with internet access run  python -c \"import torchvision; "
        f"torchvision.models.resnet50(weights='DEFAULT')\"  and copy the file it saves ({file_name}, in "
        f"~/.cache/torch/hub/checkpoints or $TORCH_HOME/hub/checkpoints) to {cached}; or\n"
        "  - pass the path of a resnet50 state_dict: resnet_features(images, weights=PATH), "
        "run_experiment(..., feature_params={'weights': PATH}) or --resnet-weights PATH on the command line.")


def load_resnet50(weights=None):
    """torchvision's ResNet-50 with the weights of ``resnet50_weights_path(weights)`` and its final
    classifier replaced by the identity: images ``(B, 3, H, W)`` -> features ``(B, 2048)``. In eval mode.
    Raises ValueError when the file is not a ResNet-50 state_dict."""
    path = resnet50_weights_path(weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint that wraps the state_dict
    model = torchvision.models.resnet50(weights=None)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a state_dict of torchvision.models.resnet50 ({error})") from error
    model.fc = nn.Identity()
    return model.eval()


def resnet_features(images, weights=None, image_size=224, batch_size=64, device=None, progress=False):
    """ResNet-50 penultimate features: images -> ``(N, 2048)`` float32.

    Each image is made RGB (a grey channel is repeated), resized to ``image_size`` x ``image_size``
    (bilinear, antialiased) and normalised with ImageNet's mean and standard deviation, then goes
    through ``load_resnet50(weights)`` (see ``resnet50_weights_path`` for ``weights``) on ``device``
    (default CPU), ``batch_size`` images at a time, without gradients.
    """
    device = torch.device(device or "cpu")
    model = load_resnet50(weights).to(device)
    preprocess = RESNET50_WEIGHTS.transforms()
    mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
    rows = []
    bar = tqdm(total=len(images), desc="ResNet-50 features", disable=not progress, leave=False)
    with torch.no_grad():
        for batch in image_batches(images, batch_size):
            batch = batch.to(device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            if batch.shape[1] != 3:
                raise ValueError(f"ResNet-50 needs grey or RGB images, got {batch.shape[1]} channels")
            if batch.shape[-2:] != (image_size, image_size):
                batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear",
                                      align_corners=False, antialias=True)
            rows.append(model((batch - mean) / std).float().cpu())
            bar.update(len(batch))
    bar.close()
    return torch.cat(rows)


def _resolve_parameters(name, params):
    """The extractor's parameters with defaults filled in, as they enter the cache key."""
    if name == "pixels":
        allowed = {}
    elif name == "hog":
        allowed = {"orientations": 9, "pixels_per_cell": None, "cells_per_block": 2}
    elif name == "resnet":
        allowed = {"weights": None, "image_size": 224, "batch_size": 64, "device": None}
    else:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    unknown = set(params) - set(allowed)
    if unknown:
        raise TypeError(f"feature extractor {name!r} takes {', '.join(allowed) or 'no parameters'}, "
                        f"not {', '.join(sorted(unknown))}")
    return {**allowed, **params}


def extract_features(name, images, progress=False, **params):
    """Features ``(N, F)`` float32 of ``images`` by the extractor ``name`` ("pixels", "hog" or
    "resnet") called with ``params`` (see each extractor)."""
    params = _resolve_parameters(name, params)
    if name == "pixels":
        return pixel_features(images)
    if name == "hog":
        return hog_features(images, progress=progress, **params)
    return resnet_features(images, progress=progress, **params)


# ---------------------------------------------------------------------------------------------------
# cache


def _file_digest(path):
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_fingerprint(images):
    """A short hex digest identifying ``images``: of their bytes, shape and dtype for an array or tensor;
    of the file list, labels and transform for an ImageFolder-like dataset (``.samples``)."""
    digest = hashlib.sha1()
    if isinstance(images, Dataset) and not torch.is_tensor(images):
        samples = getattr(images, "samples", None)
        if samples is None:
            raise TypeError("only arrays, tensors and ImageFolder-like datasets (with .samples) can be cached; "
                            "load the images into a tensor first")
        digest.update(repr([(os.fspath(path), int(label)) for path, label in samples]).encode())
        digest.update(repr(getattr(images, "transform", None)).encode())
    else:
        array = _as_image_tensor(images).contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def cached_features(name, images, dataset, split, cache_dir, progress=False, **params):
    """``extract_features(name, images, **params)``, computed once and then read from disk.

    The features are stored in ``<cache_dir>/<dataset>/<split>-<name>-<key>.pt``, where ``key`` hashes
    the extractor's parameters (defaults filled in; for ResNet the weights file's content rather than
    its path) and ``images_fingerprint(images)``. Written atomically, so an interrupted run leaves no
    half file. Returns ``(N, F)`` float32.
    """
    params = _resolve_parameters(name, params)
    key_params = dict(params)
    key_params.pop("batch_size", None)  # neither changes the values
    key_params.pop("device", None)
    if name == "resnet":
        key_params["weights"] = _file_digest(resnet50_weights_path(params["weights"]))
    key_source = json.dumps({"extractor": name, "params": key_params, "images": images_fingerprint(images)},
                            sort_keys=True)
    key = hashlib.sha1(key_source.encode()).hexdigest()[:16]
    folder = os.path.join(os.fspath(cache_dir), str(dataset))
    path = os.path.join(folder, f"{split}-{name}-{key}.pt")
    if os.path.isfile(path):
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key_source") == key_source:
            return stored["features"]
    features = extract_features(name, images, progress=progress, **params)
    with atomic_write(path) as file:  # folders created
        torch.save({"features": features, "key_source": key_source}, file)
    return features
