"""Siamese and triplet autoencoders and VAEs: metric learning that keeps the structure of the data.

Each model is trained on ``M * metric loss + (1 - M) * autoencoder loss``
(``losses.PairwiseAutoencoderLoss`` / ``TripletAutoencoderLoss``): M = 1 is a plain siamese or triplet
network, M = 0 a plain autoencoder or VAE, and the values between trade retrieval quality against
reconstruction. Pairs and triplets are mined online in class-stratified batches
(``datasets.BalancedBatchSampler`` and the selectors of ``utils.py``).

- ``load_image_splits(dataset, root, download)``: train and test images of "mnist", "fashion-mnist"
  (``datasets.load_dataset``), "cifar10" (``load_cifar10``: CIFAR's python-pickle batches, downloaded by
  torchvision when missing) or "imagenet" (``load_imagenet``: ``train/`` and ``val/`` ImageFolders);
- ``run_experiment(constraint_type, encoder_type, dataset, list_of_weights, list_of_latent_dims, ...)``:
  one model per (M, latent size) on raw images (convolutional autoencoder) or on features from
  ``features.py`` (MLP autoencoder), each scored on the test split with ``metrics.evaluate_embeddings``
  (k-NN accuracy with k = 5 against the train split, P@1, R-Precision, MAP@R, NMI, ROC-AUC) and its
  reconstruction error, its test latents plotted (t-SNE above 2-D) and the table written to
  ``results/autoencoders-<dataset>.md`` and ``.json``;
- ``plot_tradeoff(rows)``: retrieval quality and reconstruction error against M;
- ``main(argv)``: the command line, e.g.
  ``python autoencoders.py --dataset fashion-mnist --constraint pairwise,triplet --encoder embenc,vae
  --weights 0,0.25,0.5,0.75,1 --latent-dims 2``.
"""

import argparse
import copy
import json
import os
import pickle
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torchvision import transforms
from tqdm.auto import tqdm

from datasets import BalancedBatchSampler, load_dataset
from features import EXTRACTORS, cached_features, image_batches
from losses import AUTOENCODER_DISTANCES, RECONSTRUCTION_LOSSES, PairwiseAutoencoderLoss, TripletAutoencoderLoss
from metrics import evaluate_embeddings
from networks import make_autoencoder
from utils import (AllPositivePairSelector, AllTripletSelector, HardNegativePairSelector,
                   RandomNegativeTripletSelector, check_int)

# Flush-to-zero for denormal floats, set at import so torch's worker threads inherit it (see trainer.py).
torch.set_flush_denormal(True)

DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagenet")
CONSTRAINTS = ("pairwise", "triplet")
ENCODERS = ("embenc", "vae")  # plain autoencoder, variational autoencoder
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision's download extracts into root
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENET_SIZE = 32  # side of ImageNet images for the convolutional, pixel and HOG paths (ResNet: 224)

LEARNING_RATE = 1e-3
HIDDEN_DIMS = (512, 256)  # MLP autoencoder on feature vectors
EVALUATION_BATCH = 1024
PLOT_POINTS = 2000  # test points in a latent plot (t-SNE time grows fast with the count)
LOSS_WINDOW = 100  # iterations averaged for the reported final losses

# quick=True: a smoke run on small random subsets, written under results/quick and images/quick
QUICK_SIZES = (2000, 1000)
QUICK_ITERS = 200


# ---------------------------------------------------------------------------------------------------
# data


class ImageSplit(NamedTuple):
    """One split of a data set: ``images`` (a uint8 tensor (N, H, W) or (N, H, W, C), or an
    ImageFolder-like dataset of (float image (C, H, W), label) items), ``labels (N,)`` long and the
    class names ``classes`` (class id k is ``classes[k]``)."""

    images: object
    labels: torch.Tensor
    classes: list


def read_cifar10(folder, train=True):
    """The train (``data_batch_1`` .. ``5``) or test (``test_batch``) split of CIFAR-10 from ``folder``,
    the extracted python version (pickled dicts with ``data`` (N, 3072) uint8 rows, R then G then B
    planes, and ``labels``; class names from ``batches.meta`` when present).
    Returns an ``ImageSplit`` with images (N, 32, 32, 3) uint8."""
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    rows, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-10 file {path} is missing; the folder must hold data_batch_1 .. "
                                    "data_batch_5, test_batch and batches.meta (the python version)")
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="latin1")
        rows.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(label) for label in batch["labels"])
    classes = CIFAR10_CLASSES
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as file:
            classes = list(pickle.load(file, encoding="latin1")["label_names"])
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(rows).transpose(0, 2, 3, 1)))
    return ImageSplit(images, torch.tensor(labels, dtype=torch.long), classes)


