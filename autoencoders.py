"""Siamese and triplet autoencoders and VAEs: metric learning that keeps the structure of the data.

Each model is trained on ``M * metric loss + (1 - M) * autoencoder loss``
(``losses.PairwiseAutoencoderLoss`` / ``TripletAutoencoderLoss``): M = 1 is a plain siamese or triplet
network, M = 0 a plain autoencoder or VAE, and the values between trade retrieval quality against
reconstruction. Pairs and triplets are mined online in class-stratified batches
(``datasets.BalancedBatchSampler`` and the selectors of ``utils.py``).

- the data: ``known_datasets.load_image_splits(dataset, root, download)`` gives the train and test images
  in [0, 1] of any dataset of ``known_datasets.KNOWN_DATASETS`` ("mnist", "fashion-mnist", "cifar10",
  "imagenet"), as ``InMemoryDataset`` s;
- ``run_experiment(constraint_type, encoder_type, dataset, list_of_weights, list_of_latent_dims, ...)``:
  one model per (M, latent size) on raw images (convolutional autoencoder) or on features from
  ``features.py`` (MLP autoencoder), each scored on the test split with ``metrics.evaluate_embeddings``
  (k-NN accuracy with k = 5 against the train split, P@1, R-Precision, MAP@R, NMI, ROC-AUC) and its
  reconstruction error, its test latents plotted (t-SNE above 2-D) and the table written to
  ``results/autoencoders-<dataset>.md`` and ``.json``, rows keyed by every setting that defines them;
  only the study's settings (``SWEEP_SETTINGS``) write there and to ``images/autoencoders/``: a run with
  others (iterations, batch size, seed, ...) writes the same files under
  ``runs/autoencoders-<dataset>/<settings tag>/`` (``sweep_outputs``), a quick run under
  ``runs/autoencoders-<dataset>/quick/``;
- ``plot_tradeoff(rows)``: retrieval quality and reconstruction error against M;
- every model is trained by ``trainer.fit``, the library's one training loop: an iteration budget is a
  number of epochs of a fixed number of batches (``training_epochs``);
- ``main(argv)``: the command line, e.g.
  ``python autoencoders.py --dataset fashion-mnist --constraint pairwise,triplet --encoder embenc,vae
  --weights 0,0.25,0.5,0.75,1 --latent-dims 2``; a user's mistake is one line and exit status 2
  (``cli.run``).
"""

import itertools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import cli
from datasets import BalancedBatchSampler, random_subset
from known_datasets import (IMAGENET_SIZE, KNOWN_DATASETS, load_cifar10, load_image_splits, load_imagenet,  # noqa: F401
                            read_cifar10)
from results import RUNS_ROOT, markdown_table, merge_results, output_dirs, save_figure, settings_tag
from features import EXTRACTORS, cached_features
from losses import AUTOENCODER_DISTANCES, RECONSTRUCTION_LOSSES, PairwiseAutoencoderLoss, TripletAutoencoderLoss
from metrics import Metric, evaluate_embeddings
from networks import make_autoencoder
from projections import project_2d, subsample
from trainer import fit, flush_denormal_everywhere, resolve_device
from utils import (AllPositivePairSelector, AllTripletSelector, HardNegativePairSelector,
                   RandomNegativeTripletSelector, check_choice, check_int)

DATASETS = tuple(KNOWN_DATASETS)  # (load_cifar10, read_cifar10, load_imagenet: imported for their old path here)
CONSTRAINTS = ("pairwise", "triplet")
ENCODERS = ("embenc", "vae")  # plain autoencoder, variational autoencoder

LEARNING_RATE = 1e-3
HIDDEN_DIMS = (512, 256)  # MLP autoencoder on feature vectors
EVALUATION_BATCH = 1024
PLOT_POINTS = 2000  # test points in a latent plot (t-SNE time grows fast with the count)
LOSS_TERMS = ("total", "metric", "reconstruction", "kl", "n_selected")

# quick=True: a smoke run on small random subsets, written under runs/autoencoders-<dataset>/quick/ (sweep_outputs)
QUICK_SIZES = (2000, 1000)
QUICK_ITERS = 200


# ------------------------------------------------------------------------------------------ labels

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


# -------------------------------------------------------- inputs: images or features, standardised

