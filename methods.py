"""How each metric-learning method of the study is put together for training, by name: the methods and
selectors, the classic study's hyper-parameters, the recipes each method trains with (``Recipe``,
``RECIPES``), ``build_method`` (the one place a method's model, loss and batches are assembled, for the
Fashion-MNIST study and for Omniglot alike), the network choice and ``build_training``, all a study's
``trainer.fit`` needs. The studies themselves (what runs, where the outputs go) are ``experiments.py``
and ``omniglot.py``.
"""

import os
import re
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cross_batch_memory import CrossBatchMemory
from datasets import BalancedBatchSampler, DistributedBalancedBatchSampler, SiameseMNIST, TripletMNIST
from distributed import rank_and_world_size
from losses import ContrastiveLoss, MultiSimilarityLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss
from metrics import AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric
from networks import ClassificationNet, SiameseNet, SiameseNetwork, TripletNet, build_network
from utils import (AllTripletSelector, BatchHardTripletSelector, HardestNegativeTripletSelector,
                   HardNegativePairSelector, RandomNegativeTripletSelector, SemihardNegativeTripletSelector,
                   check_choice, check_int)

METHODS = ("softmax", "siamese", "triplet", "online-contrastive", "online-triplet", "multi-similarity")
# The methods that mine balanced batches with an online loss, so that a cross-batch memory can join their candidates.
ONLINE_METHODS = ("online-contrastive", "online-triplet", "multi-similarity")
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
STUDY_NETWORKS = ("embedding-net", "resnet18")

# The classic study's settings.
MARGIN = 1.0
LEARNING_RATE = {"softmax": 1e-2}  # every other method: 1e-3
DEFAULT_LEARNING_RATE = 1e-3
BATCH_SIZE = {"softmax": 256, "siamese": 128, "triplet": 128}
BALANCED_BATCH = (10, 25)  # classes x samples per class, for the online methods
WEIGHT_DECAY = {"online-triplet": 1e-4}
# Training steps before a cross-batch memory is mined (Recipe.memory_warmup). Wang et al. (2020) start the memory
# once the embeddings' early fast drift is over, so that what it holds is close to what the model gives now; here
# that is a fraction of the first epoch (the classic balanced batches make 240 steps an epoch on Fashion-MNIST).
# A guess from the paper's reasoning, not a measurement: --memory-warmup changes it.
MEMORY_WARMUP = 250


class Recipe(NamedTuple):
    """How a metric-learning method is trained, beyond the classic study's settings (``CLASSIC``):
    ``margin`` of its losses, ``soft`` margin of the triplet losses (``losses.triplet_terms``), the
    ``distance`` every loss and selector compares (``"squared"`` or ``"euclidean"``), ``batch_norm``,
    an ``EmbeddingNet`` ending in a BatchNorm that keeps the embeddings from collapsing,
    ``easy_selector``, the name (``SELECTORS``) of an easier selector whose triplets' loss the online
    triplet loss adds to its own selector's (a mixed objective, ``losses.OnlineTripletLoss``), and
    ``batch_samples``, the images per class in the online methods' balanced batches (fewer: an anchor's
    hardest positive and negative come from fewer candidates, so they are less extreme), ``memory``, the
    size of the cross-batch memory the online methods' loss mines besides the batch (0: none;
    ``cross_batch_memory.CrossBatchMemory``), ``memory_warmup``, the training steps before it is mined, and
    ``normalize``, an ``EmbeddingNet`` whose embeddings have unit L2 norm, so that every loss, the mining and the
    study's Euclidean metrics see the cosine geometry that ``MultiSimilarityLoss`` trains."""

    margin: float = MARGIN
    soft: bool = False
    distance: str = "squared"
    batch_norm: bool = False
    easy_selector: Optional[str] = None
    batch_samples: int = BALANCED_BATCH[1]
    memory: int = 0
    memory_warmup: int = MEMORY_WARMUP
    normalize: bool = False