def load_cifar10(root="data", train=True, download=True):
    """CIFAR-10 from ``root/cifar-10-batches-py``; when that folder is missing and ``download``,
    ``torchvision.datasets.CIFAR10(root, download=True)`` fetches and extracts it there first.
    Returns an ``ImageSplit`` (see ``read_cifar10``). Raises FileNotFoundError saying how to get it."""
    folder = os.path.join(os.fspath(root), CIFAR10_FOLDER)
    problem = ""
    if not os.path.isdir(folder) and download:
        try:
            torchvision.datasets.CIFAR10(os.fspath(root), train=train, download=True)
        except (RuntimeError, OSError) as error:  # OSError covers urllib's URLError
            problem = f" Downloading it with torchvision failed: {error}."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CIFAR-10 not found: there is no {folder}.{problem} Pass download=True on a "
                                "machine with internet access, or extract the python version "
                                f"(cifar-10-python.tar.gz) into {root}.")
    return read_cifar10(folder, train)


def load_imagenet(root="data", train=True, image_size=IMAGENET_SIZE):
    """ImageNet (or any data set in its layout) as an ImageFolder: ``root/imagenet/train`` or
    ``root/train`` (``val`` for the test split), one sub-folder of images per class. Images are resized
    (shorter side) and centre-cropped to ``image_size``, then made float tensors in [0, 1].
    Returns an ``ImageSplit`` whose images are the (lazy) ImageFolder."""
    split = "train" if train else "val"
    candidates = [os.path.join(os.fspath(root), "imagenet", split), os.path.join(os.fspath(root), split)]
    folder = next((path for path in candidates if os.path.isdir(path)), None)
    if folder is None:
        raise FileNotFoundError(f"ImageNet {split} split not found: looked for {' and '.join(candidates)}; "
                                "put one folder of images per class under train/ and val/")
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    folder_dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    return ImageSplit(folder_dataset, torch.tensor(folder_dataset.targets, dtype=torch.long),
                      list(folder_dataset.classes))


def load_image_splits(dataset, root="data", download=True, image_size=IMAGENET_SIZE):
    """``(train, test)`` ``ImageSplit`` s of ``dataset``: "mnist" / "fashion-mnist" (by
    ``datasets.load_dataset``, which also finds the system's copy, e.g. /usr/share/datasets/fashion-mnist),
    "cifar10" (``load_cifar10``) or "imagenet" (``load_imagenet`` at ``image_size``)."""
    _check_choice(dataset, DATASETS, "dataset")
    if dataset == "cifar10":
        return load_cifar10(root, True, download), load_cifar10(root, False, download)
    if dataset == "imagenet":
        return load_imagenet(root, True, image_size), load_imagenet(root, False, image_size)
    splits = []
    for train in (True, False):
        mnist_like = load_dataset(dataset, root=root, train=train, download=download)
        splits.append(ImageSplit(mnist_like.data, mnist_like.targets.long(), list(mnist_like.classes)))
    return tuple(splits)


def subset_split(split, size, generator):
    """A uniformly random subset of ``size`` items of ``split`` (kept in their original order); the
    split itself when it is not larger."""
    if size is None or size >= len(split.labels):
        return split
    chosen = torch.randperm(len(split.labels), generator=generator)[:size].sort().values
    images = split.images
    if torch.is_tensor(images):
        images = images[chosen]
    else:  # an ImageFolder: keep the chosen files only
        images = _folder_subset(images, chosen.tolist())
    return ImageSplit(images, split.labels[chosen], split.classes)


def _folder_subset(folder_dataset, chosen):
    subset = copy.copy(folder_dataset)
    subset.samples = [folder_dataset.samples[i] for i in chosen]
    subset.imgs = subset.samples
    subset.targets = [label for _, label in subset.samples]
    return subset


def relabel(labels, composite_labels):
    """``labels (N,)`` mapped through ``composite_labels`` ({old label: new label}, which may send
    several classes to one); labels not in the map keep their id."""
    if composite_labels is None:
        return labels
    if not isinstance(composite_labels, dict) or not all(
            isinstance(k, (int, np.integer)) and isinstance(v, (int, np.integer))
            for k, v in composite_labels.items()):
        raise TypeError("composite_labels must be a dict {old label: new label} of ints, e.g. {0: 0, 2: 0, 6: 0}")
    mapped = labels.clone()
    for old, new in composite_labels.items():
        mapped[labels == old] = int(new)
    return mapped