def prepare_inputs(train, test, dataset, feature_extractor=None, feature_params=None, normalize=True,
                   cache_dir="data/feature-cache", progress=True):
    """Model inputs of both splits: ``(train_inputs, test_inputs, mean, std, image_shape)``.

    Takes the train and test ``InMemoryDataset`` s of images (N, C, H, W) in [0, 1]
    (``known_datasets.load_image_splits``). Without ``feature_extractor`` the inputs are the images; with one
    ("pixels", "hog" or "resnet", called with ``feature_params``) they are its features (N, F),
    computed once per split and cached under ``cache_dir``. With ``normalize`` both splits are
    standardised with the train split's mean and standard deviation (per channel for images, per
    feature for vectors; a constant feature is left centred, not divided by 0); otherwise mean = 0
    and std = 1. ``image_shape`` is (C, H, W) when the inputs can be shown as images (raw images or
    pixels), else None.
    """
    if feature_extractor is None:
        train_inputs, test_inputs = train.data, test.data
        image_shape, dims = tuple(train_inputs.shape[1:]), (0, 2, 3)
    else:
        check_choice(feature_extractor, EXTRACTORS, "feature_extractor")
        params = dict(feature_params or {})
        train_inputs, test_inputs = (cached_features(feature_extractor, split.data, dataset, name, cache_dir,
                                                     progress=progress, **params)
                                     for name, split in (("train", train), ("test", test)))
        image_shape, dims = None, (0,)
        if feature_extractor == "pixels":
            image_shape = tuple(train.data.shape[1:])
    if normalize:
        std, mean = torch.std_mean(train_inputs, dim=dims, keepdim=True)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(()), torch.ones(())
    return (train_inputs - mean) / std, (test_inputs - mean) / std, mean, std, image_shape


# ------------------------------------------------------------------------- training and evaluation

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


def training_epochs(num_iters, batches_per_pass):
    """``(epochs, batches per epoch)`` of an iteration budget: an epoch is one pass of the batch sampler
    (``batches_per_pass`` batches), or ``num_iters`` batches when that is fewer; when the budget is not a
    whole number of epochs, the last epoch is the shorter remainder (``EpochOfBatches``)."""
    batches = min(check_int(num_iters, "num_iters", 1), check_int(batches_per_pass, "batches_per_pass", 1))
    return math.ceil(num_iters / batches), batches


class EpochOfBatches:
    """Epochs of ``n_batches`` batches of ``batch_sampler`` (one pass each, through its ``set_epoch``), the
    last one cut so that all epochs together hold ``total`` batches (default: no cut). This is the plain
    loop "``total`` batches, pass after pass" in ``trainer.fit``'s epochs."""

    def __init__(self, batch_sampler, n_batches, total=None):
        self.batch_sampler, self.n_batches = batch_sampler, check_int(n_batches, "n_batches", 1)
        self.total = None if total is None else check_int(total, "total", 1)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch)

    def __len__(self):
        length = min(self.n_batches, len(self.batch_sampler))
        if self.total is not None:
            length = max(0, min(length, self.total - self.epoch * self.n_batches))
        return length

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), len(self))


class ReconstructionSet(Dataset):
    """Inputs ``(N, ...)`` with labels ``(N,)`` served whole batches at a time as ``(inputs, (inputs,
    labels))``: the model sees the inputs, the loss gets them back as the reconstruction target."""

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.inputs)

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = self.inputs[index]
        return batch, (batch, self.labels[index])


def _whole_batch(batch):  # ReconstructionSet already hands out whole batches
    return batch


class AutoencoderObjective:
    """``loss_fn`` for ``trainer.fit``: ``(output, inputs, labels) -> (total loss, terms)``, the terms
    being ``PairwiseAutoencoderLoss.terms`` / ``TripletAutoencoderLoss.terms`` (read by ``LossTerm``)."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, output, inputs, labels):
        terms = self.loss.terms(output, inputs, labels)
        return terms["total"], terms


class LossTerm(Metric):
    """The mean over an epoch's batches of one of the terms ``AutoencoderObjective`` returns."""

    def __init__(self, term):
        self.term = term
        self.reset()

    def __call__(self, outputs, target, loss):
        value = loss[1][self.term]
        self.sum = self.sum + (value.detach() if torch.is_tensor(value) else value)
        self.count += 1
        return self.value()

    def reset(self):
        self.sum, self.count = 0.0, 0

    def value(self):
        return float(self.sum) / self.count if self.count else float("nan")

    def name(self):
        return self.term


