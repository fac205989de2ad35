"""The MNIST / Fashion-MNIST study: train embeddings with each approach, plot them, measure them.

Methods (the classic study's, with its hyper-parameters as defaults):

- ``softmax``: a classifier (``ClassificationNet``, NLL loss); embeddings from its penultimate layer;
- ``siamese``: ``SiameseMNIST`` pairs + ``ContrastiveLoss``;
- ``triplet``: ``TripletMNIST`` triplets + ``TripletLoss``;
- ``online-contrastive``: ``BalancedBatchSampler`` batches + ``OnlineContrastiveLoss`` with hard
  negative pairs;
- ``online-triplet``: ``BalancedBatchSampler`` batches + ``OnlineTripletLoss`` with a selector:
  ``all``, ``hardest``, ``random-hard`` (default), ``semi-hard`` or ``batch-hard``.

Every trained embedding is measured on the test set with one set of metrics that is comparable
between approaches (``metrics.evaluate_embeddings``: Precision@1, R-Precision, MAP@R, k-NN accuracy
with the train set as gallery, NMI of k-means clusters, pair verification ROC-AUC), plotted to
``images/`` and tabulated in ``results/<dataset>.md`` and ``.json``.

Python: ``run_method("fashion-mnist", "online-triplet", selector="semi-hard", epochs=20)`` returns
the result row; ``run_methods(...)`` runs several and writes the table. Command line::

    python experiments.py --dataset fashion-mnist --methods all --epochs 20
    python experiments.py --dataset fashion-mnist --methods online-triplet --selectors all,batch-hard
    python experiments.py --quick          # a smoke run: small subsets, one epoch
    torchrun --nproc-per-node 4 experiments.py --methods online-triplet --amp bf16   # 4 processes (GPUs)

Under torchrun every process trains its share of the one-process global batch (``build_method``) and rank 0
alone evaluates and writes (``run_method``), so N processes give one process's results up to float rounding.

Held-out classes: ``--train-classes 0-4`` (``run_method(..., train_classes="0-4")``) trains on those
classes only, scores the usual metrics on them and adds one-shot accuracy (5-way 1-shot episodes) and
verification ROC-AUC on the test images of the other classes, which the model never saw; the
results go to ``results/train-classes-0-4/`` and ``images/train-classes-0-4/``, beside two reference
rows scored the same way (``held_out_baselines``: raw pixels and the untrained network).

Omniglot (one-shot learning on alphabets never seen in training) lives in ``omniglot.py``; this command
line runs it too (``omniglot.omniglot_main``), and its old names here (``experiments.run_omniglot``,
``experiments.OMNIGLOT_RECIPE``, ...) still resolve to omniglot's::

    python experiments.py --dataset omniglot       # train the recipe (OMNIGLOT_RECIPE), save weights/omniglot_siamese.pt
    python experiments.py --dataset omniglot --one-shot-runs PATH [--weights FILE]   # Lake's 20 runs
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from checkpoints import CHECKPOINT_NAME
from datasets import BalancedBatchSampler, DistributedBalancedBatchSampler, SiameseMNIST, TripletMNIST, class_subset
from distributed import broadcast_from_main, close_distributed, is_main_process, rank_and_world_size
from image_folders import load_folder_splits
from known_datasets import load_dataset
from losses import ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss
from metrics import (AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, evaluate_embeddings, extract_embeddings,
                     few_shot_accuracy, retrieval_metrics, verification_roc_auc, verification_threshold)
from model_file import save_model
from networks import ClassificationNet, EmbeddingNet, SiameseNet, SiameseNetwork, TripletNet, build_network
from results import markdown_table, merge_results, plot_embeddings, save_figure, write_json, write_text
from trainer import device_name, fit, flush_denormal_everywhere, setup_distributed
from utils import (DISTANCES, AllTripletSelector, BatchHardTripletSelector, HardestNegativeTripletSelector,
                   HardNegativePairSelector, RandomNegativeTripletSelector,
                   SemihardNegativeTripletSelector, atomic_write, check_choice, check_int, moved_attribute)

METHODS = ("softmax", "siamese", "triplet", "online-contrastive", "online-triplet")
# name -> selector(margin, generator, distance="squared"); distance: the loss's (utils.DISTANCES)
SELECTORS = {
    "all": lambda margin, generator, distance="squared": AllTripletSelector(),
    "hardest": lambda margin, generator, distance="squared": HardestNegativeTripletSelector(margin, distance=distance),
    "random-hard": lambda margin, generator, distance="squared": RandomNegativeTripletSelector(
        margin, generator=generator, distance=distance),
    "semi-hard": lambda margin, generator, distance="squared": SemihardNegativeTripletSelector(
        margin, generator=generator, distance=distance),
    "batch-hard": lambda margin, generator, distance="squared": BatchHardTripletSelector(distance=distance),
    # the same miner, named apart because its recipes (RECIPES, CLASSIC_RECIPES) train it with a soft margin
    "batch-hard-soft": lambda margin, generator, distance="squared": BatchHardTripletSelector(distance=distance),
}
DATASETS = ("mnist", "fashion-mnist")  # by name; any folder of images or CSV of path,label lines by its path
STUDY_NETWORKS = ("embedding-net", "resnet18")

# The classic study's settings.
MARGIN = 1.0
LEARNING_RATE = {"softmax": 1e-2}  # every other method: 1e-3
DEFAULT_LEARNING_RATE = 1e-3
BATCH_SIZE = {"softmax": 256, "siamese": 128, "triplet": 128}
BALANCED_BATCH = (10, 25)  # classes x samples per class, for the online methods
WEIGHT_DECAY = {"online-triplet": 1e-4}


class Recipe(NamedTuple):
    """How a metric-learning method is trained, beyond the classic study's settings (``CLASSIC``):
    ``margin`` of its losses, ``soft`` margin of the triplet losses (``losses.triplet_terms``), the
    ``distance`` every loss and selector compares (``"squared"`` or ``"euclidean"``), ``batch_norm``,
    an ``EmbeddingNet`` ending in a BatchNorm that keeps the embeddings from collapsing,
    ``easy_selector``, the name (``SELECTORS``) of an easier selector whose triplets' loss the online
    triplet loss adds to its own selector's (a mixed objective, ``losses.OnlineTripletLoss``), and
    ``batch_samples``, the images per class in the online methods' balanced batches (fewer: an anchor's
    hardest positive and negative come from fewer candidates, so they are less extreme)."""

    margin: float = MARGIN
    soft: bool = False
    distance: str = "squared"
    batch_norm: bool = False
    easy_selector: Optional[str] = None
    batch_samples: int = BALANCED_BATCH[1]


CLASSIC = Recipe()
HERMANS = Recipe(margin=0.0, soft=True, distance="euclidean")  # Hermans et al.'s soft margin on plain distances
# The hardest-negative selectors mine batches of few images per class, so that an anchor's hardest picks are
# not the few ambiguous items of the batch (shirts against T-shirts) in every batch (README, "Recipes").
FEW_PER_CLASS = 4
# The recipe each method trains with in the study (measured in README, "Recipes"; a method not named: CLASSIC),
# and the one it trained with before them (CLASSIC_RECIPES, else CLASSIC), kept as the "before" rows.
RECIPES = {
    "online-triplet/hardest": Recipe(batch_norm=True, easy_selector="random-hard", batch_samples=FEW_PER_CLASS),
    "online-triplet/semi-hard": Recipe(batch_norm=True),
    "online-triplet/batch-hard": Recipe(batch_norm=True, easy_selector="random-hard", batch_samples=FEW_PER_CLASS),
    "online-triplet/batch-hard-soft": Recipe(soft=True, batch_norm=True, easy_selector="random-hard",
                                             batch_samples=FEW_PER_CLASS),
}
CLASSIC_RECIPES = {"online-triplet/batch-hard-soft": HERMANS}
STEP_SIZE, GAMMA = 8, 0.1
EVALUATION_BATCH = 1000
STREAMING_WORKERS = 4  # at most, for image folders too large to hold in memory

RUN_DIR = "checkpoints"  # run_methods' per-method checkpoints and finished rows (resumable)

# --quick: a smoke run on small subsets of the data, one epoch.
QUICK_SIZES = (2000, 1000)  # train, test items
QUICK_EPOCHS = 1


def method_label(method, selector=None):
    """Row name of a method: ``online-triplet`` carries its selector, e.g. ``online-triplet/semi-hard``."""
    return f"{method}/{selector}" if method == "online-triplet" else method


def method_recipe(label, recipe=None):
    """The ``Recipe`` the method called ``label`` (``method_label``) trains with: ``recipe`` itself when it
    is a Recipe, the study's (``RECIPES``) for None, the one before the study's recipes
    (``CLASSIC_RECIPES``) for ``"classic"``."""
    if isinstance(recipe, Recipe):
        return recipe
    check_choice(recipe, (None, "classic"), "recipe")
    return (RECIPES if recipe is None else CLASSIC_RECIPES).get(label, CLASSIC)


def recipe_tag(label, recipe=None):
    """A file-name form of ``recipe_label`` for a method trained with another recipe than the study's
    (``method_recipe(label, recipe)``), e.g. ``"bn-soft-margin"``; ``""`` for the study's recipe."""
    recipe = method_recipe(label, recipe)
    if recipe == method_recipe(label):
        return ""
    return re.sub(r"[^a-z0-9.]+", "-", recipe_label(recipe).lower()).strip("-")