def label_names(classes, labels, composite_labels=None, keys=None):
    """``{label: name}`` for every label in ``labels``: ``keys`` when given (a list indexed by label,
    or a dict), else the class names, merged classes joined by '+'."""
    present = sorted(torch.unique(labels).tolist())
    if keys is not None:
        names = dict(keys) if isinstance(keys, dict) else dict(enumerate(keys))
        missing = [label for label in present if label not in names]
        if missing:
            raise ValueError(f"keys names no class for labels {missing}; give one name per label "
                             f"(labels present: {present})")
        return {label: str(names[label]) for label in present}
    members = {label: [] for label in present}
    for old, name in enumerate(classes):
        new = int(composite_labels.get(old, old)) if composite_labels else old
        if new in members:
            members[new].append(str(name))
    return {label: "+".join(members[label]) or str(label) for label in present}


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------------------
# inputs: images or features, standardised


def _image_tensor(images):
    """All of ``images`` as one float tensor (N, C, H, W) in [0, 1]."""
    return torch.cat(list(image_batches(images)))


def prepare_inputs(train, test, dataset, feature_extractor=None, feature_params=None, normalize=True,
                   cache_dir="data/feature-cache", progress=True):
    """Model inputs of both splits: ``(train_inputs, test_inputs, mean, std, image_shape)``.

    Without ``feature_extractor`` the inputs are the images (N, C, H, W) in [0, 1]; with one
    ("pixels", "hog" or "resnet", called with ``feature_params``) they are its features (N, F),
    computed once per split and cached under ``cache_dir``. With ``normalize`` both splits are
    standardised with the train split's mean and standard deviation (per channel for images, per
    feature for vectors; a constant feature is left centred, not divided by 0); otherwise mean = 0
    and std = 1. ``image_shape`` is (C, H, W) when the inputs can be shown as images (raw images or
    pixels), else None.
    """
    if feature_extractor is None:
        train_inputs, test_inputs = _image_tensor(train.images), _image_tensor(test.images)
        image_shape, dims = tuple(train_inputs.shape[1:]), (0, 2, 3)
    else:
        _check_choice(feature_extractor, EXTRACTORS, "feature extractor")
        params = dict(feature_params or {})
        train_inputs, test_inputs = (cached_features(feature_extractor, split.images, dataset, name, cache_dir,
                                                     progress=progress, **params)
                                     for name, split in (("train", train), ("test", test)))
        image_shape, dims = None, (0,)
        if feature_extractor == "pixels":
            image_shape = tuple(next(image_batches(train.images, 1)).shape[1:])
    if normalize:
        std, mean = torch.std_mean(train_inputs, dim=dims, keepdim=True)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(()), torch.ones(())
    return (train_inputs - mean) / std, (test_inputs - mean) / std, mean, std, image_shape


# ---------------------------------------------------------------------------------------------------
# training and evaluation