def train_model(model, loss_fn, inputs, labels, sampler, num_iters, learning_rate=LEARNING_RATE, device=None,
                progress=True, checkpoint_dir=None):
    """Train ``model`` with Adam on ``loss_fn`` (a ``PairwiseAutoencoderLoss`` / ``TripletAutoencoderLoss``)
    for the budget of ``num_iters`` batches of ``inputs (N, ...)`` / ``labels (N,)`` drawn by ``sampler``
    (a ``BalancedBatchSampler``), through ``trainer.fit`` in ``training_epochs`` epochs. ``device``: as
    ``fit`` (default: the best available); ``checkpoint_dir``: ``fit``'s checkpoints, resumed when present.

    Returns the loss terms of the last epoch, averaged over its batches: a dict of floats ``total``,
    ``metric``, ``reconstruction``, ``kl``, ``n_selected``, and ``num_iters``, the batches trained on.
    Raises FloatingPointError on a NaN or infinite loss, before that step is taken (``fit``).
    """
    epochs, batches = training_epochs(num_iters, len(sampler))
    # A generator of its own: DataLoader draws a worker seed per epoch from it, not from torch's global RNG,
    # which the model's dropout and VAE noise draw from.
    loader = DataLoader(ReconstructionSet(inputs, labels), batch_sampler=EpochOfBatches(sampler, batches, num_iters),
                        collate_fn=_whole_batch, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    history = fit(loader, None, model, AutoencoderObjective(loss_fn), optimizer, None, epochs, device=device,
                  progress=progress, log_interval=max(batches, 1), metrics=[LossTerm(term) for term in LOSS_TERMS],
                  checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None)
    final = {term: history[f"train_{term}"][-1] for term in LOSS_TERMS}
    final["num_iters"] = num_iters
    return final


def embed(model, inputs, reconstruction="mse", batch_size=EVALUATION_BATCH):
    """Embeddings (means) ``(N, L)`` of ``inputs`` and the mean squared reconstruction error over all
    values (in the inputs' units; with a BCE model the decoder's logits go through a sigmoid first),
    in eval mode (dropout off, a VAE decodes its mean), on the device of the model's weights."""
    device = next(model.parameters()).device
    model.eval()
    embeddings, squared_error = [], 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size].to(device)
            output = model(batch)
            rebuilt = output.reconstruction.sigmoid() if reconstruction == "bce" else output.reconstruction
            squared_error += float((rebuilt - batch).pow(2).sum())
            embeddings.append(output.mean.float().cpu())
    return torch.cat(embeddings), squared_error / inputs.numel()


# ------------------------------------------------------------------------------------------- plots

def _figure(width, height):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in notebooks

    return Figure(figsize=(width, height))


def latent_points(embeddings, seed=0, max_points=PLOT_POINTS):
    """``(points (n, 2), chosen (n,))``: a seeded random subset of at most ``max_points`` rows of
    ``embeddings (N, L)`` in 2-D: the embeddings themselves when L <= 2, else their t-SNE map
    (scikit-learn, PCA initialisation, ``random_state=seed``)."""
    chosen = subsample(len(embeddings), max_points, seed)
    points = project_2d(embeddings[chosen], "tsne", seed)
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
    return save_figure(figure, path)


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
    return save_figure(figure, path)


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
        save_figure(figure, path)
    return figure


# ----------------------------------------------------------------------------------------- results

# A row is keyed by every setting that defines it (a run with other settings adds rows, never replaces one).
RESULT_KEY = ("constraint", "encoder", "features", "distance", "composite_labels", "latent_dim", "weight", "num_iters",
              "batch_size", "margin", "beta", "dropout", "normalize", "reconstruction", "seed", "quick", "n_train",
              "n_test")
COLUMNS = [("constraint", "constraint", "{}"), ("encoder", "encoder", "{}"), ("features", "features", "{}"),
           ("weight", "M", "{:g}"), ("latent_dim", "dim", "{}"), ("knn_accuracy", "kNN acc", "{:.3f}"),
           ("precision_at_1", "P@1", "{:.3f}"), ("map_at_r", "MAP@R", "{:.3f}"), ("nmi", "NMI", "{:.3f}"),
           ("roc_auc", "ROC-AUC", "{:.3f}"), ("reconstruction_mse", "recon MSE", "{:.4f}"),
           ("num_iters", "iters", "{}"), ("train_seconds", "train s", "{:.0f}"), ("threads", "threads", "{}")]