def recipe_label(recipe):
    """A recipe in a few words for the results tables, e.g. ``"BN, + random-hard"`` or ``"classic"``."""
    words = (["BN"] if recipe.batch_norm else []) + (["soft margin"] if recipe.soft else [])
    words += [] if recipe.distance == CLASSIC.distance else [recipe.distance]
    words += [] if recipe.margin == CLASSIC.margin else [f"margin {recipe.margin:g}"]
    words += [] if recipe.batch_samples == CLASSIC.batch_samples else [f"{recipe.batch_samples} images per class"]
    words += [] if recipe.easy_selector is None else [f"+ {recipe.easy_selector}"]
    return ", ".join(words) or "classic"


def load_splits(dataset, root="data", download=False, quick=False):
    """``(train, test)`` ``InMemoryDataset`` s of ``dataset`` ("mnist" or "fashion-mnist"),
    normalised as usual; with ``quick``, the first ``QUICK_SIZES`` items of each."""
    splits = [load_dataset(dataset, root=root, train=train, download=download, in_memory=True)
              for train in (True, False)]
    if quick:
        splits = [split.subset(slice(0, size)) for split, size in zip(splits, QUICK_SIZES)]
    return tuple(splits)




def build_method(method, embedding_net, train_set, test_set=None, *, selector="random-hard", margin=MARGIN,
                 batch_size=128, batch_classes=BALANCED_BATCH[0], batch_samples=BALANCED_BATCH[1], seed=0,
                 groups=None, soft=False, distance="squared", easy_selector=None):
    """The one place a method is put together, for the Fashion-MNIST study and for Omniglot alike.

    Takes the method (see ``METHODS``), the embedding network it trains (images ``(B, C, H, W)`` ->
    ``(B, D)``), the training set (an ``InMemoryDataset``-like set with ``.targets (N,)`` and
    ``.classes``) and optionally a test set for validation. ``softmax`` adds a ``ClassificationNet`` head
    (NLL loss); ``siamese`` / ``triplet`` draw random pairs / triplets (``SiameseMNIST`` / ``TripletMNIST``,
    batches of ``batch_size``) with ``ContrastiveLoss(margin)`` / ``TripletLoss(margin)``; the online
    methods mine ``BalancedBatchSampler`` batches of ``batch_classes x batch_samples`` (``groups``: one id
    per item, to draw each batch inside one group) with ``OnlineContrastiveLoss(margin,
    HardNegativePairSelector())`` or ``OnlineTripletLoss(margin, <selector>)``. Random draws (shuffling,
    the random selectors) come from generators seeded with ``seed``; the network's own initial weights
    are the caller's (seed torch before building it). ``distance`` (``"squared"``, the classic, or
    ``"euclidean"``) is the distance of every contrastive and triplet loss and selector, ``soft`` the
    triplet losses' soft margin (``losses.triplet_terms``), ``easy_selector`` the name of a second selector
    (``SELECTORS``) whose triplets the online triplet loss adds (``losses.OnlineTripletLoss``).
    Returns ``(model, loss_fn, train_loader, val_loader, metrics)``; ``val_loader`` is None without
    ``test_set``.

    Several processes (a ``torch.distributed`` group of ``W`` > 1 ranks, e.g. under torchrun): the online
    methods' batches come from ``DistributedBalancedBatchSampler`` (the same global batches, each rank
    holding its share, the losses mining over the whole), the others' from ``DistributedSampler`` with
    ``batch_size // W`` items per rank, so the global batch, and with it the learning rate, stays the same.
    Validation of the online methods is sharded alike; the others validate on the whole test set on every
    rank.
    """
    check_choice(method, METHODS, "method")
    generator = torch.Generator().manual_seed(seed)
    workers = {"num_workers": data_workers(train_set)}
    metrics = []
    if method == "softmax":
        model, loss_fn = ClassificationNet(embedding_net, len(train_set.classes)), nn.NLLLoss()
        train_loader, validation = _shuffled_loader(train_set, batch_size, generator, seed, workers), test_set
        metrics = [AccumulatedAccuracyMetric()]
    elif method in ("siamese", "triplet"):
        wrapper, loss_fn = ((SiameseMNIST, ContrastiveLoss(margin, distance=distance)) if method == "siamese" else
                            (TripletMNIST, TripletLoss(margin, soft=soft, distance=distance)))
        # SiameseNetwork embeds both members of a pair in one call (one BatchNorm batch): it is its own pair model
        pair_model = embedding_net if isinstance(embedding_net, SiameseNetwork) else SiameseNet(embedding_net)
        model = pair_model if method == "siamese" else TripletNet(embedding_net)
        train_loader = _shuffled_loader(wrapper(train_set), batch_size, generator, seed, workers)
        validation = None if test_set is None else wrapper(test_set)
    else:
        model = embedding_net
        if method == "online-contrastive":
            loss_fn = OnlineContrastiveLoss(margin, HardNegativePairSelector(), distance=distance)
        else:
            check_choice(selector, tuple(SELECTORS), "selector")
            easy = None
            if easy_selector is not None:
                easy = SELECTORS[check_choice(easy_selector, tuple(SELECTORS), "easy_selector")](
                    margin, generator, distance)
            loss_fn = OnlineTripletLoss(margin, SELECTORS[selector](margin, generator, distance), soft=soft,
                                        distance=distance, easy_selector=easy)
            metrics = [AverageNonzeroTripletsMetric()]
        n_batch_classes = min(batch_classes, len(train_set.classes))
        train_samples = _samples_per_class(train_set, batch_samples, "training")
        train_loader = _balanced_loader(train_set, n_batch_classes, train_samples, seed, groups, workers)
        validation = None
        if test_set is not None and _smallest_class(test_set)[1] >= 2:  # else no positive pairs to validate on
            return model, loss_fn, train_loader, _balanced_loader(
                test_set, n_batch_classes, _samples_per_class(test_set, batch_samples, "validation"), seed + 1, None,
                workers), metrics
    val_loader = None if validation is None else DataLoader(validation, batch_size=EVALUATION_BATCH, **workers)
    return model, loss_fn, train_loader, val_loader, metrics