# Recipe fields added after run folders and result rows recorded recipes: those record them only when they are not
# their default (experiments.method_settings), so that every earlier run folder still matches and resumes.
LATER_RECIPE_FIELDS = ("batch_samples", "memory", "memory_warmup", "normalize")
CLASSIC = Recipe()
HERMANS = Recipe(margin=0.0, soft=True, distance="euclidean")  # Hermans et al.'s soft margin on plain distances
# The hardest-negative selectors mine batches of few images per class, so that an anchor's hardest picks are
# not the few ambiguous items of the batch (shirts against T-shirts) in every batch (results/README.md, "Recipes").
FEW_PER_CLASS = 4
# The recipe each method trains with in the study (measured in results/README.md, "Recipes"; a method not named: CLASSIC),
# and the one it trained with before them (CLASSIC_RECIPES, else CLASSIC), kept as the "before" rows.
RECIPES = {
    "online-triplet/hardest": Recipe(batch_norm=True, easy_selector="random-hard", batch_samples=FEW_PER_CLASS),
    "online-triplet/semi-hard": Recipe(batch_norm=True),
    "online-triplet/batch-hard": Recipe(batch_norm=True, easy_selector="random-hard", batch_samples=FEW_PER_CLASS),
    "online-triplet/batch-hard-soft": Recipe(soft=True, batch_norm=True, easy_selector="random-hard",
                                             batch_samples=FEW_PER_CLASS),
    # multi-similarity trains cosine similarities: unit-norm embeddings make the study's Euclidean metrics score
    # that geometry (64-D, seed 0: MAP@R 0.792 against 0.636 on the raw embeddings; results/README.md, "64-D")
    "multi-similarity": Recipe(normalize=True),
}
CLASSIC_RECIPES = {"online-triplet/batch-hard-soft": HERMANS}
STEP_SIZE, GAMMA = 8, 0.1
EVALUATION_BATCH = 1000
STREAMING_WORKERS = 4  # at most, for image folders too large to hold in memory

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
    words = (["BN"] if recipe.batch_norm else []) + (["L2"] if recipe.normalize else [])
    words += ["soft margin"] if recipe.soft else []
    words += [] if recipe.distance == CLASSIC.distance else [recipe.distance]
    words += [] if recipe.margin == CLASSIC.margin else [f"margin {recipe.margin:g}"]
    words += [] if recipe.batch_samples == CLASSIC.batch_samples else [f"{recipe.batch_samples} images per class"]
    words += [] if recipe.easy_selector is None else [f"+ {recipe.easy_selector}"]
    words += [f"memory {recipe.memory}"] if recipe.memory else []
    if recipe.memory and recipe.memory_warmup != MEMORY_WARMUP:
        words += [f"warm-up {recipe.memory_warmup}"]
    return ", ".join(words) or "classic"


def build_method(method, embedding_net, train_set, test_set=None, *, selector="random-hard", margin=MARGIN,
                 batch_size=128, batch_classes=BALANCED_BATCH[0], batch_samples=BALANCED_BATCH[1], seed=0,
                 groups=None, soft=False, distance="squared", easy_selector=None, memory=0,
                 memory_warmup=MEMORY_WARMUP):
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
    ``multi-similarity`` mines the same balanced batches with ``MultiSimilarityLoss()`` (its own defaults;
    ``margin``, ``distance`` and ``soft`` are the contrastive and triplet losses'). ``memory`` > 0 gives the
    online methods' loss a ``CrossBatchMemory(memory, D, memory_warmup)`` (``D``: the network's
    ``embedding_dim``); ``check_memory`` says which methods can take one.
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
    check_memory(method, memory, memory_warmup)
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
        model, memory = embedding_net, _memory_of(embedding_net, memory, memory_warmup)
        loss_fn = _online_loss(method, selector, margin, generator, soft, distance, easy_selector, memory)
        metrics = [AverageNonzeroTripletsMetric()] if method == "online-triplet" else []
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


def _online_loss(method, selector, margin, generator, soft, distance, easy_selector, memory):
    """The loss of an online method (``ONLINE_METHODS``) of ``build_method``'s settings; ``memory``: its
    ``CrossBatchMemory`` or None."""
    if method == "online-contrastive":
        return OnlineContrastiveLoss(margin, HardNegativePairSelector(), distance=distance, memory=memory)
    if method == "multi-similarity":
        return MultiSimilarityLoss(memory=memory)
    check_choice(selector, tuple(SELECTORS), "selector")
    easy = None
    if easy_selector is not None:
        easy = SELECTORS[check_choice(easy_selector, tuple(SELECTORS), "easy_selector")](margin, generator, distance)
    return OnlineTripletLoss(margin, SELECTORS[selector](margin, generator, distance), soft=soft, distance=distance,
                             easy_selector=easy, memory=memory)