def results_table(rows):
    """Markdown table of result rows, one line per model."""
    return markdown_table(rows, COLUMNS)


def record_results(new_rows, dataset, results_dir="results"):
    """Merge ``new_rows`` into ``<results_dir>/autoencoders-<dataset>.json`` (a row with the same ``RESULT_KEY``
    values replaces the old one) and rewrite ``autoencoders-<dataset>.md``. Returns all the rows."""
    header = (f"# Siamese / triplet autoencoders on {dataset}\n\n"
              "M weighs the metric loss against the autoencoder loss (1: metric only, 0: reconstruction "
              "only). Test split; kNN acc: 5-NN with the train split as gallery; recon MSE: mean squared "
              "reconstruction error of the (standardised) inputs. Written by autoencoders.run_experiment.\n\n")
    return merge_results(os.path.join(results_dir, f"autoencoders-{dataset}"), new_rows, RESULT_KEY,
                         lambda r: (r["constraint"], r["encoder"], r["features"], str(r["distance"]),
                                    str(r["composite_labels"]), r["latent_dim"], r["weight"],
                                    tuple(str(r.get(key)) for key in RESULT_KEY[7:])),
                         results_table, header)


# ---------------------------------------------------------------------------------- the experiment

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
                   device=None, results_dir="results", images_dir="images", runs_dir=RUNS_ROOT, progress=True):
    """Train a siamese / triplet autoencoder or VAE for every weight M and latent size; score, plot and
    tabulate them.

    Args:
        constraint_type: "pairwise" (contrastive loss on mined pairs) or "triplet" (on mined triplets).
        encoder_type: "embenc" (plain autoencoder) or "vae".
        dataset: "mnist", "fashion-mnist", "cifar10" or "imagenet" (see ``load_image_splits``; ``root`` is
            the data folder, ``download`` allows torchvision's download). With ``splits`` (a pair of
            ``InMemoryDataset`` of images in [0, 1], as ``load_image_splits`` gives) the data is taken from
            there and ``dataset`` only names the outputs.
        list_of_weights: the values of M in [0, 1]; list_of_latent_dims: the latent sizes.
        num_iters: Adam steps per model (learning rate ``learning_rate``).
        batch_size: items per class-stratified batch (``balanced_batch_shape``: 64 with 10 classes gives 10 x 6).
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
            (subsets of ``QUICK_SIZES``, at most ``QUICK_ITERS`` iterations, outputs under
            ``<runs_dir>/autoencoders-<dataset>/quick/``).
        results_dir, images_dir: the study's table and plots (None: not written); runs_dir: other runs'.

    Returns the result rows of this call, one dict per model: the settings, ``metrics.evaluate_embeddings``
    of the test embeddings against the train ones (``knn_accuracy`` with k = 5, ``precision_at_1``,
    ``r_precision``, ``map_at_r``, ``nmi``, ``roc_auc``), ``reconstruction_mse`` on the test split, the
    final training losses, ``train_seconds``, ``threads`` and the plot paths. The rows are merged into
    ``autoencoders-<dataset>.json`` / ``.md`` and the plots drawn where ``sweep_outputs`` says: with the
    study's settings (``SWEEP_SETTINGS``) ``results_dir`` and ``<images_dir>/autoencoders/``, else a folder
    of their own under ``runs_dir``, never the study's files.
    """
    weights, latent_dims, num_iters, batch_size = _check_sweep(
        constraint_type, encoder_type, distance, reconstruction, normalize, feature_extractor, list_of_weights,
        list_of_latent_dims, num_iters, batch_size)
    chosen = dict(num_iters=num_iters, batch_size=batch_size, margin=margin, dropout_val=dropout_val,
                  normalize=normalize, seed=seed, beta=beta, reconstruction=reconstruction, hidden_dims=hidden_dims,
                  learning_rate=learning_rate, max_train=max_train, max_test=max_test,
                  composite_labels=composite_labels, feature_params=feature_params)
    results_dir, plots_dir = sweep_outputs(dataset, quick, results_dir, images_dir, runs_dir, **chosen)
    if quick:
        num_iters = min(num_iters, QUICK_ITERS)
        max_train = min(max_train or QUICK_SIZES[0], QUICK_SIZES[0])
        max_test = min(max_test or QUICK_SIZES[1], QUICK_SIZES[1])
    data = sweep_data(dataset, splits, root, download, seed, max_train, max_test, composite_labels, keys,
                      feature_extractor, feature_params, normalize, cache_dir, progress)
    label = run_label(constraint_type, encoder_type, data["features"], distance)
    settings, model_settings = _sweep_settings(data, dict(chosen, num_iters=num_iters, distance=distance, quick=quick,
                                                          encoder_type=encoder_type, constraint_type=constraint_type))
    rows = [_sweep_row(data, settings, model_settings, weight, latent_dim, device, progress, plots_dir, label)
            for latent_dim in latent_dims for weight in weights]
    if plots_dir is not None:
        plot_tradeoff(rows, os.path.join(plots_dir, f"{dataset}_{label}_tradeoff.png"), f"{dataset}: {label}")
    if results_dir is not None:
        record_results(rows, dataset, results_dir)
    return rows