def balanced_batch_shape(labels, batch_size):
    """``(n_classes, n_samples)`` of the class-stratified batches: as many classes as fit with at least
    two items each (all of them when possible), and ``batch_size // n_classes`` items per class, so a
    batch holds ``n_classes * n_samples <= batch_size`` items, each with positives and negatives."""
    n_label_classes = int(torch.unique(labels).numel())
    if n_label_classes < 2:
        raise ValueError("metric learning needs at least two classes; check composite_labels")
    n_classes = min(n_label_classes, batch_size // 2)
    return n_classes, batch_size // n_classes


def build_loss(constraint_type, weight, margin, beta, distance, reconstruction, generator):
    """The loss of one model. Pairs: the hardest negative pairs (``HardNegativePairSelector``, as the
    study's online-contrastive method); triplets: a random negative within the margin
    (``RandomNegativeTripletSelector``, the study's default). Those mine by Euclidean distance between
    the means, so with ``distance="kl"`` the distance-free ``AllPositivePairSelector`` (balanced) and
    ``AllTripletSelector`` are used instead."""
    if constraint_type == "pairwise":
        selector = (HardNegativePairSelector() if distance == "euclidean"
                    else AllPositivePairSelector(balance=True, generator=generator))
        return PairwiseAutoencoderLoss(weight, margin, selector, beta, distance, reconstruction)
    selector = (RandomNegativeTripletSelector(margin, generator=generator) if distance == "euclidean"
                else AllTripletSelector())
    return TripletAutoencoderLoss(weight, margin, selector, beta, distance, reconstruction)


def train_model(model, loss_fn, inputs, labels, sampler, num_iters, learning_rate=LEARNING_RATE, device=None,
                progress=True, description="training"):
    """Train ``model`` for ``num_iters`` Adam steps on batches of ``inputs (N, ...)`` / ``labels (N,)``
    drawn by ``sampler`` (index lists, one per batch; re-iterated as often as needed).

    Returns the loss terms averaged over the last ``LOSS_WINDOW`` iterations: a dict of floats
    ``total``, ``metric``, ``reconstruction``, ``kl``, ``n_selected``. Raises FloatingPointError on a
    NaN or infinite loss, before that step is taken.
    """
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # for this thread too: denormal floats slow CPU training (trainer.fit)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    window = {key: [] for key in ("total", "metric", "reconstruction", "kl", "n_selected")}
    bar = tqdm(total=num_iters, desc=description, disable=not progress, leave=False)
    iteration = 0
    while iteration < num_iters:
        for batch in sampler:
            index = torch.as_tensor(batch, dtype=torch.long)
            batch_inputs, batch_labels = inputs[index].to(device), labels[index].to(device)
            terms = loss_fn.terms(model(batch_inputs), batch_inputs, batch_labels)
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(f"the loss became {terms['total'].item()} at iteration {iteration + 1}; "
                                         "lower the learning rate or check the inputs")
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            iteration += 1
            if iteration > num_iters - LOSS_WINDOW:
                for key in window:
                    value = terms[key]
                    window[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
            bar.update()
            if progress and iteration % 50 == 0:
                bar.set_postfix(loss=f"{terms['total'].item():.4f}", metric=f"{terms['metric'].item():.4f}",
                                reconstruction=f"{terms['reconstruction'].item():.4f}")
            if iteration == num_iters:
                break
    bar.close()
    return {key: sum(values) / len(values) for key, values in window.items()}


def embed(model, inputs, reconstruction="mse", device=None, batch_size=EVALUATION_BATCH):
    """Embeddings (means) ``(N, L)`` of ``inputs`` and the mean squared reconstruction error over all
    values (in the inputs' units; with a BCE model the decoder's logits go through a sigmoid first),
    in eval mode: dropout off, a VAE decodes its mean."""
    device = torch.device(device or "cpu")
    model.to(device).eval()
    embeddings, squared_error = [], 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size].to(device)
            output = model(batch)
            rebuilt = output.reconstruction.sigmoid() if reconstruction == "bce" else output.reconstruction
            squared_error += float((rebuilt - batch).pow(2).sum())
            embeddings.append(output.mean.float().cpu())
    return torch.cat(embeddings), squared_error / inputs.numel()


# ---------------------------------------------------------------------------------------------------
# plots


def _figure(width, height):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in notebooks

    return Figure(figsize=(width, height))


def _save(figure, path):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    return path


def latent_points(embeddings, seed=0, max_points=PLOT_POINTS):
    """``(points (n, 2), chosen (n,))``: a seeded random subset of at most ``max_points`` rows of
    ``embeddings (N, L)`` in 2-D: the embeddings themselves when L <= 2, else their t-SNE map
    (scikit-learn, PCA initialisation, ``random_state=seed``)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.arange(len(embeddings))
    if len(embeddings) > max_points:
        chosen = torch.randperm(len(embeddings), generator=generator)[:max_points].sort().values
    points = embeddings[chosen].double().numpy()
    if points.shape[1] == 1:
        points = np.concatenate([points, np.zeros_like(points)], axis=1)
    elif points.shape[1] > 2:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max((len(points) - 1) / 3, 1.0))
        points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(points)
    return points, chosen


def plot_latents(embeddings, labels, names, title, path, seed=0, max_points=PLOT_POINTS):
    """Scatter plot of test ``embeddings (N, L)`` (``latent_points``) coloured by ``labels (N,)`` with
    ``names`` ({label: name}) in the legend, saved to ``path``. Returns the path."""
    import matplotlib

    points, chosen = latent_points(embeddings, seed, max_points)
    labels = labels[chosen]
    figure = _figure(7, 7)
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    for position, (label, name) in enumerate(sorted(names.items())):
        mine = (labels == label).numpy()
        axes.scatter(points[mine, 0], points[mine, 1], s=3, alpha=0.6, color=colours(position % colours.N),
                     label=name)
    projection = " (t-SNE)" if embeddings.shape[1] > 2 else ""
    axes.set_title(title + projection)
    axes.legend(markerscale=4, fontsize=7, loc="best")
    return _save(figure, path)


def plot_reconstructions(inputs, reconstructions, mean, std, image_shape, path, title=""):
    """Inputs (top row) above their reconstructions (bottom row), undoing the standardisation
    (``mean``, ``std``) and reshaping flat rows to ``image_shape`` (C, H, W). Returns the path."""
    def as_images(rows):
        images = (rows * std + mean).reshape(len(rows), *image_shape).clamp(0, 1)
        return images.permute(0, 2, 3, 1).numpy()

    originals, rebuilt = as_images(inputs), as_images(reconstructions)
    count = len(originals)
    figure = _figure(count * 0.9, 2.1)
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        for row, images in enumerate((originals, rebuilt)):
            image = images[column]
            axes[row, column].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray_r"
                                     if image.shape[-1] == 1 else None, vmin=0, vmax=1)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("rebuilt", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def plot_tradeoff(rows, path=None, title="retrieval against reconstruction"):
    """Retrieval quality (k-NN accuracy and MAP@R, left) and test reconstruction error (right) against
    the weight M, one line per (constraint, encoder, features, latent size) of the result ``rows``.
    Saved to ``path`` when given. Returns the matplotlib Figure."""
    figure = _figure(12, 4.5)
    quality_axes, error_axes = figure.subplots(1, 2)
    groups = {}
    for row in rows:
        key = f"{row['constraint']} {row['encoder']} {row['features']} {row['latent_dim']}-D"
        groups.setdefault(key, []).append(row)
    for position, (key, group) in enumerate(sorted(groups.items())):
        group = sorted(group, key=lambda r: r["weight"])
        weights = [r["weight"] for r in group]
        colour = f"C{position % 10}"
        quality_axes.plot(weights, [r["knn_accuracy"] for r in group], "o-", color=colour, label=f"{key} kNN acc")
        quality_axes.plot(weights, [r["map_at_r"] for r in group], "s--", color=colour, label=f"{key} MAP@R")
        error_axes.plot(weights, [r["reconstruction_mse"] for r in group], "o-", color=colour, label=key)
    quality_axes.set_xlabel("M (weight of the metric loss)")
    quality_axes.set_ylabel("test k-NN accuracy (k = 5) / MAP@R")
    error_axes.set_xlabel("M (weight of the metric loss)")
    error_axes.set_ylabel("test reconstruction MSE (standardised units)")
    quality_axes.legend(fontsize=7)
    error_axes.legend(fontsize=7)
    figure.suptitle(title)
    if path is not None:
        _save(figure, path)
    return figure


# ---------------------------------------------------------------------------------------------------
# results


RESULT_KEY = ("constraint", "encoder", "features", "distance", "composite_labels", "latent_dim", "weight")
COLUMNS = [("constraint", "constraint", "{}"), ("encoder", "encoder", "{}"), ("features", "features", "{}"),
           ("weight", "M", "{:g}"), ("latent_dim", "dim", "{}"), ("knn_accuracy", "kNN acc", "{:.3f}"),
           ("precision_at_1", "P@1", "{:.3f}"), ("map_at_r", "MAP@R", "{:.3f}"), ("nmi", "NMI", "{:.3f}"),
           ("roc_auc", "ROC-AUC", "{:.3f}"), ("reconstruction_mse", "recon MSE", "{:.4f}"),
           ("num_iters", "iters", "{}"), ("train_seconds", "train s", "{:.0f}")]


def results_table(rows):
    """Markdown table of result rows, one line per model."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if row.get(key) is not None else ""
                                        for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def record_results(new_rows, dataset, results_dir="results"):
    """Merge ``new_rows`` into ``<results_dir>/autoencoders-<dataset>.json`` (a row with the same
    constraint, encoder, features, distance, label map, latent size and M replaces the old one) and
    rewrite ``autoencoders-<dataset>.md``. Returns all the rows."""
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, f"autoencoders-{dataset}")
    rows = []
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as file:
            rows = json.load(file)
    fresh = {tuple(row[key] for key in RESULT_KEY) for row in new_rows}
    rows = [row for row in rows if tuple(row.get(key) for key in RESULT_KEY) not in fresh] + list(new_rows)
    rows.sort(key=lambda r: (r["constraint"], r["encoder"], r["features"], str(r["distance"]),
                             str(r["composite_labels"]), r["latent_dim"], r["weight"]))
    with open(stem + ".json", "w") as file:
        json.dump(rows, file, indent=1)
    with open(stem + ".md", "w") as file:
        file.write(f"# Siamese / triplet autoencoders on {dataset}\n\n"
                   "M weighs the metric loss against the autoencoder loss (1: metric only, 0: reconstruction "
                   "only). Test split; kNN acc: 5-NN with the train split as gallery; recon MSE: mean squared "
                   "reconstruction error of the (standardised) inputs. Written by autoencoders.run_experiment.\n\n")
        file.write(results_table(rows))
    return rows