def _shuffled_loader(dataset, batch_size, generator, seed, workers):
    """A loader of ``dataset`` in random order, ``batch_size`` items a batch: shuffled by ``generator`` in one
    process, by a ``DistributedSampler`` seeded with ``seed`` (``batch_size // W`` items per rank) on ``W``."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **workers)
    if batch_size < world_size:
        raise ValueError(f"a batch of {batch_size} items cannot be shared by {world_size} processes")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler, **workers)


def _balanced_loader(dataset, n_classes, n_samples, seed, groups, workers):
    """A loader of ``n_classes x n_samples`` batches of ``dataset`` (``BalancedBatchSampler``); on several
    processes every rank draws the same batches and takes its share (``DistributedBalancedBatchSampler``)."""
    sampler = (BalancedBatchSampler(dataset.targets, n_classes, n_samples, seed=seed, groups=groups)
               if rank_and_world_size()[1] == 1 else
               DistributedBalancedBatchSampler(dataset.targets, n_classes, n_samples, seed=seed, groups=groups))
    return DataLoader(dataset, batch_sampler=sampler, **workers)


def data_workers(dataset):
    """DataLoader workers for ``dataset``: none for images held in memory (a batch is one gather), a few
    for a folder read from disk as it is drawn (``datasets.ImageFileDataset``), which decode in parallel."""
    return 0 if hasattr(dataset, "data") else min(STREAMING_WORKERS, os.cpu_count() or 1)


def _smallest_class(dataset):
    """``(name, count)`` of the class of ``dataset`` with the fewest items."""
    counts = torch.bincount(torch.as_tensor(dataset.targets), minlength=len(dataset.classes))
    smallest = int(counts.argmin())
    return dataset.classes[smallest], int(counts[smallest])


def _samples_per_class(dataset, batch_samples, what):
    """Items per class in an online batch: ``batch_samples``, or fewer when a class of ``dataset`` has
    fewer (your own folders); a class with a single item leaves no positive pair, which is an error."""
    name, count = _smallest_class(dataset)
    if count < 2:
        raise ValueError(f"class {name!r} has {count} {what} image(s); the online methods need at least 2 per "
                         "class: add images to it, hold it out (--held-out-classes), or use --methods "
                         "softmax,siamese,triplet")
    return min(batch_samples, count)


def image_shape(dataset):
    """``(channels, image_size)`` of the square images of ``dataset`` (an ``InMemoryDataset`` or a folder's
    ``ImageFileDataset``)."""
    if hasattr(dataset, "data"):
        return dataset.data.shape[1], dataset.data.shape[-1]
    return dataset.channels, dataset.image_size


def build_embedding_net(network, embedding_dim, train_set, pretrained=None, batch_norm=False):
    """The network a study trains: ``"embedding-net"`` (the classic ``EmbeddingNet``, any image size and
    channel count; ``batch_norm``: ending in a BatchNorm, see ``networks.EmbeddingNet``) or ``"resnet18"``
    (``networks.ResNetEmbedding``, ``pretrained`` None, a file or ``"imagenet"``), sized for ``train_set``'s
    images. Returns ``(network, its constructor arguments)``."""
    check_choice(network, STUDY_NETWORKS, "network")
    in_channels, image_size = image_shape(train_set)
    if network == "embedding-net":
        if pretrained is not None:
            raise ValueError("--pretrained needs --network resnet18 (EmbeddingNet has no pretrained weights)")
        arguments = {"embedding_dim": embedding_dim, "in_channels": in_channels, "image_size": image_size}
        if batch_norm:
            arguments["batch_norm"] = True
    elif batch_norm:
        raise ValueError("--batch-norm is an option of the classic network (--network embedding-net)")
    else:
        arguments = {"embedding_dim": embedding_dim, "in_channels": in_channels, "pretrained": pretrained}
    return build_network(network, **arguments), arguments


def build_training(method, train_set, test_set, selector="random-hard", embedding_dim=2, seed=0,
                   network="embedding-net", pretrained=None, recipe=None):
    """Everything ``fit`` needs for one method of the study: ``(model, loss_fn, train_loader, val_loader,
    metrics, learning_rate, weight_decay)``, with the classic study's settings (``build_method`` on the
    ``build_embedding_net`` network, by default an ``EmbeddingNet`` of ``embedding_dim``) changed by the
    method's recipe (``method_recipe(label, recipe)``: by default the study's ``RECIPES``)."""
    check_choice(method, METHODS, "method")
    recipe = method_recipe(method_label(method, selector), recipe)
    embedding_net, _ = build_embedding_net(network, embedding_dim, train_set, pretrained, recipe.batch_norm)
    model, loss_fn, train_loader, val_loader, metrics = build_method(
        method, embedding_net, train_set, test_set, selector=selector, margin=recipe.margin,
        batch_size=BATCH_SIZE.get(method, BATCH_SIZE["siamese"]), seed=seed, soft=recipe.soft,
        distance=recipe.distance, easy_selector=recipe.easy_selector, batch_samples=recipe.batch_samples)
    return (model, loss_fn, train_loader, val_loader, metrics,
            LEARNING_RATE.get(method, DEFAULT_LEARNING_RATE), WEIGHT_DECAY.get(method, 0.0))


def run_method(dataset, method, *, selector="random-hard", embedding_dim=2, epochs=None, seed=0,
               quick=False, root="data", download=False, device=None, splits=None,
               images_dir="images", results_dir="results", progress=True, channels_last=False,
               train_classes=None, run_dir=None, fresh=False, network="embedding-net", pretrained=None,
               held_out=None, model_file=None, command=None, amp=None, compile=False, recipe=None,
               lr_step=STEP_SIZE):
    """Train one method on ``dataset``, evaluate and plot its embeddings, and record the result.

    Takes the dataset (a name of ``DATASETS``, or the path of a folder of your own images or a CSV, see
    ``datasets.load_folder_splits``), the method (see ``METHODS``), for ``online-triplet`` the selector
    name, the embedding size, the number of epochs (default 20; ``quick`` means small subsets and
    ``QUICK_EPOCHS`` whatever ``epochs`` says) and a seed; ``splits`` may hand in preloaded ``(train, test)``
    datasets; ``channels_last`` trains in channels-last memory format (faster on CPUs, see
    ``trainer.fit``); ``network`` / ``pretrained``: see ``build_embedding_net``. Writes
    ``images/<name>_<method>[_<dim>d]_{train,test}.png`` and merges the result row into
    ``results/<name>.json`` and ``.md`` (``dataset_name``; skipped when the directory is None; a quick run
    writes under ``images/quick/`` and ``results/quick/`` instead).
    ``train_classes`` (e.g. ``"0-4"``, see ``parse_classes``): train and score on those classes only,
    add the one-shot accuracy and ROC-AUC of the other classes' test images (``evaluate_held_out``) and
    write under ``images/train-classes-<tag>/`` and ``results/train-classes-<tag>/``; ``held_out``: a
    ready dataset of classes never trained on, scored the same way (a folder's ``--held-out-classes``).
    ``run_dir``: a folder of this method's run (see ``method_run_dir``) that survives interruptions: a
    checkpoint after every epoch, and the finished row. Run again with the same settings, a finished
    method is not retrained (its row is read back) and an interrupted one resumes from its last epoch,
    giving the row an uninterrupted run gives (up to the timings); ``fresh=True`` deletes the folder
    first. ``model_file``: also save the trained network as one model file (``save_trained_model``, with
    ``command``, the command line that trained it, default this process's). ``amp`` (None, "bf16",
    "fp16") and ``compile``: mixed precision and torch.compile in training (see ``trainer.fit``);
    ``recipe``: a ``Recipe``, None (default) for the study's recipe of the method (``RECIPES``) or
    ``"classic"`` for the one before it (see ``method_recipe``); the row records it in words (``recipe_label``)
    and goes to ``results/<name>.md`` when it is the study's recipe, to ``results/<name>-recipes.md`` when not.
    ``lr_step``: the learning rate falls tenfold every ``lr_step`` epochs (StepLR; the classic 8 by default).
    Under torchrun every rank trains its share (``build_method``); rank 0 alone evaluates, plots and
    writes, and every rank returns rank 0's row.
    Returns the row: a dict of the evaluation metrics, seconds per epoch, epochs and settings.
    """
    name = dataset_name(dataset)
    device, _, _ = setup_distributed(device)
    writer = is_main_process()
    if not writer:  # one writer: the other ranks train, and return rank 0's row
        images_dir = results_dir = model_file = None
        progress = False
    check_choice(method, METHODS, "method")
    if method == "online-triplet":
        check_choice(selector, tuple(SELECTORS), "selector")
    epochs = QUICK_EPOCHS if quick else 20 if epochs is None else check_int(epochs, "epochs", 1)
    if quick:  # smoke runs never overwrite the committed plots and tables
        images_dir = None if images_dir is None else os.path.join(images_dir, "quick")
        results_dir = None if results_dir is None else os.path.join(results_dir, "quick")
    label = method_label(method, selector)
    recipe = method_recipe(label, recipe)
    lr_step = check_int(lr_step, "lr_step", 1)
    settings = method_settings(name, label, embedding_dim, epochs, seed, quick, channels_last, train_classes, network,
                               pretrained, amp, compile, recipe, lr_step)
    finished = broadcast_from_main(_open_run(run_dir, settings, fresh) if writer else None)
    if finished is not None:
        if writer:
            print(f"== {name}: {label}, {embedding_dim}-D: finished before, row read from {run_dir}", flush=True)
        if results_dir is not None:
            record_result(finished, _held_out_dir(results_dir, finished.get("train_classes")))
        return finished
    if splits is None:
        splits = load_splits(dataset, root, download, quick) if name in DATASETS else load_folder_splits(
            dataset, seed=seed, progress=progress)[:2]
    train_set, test_set = splits
    classes_tag = None
    if train_classes is not None:
        (train_set, test_set), held_out, classes_tag = held_out_splits(train_set, test_set, train_classes)
        images_dir, results_dir = _held_out_dir(images_dir, classes_tag), _held_out_dir(results_dir, classes_tag)
    images_dir = recipe_images_dir(images_dir, label, recipe)
    if int(torch.bincount(torch.as_tensor(test_set.targets)).max()) < 2:  # checked now, not after training
        raise ValueError("every class has at most one validation image, so retrieval and verification cannot be "
                         "measured; raise --val-fraction (e.g. 0.25) or add images")
    torch.manual_seed(seed)
    model, loss_fn, train_loader, val_loader, metrics, learning_rate, weight_decay = build_training(
        method, train_set, test_set, selector, embedding_dim, seed, network, pretrained, recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, lr_step, gamma=GAMMA)
    resuming = run_dir is not None and os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME))
    if writer:
        print(f"== {name}: {label}, {embedding_dim}-D, {epochs} epochs"
              + (f", resuming from {run_dir}" if resuming else ""), flush=True)
    history = fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, epochs,
                  metrics=metrics, device=device, progress=progress, log_interval=50,
                  channels_last=channels_last, checkpoint_dir=run_dir, resume=run_dir is not None, amp=amp,
                  compile=compile)
    row = None
    if writer:
        row = finish_run(dict(settings, train_classes=classes_tag), method, model, history, (train_set, test_set),
                         held_out, images_dir, results_dir, run_dir, model_file, command)
    return broadcast_from_main(row)


def method_settings(name, label, embedding_dim, epochs, seed, quick=False, channels_last=False, train_classes=None,
                    network="embedding-net", pretrained=None, amp=None, compile=False, recipe=None,
                    lr_step=STEP_SIZE):
    """The settings of one method's run (see ``run_method`` for each), the start of its result row and what
    its run folder must match to resume. The network, mixed precision, recipe (``method_recipe(label,
    recipe)``) and learning-rate step are recorded only when not the classic ones, so that earlier run
    folders still resume (``finish_run`` adds the classic step to the row, ``Recipe`` the classic batch shape)."""
    settings = {"dataset": name, "method": label, "embedding_dim": embedding_dim, "epochs": epochs,
                "seed": seed, "quick": quick, "channels_last": channels_last, "train_classes": train_classes}
    if network != "embedding-net" or pretrained is not None:
        settings.update(network=network, pretrained=pretrained)
    if amp is not None or compile:
        settings.update(amp=amp, compile=compile)
    recipe = method_recipe(label, recipe)
    if recipe != CLASSIC:  # the batch shape, added to recipes later, only when not the classic one
        settings.update({field: value for field, value in recipe._asdict().items()
                         if field != "batch_samples" or value != CLASSIC.batch_samples})
    if lr_step != STEP_SIZE:
        settings["lr_step"] = lr_step
    return settings


def finish_run(row, method, model, history, splits, held_out=None, images_dir="images", results_dir="results",
               run_dir=None, model_file=None, command=None):
    """After training a method's ``model`` (``trainer.fit``'s ``history``) on ``splits`` ``(train, test)``:
    score its embeddings into ``row`` (its ``method_settings``; the recipe in words added), plot them under
    ``images_dir``, save the model file, record the row under ``results_dir`` (``record_result``; a directory
    of None: skipped) and, last, in the run folder. ``held_out``: see ``run_method``. Returns the row."""
    train_set, test_set = splits
    name, label, embedding_dim, seed = row["dataset"], row["method"], row["embedding_dim"], row["seed"]
    network = row.get("network", "embedding-net")
    embedded = _embed_splits(model, train_set, test_set)
    row["recipe"] = recipe_label(Recipe(**{field: row[field] for field in Recipe._fields if field in row}))
    row.setdefault("lr_step", STEP_SIZE)
    row.update(_scores(method, model, history, embedded, held_out, seed))
    if row.get("train_classes", "") is None:
        del row["train_classes"]
    if images_dir is not None:
        for split, (embeddings, labels) in embedded.items():
            plot_embeddings(embeddings, labels, train_set.classes,
                            f"{name} {label} ({split}, {embedding_dim}-D)",
                            image_path(name, label, split, embedding_dim, images_dir, seed))
    if model_file is not None:
        save_trained_model(model_file, model, network, train_set, embedded["test"], row, seed, command)
    if results_dir is not None:
        record_result(row, results_dir)
    if run_dir is not None:  # last, so a finished row means every output above was written
        write_json(os.path.join(run_dir, RUN_ROW), row)
    return row


def _scores(method, model, history, embedded, held_out, seed):
    """A trained method's scores for its row: ``evaluate_embeddings`` of the test embeddings against the
    train ones, the classifier's accuracy (softmax), the mean epoch time, the device and thread count, the
    final losses and, with a ``held_out`` dataset, ``evaluate_held_out``."""
    scores = evaluate_embeddings(*embedded["train"], *embedded["test"], seed=seed)
    if method == "softmax":
        scores["classifier_accuracy"] = history["val_accuracy"][-1] / 100
    scores["seconds_per_epoch"] = sum(history["seconds"]) / len(history["seconds"])
    scores["device"] = device_name(next(model.parameters()).device)
    scores["threads"] = torch.get_num_threads()  # the numbers move with it (float sums in another order)
    scores["final_train_loss"] = history["train_loss"][-1]
    scores["final_val_loss"] = history["val_loss"][-1]
    if held_out is not None:
        scores.update(evaluate_held_out(model, held_out, seed))
    return scores


def dataset_name(dataset):
    """The name a dataset's outputs go by: a name of ``DATASETS`` itself, or for your own images the
    folder's (or CSV file's) name, e.g. ``flowers`` for ``data/flowers/``. Raises ValueError for a name
    that is neither, and FileNotFoundError for a path that does not exist."""
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset must be a name ({', '.join(DATASETS)}) or a folder path, got "
                        f"{type(dataset).__name__}")
    if dataset in DATASETS:
        return dataset
    path = os.fspath(dataset)
    if not os.path.exists(path):
        if os.sep not in path and "." not in path:
            raise ValueError(f"unknown dataset {path!r}; choose one of {', '.join(DATASETS)}, or give the path "
                             "of a folder of images (one sub-folder per class) or of a CSV of path,label lines")
        raise FileNotFoundError(f"dataset folder {path!r} does not exist")
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def save_trained_model(path, model, network, train_set, validation, row, seed=0, command=None):
    """Save the embedding network of a trained ``model`` (the net inside a ``ClassificationNet`` /
    ``SiameseNet`` / ``TripletNet``, or the model itself) as one model file (``networks.save_model``) with
    what using it needs: image size, channels, the training images' normalisation, class names, the
    verification threshold chosen on the validation embeddings ``(embeddings, labels)``
    (``metrics.verification_threshold``), the ``command`` (default: this process's command line) and the
    row's metrics. Returns the path."""
    embedding_net = getattr(model, "embedding_net", model)
    channels, image_size = image_shape(train_set)
    threshold, accuracy = verification_threshold(*validation, seed=seed)
    normalization = ({"mean": list(train_set.mean), "std": list(train_set.std)} if hasattr(train_set, "mean")
                     else None)
    metrics = {key: value for key, value in row.items() if isinstance(value, (int, float)) and key != "seed"}
    metrics["validation_verification_accuracy"] = accuracy
    return save_model(path, embedding_net, network, embedding_net.config(), image_size=image_size, channels=channels,
                      normalization=normalization, class_names=list(train_set.classes), threshold=threshold,
                      command=command or " ".join(sys.argv), metrics=metrics)


RUN_SETTINGS, RUN_ROW = "settings.json", "row.json"


def method_run_dir(run_dir, dataset, label, embedding_dim=2, seed=0, quick=False, train_classes=None, recipe=None):
    """The folder of one method's run under ``run_dir``, e.g.
    ``checkpoints/fashion-mnist/online-triplet-random-hard_2d_seed0`` (``fashion-mnist-quick`` for quick
    runs, ``.../train-classes-0-4/...`` for held-out runs, ``..._seed0_bn-soft-margin`` for a ``recipe``
    other than the study's, see ``method_recipe``)."""
    folder = os.path.join(run_dir, dataset + ("-quick" if quick else ""))
    if train_classes is not None:
        folder = os.path.join(folder, "train-classes-" + str(train_classes).replace(",", "_"))
    tag = recipe_tag(label, recipe)
    return os.path.join(folder, f"{label.replace('/', '-')}_{embedding_dim}d_seed{seed}" + (tag and "_" + tag))


def _open_run(run_dir, settings, fresh):
    """Prepare a method's run folder: None when there is none or nothing finished yet, else the
    finished row. Raises ValueError when the folder holds a run with other settings."""
    if run_dir is None:
        return None
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    settings_path = os.path.join(run_dir, RUN_SETTINGS)
    trained = any(os.path.exists(os.path.join(run_dir, name)) for name in (CHECKPOINT_NAME, RUN_ROW))
    if os.path.exists(settings_path) and trained:  # a folder where nothing was trained yet is simply reused
        with open(settings_path) as file:
            started = json.load(file)
        if started != json.loads(json.dumps(settings)):
            changed = sorted(key for key in settings.keys() | started.keys()
                             if started.get(key) != settings.get(key))
            raise ValueError(f"{run_dir} holds a run started with other settings ({', '.join(changed)}: "
                             f"{[started.get(key) for key in changed]}); run with --fresh to start over, "
                             "or give another --run-dir")
    else:
        write_json(settings_path, settings)
    row_path = os.path.join(run_dir, RUN_ROW)
    if not os.path.exists(row_path):
        return None
    with open(row_path) as file:
        return json.load(file)


def _held_out_dir(folder, classes_tag):
    if folder is None or classes_tag is None:
        return folder
    return os.path.join(folder, f"train-classes-{classes_tag}")


def _embed_splits(model, train_set, test_set):
    """{'train': (embeddings (N, D), labels (N,)), 'test': (...)} of a trained model."""
    return {split: extract_embeddings(DataLoader(data, batch_size=EVALUATION_BATCH, num_workers=data_workers(data)),
                                      model)
            for split, data in (("train", train_set), ("test", test_set))}


def _image_stem(dataset, label, embedding_dim, seed=0):
    suffix = ("" if embedding_dim == 2 else f"_{embedding_dim}d") + ("" if seed == 0 else f"_seed{seed}")
    return f"{dataset}_{label.replace('/', '-')}{suffix}"


def image_path(dataset, label, split, embedding_dim=2, images_dir="images", seed=0):
    """Where ``run_method`` saves the plot of a method's ``split`` ("train" or "test") embeddings,
    e.g. ``images/fashion-mnist_online-triplet-semi-hard_test.png``; a ``seed`` other than 0 is in the
    name (``..._semi-hard_seed1_test.png``), so that other seeds' runs keep the seed-0 plots."""
    return os.path.join(images_dir, f"{_image_stem(dataset, label, embedding_dim, seed)}_{split}.png")


def recipe_images_dir(images_dir, label, recipe=None):
    """Where the plots of the method called ``label`` trained with ``recipe`` (see ``method_recipe``) go:
    ``images_dir`` itself for the study's recipe, so that the study's plots stay those of its recipes,
    ``<images_dir>/recipes/<recipe_tag>`` for another; None stays None."""
    tag = recipe_tag(label, recipe)
    return os.path.join(images_dir, "recipes", tag) if tag and images_dir is not None else images_dir


def plot_comparison(dataset, pairs, embedding_dim=2, images_dir="images", seed=0, recipe=None):
    """Side-by-side figures of random (offline) against online mining, from the rows' saved test
    plots of the methods trained with ``recipe`` (each method's plots in its ``recipe_images_dir``): one
    PNG per pair, e.g. ``images/fashion-mnist_siamese_vs_online-contrastive.png``, beside the online
    method's plots. Returns the paths written (pairs without both plots are skipped)."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    written = []
    for left, right in pairs:
        paths = [image_path(dataset, label, "test", embedding_dim, recipe_images_dir(images_dir, label, recipe), seed)
                 for label in (left, right)]
        if not all(os.path.exists(path) for path in paths):
            continue
        figure = Figure(figsize=(16, 8))
        axes = figure.subplots(1, 2)
        for axis, path in zip(axes, paths):
            axis.imshow(mpimg.imread(path))
            axis.axis("off")
        written.append(save_figure(figure, comparison_path(dataset, left, right, embedding_dim, images_dir, seed,
                                                           recipe)))
    return written


def comparison_path(dataset, left, right, embedding_dim=2, images_dir="images", seed=0, recipe=None):
    """Where ``plot_comparison`` saves the figure of method ``left`` beside ``right`` (their ``seed``'s runs
    with ``recipe``): in ``right``'s ``recipe_images_dir``."""
    stem = _image_stem(dataset, left, embedding_dim, seed)
    return os.path.join(recipe_images_dir(images_dir, right, recipe), f"{stem}_vs_{right.replace('/', '-')}.png")


# -------------------------------------------------------------------------------------- results

COLUMNS = [("method", "method", "{}"), ("embedding_dim", "dim", "{}"), ("recipe", "recipe", "{}"),
           ("seed", "seed", "{}"),
           ("precision_at_1", "P@1", "{:.3f}"), ("r_precision", "R-Prec", "{:.3f}"),
           ("map_at_r", "MAP@R", "{:.3f}"), ("knn_accuracy", "kNN acc", "{:.3f}"),
           ("nmi", "NMI", "{:.3f}"), ("roc_auc", "ROC-AUC", "{:.3f}"),
           ("classifier_accuracy", "clf acc", "{:.3f}"),
           ("seconds_per_epoch", "s/epoch", "{:.1f}"), ("device", "device", "{}"), ("threads", "threads", "{}"),
           ("epochs", "epochs", "{}"), ("lr_step", "lr step", "{}")]


RESULT_KEY = ("method", "embedding_dim", "recipe", "seed")  # what tells two result rows apart


def results_stem(row):
    """Where a result row is tabulated: ``<dataset>`` for a method trained with the study's recipe
    (``method_recipe``), ``<dataset>-recipes`` for any other recipe (the classic "before" rows, trials)."""
    study = recipe_label(method_recipe(row["method"])) if row["method"] in _all_labels() else "classic"
    return row["dataset"] + ("" if row.get("recipe", "classic") == study else "-recipes")


def record_result(row, results_dir="results"):
    """Merge ``row`` into ``results/<stem>.json`` (``results_stem``; one row per method, embedding size,
    recipe and seed: a new run replaces the old row) and rewrite ``results/<stem>.md``. Returns the rows."""
    order = {label: position for position, label in enumerate(_all_labels())}
    row = {**row, "recipe": row.get("recipe", "classic"), "seed": row.get("seed", 0)}  # before recipes: classic
    return merge_results(os.path.join(results_dir, results_stem(row)), [row], RESULT_KEY,
                         lambda r: (r["embedding_dim"], order.get(r["method"], len(order)), r["method"],
                                    r.get("recipe", "classic"), r.get("seed", 0)),
                         results_table)


def _all_labels():
    return [method_label(method, selector) for method in METHODS
            for selector in (SELECTORS if method == "online-triplet" else [None])]


def results_table(rows):
    """Markdown table of result rows (one line per method and embedding size)."""
    columns = COLUMNS + [column for column in HELD_OUT_COLUMNS if any(column[0] in row for row in rows)]
    return markdown_table(rows, columns)


def run_methods(dataset, methods=METHODS, selectors=("random-hard",), embedding_dim=2, epochs=None,
                seed=0, quick=False, root="data", download=False, device=None,
                images_dir="images", results_dir="results", progress=True, channels_last=False,
                train_classes=None, run_dir=RUN_DIR, fresh=False, network="embedding-net", pretrained=None,
                folder=None, model_file=None, command=None, amp=None, compile=False, recipe=None,
                lr_step=STEP_SIZE):
    """Run several methods on one dataset (the data is loaded once), write the comparison figures
    and return the result rows. ``train_classes``, ``network``, ``pretrained``: see ``run_method``. Each
    method runs in its own folder under ``run_dir`` (``method_run_dir``; None: no checkpoints), so that the
    same call after an interruption skips the finished methods and resumes the interrupted one; ``fresh``
    starts over. A folder of your own images (``dataset`` a path) is read by
    ``datasets.load_folder_splits`` with the keyword arguments in ``folder`` (image_size, channels,
    held_out_classes, val_fraction, skip_bad_images). ``model_file``: save the trained network (one method
    only; see ``save_trained_model``; ``command``: the command line recorded in it); ``amp``, ``compile``,
    ``recipe``, ``lr_step``: see ``run_method``. Under torchrun every rank runs this with the same arguments: each
    trains its share of every global batch, and rank 0 alone writes the results, plots and run folders
    (``run_method``)."""
    name = dataset_name(dataset)
    device, _, _ = setup_distributed(device)
    if not is_main_process():
        images_dir = results_dir = None
        progress = False
    n_runs = sum(len(selectors) if method == "online-triplet" else 1 for method in methods)
    if model_file is not None and n_runs != 1:
        raise ValueError(f"--save-model saves one trained model, but {n_runs} methods run; choose one "
                         "(e.g. --methods online-triplet --selectors random-hard)")
    held_out = None
    if name in DATASETS:
        splits = load_splits(dataset, root, download, quick)
    else:
        *splits, held_out = load_folder_splits(dataset, seed=seed, progress=progress, **(folder or {}))
    rows = []
    for method in methods:
        for selector in (selectors if method == "online-triplet" else [None]):
            label = method_label(method, selector)
            method_dir = (None if run_dir is None else
                          method_run_dir(run_dir, name, label, embedding_dim, seed, quick, train_classes, recipe))
            rows.append(run_method(dataset, method, selector=selector, embedding_dim=embedding_dim,
                                   epochs=epochs, seed=seed, quick=quick, device=device, splits=splits,
                                   images_dir=images_dir, results_dir=results_dir, progress=progress,
                                   channels_last=channels_last, train_classes=train_classes,
                                   run_dir=method_dir, fresh=fresh, network=network, pretrained=pretrained,
                                   held_out=held_out, model_file=model_file, command=command, amp=amp,
                                   compile=compile, recipe=recipe, lr_step=lr_step))
    if train_classes is not None:  # what the held-out scores mean needs these two references
        baselines_dir = results_dir
        if quick and results_dir is not None:  # where run_method put a quick run's table
            baselines_dir = os.path.join(results_dir, "quick")
        rows += held_out_baselines(name, *splits, train_classes, embedding_dim, seed, baselines_dir)
    if images_dir is not None:
        comparison_dir = os.path.join(images_dir, "quick") if quick else images_dir
        if train_classes is not None:  # where run_method put the plots
            comparison_dir = os.path.join(comparison_dir, "train-classes-" + rows[0]["train_classes"])
        offline_online = [("siamese", "online-contrastive")]
        offline_online += [("triplet", method_label("online-triplet", s)) for s in selectors]
        plot_comparison(name, offline_online, embedding_dim, comparison_dir, seed, recipe)
    return rows


# The command line's on/off switches: flag -> help.
SWITCHES = {
    "--download": "download with torchvision when the data is not found locally",
    "--quick": "smoke run: small subsets, one epoch",
    "--no-progress": "log lines instead of progress bars",
    "--channels-last": "train in channels-last memory format (faster convolutions on CPUs)",
    "--fresh": "start every method over instead of resuming or reusing finished ones",
}


def _parser(omniglot_weights):
    """The argument parser of ``main``."""
    parser = argparse.ArgumentParser(description="Train and evaluate siamese/triplet embeddings.")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help=f"{', '.join(DATASETS)}, omniglot, or the path of a folder of your own images (one "
                             "sub-folder per class, or alphabet/character/ like Omniglot) or of a CSV of "
                             "path,label lines")
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated subset of {', '.join(METHODS)}, or 'all'")
    parser.add_argument("--selectors", default="random-hard",
                        help=f"online-triplet selectors, comma-separated subset of "
                             f"{', '.join(SELECTORS)}, or 'all'")
    for option in ("--epochs", "--embedding-dim"):
        parser.add_argument(option, type=int, default=None, help="default: 20 epochs and 2-D (MNIST-like), "
                                                                   "the recipe's (omniglot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-step", type=_positive_int, default=STEP_SIZE,
                        help=f"the learning rate falls tenfold every this many epochs (default {STEP_SIZE}, "
                             "the classic)")
    parser.add_argument("--root", default="data", help="where to look for (and download) the data")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    for flag, text in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--train-classes", default=None,
                        help="train on these classes only (e.g. 0-4 or 0,1,2,3,4) and measure one-shot "
                             "accuracy and verification on the others")
    parser.add_argument("--run-dir", default=RUN_DIR,
                        help="checkpoints of every method, so that the same command resumes after an "
                             f"interruption (default {RUN_DIR}/)")
    own = parser.add_argument_group("your own images (--dataset PATH)")
    own.add_argument("--image-size", type=int, default=None,
                     help="resize every image to this square size (default: the images' own, when all agree)")
    own.add_argument("--channels", type=int, choices=(1, 3), default=None,
                     help="1 (grey) or 3 (RGB); default: 3 when any image is in colour")
    own.add_argument("--held-out-classes", default=None,
                     help="classes set aside and measured as unseen: a fraction (0.2) or names/indices (cat,dog)")
    own.add_argument("--val-fraction", type=float, default=0.1, help="validation share of each class")
    own.add_argument("--skip-bad-images", action="store_true",
                     help="leave out unreadable images (and report how many) instead of stopping")
    parser.add_argument("--network", default="embedding-net", choices=STUDY_NETWORKS,
                        help="the classic EmbeddingNet, or a ResNet-18 backbone with an embedding head")
    parser.add_argument("--pretrained", default=None,
                        help="resnet18: ImageNet weights from this file, or 'imagenet' for torchvision's cache")
    parser.add_argument("--amp", default=None, choices=("bf16", "fp16"),
                        help="mixed precision training (bfloat16, or float16 with loss scaling); distances and "
                             "mining stay in float32")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile(model)")
    recipe = parser.add_argument_group(
        "recipes", "by default each method trains with its recipe in the study (experiments.RECIPES); any option "
                   "below except --classic gives every method the one recipe it describes, the classic settings "
                   "changed by the options given")
    recipe.add_argument("--classic", action="store_true",
                        help="each method's settings before the study's recipes (the classic study's)")
    recipe.add_argument("--margin", type=float, default=None, help=f"the losses' margin (classic: {MARGIN})")
    recipe.add_argument("--distance", default=None, choices=DISTANCES,
                        help="squared Euclidean distances (the classic) or plain ones, in every contrastive and "
                             "triplet loss and selector")
    recipe.add_argument("--soft-margin", action="store_true",
                        help="triplet losses: softplus instead of the hinge (Hermans et al.; use with --margin 0)")
    recipe.add_argument("--batch-norm", action="store_true",
                        help="end the classic network with a BatchNorm, which keeps the embeddings from collapsing")
    recipe.add_argument("--easy-selector", default=None, choices=tuple(SELECTORS),
                        help="online-triplet: add the loss of this (easier) selector's triplets to the selector's")
    recipe.add_argument("--batch-samples", type=_positive_int, default=None,
                        help=f"online methods: images per class in a balanced batch (classic: {BALANCED_BATCH[1]}, "
                             f"of {BALANCED_BATCH[0]} classes)")
    parser.add_argument("--save-model", default=None, metavar="FILE",
                        help="save the trained model as one file (one method only), for search.py")
    parser.add_argument("--omniglot-root", default=None,
                        help="folder holding images_background_small1/2 (.zip or extracted); default "
                             "../shared/data/omniglot next to the repository")
    parser.add_argument("--one-shot-runs", default=None,
                        help="omniglot: score saved weights on Lake's one-shot runs (folder or .zip of run01..run20)")
    parser.add_argument("--weights", default=None, help=f"omniglot weights file (default {omniglot_weights})")
    return parser