# The settings of the committed sweep (results/autoencoders-<dataset>.*, images/autoencoders/): run_experiment's
# defaults. A run with any other value writes to its own folder (sweep_outputs), named by what it changed.
SWEEP_SETTINGS = {"num_iters": 20000, "batch_size": 64, "margin": 1.0, "dropout_val": 0.2, "normalize": True,
                  "seed": 0, "beta": 1.0, "reconstruction": "mse", "hidden_dims": HIDDEN_DIMS,
                  "learning_rate": LEARNING_RATE, "max_train": None, "max_test": None, "composite_labels": None,
                  "feature_params": None}


def sweep_tag(quick=False, **settings):
    """The folder name of a sweep run with ``settings`` (SWEEP_SETTINGS' names; the others keep the study's
    values), by ``results.settings_tag``: ``""`` for the study's, else what changed, e.g. ``num-iters-60_seed-1``
    (a label map or extractor parameters by a short hash); ``"quick"`` for a quick run, whatever its settings
    (its rows record them). An unknown name raises ValueError."""
    if settings.get("feature_params") is not None:  # parameters left None are the extractor's defaults
        settings["feature_params"] = {k: v for k, v in settings["feature_params"].items() if v is not None} or None
    tag = settings_tag(settings, SWEEP_SETTINGS)  # (checks the names of a quick run's settings too)
    return settings_tag({"quick": quick}, {"quick": False}) or tag


def sweep_outputs(dataset, quick=False, results_dir="results", images_dir="images", runs_dir=RUNS_ROOT, **settings):
    """Where a sweep run writes: ``(results folder, plots folder)``, each None when ``results_dir`` /
    ``images_dir`` is None. The study's settings (``sweep_tag`` empty): ``results_dir`` and
    ``<images_dir>/autoencoders``; any other run, a quick one too: ``<runs_dir>/autoencoders-<dataset>/<sweep_tag>/``
    (``results.output_dirs``): never a committed row or figure."""
    tag = sweep_tag(quick, **settings)
    if not tag:
        return results_dir, None if images_dir is None else os.path.join(images_dir, "autoencoders")
    folders = output_dirs(f"autoencoders-{dataset}", tag, committed=False, root=runs_dir)
    return (None if results_dir is None else folders.results), (None if images_dir is None else folders.images)