# ---------------------------------------------------------------------------------------------------
# the experiment


def _check_weights(list_of_weights):
    weights = [list_of_weights] if isinstance(list_of_weights, (int, float)) else list(list_of_weights)
    if not weights:
        raise ValueError("list_of_weights is empty; give weights M in [0, 1], e.g. [0, 0.25, 0.5, 0.75, 1]")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)):
            raise TypeError(f"every weight must be a number in [0, 1], got {weight!r}")
        if not 0 <= weight <= 1:
            raise ValueError(f"every weight must be in [0, 1], got {weight}")
    return [float(weight) for weight in weights]


def run_label(constraint_type, encoder_type, features, distance="euclidean"):
    """File-name stem of one sweep, e.g. ``pairwise_vae_images`` (``_kl`` added for KL distances)."""
    return f"{constraint_type}_{encoder_type}_{features}" + ("" if distance == "euclidean" else f"_{distance}")


def run_experiment(constraint_type, encoder_type, dataset, list_of_weights, list_of_latent_dims, num_iters=20000,
                   batch_size=64, keys=None, composite_labels=None, margin=1.0, dropout_val=0.2, normalize=True,
                   feature_extractor=None, seed=0, *, feature_params=None, beta=1.0, distance="euclidean",
                   reconstruction="mse", hidden_dims=HIDDEN_DIMS, learning_rate=LEARNING_RATE, root="data",
                   download=True, splits=None, max_train=None, max_test=None, quick=False, cache_dir=None,
                   device=None, results_dir="results", images_dir="images", progress=True):
    """Train a siamese / triplet autoencoder or VAE for every weight M and latent size; score, plot and
    tabulate them.

    Args:
        constraint_type: "pairwise" (contrastive loss on mined pairs) or "triplet" (triplet loss on mined
            triplets).
        encoder_type: "embenc" (plain autoencoder) or "vae".
        dataset: "mnist", "fashion-mnist", "cifar10" or "imagenet" (see ``load_image_splits``; ``root`` is
            the data folder, ``download`` allows torchvision's download). With ``splits`` (a pair of
            ``ImageSplit``) the data is taken from there and ``dataset`` only names the outputs.
        list_of_weights: the values of M in [0, 1]; list_of_latent_dims: the latent sizes.
        num_iters: Adam steps per model (learning rate ``learning_rate``).
        batch_size: items per class-stratified batch (``balanced_batch_shape``: e.g. 64 with 10 classes
            gives 10 classes x 6 items).
        keys: class names for the plots (a list indexed by label, or a dict {label: name}).
        composite_labels: {label: new label}, merging classes (``relabel``) before anything else.
        margin: of the contrastive / triplet loss. dropout_val: after every hidden layer.
        normalize: standardise the inputs with the train split's statistics (``prepare_inputs``).
        feature_extractor: None (the images themselves, convolutional autoencoder) or "pixels", "hog",
            "resnet" (features from ``features.py`` called with ``feature_params``, cached under
            ``cache_dir``, default ``<root>/feature-cache``; MLP autoencoder with ``hidden_dims``).
        seed: seeds the model initialisation, dropout, VAE noise, batches, mining, t-SNE and metrics;
            every model starts from the same seed, so models differ only by their settings.
        beta, distance, reconstruction: of ``losses.PairwiseAutoencoderLoss`` / ``TripletAutoencoderLoss``.
        max_train, max_test: random subsets of that many items (None: everything). quick: a smoke run
            (subsets of ``QUICK_SIZES``, at most ``QUICK_ITERS`` iterations, outputs under ``quick/``).
        results_dir, images_dir: where the table and plots go (None: not written).

    Returns the result rows of this call, one dict per model: the settings, ``metrics.evaluate_embeddings``
    of the test embeddings against the train ones (``knn_accuracy`` with k = 5, ``precision_at_1``,
    ``r_precision``, ``map_at_r``, ``nmi``, ``roc_auc``), ``reconstruction_mse`` on the test split, the
    final training losses, ``train_seconds`` and the plot paths. The rows are merged into
    ``<results_dir>/autoencoders-<dataset>.json`` / ``.md``; plots go to ``<images_dir>/autoencoders/``.
    """
    _check_choice(constraint_type, CONSTRAINTS, "constraint_type")
    _check_choice(encoder_type, ENCODERS, "encoder_type")
    _check_choice(distance, AUTOENCODER_DISTANCES, "distance")
    _check_choice(reconstruction, RECONSTRUCTION_LOSSES, "reconstruction")
    if distance == "kl" and encoder_type != "vae":
        raise ValueError("distance='kl' compares VAE posteriors; use encoder_type='vae' or distance='euclidean'")
    if reconstruction == "bce" and normalize:
        raise ValueError("reconstruction='bce' needs inputs in [0, 1], which standardised inputs are not; "
                         "pass normalize=False with it")
    if feature_extractor is not None:
        _check_choice(feature_extractor, EXTRACTORS, "feature_extractor")
    weights = _check_weights(list_of_weights)
    latent_dims = [list_of_latent_dims] if isinstance(list_of_latent_dims, int) else list(list_of_latent_dims)
    if not latent_dims:
        raise ValueError("list_of_latent_dims is empty; give latent sizes, e.g. [2, 16]")
    latent_dims = [check_int(dim, "every latent size", 1) for dim in latent_dims]
    num_iters = check_int(num_iters, "num_iters", 1)
    batch_size = check_int(batch_size, "batch_size", 4)
    if quick:
        num_iters = min(num_iters, QUICK_ITERS)
        max_train = min(max_train or QUICK_SIZES[0], QUICK_SIZES[0])
        max_test = min(max_test or QUICK_SIZES[1], QUICK_SIZES[1])
        results_dir = None if results_dir is None else os.path.join(results_dir, "quick")
        images_dir = None if images_dir is None else os.path.join(images_dir, "quick")
    if cache_dir is None:
        cache_dir = os.path.join(os.fspath(root), "feature-cache")

    if splits is None:
        image_size = (feature_params or {}).get("image_size", 224) if feature_extractor == "resnet" else IMAGENET_SIZE
        splits = load_image_splits(dataset, root, download, image_size)
    generator = torch.Generator().manual_seed(seed)
    train, test = subset_split(splits[0], max_train, generator), subset_split(splits[1], max_test, generator)
    train_labels, test_labels = relabel(train.labels, composite_labels), relabel(test.labels, composite_labels)
    names = label_names(train.classes, torch.cat([train_labels, test_labels]), composite_labels, keys)
    n_classes, n_samples = balanced_batch_shape(train_labels, batch_size)
    features = feature_extractor or "images"
    train_inputs, test_inputs, mean, std, image_shape = prepare_inputs(
        train, test, dataset, feature_extractor, feature_params, normalize, cache_dir, progress)
    # one test item of each class (the first), for the reconstruction figures
    shown = torch.stack([(test_labels == label).nonzero()[0, 0] for label in sorted(names)
                         if (test_labels == label).any()])[:12]

    label = run_label(constraint_type, encoder_type, features, distance)
    composite = None if composite_labels is None else json.dumps({str(k): int(v) for k, v in
                                                                   sorted(composite_labels.items())})
    rows = []
    for latent_dim in latent_dims:
        for weight in weights:
            torch.manual_seed(seed)
            mining_generator = torch.Generator().manual_seed(seed)
            model = make_autoencoder(train_inputs.shape[1:], latent_dim, encoder_type == "vae", hidden_dims,
                                     dropout_val)
            loss_fn = build_loss(constraint_type, weight, margin, beta, distance, reconstruction, mining_generator)
            sampler = BalancedBatchSampler(train_labels, n_classes, n_samples, seed=seed)
            description = f"{dataset} {label} M={weight:g} {latent_dim}-D"
            print(f"== {description}: {num_iters} iterations, batches of {n_classes} classes x {n_samples}",
                  flush=True)
            started = time.perf_counter()
            final = train_model(model, loss_fn, train_inputs, train_labels, sampler, num_iters, learning_rate,
                                device, progress, description)
            train_seconds = time.perf_counter() - started
            train_embeddings, _ = embed(model, train_inputs, reconstruction, device)
            test_embeddings, reconstruction_mse = embed(model, test_inputs, reconstruction, device)

            row = {"dataset": dataset, "constraint": constraint_type, "encoder": encoder_type,
                   "features": features, "distance": distance, "composite_labels": composite,
                   "weight": weight, "latent_dim": latent_dim, "num_iters": num_iters,
                   "batch_size": n_classes * n_samples, "margin": float(margin), "beta": float(beta),
                   "dropout": float(dropout_val), "normalize": bool(normalize), "reconstruction": reconstruction,
                   "seed": seed, "quick": bool(quick), "n_train": len(train_labels), "n_test": len(test_labels)}
            row.update(evaluate_embeddings(train_embeddings, train_labels, test_embeddings, test_labels, k=5,
                                           seed=seed))
            row["reconstruction_mse"] = reconstruction_mse
            row.update({f"final_{key}_loss": value for key, value in final.items() if key != "n_selected"})
            row["final_n_selected"] = final["n_selected"]
            row["train_seconds"] = train_seconds
            row["latent_plot"] = row["reconstruction_plot"] = None
            if images_dir is not None:
                stem = os.path.join(images_dir, "autoencoders", f"{dataset}_{label}_M{weight:g}_{latent_dim}d")
                row["latent_plot"] = plot_latents(test_embeddings, test_labels, names,
                                                  f"{dataset} {label}, M = {weight:g}, {latent_dim}-D (test)",
                                                  stem + "_latent.png", seed)
                if image_shape is not None:
                    with torch.no_grad():
                        output = model.eval()(test_inputs[shown].to(device or "cpu"))
                    rebuilt = output.reconstruction.cpu()
                    if reconstruction == "bce":
                        rebuilt = rebuilt.sigmoid()
                    row["reconstruction_plot"] = plot_reconstructions(
                        test_inputs[shown], rebuilt, mean, std, image_shape, stem + "_reconstructions.png",
                        f"{label}, M = {weight:g}, {latent_dim}-D")
            print(f"   kNN acc {row['knn_accuracy']:.3f}, MAP@R {row['map_at_r']:.3f}, reconstruction MSE "
                  f"{reconstruction_mse:.4f}, {train_seconds:.0f} s", flush=True)
            rows.append(row)
    if images_dir is not None:
        plot_tradeoff(rows, os.path.join(images_dir, "autoencoders", f"{dataset}_{label}_tradeoff.png"),
                      f"{dataset}: {label}")
    if results_dir is not None:
        record_results(rows, dataset, results_dir)
    return rows