def main(argv=None):
    """The command line (see the module docstring): ``argv`` (default ``sys.argv[1:]``) -> the result rows
    (``--dataset omniglot``: omniglot.omniglot_main's result; ``autoencoders ...``: autoencoders.main's).
    First turns flush-to-zero on for the whole process (``trainer.flush_denormal_everywhere``)."""
    flush_denormal_everywhere()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["autoencoders"]:  # python experiments.py autoencoders --dataset ... (autoencoders.main)
        import autoencoders
        return autoencoders.main(argv[1:])
    import omniglot  # here, not at the top: omniglot imports this module
    parser = _parser(omniglot.OMNIGLOT_WEIGHTS)
    args = parser.parse_args(argv)
    if args.dataset == "omniglot":
        return omniglot.omniglot_main(args, parser)
    try:
        dataset_name(args.dataset)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    args.embedding_dim = 2 if args.embedding_dim is None else args.embedding_dim

    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    selectors = tuple(SELECTORS) if args.selectors == "all" else tuple(args.selectors.split(","))
    for method in methods:
        check_choice(method, METHODS, "method")
    for selector in selectors:
        check_choice(selector, tuple(SELECTORS), "selector")
    started = time.perf_counter()
    folder = {"image_size": args.image_size, "channels": args.channels, "held_out_classes": args.held_out_classes,
              "val_fraction": args.val_fraction, "skip_bad_images": args.skip_bad_images}
    try:
        rows = run_methods(args.dataset, methods, selectors, args.embedding_dim, args.epochs, args.seed,
                           args.quick, args.root, args.download, args.device,
                           progress=not args.no_progress, channels_last=args.channels_last,
                           train_classes=args.train_classes, run_dir=args.run_dir, fresh=args.fresh,
                           network=args.network, pretrained=args.pretrained, folder=folder,
                           model_file=args.save_model, command=" ".join(["python experiments.py", *argv]),
                           amp=args.amp, compile=args.compile, recipe=_recipe_of(args, parser), lr_step=args.lr_step)
    finally:
        writer = is_main_process()
        close_distributed()
    if not writer:
        return rows
    print()
    print(results_table(rows))
    where = "quick/" if args.quick else ""
    if args.train_classes is not None:
        where += "train-classes-" + rows[0]["train_classes"] + "/"
    tables = ", ".join(sorted({f"results/{where}{results_stem(row)}.md" for row in rows}))
    print(f"Total {time.perf_counter() - started:.0f} s. Results in {tables}, "
          f"plots in images/{where}." + (f" Model saved to {args.save_model}." if args.save_model else ""))
    return rows