def sweep_data(dataset, splits=None, root="data", download=True, seed=0, max_train=None, max_test=None,
               composite_labels=None, keys=None, feature_extractor=None, feature_params=None, normalize=True,
               cache_dir=None, progress=True):
    """The data of a sweep (run_experiment's arguments of the same names): ``{'train': (inputs, labels),
    'test': (inputs, labels), 'mean', 'std', 'image_shape'`` (prepare_inputs), ``'names'`` ({label: name}),
    ``'features'`` ("images" or the extractor) and ``'dataset'``."""
    cache_dir = os.path.join(os.fspath(root), "feature-cache") if cache_dir is None else cache_dir
    if splits is None:
        image_size = (feature_params or {}).get("image_size", 224) if feature_extractor == "resnet" else IMAGENET_SIZE
        splits = load_image_splits(dataset, root, download, image_size)
    generator = torch.Generator().manual_seed(seed)
    train, test = random_subset(splits[0], max_train, generator), random_subset(splits[1], max_test, generator)
    train_labels, test_labels = relabel(train.targets, composite_labels), relabel(test.targets, composite_labels)
    train_inputs, test_inputs, mean, std, image_shape = prepare_inputs(
        train, test, dataset, feature_extractor, feature_params, normalize, cache_dir, progress)
    return {"train": (train_inputs, train_labels), "test": (test_inputs, test_labels), "mean": mean, "std": std,
            "image_shape": image_shape, "features": feature_extractor or "images", "dataset": dataset,
            "names": label_names(train.classes, torch.cat([train_labels, test_labels]), composite_labels, keys)}


def _sweep_settings(data, chosen):
    """``(what every row records, what every model trains with)`` of a sweep on ``data`` with ``chosen``."""
    train_labels, test_labels = data["train"][1], data["test"][1]
    n_classes, n_samples = balanced_batch_shape(train_labels, chosen["batch_size"])
    composite_labels = chosen["composite_labels"]
    settings = {"dataset": data["dataset"], "constraint": chosen["constraint_type"], "encoder": chosen["encoder_type"],
                "features": data["features"], "distance": chosen["distance"],
                "composite_labels": None if composite_labels is None else json.dumps(
                    {str(k): int(v) for k, v in sorted(composite_labels.items())}),
                "batch_size": n_classes * n_samples, "margin": float(chosen["margin"]), "beta": float(chosen["beta"]),
                "dropout": float(chosen["dropout_val"]), "normalize": bool(chosen["normalize"]),
                "reconstruction": chosen["reconstruction"], "seed": chosen["seed"], "quick": bool(chosen["quick"]),
                "n_train": len(train_labels), "n_test": len(test_labels)}
    model_settings = {name: chosen[name] for name in ("encoder_type", "constraint_type", "margin", "beta", "distance",
                                                      "reconstruction", "hidden_dims", "num_iters", "learning_rate",
                                                      "seed")}
    model_settings.update(dropout=chosen["dropout_val"], batch_shape=(n_classes, n_samples))
    return settings, model_settings


def _sweep_row(data, settings, model_settings, weight, latent_dim, device, progress, plots_dir, label):
    """One model of a sweep (``_train_and_score``), announced and summed up on stdout; returns its row."""
    dataset, (n_classes, n_samples) = settings["dataset"], model_settings["batch_shape"]
    print(f"== {dataset} {label} M={weight:g} {latent_dim}-D: {model_settings['num_iters']} iterations, batches of "
          f"{n_classes} classes x {n_samples}", flush=True)
    plot_stem = None if plots_dir is None else os.path.join(plots_dir, f"{dataset}_{label}_M{weight:g}_{latent_dim}d")
    row = dict(settings, weight=weight, latent_dim=latent_dim)
    row.update(_train_and_score(data, weight, latent_dim, model_settings, device, progress, plot_stem,
                                f"{label}, M = {weight:g}, {latent_dim}-D", dataset))
    print(f"   kNN acc {row['knn_accuracy']:.3f}, MAP@R {row['map_at_r']:.3f}, reconstruction MSE "
          f"{row['reconstruction_mse']:.4f}, {row['train_seconds']:.0f} s", flush=True)
    return row


def _check_sweep(constraint_type, encoder_type, distance, reconstruction, normalize, feature_extractor,
                 list_of_weights, list_of_latent_dims, num_iters, batch_size):
    """run_experiment's argument checks; returns ``(weights, latent sizes, num_iters, batch_size)``."""
    check_choice(constraint_type, CONSTRAINTS, "constraint_type")
    check_choice(encoder_type, ENCODERS, "encoder_type")
    check_choice(distance, AUTOENCODER_DISTANCES, "distance")
    check_choice(reconstruction, RECONSTRUCTION_LOSSES, "reconstruction")
    if distance == "kl" and encoder_type != "vae":
        raise ValueError("distance='kl' compares VAE posteriors; use encoder_type='vae' or distance='euclidean'")
    if reconstruction == "bce" and normalize:
        raise ValueError("reconstruction='bce' needs inputs in [0, 1], which standardised inputs are not; "
                         "pass normalize=False with it")
    if feature_extractor is not None:
        check_choice(feature_extractor, EXTRACTORS, "feature_extractor")
    weights = _check_weights(list_of_weights)
    latent_dims = [list_of_latent_dims] if isinstance(list_of_latent_dims, int) else list(list_of_latent_dims)
    if not latent_dims:
        raise ValueError("list_of_latent_dims is empty; give latent sizes, e.g. [2, 16]")
    latent_dims = [check_int(dim, "every latent size", 1) for dim in latent_dims]
    return weights, latent_dims, check_int(num_iters, "num_iters", 1), check_int(batch_size, "batch_size", 4)