# ---------------------------------------------------------------------------------------------------
# command line


def _parse_list(text, convert, what):
    try:
        return [convert(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SystemExit(f"--{what}: expected a comma-separated list, got {text!r} ({error})")


def _parse_composite(text):
    """'0:0,2:0,6:0' -> {0: 0, 2: 0, 6: 0}."""
    try:
        return {int(old): int(new) for old, new in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except ValueError:
        raise SystemExit(f"--composite-labels: expected old:new pairs such as 0:0,2:0,6:0, got {text!r}")


def main(argv=None):
    """Command line: one ``run_experiment`` per (constraint, encoder) given; prints the table."""
    parser = argparse.ArgumentParser(
        description="Siamese / triplet autoencoders and VAEs: sweep the weight M of the metric loss.")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    parser.add_argument("--constraint", default="pairwise,triplet",
                        help=f"comma-separated subset of {', '.join(CONSTRAINTS)}")
    parser.add_argument("--encoder", default="embenc,vae", help=f"comma-separated subset of {', '.join(ENCODERS)}")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="values of M, comma-separated")
    parser.add_argument("--latent-dims", default="2", help="latent sizes, comma-separated")
    parser.add_argument("--iters", type=int, default=20000, help="training iterations per model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", default="none", choices=("none", *EXTRACTORS),
                        help="none: the images (convolutional autoencoder); else an extractor (MLP autoencoder)")
    parser.add_argument("--resnet-weights", default=None, help="ResNet-50 state_dict file (default: torch.hub cache)")
    parser.add_argument("--margin", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the VAE's KL term")
    parser.add_argument("--distance", default="euclidean", choices=AUTOENCODER_DISTANCES)
    parser.add_argument("--reconstruction", default="mse", choices=RECONSTRUCTION_LOSSES)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--no-normalize", action="store_true", help="do not standardise the inputs")
    parser.add_argument("--composite-labels", default=None, help="merge classes, e.g. 0:0,2:0,6:0")
    parser.add_argument("--keys", default=None, help="class names for the plots, comma-separated, by label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data", help="data folder (also holds the feature cache)")
    parser.add_argument("--no-download", action="store_true", help="never download data")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: small subsets, few iterations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    constraints = _parse_list(args.constraint, str, "constraint")
    encoders = _parse_list(args.encoder, str, "encoder")
    for constraint in constraints:
        if constraint not in CONSTRAINTS:
            parser.error(f"unknown constraint {constraint!r}; choose from {', '.join(CONSTRAINTS)}")
    for encoder in encoders:
        if encoder not in ENCODERS:
            parser.error(f"unknown encoder {encoder!r}; choose from {', '.join(ENCODERS)}")
    feature_extractor = None if args.features == "none" else args.features
    feature_params = {"weights": args.resnet_weights} if feature_extractor == "resnet" else None
    # loaded once for all the runs
    splits = load_image_splits(args.dataset, args.root, not args.no_download,
                               224 if feature_extractor == "resnet" else IMAGENET_SIZE)
    started, rows = time.perf_counter(), []
    for constraint in constraints:
        for encoder in encoders:
            rows += run_experiment(
                constraint, encoder, args.dataset, _parse_list(args.weights, float, "weights"),
                _parse_list(args.latent_dims, int, "latent-dims"), num_iters=args.iters, batch_size=args.batch_size,
                keys=None if args.keys is None else args.keys.split(","),
                composite_labels=None if args.composite_labels is None else _parse_composite(args.composite_labels),
                margin=args.margin, dropout_val=args.dropout, normalize=not args.no_normalize,
                feature_extractor=feature_extractor, seed=args.seed, feature_params=feature_params, beta=args.beta,
                distance=args.distance, reconstruction=args.reconstruction, root=args.root,
                download=not args.no_download, splits=splits, quick=args.quick, device=args.device,
                progress=not args.no_progress)
    where = "quick/" if args.quick else ""
    if len(constraints) * len(encoders) > 1:  # every model of the sweep in one trade-off figure
        plot_tradeoff(rows, os.path.join("images", where, "autoencoders", f"{args.dataset}_tradeoff.png"),
                      f"{args.dataset}: retrieval against reconstruction")
    print()
    print(results_table(rows))
    print(f"Total {time.perf_counter() - started:.0f} s. Results in results/{where}autoencoders-{args.dataset}.md, "
          f"plots in images/{where}autoencoders/.")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