def options_given(parser, args):
    """The options of ``parser`` that its parsed ``args`` hold at another value than their default, as
    ``(option string, destination)`` pairs in the parser's order."""
    return [(action.option_strings[0], action.dest) for action in parser._actions
            if action.option_strings and action.dest != "help"
            and getattr(args, action.dest, action.default) != action.default]


def _positive_int(text):
    """An argparse type: ``text`` as an int of at least 1 (``check_int``), refused by the parser (before any
    data loads) else."""
    try:
        return check_int(int(text), "the value", 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from error


def _recipe_of(args, parser):
    """The ``recipe`` argument of ``run_methods`` the command line asks for: one ``Recipe`` for every method
    when an option describes one, ``"classic"`` for ``--classic``, else None (each method's study recipe)."""
    given = {"margin": args.margin, "soft": args.soft_margin or None, "distance": args.distance,
             "batch_norm": args.batch_norm or None, "easy_selector": args.easy_selector,
             "batch_samples": args.batch_samples}
    given = {field: value for field, value in given.items() if value is not None}
    if given and args.classic:
        parser.error("--classic takes each method's classic settings; leave out the recipe options with it")
    return CLASSIC._replace(**given) if given else "classic" if args.classic else None


# ----------------------------------------------------------------------------- held-out classes
# Train on some classes only and measure one-shot learning on the others (``--train-classes``).

HELD_OUT_EPISODES = 1000
HELD_OUT_COLUMNS = [("train_classes", "train classes", "{}"),
                    ("held_out_one_shot", "held-out 1-shot acc", "{:.3f}"),
                    ("held_out_one_shot_ci95", "+-", "{:.3f}"),
                    ("held_out_roc_auc", "held-out ROC-AUC", "{:.3f}"),
                    ("held_out_map_at_r", "held-out MAP@R", "{:.3f}")]


def parse_classes(spec, n_classes):
    """Sorted class ids from ``spec``: a list of ints, or a string of ids and ranges such as ``'0-4'``,
    ``'0,1,2,3,4'`` or ``'0-2,7'``. Each must be in [0, n_classes); at least one class and at least two
    others (for the held-out episodes) must remain."""
    if isinstance(spec, str):
        ids = []
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            first, dash, last = part.partition("-")
            if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
                raise ValueError(f"cannot read train classes {spec!r}: use ids and ranges such as '0-4' or '0,1,2,3,4'")
            ids += range(int(first), int(last) + 1) if dash else [int(first)]
    else:
        ids = [int(class_id) for class_id in spec]
    ids = sorted(set(ids))
    if not ids or ids[0] < 0 or ids[-1] >= n_classes:
        raise ValueError(f"train classes must be ids in 0..{n_classes - 1}, got {spec!r}")
    if n_classes - len(ids) < 2:
        raise ValueError(f"train classes {spec!r} leave {n_classes - len(ids)} held-out classes; leave at least 2")
    return ids


def held_out_splits(train_set, test_set, train_classes):
    """``((seen train, seen test), held-out test, tag)`` for training on ``train_classes`` only (see
    parse_classes); ``tag`` names the class set in file names, e.g. '0-4'."""
    seen = parse_classes(train_classes, len(train_set.classes))
    unseen = [k for k in range(len(train_set.classes)) if k not in seen]
    tag = ",".join(str(k) for k in seen) if seen != list(range(seen[0], seen[-1] + 1)) else f"{seen[0]}-{seen[-1]}"
    return ((class_subset(train_set, seen), class_subset(test_set, seen)), class_subset(test_set, unseen), tag)


class PixelEmbedding(nn.Module):
    """The no-learning reference embedding: images ``(B, C, H, W)`` -> their pixels ``(B, C*H*W)``."""

    def forward(self, x):
        return x.flatten(1)

    def get_embedding(self, x):
        return self(x)


HELD_OUT_BASELINES = ("pixels", "untrained network")


def held_out_baselines(dataset, train_set, test_set, train_classes, embedding_dim=2, seed=0,
                       results_dir="results"):
    """Reference rows for a held-out-class run, scored exactly as ``run_method`` scores a trained model:
    'pixels' (the normalised images as vectors, ``PixelEmbedding``) and 'untrained network' (the
    ``EmbeddingNet`` every method starts from: same ``embedding_dim`` and seed, no training). A trained
    embedding should beat both on its own classes; on the held-out ones it may not (see the README).
    Takes the full ``(train_set, test_set)`` and the ``train_classes`` spec; records the rows under
    ``results_dir/train-classes-<tag>/`` (skipped when None) and returns them."""
    (seen_train, seen_test), held_out, classes_tag = held_out_splits(train_set, test_set, train_classes)
    in_channels, image_size = seen_train.data.shape[1], seen_train.data.shape[-1]
    rows = []
    for name in HELD_OUT_BASELINES:
        torch.manual_seed(seed)  # run_method's seed before it builds the network: the same initial weights
        model = (PixelEmbedding() if name == "pixels" else
                 EmbeddingNet(embedding_dim, in_channels=in_channels, image_size=image_size))
        embedded = [extract_embeddings(DataLoader(split, batch_size=EVALUATION_BATCH), model)
                    for split in (seen_train, seen_test)]
        dimension = embedded[0][0].shape[1]
        row = {"dataset": dataset, "method": name, "embedding_dim": dimension, "epochs": 0, "seed": seed,
               "train_classes": classes_tag}
        row.update(evaluate_embeddings(*embedded[0], *embedded[1], seed=seed))
        row.update(evaluate_held_out(model, held_out, seed))
        if results_dir is not None:
            record_result(row, os.path.join(results_dir, f"train-classes-{classes_tag}"))
        rows.append(row)
    return rows


def evaluate_held_out(model, held_out, seed=0, n_episodes=HELD_OUT_EPISODES):
    """One-shot accuracy (5-way 1-shot, or fewer ways when fewer classes are held out; 1 query per class,
    seeded episodes) with its 95% interval, verification ROC-AUC and retrieval MAP@R (each image querying
    the others), on held-out classes never trained on. Returns {'held_out_one_shot',
    'held_out_one_shot_ci95', 'held_out_n_way', 'held_out_roc_auc', 'held_out_map_at_r'}."""
    embeddings, labels = extract_embeddings(
        DataLoader(held_out, batch_size=EVALUATION_BATCH, num_workers=data_workers(held_out)), model)
    n_way = min(5, len(held_out.classes))
    episodes = few_shot_accuracy(embeddings, labels, n_way, 1, n_episodes, seed=seed)
    return {"held_out_one_shot": episodes["accuracy"], "held_out_one_shot_ci95": episodes["ci95"],
            "held_out_n_way": n_way, "held_out_roc_auc": verification_roc_auc(embeddings, labels, seed=seed),
            "held_out_map_at_r": retrieval_metrics(embeddings, labels)["map_at_r"]}



def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