def _train_and_score(data, weight, latent_dim, settings, device, progress, plot_stem, title, dataset):
    """One model of the sweep, from the sweep's seed: trained, scored and (``plot_stem`` not None) plotted.
    Returns its part of the row: ``train_seconds``, ``_score_model``'s scores and the plot paths."""
    train_inputs, train_labels = data["train"]
    torch.manual_seed(settings["seed"])
    model = make_autoencoder(train_inputs.shape[1:], latent_dim, settings["encoder_type"] == "vae",
                             settings["hidden_dims"], settings["dropout"])
    loss_fn = build_loss(settings["constraint_type"], weight, settings["margin"], settings["beta"],
                         settings["distance"], settings["reconstruction"],
                         torch.Generator().manual_seed(settings["seed"]))
    sampler = BalancedBatchSampler(train_labels, *settings["batch_shape"], seed=settings["seed"])
    started = time.perf_counter()
    final = train_model(model, loss_fn, train_inputs, train_labels, sampler, settings["num_iters"],
                        settings["learning_rate"], device, progress)
    # the thread count with the time: both the time and, through float summation order, the scores move with it
    row = {"train_seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}
    scores, test_embeddings = _score_model(model, data, settings["reconstruction"], final, settings["seed"])
    row.update(scores, latent_plot=None, reconstruction_plot=None)
    if plot_stem is not None:
        row.update(_plot_model(model, data, test_embeddings, settings["reconstruction"], settings["seed"], title,
                               f"{dataset} {title}", plot_stem))
    return row


def _score_model(model, data, reconstruction, final, seed):
    """A trained model's part of its row: ``metrics.evaluate_embeddings`` of the test means against the
    train ones (k = 5), the test reconstruction MSE and ``train_model``'s final losses. Returns
    ``(scores, test embeddings (M, L))``."""
    (train_inputs, train_labels), (test_inputs, test_labels) = data["train"], data["test"]
    train_embeddings, _ = embed(model, train_inputs, reconstruction)
    test_embeddings, reconstruction_mse = embed(model, test_inputs, reconstruction)
    scores = evaluate_embeddings(train_embeddings, train_labels, test_embeddings, test_labels, k=5, seed=seed)
    scores["reconstruction_mse"] = reconstruction_mse
    scores.update({f"final_{key}_loss": final[key] for key in LOSS_TERMS if key != "n_selected"})
    scores["final_n_selected"], scores["num_iters"] = final["n_selected"], final["num_iters"]
    return scores, test_embeddings


def _plot_model(model, data, test_embeddings, reconstruction, seed, title, latent_title, stem):
    """A trained model's latent plot (its ``test_embeddings`` (M, L)) and, for inputs that are images, its
    reconstructions of one test item per class; returns ``{'latent_plot', 'reconstruction_plot'}`` (paths,
    or None)."""
    test_inputs, test_labels = data["test"]
    plots = {"latent_plot": plot_latents(test_embeddings, test_labels, data["names"], f"{latent_title} (test)",
                                         stem + "_latent.png", seed), "reconstruction_plot": None}
    if data["image_shape"] is not None:
        shown = torch.stack([(test_labels == name).nonzero()[0, 0] for name in sorted(data["names"])
                             if (test_labels == name).any()])[:12]  # the first test item of each class
        with torch.no_grad():
            rebuilt = model.eval()(test_inputs[shown].to(next(model.parameters()).device)).reconstruction.cpu()
        if reconstruction == "bce":
            rebuilt = rebuilt.sigmoid()
        plots["reconstruction_plot"] = plot_reconstructions(test_inputs[shown], rebuilt, data["mean"], data["std"],
                                                            data["image_shape"], stem + "_reconstructions.png", title)
    return plots


# ------------------------------------------------------------------------------------ command line

def _parse_list(text, convert, what):
    """``--what``'s comma-separated values, each through ``convert``; ValueError naming the option else."""
    try:
        return [convert(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--{what}: expected a comma-separated list, got {text!r} ({error})") from None


def _parse_composite(text):
    """'0:0,2:0,6:0' -> {0: 0, 2: 0, 6: 0}; ValueError naming --composite-labels else."""
    try:
        return {int(old): int(new) for old, new in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except ValueError:
        raise ValueError(f"--composite-labels: expected old:new pairs such as 0:0,2:0,6:0, got {text!r}") from None


def _parser():
    """The argument parser of ``main``."""
    parser = cli.ArgumentParser(prog="autoencoders.py", description="Siamese / triplet autoencoders and VAEs: sweep "
                                "the weight M of the metric loss.")
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
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small subsets, few iterations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _sweep_arguments(args):
    """``(constraints, encoders, run_experiment's keyword arguments)`` of ``args``, each checked (ValueError)."""
    constraints = [check_choice(name, CONSTRAINTS, "--constraint") for name in _parse_list(args.constraint, str,
                                                                                              "constraint")]
    encoders = [check_choice(name, ENCODERS, "--encoder") for name in _parse_list(args.encoder, str, "encoder")]
    feature_extractor = None if args.features == "none" else args.features
    arguments = dict(
        list_of_weights=_check_weights(_parse_list(args.weights, float, "weights")),
        list_of_latent_dims=[check_int(dim, "every --latent-dims size", 1)
                             for dim in _parse_list(args.latent_dims, int, "latent-dims")],
        num_iters=check_int(args.iters, "--iters", 1), batch_size=check_int(args.batch_size, "--batch-size", 4),
        keys=None if args.keys is None else args.keys.split(","),
        composite_labels=None if args.composite_labels is None else _parse_composite(args.composite_labels),
        margin=args.margin, dropout_val=args.dropout, normalize=not args.no_normalize,
        feature_extractor=feature_extractor, seed=args.seed, beta=args.beta, distance=args.distance,
        feature_params={"weights": args.resnet_weights} if feature_extractor == "resnet" else None,
        reconstruction=args.reconstruction, root=args.root, download=not args.no_download, quick=args.quick,
        device=args.device, progress=not args.no_progress)
    if not constraints or not encoders or not arguments["list_of_latent_dims"]:
        raise ValueError("--constraint, --encoder and --latent-dims each need at least one value")
    if args.device is not None:
        resolve_device(args.device)  # an unknown or absent device
    return constraints, encoders, arguments


def main(argv=None):
    """Command line: one ``run_experiment`` per (constraint, encoder) given; prints the table and where it is.
    Returns the rows. A bad option or unreadable data raises ValueError / OSError before any training."""
    args = _parser().parse_args(argv)
    constraints, encoders, arguments = _sweep_arguments(args)
    dataset = args.dataset
    settings = {name: arguments[name] for name in SWEEP_SETTINGS if name in arguments}
    results_dir, plots_dir = sweep_outputs(dataset, arguments["quick"], **settings)
    splits = load_image_splits(dataset, arguments["root"], arguments["download"],  # once for all the runs
                               224 if arguments["feature_extractor"] == "resnet" else IMAGENET_SIZE)
    started, rows = time.perf_counter(), []
    for constraint in constraints:
        for encoder in encoders:
            rows += run_experiment(constraint, encoder, dataset, splits=splits, **arguments)
    if len(constraints) * len(encoders) > 1:  # every model of the sweep in one trade-off figure
        plot_tradeoff(rows, os.path.join(plots_dir, f"{dataset}_tradeoff.png"),
                      f"{dataset}: retrieval against reconstruction")
    print()
    print(results_table(rows))
    table = os.path.join(results_dir, f"autoencoders-{dataset}.md").replace(os.sep, "/")
    print(f"Total {time.perf_counter() - started:.0f} s. Results in {table}, plots in "
          f"{plots_dir.replace(os.sep, '/')}/.")
    return rows


if __name__ == "__main__":  # flush-to-zero for the whole process, as every command line of the library
    flush_denormal_everywhere()
    sys.exit(cli.run(main, "autoencoders.py"))