def check_memory(method, memory, memory_warmup=MEMORY_WARMUP):
    """Check a cross-batch memory of ``memory`` items (0: none) and its ``memory_warmup`` steps for ``method``
    (``METHODS``): ValueError, saying what to change, for a size or warm-up below 0, a memory for a method not
    in ``ONLINE_METHODS`` (their random pairs or triplets, or a classifier, mine nothing), or a warm-up other
    than ``MEMORY_WARMUP`` without a memory. Returns ``memory``."""
    check_int(memory, "memory", 0)
    check_int(memory_warmup, "memory_warmup", 0)
    if memory and method not in ONLINE_METHODS:
        raise ValueError(f"a cross-batch memory (--memory) needs an online method ({', '.join(ONLINE_METHODS)}); "
                         f"{method} mines no batch: leave it out of --methods, or leave out --memory")
    if not memory and memory_warmup != MEMORY_WARMUP:
        raise ValueError("memory_warmup (--memory-warmup) is the warm-up of a cross-batch memory: give its size "
                         "too (--memory M)")
    return memory


def _memory_of(embedding_net, memory, memory_warmup):
    """The ``CrossBatchMemory`` of ``memory`` items (None for 0) sized by ``embedding_net.embedding_dim``."""
    if not memory:
        return None
    embedding_dim = getattr(embedding_net, "embedding_dim", None)
    if not isinstance(embedding_dim, int):
        raise ValueError(f"a cross-batch memory needs the network's embedding size, but {type(embedding_net).__name__} "
                         "has no embedding_dim attribute; set it, or leave out --memory")
    return CrossBatchMemory(memory, embedding_dim, memory_warmup)


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


def build_embedding_net(network, embedding_dim, train_set, pretrained=None, batch_norm=False, normalize=False):
    """The network a study trains: ``"embedding-net"`` (the classic ``EmbeddingNet``, any image size and
    channel count; ``batch_norm``: ending in a BatchNorm, ``normalize``: unit-norm embeddings, see
    ``networks.EmbeddingNet``) or ``"resnet18"``
    (``networks.ResNetEmbedding``, ``pretrained`` None, a file or ``"imagenet"``), sized for ``train_set``'s
    images. Returns ``(network, its constructor arguments)``."""
    check_choice(network, STUDY_NETWORKS, "network")
    in_channels, image_size = image_shape(train_set)
    if network == "embedding-net":
        if pretrained is not None:
            raise ValueError("--pretrained needs --network resnet18 (EmbeddingNet has no pretrained weights)")
        arguments = {"embedding_dim": embedding_dim, "in_channels": in_channels, "image_size": image_size}
        arguments.update({flag: True for flag, on in (("batch_norm", batch_norm), ("normalize", normalize)) if on})
    elif batch_norm or normalize:
        option = "--batch-norm" if batch_norm else "--normalize"
        raise ValueError(f"{option} is an option of the classic network (--network embedding-net)")
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
    embedding_net, _ = build_embedding_net(network, embedding_dim, train_set, pretrained, recipe.batch_norm,
                                           recipe.normalize)
    model, loss_fn, train_loader, val_loader, metrics = build_method(
        method, embedding_net, train_set, test_set, selector=selector, margin=recipe.margin,
        batch_size=BATCH_SIZE.get(method, BATCH_SIZE["siamese"]), seed=seed, soft=recipe.soft,
        distance=recipe.distance, easy_selector=recipe.easy_selector, batch_samples=recipe.batch_samples,
        memory=recipe.memory, memory_warmup=recipe.memory_warmup)
    return (model, loss_fn, train_loader, val_loader, metrics,
            LEARNING_RATE.get(method, DEFAULT_LEARNING_RATE), WEIGHT_DECAY.get(method, 0.0))
