"""Datasets and samplers for siamese and triplet training.

- InMemoryDataset: a normalised (N, C, H, W) float image tensor with (N,) labels, for fast CPU training.
- SiameseMNIST: wraps a labelled dataset and yields ((img1, img2), target), target 1 = same class.
- TripletMNIST: wraps a labelled dataset and yields ((anchor, positive, negative), []).
- BalancedBatchSampler: batches of n_classes classes x n_samples items, for online pair/triplet mining.
- DistributedBalancedBatchSampler: the same global batches on every process of a DistributedDataParallel
  run, each process yielding its contiguous share (share_bounds).

SiameseMNIST and TripletMNIST accept three kinds of dataset:
- an InMemoryDataset (fast path: images are rows of its tensor, no PIL, batches are gathered at once);
- an MNIST-like torchvision dataset with uint8 `.data` and `.targets`: each image is turned into a PIL
  image ('L' for (H, W), 'RGB' for (H, W, 3)) and the dataset's `transform` is applied to it;
- any other dataset plus one label per item (`labels=`, or the dataset's `.targets` as in ImageFolder):
  the image is `dataset[i][0]`, so the dataset applies its own transform.

Loading MNIST and Fashion-MNIST from their IDX files:
- read_idx: reads one IDX file (the MNIST file format, gzipped or plain) into a tensor, checking it.
- IDXImageDataset: a torchvision-MNIST-compatible dataset built from a folder holding the IDX files.
- load_dataset("mnist" | "fashion-mnist", root, train, ...): looks for the files in `root`, then in the
  operating system's dataset folders (SYSTEM_DATA_DIRS), then (download=True) lets torchvision
  download them into `root`; optionally returns an InMemoryDataset. NORMALIZATION and CLASS_NAMES
  hold each dataset's (mean, std) and class names.

Your own images (a folder of class folders, group/class folders like Omniglot's, or a CSV of path,label):
- read_image / list_images / load_image_folder: read them (resized, 1 or 3 channels, pixels in [0, 1]) into an
  InMemoryDataset, or an ImageFileDataset that reads each file when fetched if they do not fit in memory.
- channel_statistics / normalized: per-channel mean and std of the training images, and standardising by them.
- split_per_class (a validation split inside every class) and held_out_class_split (unseen classes).

BatchRandomAffine: random rotation, shear, zoom and shift of a whole batch of image tensors at once.

Omniglot's readers (OmniglotAlphabets, OneShotRuns) live in omniglot.py; ``datasets.OmniglotAlphabets``
and the other old names still resolve to them.
"""

import csv
import gzip
import math
import numbers
import os
import pickle
import re
import struct
import warnings
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch
import torchvision
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from tqdm.auto import tqdm

import distributed
from utils import check_choice, check_int, groups_of_classes, moved_attribute


class InMemoryDataset(Dataset):
    """Images held in one float tensor, so a batch is a single gather instead of N PIL conversions.

    Args:
        data: (N, C, H, W) float tensor, already normalised.
        targets: (N,) integer class ids (tensor, numpy array or list).
        train: whether this is a training split (read by SiameseMNIST / TripletMNIST).
        transform: optional callable applied to each (C, H, W) image tensor.
        target_transform: optional callable applied to each int target.
        classes: class names; defaults to str(class id) for each distinct id, in increasing order.
    Items are (image (C, H, W), target int).
    """

    def __init__(self, data, targets, train=True, transform=None, target_transform=None, classes=None):
        if not torch.is_tensor(data) or not data.is_floating_point() or data.ndim != 4:
            raise TypeError("data must be a (N, C, H, W) float tensor; use InMemoryDataset.from_dataset "
                            "to convert a torchvision dataset with uint8 images")
        targets = _as_tensor(targets)
        if targets.ndim != 1 or len(targets) != len(data) or targets.is_floating_point():
            raise ValueError(f"targets must be {len(data)} integer class ids (one per image), "
                             f"got shape {tuple(targets.shape)} and dtype {targets.dtype}")
        self.data = data
        self.targets = targets.long()
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        self.classes = list(classes) if classes is not None else [str(c) for c in self.targets.unique().tolist()]

    @classmethod
    def from_dataset(cls, dataset, mean=None, std=None):
        """Convert a torchvision MNIST/CIFAR-like dataset into an InMemoryDataset.

        Reads `dataset.data` (uint8, (N, H, W) or channels-last (N, H, W, C), tensor or numpy),
        `.targets`, `.train` and `.classes`. Pixels are scaled to [0, 1] and normalised per channel
        by `mean`/`std` (numbers or one per channel; computed from the data when None). The result
        stores them as `.mean` and `.std` tuples, ready for transforms.Normalize. The source dataset's
        own (PIL) transforms are not carried over.
        """
        images = _as_tensor(dataset.data)
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise TypeError(f"dataset.data must be uint8 images of shape (N, H, W) or (N, H, W, C), got "
                            f"{images.dtype} {tuple(images.shape)}; build an InMemoryDataset directly instead")
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        data = images.contiguous().float().div_(255)
        n_channels = data.shape[1]
        if mean is None or std is None:
            data_std, data_mean = torch.std_mean(data, dim=(0, 2, 3), correction=0)
        mean = data_mean if mean is None else _per_channel(mean, n_channels, "mean")
        std = data_std if std is None else _per_channel(std, n_channels, "std")
        if (std <= 0).any():
            raise ValueError(f"std must be positive in every channel, got {std.tolist()}")
        data.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        memory = cls(data, dataset.targets, train=getattr(dataset, "train", True),
                     classes=getattr(dataset, "classes", None))
        memory.mean, memory.std = tuple(mean.tolist()), tuple(std.tolist())
        return memory

    def __len__(self):
        return len(self.data)

    def subset(self, index):
        """The items at ``index`` (a (K,) index or bool tensor, or a slice) as a new InMemoryDataset with
        the same split flag, transforms, class names and recorded ``mean`` / ``std`` (and, for a dataset
        from ``load_image_folder``, its ``paths`` and ``groups`` at ``index`` and its other attributes)."""
        subset = InMemoryDataset(self.data[index], self.targets[index], train=self.train, transform=self.transform,
                                 target_transform=self.target_transform, classes=self.classes)
        if hasattr(self, "mean"):
            subset.mean, subset.std = self.mean, self.std
        _carry_image_attributes(self, subset, index)
        return subset

    def _sample(self, image, target):
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getitem__(self, index):
        return self._sample(self.data[index], int(self.targets[index]))

    def __getitems__(self, indices):
        """List of (image, target) samples for a batch of indices, gathered with one index op.

        torch's DataLoader calls this with all the indices of a batch when a dataset defines it.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.data[index]
        return [self._sample(image, target) for image, target in zip(images, self.targets[index].tolist())]


def _as_tensor(values):
    # numpy arrays may be negatively strided views (e.g. labels[::-1]), which torch cannot wrap
    return torch.as_tensor(np.ascontiguousarray(values) if isinstance(values, np.ndarray) else values)


def _per_channel(value, n_channels, name):
    value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if value.numel() == 1:
        value = value.expand(n_channels)
    if value.numel() != n_channels:
        raise ValueError(f"{name} needs 1 or {n_channels} values (one per channel), got {value.numel()}")
    return value


class _ClassBlocks:
    """Item indices sorted by label, with each item's class block start and size.

    This is the one place partners are drawn, for both wrappers in both modes: with the block layout,
    a uniform draw among "same class except me" or "any other class" is arithmetic, not a retry loop.
    """

    def __init__(self, labels):
        _, class_of, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.n_items, self.n_classes = len(labels), len(counts)
        self.order = torch.argsort(class_of, stable=True)  # item indices grouped by class
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(self.n_items)  # position of each item in `order`
        self.start = (counts.cumsum(0) - counts)[class_of]  # (N,) start of each item's class block
        self.size = counts[class_of]  # (N,) number of items in each item's class

    def draw(self, anchors, same_class, uniforms):
        """Partner index for each anchor: a different item of its class where same_class, else an item
        of another class; uniform given uniforms in [0, 1).

        anchors (B,) long, same_class (B,) bool, uniforms (B,) float64 -> (B,) long.
        A singleton class's only same-class item is the anchor itself, which is what a same-class draw
        returns then. A different-class draw in a one-class dataset is meaningless: callers avoid it.
        """
        start, size = self.start[anchors], self.size[anchors]
        own_rank = self.rank[anchors] - start
        # same class: r in [0, size - 1), then skip the anchor's own rank inside its block;
        # other class: r in [0, N - size), then skip the anchor's whole block
        span = torch.where(same_class, size - 1, self.n_items - size)
        r = (uniforms * span).long()
        skip_from = torch.where(same_class, own_rank, start)
        skip_by = torch.where(same_class, 1, size)
        r = r + torch.where((r >= skip_from) & (span > 0), skip_by, 0)
        return self.order[torch.where(same_class, start, 0) + r]


class _LabelledWrapper(Dataset):
    """Shared plumbing of SiameseMNIST and TripletMNIST: pairing labels, modes, image loading."""

    def __init__(self, dataset, labels, train, seed):
        self.dataset = dataset
        self.labels = _pairing_labels(dataset, labels)
        self.train = bool(getattr(dataset, "train", True) if train is None else train)
        self.seed = seed
        if len(self.labels) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 items, got {len(self.labels)}")
        self._blocks = _ClassBlocks(self.labels)
        if isinstance(dataset, InMemoryDataset):
            self._kind = "memory"
        elif hasattr(dataset, "data") and hasattr(dataset, "targets"):
            self._kind = "pil"
        else:
            self._kind = "generic"

    def __len__(self):
        return len(self.labels)

    def _uniforms(self, n, generator=None):
        # Train mode draws from torch's global RNG: torch.manual_seed reproduces it and DataLoader seeds
        # every worker differently. (The classic code used numpy's global RNG, whose state is copied
        # into each forked worker, so all workers produced the same "random" pairs.)
        # One (n, 2) draw consumes the RNG exactly like n draws of (1, 2), so a batch fetched through
        # __getitems__ gets the same partners as fetching its items one by one.
        return torch.rand(n, 2, dtype=torch.float64, generator=generator)

    def _image(self, index):
        if self._kind == "generic":
            return self.dataset[index][0]
        image = self.dataset.data[index]
        if self._kind == "pil":
            image = Image.fromarray(np.asarray(image))  # (H, W) uint8 -> 'L', (H, W, 3) uint8 -> 'RGB'
        transform = self.dataset.transform
        return image if transform is None else transform(image)

    def _images(self, indices):
        """List of images for (K,) item indices; one gather on the InMemoryDataset path."""
        if self._kind != "memory":
            return [self._image(i) for i in indices.tolist()]
        images = self.dataset.data[indices]
        transform = self.dataset.transform
        return list(images) if transform is None else [transform(image) for image in images]

    def __getitem__(self, index):
        return self.__getitems__([index])[0]


def _pairing_labels(dataset, labels):
    """(N,) long class ids used for pairing: `labels` or `dataset.targets`, mapped by the dataset's
    target_transform when it has one."""
    if labels is None:
        labels = getattr(dataset, "targets", None)
        if labels is None:
            raise TypeError(f"{type(dataset).__name__} has no .targets: pass labels= (one class id per item)")
    labels = _as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D sequence of integer class ids, got shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}")
    if hasattr(dataset, "__len__") and len(labels) != len(dataset):
        raise ValueError(f"got {len(labels)} labels for a dataset of {len(dataset)} items; pass one per item")
    target_transform = getattr(dataset, "target_transform", None)
    if target_transform is not None:
        labels = torch.tensor([int(target_transform(t)) for t in labels.tolist()])
    return labels.long()


class SiameseMNIST(_LabelledWrapper):
    """Pairs of images with target 1 (same class) or 0 (different class).

    Args:
        dataset: an InMemoryDataset, an MNIST-like dataset (`.data`, `.targets`) or any dataset whose
            items are (image, ...) together with `labels` (see the module docstring).
        labels: class id per item; defaults to `dataset.targets`. Pairing uses the labels after the
            dataset's `target_transform` (if any), so a target_transform merging classes makes their
            items positive pairs.
        train: defaults to `dataset.train`, else True.
        seed: seeds the fixed pairs of test mode.

    Train mode: each access pairs item i with a fresh random partner, positive or negative with
    probability 1/2, drawn from torch's global RNG. Test mode: fixed pairs (`test_pairs`, (N, 3) rows
    of (i, partner, target)) drawn once from torch.Generator().manual_seed(seed): positive for even i,
    negative for odd i. An item never pairs with itself. An item whose class has no other member gets
    a negative pair instead, and in a one-class dataset every pair is positive.
    Items are ((img1, img2), target int).
    """

    def __init__(self, dataset, labels=None, train=None, seed=29):
        super().__init__(dataset, labels, train, seed)
        if not self.train:
            anchors = torch.arange(len(self))
            uniforms = self._uniforms(len(self), torch.Generator().manual_seed(seed))
            # column 0 (the train-mode coin) is unused: parity decides, so the test set is half positive
            partners, targets = self._pairs(anchors, anchors % 2 == 0, uniforms[:, 1])
            self.test_pairs = torch.stack([anchors, partners, targets], dim=1)

    def _pairs(self, anchors, want_positive, uniforms):
        size = self._blocks.size[anchors]
        positive = (want_positive & (size > 1)) | (size == self._blocks.n_items)
        return self._blocks.draw(anchors, positive, uniforms), positive.long()

    def __getitems__(self, indices):
        """List of ((img1, img2), target) samples, with vectorised partner draws for the whole batch."""
        anchors = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self.train:
            uniforms = self._uniforms(len(anchors))
            partners, targets = self._pairs(anchors, uniforms[:, 0] < 0.5, uniforms[:, 1])
        else:
            _, partners, targets = self.test_pairs[anchors].unbind(1)
        images = self._images(torch.cat([anchors, partners]))
        n = len(anchors)
        return [((images[k], images[n + k]), target) for k, target in enumerate(targets.tolist())]


class TripletMNIST(_LabelledWrapper):
    """Triplets (anchor, positive, negative) of images.

    Same arguments and dataset kinds as SiameseMNIST (pairing labels go through the dataset's
    target_transform). The positive shares the anchor's class and is a different item, except when
    the anchor's class has a single item: then the anchor is its own positive. The negative has
    another class; a dataset with a single class raises ValueError. Train mode draws fresh triplets
    from torch's global RNG; test mode uses fixed `test_triplets` ((N, 3) item indices) drawn once
    from torch.Generator().manual_seed(seed).
    Items are ((anchor, positive, negative), []) -- the empty target keeps the classic trainer interface.
    """

    def __init__(self, dataset, labels=None, train=None, seed=29):
        super().__init__(dataset, labels, train, seed)
        if self._blocks.n_classes < 2:
            raise ValueError("TripletMNIST needs at least 2 classes to draw negatives, but every label is "
                             f"{int(self.labels[0])}; use SiameseMNIST or add other classes")
        if not self.train:
            uniforms = self._uniforms(len(self), torch.Generator().manual_seed(seed))
            self.test_triplets = self._triplets(torch.arange(len(self)), uniforms)

    def _triplets(self, anchors, uniforms):
        same = torch.ones_like(anchors, dtype=torch.bool)
        positives = self._blocks.draw(anchors, same, uniforms[:, 0])
        negatives = self._blocks.draw(anchors, ~same, uniforms[:, 1])
        return torch.stack([anchors, positives, negatives], dim=1)

    def __getitems__(self, indices):
        """List of ((anchor, positive, negative), []) samples, with vectorised draws for the whole batch."""
        anchors = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self.train:
            triplets = self._triplets(anchors, self._uniforms(len(anchors)))
        else:
            triplets = self.test_triplets[anchors]
        images = self._images(triplets.T.reshape(-1))  # all anchors, then all positives, then all negatives
        n = len(anchors)
        return [((images[k], images[n + k], images[2 * n + k]), []) for k in range(n)]


class BalancedBatchSampler(Sampler):
    """Batches of n_classes * n_samples item indices: n_samples items from each of n_classes distinct classes.

    Args:
        labels: (N,) class id per item (tensor, numpy array or list).
        n_classes: classes per batch; n_samples: items per class per batch.
        seed: with a seed, epoch e is drawn from a generator seeded from (seed, e); without one each
            epoch draws its seed from torch's global RNG (so torch.manual_seed reproduces it).
        groups: optional (N,) group id per item (e.g. Omniglot's alphabet), every class inside one
            group and every group holding at least n_classes classes: then all the classes of a batch
            come from one group, so its negatives are the hard, same-group kind that a within-group
            test (20-way within one alphabet) asks to tell apart.

    Yields len(self) = N // (n_classes * n_samples) lists of int indices per epoch. An epoch covers
    the dataset once as nearly as the batch shape allows: each class hands out its items from a
    shuffled queue; classes are chosen without replacement with probability proportional to their
    items not yet used this epoch (plus a tiny weight so every class stays eligible), except that a
    class whose unused items need every remaining batch is always chosen -- so a balanced label set
    whose counts the batch shape divides is covered exactly once. A class whose queue runs short
    continues with a fresh permutation, never repeating an index inside one batch. With groups, each
    batch first draws its group in proportion to the group's unused items, then its classes inside
    that group as above; an epoch then covers the data approximately (a class may repeat before
    another is used up).
    Call set_epoch(e) to replay epoch e (e.g. when resuming); otherwise every iteration advances the
    epoch counter.
    """

    def __init__(self, labels, n_classes, n_samples, seed=None, groups=None):
        super().__init__()
        for name, value in (("n_classes", n_classes), ("n_samples", n_samples)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        labels = _as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (one class id per item), got shape {tuple(labels.shape)}")
        self.labels = labels.long()
        self.n_classes, self.n_samples, self.seed = int(n_classes), int(n_samples), seed
        self.batch_size = self.n_classes * self.n_samples
        if len(self.labels) < self.batch_size:
            raise ValueError(f"labels has {len(self.labels)} items, fewer than one batch of n_classes * n_samples "
                             f"= {self.batch_size}; lower n_classes or n_samples")
        self.labels_set, counts = torch.unique(self.labels, return_counts=True)
        if self.n_classes > len(self.labels_set):
            raise ValueError(f"n_classes={self.n_classes} but labels hold only {len(self.labels_set)} classes; "
                             "lower n_classes")
        short = (counts < self.n_samples).nonzero().flatten().tolist()
        if short:
            listing = ", ".join(f"class {int(self.labels_set[k])} ({int(counts[k])} items)" for k in short)
            raise ValueError(f"every class needs at least n_samples={self.n_samples} items, but: {listing}; "
                             "lower n_samples or filter those classes out")
        order = torch.argsort(self.labels, stable=True)
        self.label_to_indices = dict(zip(self.labels_set.tolist(), torch.split(order, counts.tolist())))
        self.class_groups = None if groups is None else self._class_groups(groups)
        self.epoch = 0

    def _class_groups(self, groups):
        """(C,) group position of each class (in labels_set order), checked against the batch shape."""
        class_position = torch.searchsorted(self.labels_set, self.labels)
        class_groups = groups_of_classes(class_position, len(self.labels_set), _as_tensor(groups))
        classes_per_group = torch.bincount(class_groups)
        if int(classes_per_group.min()) < self.n_classes:
            raise ValueError(f"with groups, every group needs at least n_classes={self.n_classes} classes, but one "
                             f"has only {int(classes_per_group.min())}; lower n_classes or merge small groups")
        return class_groups

    def set_epoch(self, epoch):
        """Make the next iteration yield the batches of `epoch`."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.labels) // self.batch_size

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.seed is None:
            epoch_seed = int(torch.randint(2**63 - 1, ()))
        else:
            epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
        return self._batches(torch.Generator().manual_seed(epoch_seed))

    def _batches(self, generator):
        class_indices = list(self.label_to_indices.values())
        queues = [ids[torch.randperm(len(ids), generator=generator)].tolist() for ids in class_indices]
        heads = [0] * len(queues)  # next position in each queue
        sizes = torch.tensor([len(ids) for ids in class_indices], dtype=torch.float64)
        handed_out = torch.zeros_like(sizes)
        for batches_left in range(len(self), 0, -1):
            unused = (sizes - handed_out).clamp(min=0)
            urgent = torch.ceil(unused / self.n_samples) >= batches_left
            if self.class_groups is None:
                chosen = self._choose_classes(unused + 1e-6, urgent, generator)
            else:
                group_unused = torch.zeros(int(self.class_groups.max()) + 1, dtype=torch.float64)
                group_unused.index_add_(0, self.class_groups, unused)
                group = torch.multinomial(group_unused + 1e-6, 1, generator=generator)
                members = (self.class_groups == group).nonzero().flatten()
                chosen = members[self._choose_classes(unused[members] + 1e-6, urgent[members], generator)]
            batch = []
            for k in chosen.tolist():
                if heads[k] + self.n_samples > len(queues[k]):
                    rest = queues[k][heads[k]:]
                    fresh = class_indices[k][torch.randperm(len(class_indices[k]), generator=generator)].tolist()
                    # items already in this batch go to the back of the new pass, so the batch has no repeats
                    in_batch = set(rest)
                    queues[k] = rest + [i for i in fresh if i not in in_batch] + [i for i in fresh if i in in_batch]
                    heads[k] = 0
                batch += queues[k][heads[k]:heads[k] + self.n_samples]
                heads[k] += self.n_samples
                handed_out[k] += self.n_samples
            yield batch

    def _choose_classes(self, weights, urgent, generator):
        """n_classes distinct class positions: urgent ones first, the rest drawn in proportion to weights."""
        urgent_ids = urgent.nonzero().flatten()
        if len(urgent_ids) >= self.n_classes:
            return urgent_ids[torch.multinomial(weights[urgent_ids], self.n_classes, generator=generator)]
        others = (~urgent).nonzero().flatten()
        n_more = self.n_classes - len(urgent_ids)
        return torch.cat([urgent_ids, others[torch.multinomial(weights[others], n_more, generator=generator)]])


class DistributedBalancedBatchSampler(BalancedBatchSampler):
    """A BalancedBatchSampler for training on several processes (DistributedDataParallel): every rank
    draws the same global batch of n_classes * n_samples indices and yields its own contiguous share.

    Args: as BalancedBatchSampler, plus
        num_replicas: number of processes sharing each batch; rank: this process's position among them.
            Both default to the process group's world size and rank (distributed.rank_and_world_size:
            1 and 0 without one).
        seed: required (an int): every rank must draw the same batches, which an unseeded sampler,
            drawing from each process's own global RNG, would not.

    Rank r's share is ``global_batch[start:stop]`` with ``(start, stop) = distributed.share_bounds(batch_size,
    num_replicas, r)``: contiguous, so concatenating the shares in rank order (what the online losses'
    ``gather`` does with the embeddings) gives back the single-process batch, item for item, and with
    n_classes a multiple of num_replicas each rank holds whole classes. The shares differ in size by at
    most one item when num_replicas does not divide the batch; batch_size >= num_replicas is required so
    that no share is empty. len() is the single-process number of batches, the same on every rank.
    Call set_epoch(e) on every rank (as with torch's DistributedSampler) to keep them in step.
    """

    def __init__(self, labels, n_classes, n_samples, seed, num_replicas=None, rank=None, groups=None):
        if seed is None:
            raise ValueError("DistributedBalancedBatchSampler needs a seed (the same int on every rank), "
                             "or the ranks would draw different batches")
        super().__init__(labels, n_classes, n_samples, seed=seed, groups=groups)
        self.num_replicas, self.rank = distributed.process_group_shape(num_replicas, rank)
        if self.batch_size < self.num_replicas:
            raise ValueError(f"a batch of n_classes * n_samples = {self.batch_size} items cannot give each of "
                             f"num_replicas={self.num_replicas} processes at least one item; raise n_classes or "
                             "n_samples")
        self.share = distributed.share_bounds(self.batch_size, self.num_replicas, self.rank)

    def __iter__(self):
        start, stop = self.share
        return (batch[start:stop] for batch in super().__iter__())


# ---------------------------------------------------------------------------------------------------
# The known datasets: one table, from which every list of dataset names in the library is derived


class KnownDataset(NamedTuple):
    """What the library knows of a dataset it can load by name.

    ``display``: its usual spelling; ``format``: ``"idx"`` (MNIST's four IDX files, ``load_dataset``),
    ``"cifar"`` (CIFAR's python-pickle batches, ``load_cifar10``) or ``"folder"`` (one folder of images
    per class under ``train/`` and ``val/``, ``load_imagenet``); ``files``: the folder or files it is
    read from; ``torchvision_class``: the torchvision.datasets class that downloads it (None: no
    download); ``normalization``: ``(mean, std)`` of its training pixels scaled to [0, 1] (a number
    each for grey images, one per channel for colour), the constants for transforms.Normalize;
    ``classes``: class names by class id (None: read from the files).
    """

    display: str
    format: str
    files: tuple
    torchvision_class: Optional[str]
    normalization: tuple
    classes: Optional[list]


KNOWN_DATASETS = {
    "mnist": KnownDataset("MNIST", "idx", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                          "MNIST", (0.1307, 0.3081), [str(digit) for digit in range(10)]),
    "fashion-mnist": KnownDataset("Fashion-MNIST", "idx", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                                  "FashionMNIST", (0.2860, 0.3530),
                                  ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                   "Sneaker", "Bag", "Ankle boot"]),
    "cifar10": KnownDataset("CIFAR-10", "cifar", ("cifar-10-batches-py",), "CIFAR10",
                            ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]),
    "imagenet": KnownDataset("ImageNet", "folder", ("train", "val"), None,
                             ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), None),
}

# Derived views of the table, by format and by field (the names older code and notebooks import).
IDX_DATASETS = tuple(name for name, known in KNOWN_DATASETS.items() if known.format == "idx")
NORMALIZATION = {name: KNOWN_DATASETS[name].normalization for name in IDX_DATASETS}
CLASS_NAMES = {name: known.classes for name, known in KNOWN_DATASETS.items() if known.classes is not None}
TORCHVISION_CLASS_NAMES = {name: known.torchvision_class for name, known in KNOWN_DATASETS.items()
                           if known.torchvision_class is not None}

# Folders where an operating system package installs the four IDX files (Debian's and Ubuntu's
# dataset-fashion-mnist installs the .gz files in /usr/share/datasets/fashion-mnist). load_dataset
# reads this dict at call time, so adding a folder to it is enough to have it searched.
SYSTEM_DATA_DIRS = {
    "mnist": ["/usr/share/datasets/mnist"],
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
}


# ---------------------------------------------------------------------------------------------------
# Loading MNIST-like data from IDX files

# IDX type byte -> numpy dtype; IDX stores multi-byte numbers big-endian
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path):
    """Read one IDX file (the MNIST file format), gzipped or plain, into a tensor.

    Args:
        path: str or os.PathLike of the file. Gzip is recognised by the file's content, not its name.
    Returns:
        a tensor of the shape in the file's header ((N, H, W) for images, (N,) for labels) and the
        dtype of its type byte (uint8, int8, int16, int32, float32 or float64), in native byte order.
    Raises FileNotFoundError if there is no such file, and ValueError if the file is not IDX (wrong
    magic number or type byte, no dimensions), is truncated, has bytes after the data, or is a damaged
    gzip file.
    """
    with open(path, "rb") as file:
        raw = file.read()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic; an IDX file always starts with two zero bytes
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is a damaged gzip file ({error}); download it again") from error
    if len(raw) < 4:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number; "
                         "download it again")
    type_byte, n_dims = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_byte not in _IDX_DTYPES or n_dims == 0:
        magic = int.from_bytes(raw[:4], "big")
        raise ValueError(f"{path} is not an IDX file: magic number 0x{magic:08x}, expected 0x0000TTDD with type "
                         "TT in 08, 09, 0b, 0c, 0d, 0e and DD >= 1 dimensions; check that it is an MNIST-format file")
    header_size = 4 + 4 * n_dims
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated: its header announces {n_dims} dimensions but the file ends "
                         f"after {len(raw)} bytes; download it again")
    shape = struct.unpack(f">{n_dims}I", raw[4:header_size])
    dtype = _IDX_DTYPES[type_byte]
    n_items = math.prod(shape)
    expected_bytes, data_bytes = n_items * dtype.itemsize, len(raw) - header_size
    if data_bytes < expected_bytes:
        raise ValueError(f"{path} is truncated: shape {shape} of {dtype.name} needs {expected_bytes} data bytes, "
                         f"the file has {data_bytes}; download it again")
    if data_bytes > expected_bytes:
        raise ValueError(f"{path} has {data_bytes - expected_bytes} bytes after the {expected_bytes} that shape "
                         f"{shape} of {dtype.name} needs, so its header is wrong; download it again")
    values = np.frombuffer(raw, dtype=dtype, count=n_items, offset=header_size).reshape(shape)
    # astype copies into native byte order, and the copy is writable (torch warns on read-only buffers)
    return torch.from_numpy(values.astype(dtype.newbyteorder("=")))


def idx_file_names(train, name="mnist"):
    """(images, labels) IDX file names of the train (True) or test (False) split of dataset ``name``
    (KNOWN_DATASETS; the same for MNIST and Fashion-MNIST), without '.gz'."""
    files = KNOWN_DATASETS[name].files
    return files[:2] if train else files[2:]


def find_idx_files(folder, train):
    """(images path, labels path) of the split's two IDX files in `folder`, or None if one is missing.

    Each file may be plain or end in '.gz'; when both exist the plain one is used (torchvision's
    download leaves both, and the plain one needs no decompression).
    """
    found = []
    for name in idx_file_names(train):
        path = next((p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
                     if os.path.isfile(p)), None)
        if path is None:
            return None
        found.append(path)
    return tuple(found)


class IDXImageDataset(Dataset):
    """An MNIST-like dataset read from IDX files, interchangeable with torchvision.datasets.MNIST.

    Args:
        root: folder holding the split's two IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`
            or `t10k-...` for the test split), each plain or '.gz'.
        train: True for the train files, False for the t10k (test) files.
        transform: optional callable applied to each PIL 'L' image.
        target_transform: optional callable applied to each int target.
        classes: class names, class id k being classes[k]; defaults to '0', '1', ... up to the largest label.

    Attributes as in torchvision: `.data` (N, H, W) uint8 tensor, `.targets` (N,) long tensor, `.classes`,
    `.class_to_idx`, `.train`, `.transform`, `.target_transform`, `.root`; also `.images_file` and
    `.labels_file`, the paths read. Items are (transform(PIL 'L' image), target_transform(int target)).
    Raises FileNotFoundError when a file is missing, ValueError when the files are malformed or disagree.
    """

    def __init__(self, root, train=True, transform=None, target_transform=None, classes=None):
        self.root = os.fspath(root)
        self.train = bool(train)
        self.transform = transform
        self.target_transform = target_transform
        files = find_idx_files(self.root, self.train)
        if files is None:
            wanted = " and ".join(f"{name}[.gz]" for name in idx_file_names(self.train))
            raise FileNotFoundError(f"{self.root} does not hold {wanted}; put the IDX files there or use "
                                    "load_dataset, which also searches other places and can download them")
        self.images_file, self.labels_file = files
        images, labels = read_idx(self.images_file), read_idx(self.labels_file)
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"{self.images_file} holds {images.dtype} of shape {tuple(images.shape)}, expected "
                             "uint8 images (N, H, W); check that this is an images file")
        if labels.dtype != torch.uint8 or labels.ndim != 1:
            raise ValueError(f"{self.labels_file} holds {labels.dtype} of shape {tuple(labels.shape)}, expected "
                             "uint8 labels (N,); check that this is a labels file")
        if len(images) != len(labels):
            raise ValueError(f"{self.images_file} has {len(images)} images but {self.labels_file} has "
                             f"{len(labels)} labels; the two files must come from the same split")
        self.data, self.targets = images, labels.long()
        n_classes = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = [str(k) for k in range(n_classes)] if classes is None else list(classes)
        if n_classes > len(self.classes):
            raise ValueError(f"{self.labels_file} has label {n_classes - 1} but only {len(self.classes)} class "
                             "names were given; pass one name per class id")

    @property
    def class_to_idx(self):
        return {name: k for k, name in enumerate(self.classes)}

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index].numpy())  # (H, W) uint8 -> mode 'L', as torchvision's MNIST
        target = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self):
        split = "train" if self.train else "test"
        return f"{type(self).__name__}({len(self)} {split} images from {self.root})"


def _spelling_key(name):
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def canonical_dataset_name(name):
    """'mnist' or 'fashion-mnist' for any usual spelling ('MNIST', 'fashion_mnist', 'FashionMNIST', ...).

    Raises TypeError for a non-string and ValueError, listing the valid names, for an unknown one.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string such as 'mnist' or 'fashion-mnist', got {type(name).__name__}")
    canonical = {_spelling_key(known): known for known in IDX_DATASETS}.get(_spelling_key(name))
    if canonical is None:
        raise ValueError(f"unknown dataset {name!r}; valid names are {' and '.join(map(repr, IDX_DATASETS))} "
                         "(also spelled 'MNIST', 'fashion_mnist', 'FashionMNIST')")
    return canonical


def dataset_search_paths(name, root="data"):
    """Folders load_dataset searches for `name`'s IDX files, in order (name as canonical_dataset_name gives).

    Returns [root/<torchvision class>/raw (torchvision's layout), root, root/<name>] followed by
    SYSTEM_DATA_DIRS[name].
    """
    root = os.fspath(root)
    return [os.path.join(root, TORCHVISION_CLASS_NAMES[name], "raw"), root, os.path.join(root, name),
            *SYSTEM_DATA_DIRS.get(name, [])]


def load_dataset(name, root="data", train=True, transform=None, target_transform=None, download=False,
                 in_memory=False):
    """Load MNIST or Fashion-MNIST, from local files if any, else by torchvision's download.

    Args:
        name: 'mnist' or 'fashion-mnist' ('MNIST', 'fashion_mnist', 'FashionMNIST' are accepted too).
        root: folder of the data (str or os.PathLike). Searched first, in this order:
            root/MNIST/raw or root/FashionMNIST/raw (torchvision's layout), root itself, root/<name>
            (root/mnist or root/fashion-mnist). A folder counts when it holds the split's two IDX files,
            plain or '.gz'. Then each folder of SYSTEM_DATA_DIRS[name] is searched.
        train: the train split (True) or the test split (False).
        transform: callable applied to each PIL image; None means ToTensor then Normalize with
            NORMALIZATION[name] (for raw PIL images, set `dataset.transform = None` afterwards). With
            in_memory, it is applied to each normalised (1, 28, 28) tensor instead, and None means none.
        target_transform: callable applied to each int target.
        download: when no folder holds the files, download them with torchvision.datasets.MNIST or
            FashionMNIST into root/<that class>/raw (needs internet access) and read them from there.
        in_memory: return InMemoryDataset.from_dataset(dataset, *NORMALIZATION[name]): one float tensor
            (N, 1, 28, 28), equal to what the default transform gives, with the same `.classes`.
    Returns:
        an IDXImageDataset (`.data` (N, 28, 28) uint8, `.targets` (N,) long, `.classes` from CLASS_NAMES),
        or an InMemoryDataset when in_memory.
    Raises ValueError for an unknown name or malformed files (a malformed file is reported, not skipped),
    and FileNotFoundError, naming every folder tried and how to get the data, when nothing was found.
    """
    name = canonical_dataset_name(name)
    mean, std = NORMALIZATION[name]
    searched = dataset_search_paths(name, root)
    folder = next((path for path in searched if find_idx_files(path, train) is not None), None)
    download_error = None
    if folder is None and download:
        torchvision_class = getattr(torchvision.datasets, TORCHVISION_CLASS_NAMES[name])
        try:
            torchvision_class(os.fspath(root), train=train, download=True)
            folder = searched[0]
        except (RuntimeError, OSError) as error:  # what torchvision raises when every mirror fails
            download_error = error
    if folder is None:
        message = _not_found_message(name, os.fspath(root), train, searched, download, download_error)
        raise FileNotFoundError(message) from download_error
    if in_memory:
        dataset = IDXImageDataset(folder, train, classes=CLASS_NAMES[name])
        memory = InMemoryDataset.from_dataset(dataset, mean, std)
        memory.transform, memory.target_transform = transform, target_transform
        return memory
    if transform is None:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    return IDXImageDataset(folder, train, transform, target_transform, classes=CLASS_NAMES[name])


def _not_found_message(name, root, train, searched, download, download_error):
    display = KNOWN_DATASETS[name].display
    wanted = " and ".join(f"{file}[.gz]" for file in idx_file_names(train))
    lines = [f"{display} ({'train' if train else 'test'} split) not found: looked for {wanted} in"]
    lines += [f"  {path}" for path in searched]
    download_folder = os.path.join(root, TORCHVISION_CLASS_NAMES[name], "raw")
    if download:
        lines.append(f"and downloading with torchvision.datasets.{TORCHVISION_CLASS_NAMES[name]} into "
                     f"{download_folder} failed: {str(download_error).strip()}")
    lines.append("To get the data, do one of:")
    lines.append(f"  - pass download=True with internet access (torchvision downloads into {download_folder});")
    if name == "fashion-mnist":
        lines.append("  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
                     "(installs the files in /usr/share/datasets/fashion-mnist);")
    four = ", ".join(idx_file_names(True) + idx_file_names(False))
    lines.append(f"  - put the four IDX files ({four}; each plain or .gz) in {root}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Raw images in [0, 1] of the known datasets (the autoencoder experiments standardise them themselves)


def unnormalized(dataset):
    """An MNIST-like dataset (uint8 ``.data`` (N, H, W) or (N, H, W, C), ``.targets``, ``.classes``) as
    an ``InMemoryDataset`` of pixels in [0, 1], ``(N, C, H, W)``, with mean 0 and std 1 recorded."""
    return InMemoryDataset.from_dataset(dataset, mean=0.0, std=1.0)


def read_cifar10(folder, train=True):
    """The train (``data_batch_1`` .. ``5``) or test (``test_batch``) split of CIFAR-10 from ``folder``,
    the extracted python version (pickled dicts with ``data`` (N, 3072) uint8 rows, R then G then B
    planes, and ``labels``; class names from ``batches.meta`` when present).
    Returns an ``InMemoryDataset`` of images (N, 3, 32, 32) in [0, 1]."""
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
    classes = KNOWN_DATASETS["cifar10"].classes
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as file:
            classes = list(pickle.load(file, encoding="latin1")["label_names"])
    images = torch.from_numpy(np.concatenate(rows)).float().div_(255)
    split = InMemoryDataset(images, torch.tensor(labels, dtype=torch.long), train=train, classes=classes)
    split.mean, split.std = (0.0,) * 3, (1.0,) * 3
    return split


def load_cifar10(root="data", train=True, download=True):
    """CIFAR-10 from ``root/cifar-10-batches-py``; when that folder is missing and ``download``,
    ``torchvision.datasets.CIFAR10(root, download=True)`` fetches and extracts it there first.
    Returns an ``InMemoryDataset`` (see ``read_cifar10``). Raises FileNotFoundError saying how to get it."""
    known = KNOWN_DATASETS["cifar10"]
    folder = os.path.join(os.fspath(root), known.files[0])
    problem = ""
    if not os.path.isdir(folder) and download:
        try:
            getattr(torchvision.datasets, known.torchvision_class)(os.fspath(root), train=train, download=True)
        except (RuntimeError, OSError) as error:  # OSError covers urllib's URLError
            problem = f" Downloading it with torchvision failed: {error}."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CIFAR-10 not found: there is no {folder}.{problem} Pass download=True on a "
                                "machine with internet access, or extract the python version "
                                f"(cifar-10-python.tar.gz) into {root}.")
    return read_cifar10(folder, train)


IMAGENET_SIZE = 32  # side of ImageNet images for the convolutional, pixel and HOG paths (ResNet: 224)


def load_imagenet(root="data", train=True, image_size=IMAGENET_SIZE, batch_size=256):
    """ImageNet (or any data set in its layout) read into memory: ``root/imagenet/train`` or ``root/train``
    (``val`` for the test split), one sub-folder of images per class. Images are resized (shorter side)
    and centre-cropped to ``image_size``. Returns an ``InMemoryDataset`` (N, 3, image_size, image_size) in
    [0, 1] with the folder names as classes."""
    split = "train" if train else "val"
    candidates = [os.path.join(os.fspath(root), "imagenet", split), os.path.join(os.fspath(root), split)]
    folder = next((path for path in candidates if os.path.isdir(path)), None)
    if folder is None:
        raise FileNotFoundError(f"ImageNet {split} split not found: looked for {' and '.join(candidates)}; "
                                "put one folder of images per class under train/ and val/")
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    images = torchvision.datasets.ImageFolder(folder, transform=transform)
    data = torch.cat([batch for batch, _ in torch.utils.data.DataLoader(images, batch_size=batch_size)])
    loaded = InMemoryDataset(data, images.targets, train=train, classes=images.classes)
    loaded.mean, loaded.std = (0.0,) * 3, (1.0,) * 3
    return loaded


def load_image_splits(dataset, root="data", download=True, image_size=IMAGENET_SIZE):
    """``(train, test)`` ``InMemoryDataset`` s of raw pixels in [0, 1] of a known dataset (KNOWN_DATASETS):
    "mnist" / "fashion-mnist" (by ``load_dataset``, which also finds the system's copy, e.g.
    /usr/share/datasets/fashion-mnist), "cifar10" (``load_cifar10``) or "imagenet" (``load_imagenet`` at
    ``image_size``)."""
    check_choice(dataset, tuple(KNOWN_DATASETS), "dataset")
    known = KNOWN_DATASETS[dataset]
    if known.format == "cifar":
        return load_cifar10(root, True, download), load_cifar10(root, False, download)
    if known.format == "folder":
        return load_imagenet(root, True, image_size), load_imagenet(root, False, image_size)
    return tuple(unnormalized(load_dataset(dataset, root=root, train=train, download=download))
                 for train in (True, False))


def random_subset(dataset, size, generator):
    """A uniformly random subset of ``size`` items of an ``InMemoryDataset`` (kept in their original
    order), drawn with ``generator``; the dataset itself when it is not larger."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:size].sort().values)


# ---------------------------------------------------------------------------------------------------
# Augmentation of whole batches (Omniglot's training set uses it, omniglot.OmniglotAlphabets)


class BatchRandomAffine:
    """Random affine distortion (rotation, shear, scale, translation) of image tensors, one draw per image.

    Args:
        degrees: rotation drawn uniformly in [-degrees, degrees].
        shear: horizontal shear angle in degrees, drawn uniformly in [-shear, shear].
        scale: (low, high) zoom factor range, drawn uniformly.
        translate: largest shift along each axis, as a fraction of the image size.
        fill: value of the pixels that come from outside the image (the background).
        generator: torch.Generator for the draws; None uses torch's global RNG (so DataLoader workers
            and torch.manual_seed govern it).
    Call on a (C, H, W) image or a (B, C, H, W) batch (float); returns a tensor of the same shape, resampled
    bilinearly with one affine_grid + grid_sample for the whole batch.
    """

    def __init__(self, degrees=10.0, shear=10.0, scale=(0.85, 1.15), translate=0.1, fill=0.0, generator=None):
        for name, value in (("degrees", degrees), ("shear", shear), ("translate", translate)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2 or not all(isinstance(s, numbers.Real) for s in scale)
                or not 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be a (low, high) pair with 0 < low <= high, got {scale!r}")
        self.degrees, self.shear, self.translate = float(degrees), float(shear), float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.fill = float(fill)
        self.generator = generator

    def __repr__(self):
        return (f"{type(self).__name__}(degrees={self.degrees}, shear={self.shear}, scale={self.scale}, "
                f"translate={self.translate}, fill={self.fill})")

    def matrices(self, n):
        """(n, 2, 3) float32 affine_grid matrices: for each output pixel, where to sample in the input
        (normalised coordinates), i.e. the inverse of the random distortion drawn for each image."""
        draws = torch.rand(n, 5, generator=self.generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1)
        angle = torch.deg2rad(draws[:, 0] * self.degrees)
        shear = torch.tan(torch.deg2rad(draws[:, 1] * self.shear))
        low, high = self.scale
        zoom = low + (draws[:, 2] + 1) / 2 * (high - low)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # distortion = rotation @ shear @ zoom; normalised coordinates span 2, so a shift of f * size is 2f
        distortion = torch.stack([torch.stack([cos, cos * shear - sin], -1),
                                  torch.stack([sin, sin * shear + cos], -1)], -2) * zoom[:, None, None]
        shift = draws[:, 3:5] * 2 * self.translate
        inverse = torch.linalg.inv(distortion)
        offset = -(inverse @ shift.unsqueeze(-1))
        return torch.cat([inverse, offset], dim=2).float()

    def __call__(self, images):
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim not in (3, 4):
            raise TypeError(f"{type(self).__name__} takes a float tensor (C, H, W) or (B, C, H, W), got "
                            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if len(batch) == 0:
            return images
        theta = self.matrices(len(batch)).to(batch.device, batch.dtype)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        # grid_sample pads with zeros: shift so that the padding comes out as `fill`
        warped = F.grid_sample(batch - self.fill, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False) + self.fill
        return warped.squeeze(0) if images.ndim == 3 else warped


# ---------------------------------------------------------------------------------------------------
# Your own images: a folder (one sub-folder per class, or group/class like Omniglot) or a CSV file of
# path,label lines, read into memory (or streamed from disk when too large), normalised and split


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")
DEFAULT_MAX_MEMORY_BYTES = 4 * 2 ** 30  # above this, load_image_folder streams the images from disk

# Layouts list_images accepts, quoted by its errors
_LAYOUTS = ("one sub-folder of images per class (root/<class>/<image>), two levels like Omniglot "
            "(root/<group>/<class>/<image>), or a CSV file of path,label lines")
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # more than 8 bits per pixel, one channel
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
# Errors PIL raises for files that are not images, are truncated or are corrupt
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, MemoryError,
                 Image.DecompressionBombError)
_MAX_NAMED = 5  # how many paths a warning lists


class ImageList(NamedTuple):
    """The images ``list_images`` found: ``paths`` (list of N str), ``labels`` ((N,) long class ids into
    ``classes``), ``classes`` (list of class names), ``groups`` ((N,) long ids into ``group_names``, or
    None) and ``group_names`` (list of str, or None) for the two-level layout."""
    paths: list
    labels: torch.Tensor
    classes: list
    groups: Optional[torch.Tensor] = None
    group_names: Optional[list] = None


def _cannot_read(path, error):
    return ValueError(f"cannot read image {path}: {str(error) or type(error).__name__}; "
                      "remove it or pass --skip-bad-images")


def read_image(path, image_size, channels):
    """One image file (anything PIL reads: PNG, JPEG, BMP, WebP, GIF's first frame, TIFF, PGM, ...) as a
    ``(channels, image_size, image_size)`` float32 tensor in [0, 1].

    ``channels`` 1 converts to grey ('L'), 3 to 'RGB'; images with transparency (RGBA, LA, PA, or a
    palette / colour key marked transparent) are composited on white first. 16-bit and 32-bit grey
    images ('I;16', 'I') are scaled by 1/65535, float ('F') images are clipped to [0, 1]. The image is
    resized (bilinear, antialiased) to an image_size x image_size square, which does not keep its
    aspect ratio. Raises ValueError naming ``path`` when the file cannot be read, is truncated or is
    corrupt (PIL's ImageFile.LOAD_TRUNCATED_IMAGES must stay False for truncated files to fail).
    """
    image_size = check_int(image_size, "image_size", minimum=1)
    check_choice(channels, (1, 3), "channels")
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so that truncated and corrupt files fail here
            pixels = _converted_pixels(image, image_size, channels)
    except _IMAGE_ERRORS as error:
        raise _cannot_read(path, error) from error
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _converted_pixels(image, image_size, channels):
    """(image_size, image_size, channels) float32 array in [0, 1] of a loaded PIL image."""
    size = (image_size, image_size)
    if image.mode in _HIGH_DEPTH_MODES:
        # converting to 'L' would clip 16-bit values at 255 instead of scaling them
        values = np.asarray(image, dtype=np.float32)
        values = values.clip(0, 1) if image.mode == "F" else values.clip(0, 65535) / 65535
        grey = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(grey, dtype=np.float32).clip(0, 1)[:, :, None]
        return np.repeat(pixels, channels, axis=2) if channels == 3 else np.ascontiguousarray(pixels)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)  # PIL widens the filter when shrinking
    pixels = np.asarray(image, dtype=np.float32) / 255
    return pixels[:, :, None] if channels == 1 else pixels


def _image_header(path):
    """((width, height), mode) of an image file, from its header only (PIL opens lazily)."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except _IMAGE_ERRORS as error:
        raise _cannot_read(path, error) from error


def _is_image_file(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def folder_entries(folder):
    """(sorted sub-folder names, sorted image file names) of ``folder``, hidden ones left out."""
    folders, images = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file() and _is_image_file(entry.name):
                images.append(entry.name)
    return sorted(folders), sorted(images)


def _left_out(folder):
    warnings.warn(f"{folder} holds no images; it is left out", stacklevel=3)


def _check_two_classes(classes, where):
    if len(classes) < 2:
        found = f"found 1 ({classes[0]!r})" if classes else "found none"
        raise ValueError(f"metric learning needs at least 2 classes; {found} in {where}")


def list_images(root):
    """The image files under ``root`` and their classes, as an ``ImageList``.

    ``root`` is one of:
    - a folder in torchvision's ImageFolder layout: one sub-folder per class, its images inside;
    - a folder of two levels like Omniglot's (``group/class/image``): each leaf folder is a class named
      "group/class" and the upper level is kept as ``groups`` / ``group_names``;
    - a CSV file of ``path,label`` lines (paths relative to the CSV's folder unless absolute; an
      optional header line ``path,label``; labels are class names).
    Classes are sorted by name (group, then class; CSV labels numerically when they are all integers),
    files within a class by name. Images are recognised by their extension (IMAGE_EXTENSIONS, any case);
    other files and hidden files or folders (".name") are ignored.

    Raises FileNotFoundError when ``root`` does not exist; ValueError when a folder holds no class
    sub-folders or no images, mixes images and sub-folders on one level, or yields fewer than 2 classes,
    and when a CSV line is malformed or names a missing file. Warns about each class folder (or group
    folder) that holds no images: it is left out.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{root} does not exist; pass a folder of images ({_LAYOUTS})")
    if os.path.isfile(root):
        if not root.lower().endswith(".csv"):
            raise ValueError(f"{root} is a file but not a .csv file; pass a folder or a CSV file ({_LAYOUTS})")
        return _list_csv(root)
    folders, images = folder_entries(root)
    if images and folders:
        raise ValueError(f"{root} mixes images (e.g. {images[0]}) and class folders (e.g. {folders[0]}); "
                         f"expected {_LAYOUTS}")
    if not folders:
        holds = "holds images but no class sub-folders" if images else "holds no class sub-folders"
        raise ValueError(f"{root} {holds}; expected {_LAYOUTS}")
    contents = {name: folder_entries(os.path.join(root, name)) for name in folders}
    for name, (sub_folders, sub_images) in contents.items():
        if sub_folders and sub_images:
            raise ValueError(f"{os.path.join(root, name)} mixes images and sub-folders; expected {_LAYOUTS}")
    with_images = [name for name in folders if contents[name][1]]
    with_folders = [name for name in folders if contents[name][0]]
    if with_images and with_folders:
        raise ValueError(f"{root} mixes class folders of images (e.g. {with_images[0]}) and folders of "
                         f"folders (e.g. {with_folders[0]}); expected {_LAYOUTS}")
    if not with_images and not with_folders:
        raise ValueError(f"{root} holds no images in its sub-folders; expected {_LAYOUTS}")
    two_levels = bool(with_folders)
    # (group or None, class folder name, folder path, image names), in sorted order
    leaves = []
    for name in folders:
        folder = os.path.join(root, name)
        sub_folders, sub_images = contents[name]
        if not two_levels:
            leaves.append((None, name, folder, sub_images))
            continue
        for leaf in sub_folders:
            leaf_folder = os.path.join(folder, leaf)
            deeper, leaf_images = folder_entries(leaf_folder)
            if deeper:
                raise ValueError(f"{leaf_folder} holds sub-folders ({deeper[0]}, ...); in the two-level layout "
                                 "every image lies two levels down (root/<group>/<class>/<image>)")
            leaves.append((name, leaf, leaf_folder, leaf_images))
        if not sub_folders:
            _left_out(folder)
    paths, labels, groups, classes, group_names = [], [], [], [], []
    for group, name, folder, names in leaves:
        if not names:
            _left_out(folder)
            continue
        if group is not None and (not group_names or group_names[-1] != group):
            group_names.append(group)
        classes.append(name if group is None else f"{group}/{name}")
        paths.extend(os.path.join(folder, file) for file in names)
        labels.extend([len(classes) - 1] * len(names))
        groups.extend([len(group_names) - 1] * len(names))
    _check_two_classes(classes, root)
    labels = torch.tensor(labels, dtype=torch.long)
    if not two_levels:
        return ImageList(paths, labels, classes)
    return ImageList(paths, labels, classes, torch.tensor(groups, dtype=torch.long), group_names)


def _list_csv(csv_path):
    folder = os.path.dirname(csv_path)
    paths, names = [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        for row in reader:
            line = reader.line_num
            fields = [field.strip() for field in row]
            if not fields or fields == [""]:
                continue  # blank line
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise ValueError(f"{csv_path} line {line}: expected 'path,label', got {','.join(row)!r}")
            if not paths and [field.lower() for field in fields] == ["path", "label"]:
                continue  # header
            path = os.path.normpath(os.path.join(folder, fields[0]))  # an absolute path stays as it is
            if not os.path.isfile(path):
                raise ValueError(f"{csv_path} line {line}: image file {path} does not exist; fix the path "
                                 "(relative paths start from the CSV's folder) or remove the line")
            paths.append(path)
            names.append(fields[1])
    if not paths:
        raise ValueError(f"{csv_path} lists no images; expected path,label lines")
    numeric = all(re.fullmatch(r"[+-]?\d+", name) for name in names)
    classes = sorted(set(names), key=(lambda name: (int(name), name)) if numeric else None)
    _check_two_classes(classes, csv_path)
    index = {name: k for k, name in enumerate(classes)}
    return ImageList(paths, torch.tensor([index[name] for name in names], dtype=torch.long), classes)


def _drop_images(listing, bad, where):
    """``listing`` without the paths in ``bad``, its classes and groups renumbered; warns about each class
    left with no image (it is left out) and raises ValueError if fewer than 2 classes remain."""
    if not bad:
        return listing
    keep = [k for k, path in enumerate(listing.paths) if path not in bad]
    labels = listing.labels[keep]
    present = torch.zeros(len(listing.classes), dtype=torch.bool)
    present[labels] = True
    for class_id in (~present).nonzero().flatten().tolist():
        first = next(path for path, label in zip(listing.paths, listing.labels.tolist()) if label == class_id)
        warnings.warn(f"{os.path.dirname(first)} (class {listing.classes[class_id]!r}) holds no readable "
                      "images; it is left out", stacklevel=3)
    classes = [name for name, kept in zip(listing.classes, present.tolist()) if kept]
    _check_two_classes(classes, where)
    labels = (present.long().cumsum(0) - 1)[labels]
    groups, group_names = None, None
    if listing.groups is not None:
        kept_groups, groups = torch.unique(listing.groups[keep], return_inverse=True)
        group_names = [listing.group_names[g] for g in kept_groups.tolist()]
    return ImageList([listing.paths[k] for k in keep], labels, classes, groups, group_names)


def load_image_folder(root, image_size=None, channels=None, skip_bad_images=False, progress=True,
                      max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES):
    """The images under ``root`` (any layout ``list_images`` accepts) as a dataset of pixels in [0, 1],
    not normalised yet (see ``channel_statistics`` and ``normalized``).

    Args:
        root: a folder of class folders, a two-level group/class folder, or a CSV file of path,label lines.
        image_size: side of the square every image is resized to; None takes the images' common size,
            which needs every image square and of one size (ValueError asking for image_size otherwise).
        channels: 1 (grey) or 3 (RGB); None gives 3 when any image is in colour (PIL mode RGB, RGBA,
            P, CMYK, YCbCr, ...; palettes count as colour), else 1.
        skip_bad_images: leave out files that cannot be read (warning once with their count and the
            first few paths, listed in ``.skipped``) instead of raising ValueError naming the first one.
        progress: show tqdm progress bars while the images are read.
        max_memory_bytes: when the decoded float32 images would take more than this, an
            ``ImageFileDataset`` that reads each image from disk when it is fetched is returned instead.
    Returns an ``InMemoryDataset`` with data (N, channels, image_size, image_size) in [0, 1] (recorded
    mean 0, std 1) or an ``ImageFileDataset``; either has ``.targets`` (N,) long, ``.classes``,
    ``.paths`` (N str), ``.groups`` (N,) long and ``.group_names`` (None for one-level layouts),
    ``.image_size``, ``.channels`` and ``.skipped`` (the paths left out). Classes whose images were all
    left out are dropped with a warning. The streaming path checks every file's header when it
    reads sizes and modes, and decodes every file once when ``skip_bad_images`` is set.
    """
    listing = list_images(root)
    root = os.fspath(root)
    if image_size is not None:
        image_size = check_int(image_size, "image_size", minimum=1)
    if channels is not None:
        check_choice(channels, (1, 3), "channels")
    max_memory_bytes = check_int(max_memory_bytes, "max_memory_bytes", minimum=0)
    skipped = []

    def read_or_skip(read, path):
        try:
            return read(path)
        except ValueError:
            if not skip_bad_images:
                raise
            skipped.append(path)
            return None

    headers = {}
    if image_size is None or channels is None:
        bar = tqdm(listing.paths, desc="Reading image sizes", disable=not progress, leave=False)
        headers = {path: header for path in bar if (header := read_or_skip(_image_header, path)) is not None}
        listing = _drop_images(listing, set(skipped), root)
    if image_size is None:
        sizes = {size for size, _ in headers.values()}
        if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            examples = {}
            for path, (size, _) in headers.items():
                examples.setdefault(size, path)
            shown = ", ".join(f"{path} is {w}x{h}" for (w, h), path in list(examples.items())[:3])
            raise ValueError(f"the images in {root} are not all square and of one size ({shown}); pass "
                             "image_size (--image-size) to resize them all to one square size")
        image_size = next(iter(sizes))[0]
    if channels is None:
        channels = 3 if any(mode in _COLOUR_MODES for _, mode in headers.values()) else 1
    shape = (channels, image_size, image_size)
    n_bytes = len(listing.paths) * channels * image_size * image_size * 4
    if n_bytes > max_memory_bytes:
        if skip_bad_images:
            bar = tqdm(listing.paths, desc="Checking images", disable=not progress, leave=False)
            for path in bar:
                read_or_skip(lambda p: read_image(p, image_size, channels), path)
        elif not headers:
            for path in tqdm(listing.paths, desc="Checking image headers", disable=not progress, leave=False):
                _image_header(path)
        listing = _drop_images(listing, set(skipped), root)
        dataset = ImageFileDataset(listing.paths, listing.labels, image_size, channels, listing.classes)
    else:
        data = torch.empty(len(listing.paths), *shape)
        good = []
        for k, path in enumerate(tqdm(listing.paths, desc="Reading images", disable=not progress, leave=False)):
            image = read_or_skip(lambda p: read_image(p, image_size, channels), path)
            if image is not None:
                data[len(good)] = image
                good.append(k)
        listing = _drop_images(listing, set(skipped), root)
        data = data if len(good) == len(data) else data[:len(good)].clone()  # frees the skipped rows' room
        dataset = InMemoryDataset(data, listing.labels, classes=listing.classes)
        dataset.mean, dataset.std = (0.0,) * channels, (1.0,) * channels
        dataset.paths, dataset.image_size, dataset.channels = listing.paths, image_size, channels
    dataset.groups, dataset.group_names, dataset.skipped = listing.groups, listing.group_names, skipped
    if skipped:
        named = ", ".join(skipped[:_MAX_NAMED]) + (", ..." if len(skipped) > _MAX_NAMED else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) of {root}: {named}", stacklevel=2)
    return dataset


class ImageFileDataset(Dataset):
    """Images read from their files when fetched, for data sets too large to hold in memory.

    Args:
        paths: N image file paths.
        labels: (N,) integer class ids into ``classes``.
        image_size, channels: every image is read as (channels, image_size, image_size) by ``read_image``.
        classes: class names.
        transform: optional callable applied to each (C, H, W) image tensor.
    Items are (image (C, H, W) float tensor, target int); the dataset pickles, so DataLoader workers
    can read it. Attributes as ``load_image_folder``'s in-memory result: ``.targets``, ``.classes``,
    ``.paths``, ``.groups``, ``.group_names``, ``.image_size``, ``.channels``, ``.mean``, ``.std``.
    """

    def __init__(self, paths, labels, image_size, channels, classes, transform=None):
        self.paths = [os.fspath(path) for path in paths]
        self.targets = _as_tensor(labels).long()
        if self.targets.shape != (len(self.paths),):
            raise ValueError(f"labels must hold one class id per path ({len(self.paths)}), got shape "
                             f"{tuple(self.targets.shape)}")
        self.image_size = check_int(image_size, "image_size", minimum=1)
        self.channels = check_choice(channels, (1, 3), "channels")
        self.classes = list(classes)
        self.transform = transform
        self.train = True
        self.groups, self.group_names, self.skipped = None, None, []
        self.mean, self.std = (0.0,) * channels, (1.0,) * channels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = read_image(self.paths[index], self.image_size, self.channels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def subset(self, index):
        """The items at ``index`` (a (K,) index or bool tensor, or a slice) as a new ImageFileDataset with
        the same transform, classes and attributes."""
        subset = ImageFileDataset(_take(self.paths, index), self.targets[index], self.image_size, self.channels,
                                  self.classes, transform=self.transform)
        subset.train, subset.mean, subset.std = self.train, self.mean, self.std
        _carry_image_attributes(self, subset, index)
        return subset


# Attributes of an image-folder dataset that its subsets keep: per item (indexed) and whole
_ITEM_ATTRIBUTES = ("paths", "groups")
_WHOLE_ATTRIBUTES = ("group_names", "image_size", "channels", "skipped")


def _take(values, index):
    """``values`` (a list or a tensor) at ``index`` (a slice, or an index or bool tensor / sequence)."""
    if torch.is_tensor(values) or isinstance(index, slice):
        return values[index]
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    return [values[k] for k in index.reshape(-1).tolist()]


def _carry_image_attributes(source, target, index):
    for name in _ITEM_ATTRIBUTES:
        if hasattr(source, name):
            value = getattr(source, name)
            setattr(target, name, None if value is None else _take(value, index))
    for name in _WHOLE_ATTRIBUTES:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


def channel_statistics(dataset, max_images=2000, seed=0, progress=False):
    """Per-channel ``(mean tuple, std tuple)`` of a dataset's pixels, as stored (transforms not applied).

    Takes an ``InMemoryDataset`` (all of its data, summed in float64) or an ``ImageFileDataset`` (a
    sample of at most ``max_images`` images drawn with ``seed``, read from disk with a tqdm bar when
    ``progress``). The std is the population one (no correction), as ``InMemoryDataset.from_dataset``.
    """
    if isinstance(dataset, ImageFileDataset):
        max_images = check_int(max_images, "max_images", minimum=1)
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(dataset), generator=generator)[:max_images].sort().values.tolist()
        bar = tqdm(index, desc="Image statistics", disable=not progress, leave=False)
        chunks = (read_image(dataset.paths[k], dataset.image_size, dataset.channels).unsqueeze(0) for k in bar)
    elif isinstance(dataset, InMemoryDataset):
        chunks = dataset.data.split(256)  # bounds the float64 copy
    else:
        raise TypeError(f"dataset must be an InMemoryDataset or an ImageFileDataset, got {type(dataset).__name__}")
    total = squares = None
    count = 0
    for chunk in chunks:
        chunk = chunk.double()
        total = chunk.sum((0, 2, 3)) + (0 if total is None else total)
        squares = chunk.square().sum((0, 2, 3)) + (0 if squares is None else squares)
        count += chunk.numel() // chunk.shape[1]
    if count == 0:
        raise ValueError("dataset is empty; channel statistics need at least one image")
    mean = total / count
    std = (squares / count - mean.square()).clamp_(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def normalized(dataset, mean, std):
    """The dataset with every channel standardised, (x - mean) / std; ``mean`` and ``std`` are numbers or
    one per channel (e.g. ``channel_statistics`` of the training images).

    An ``InMemoryDataset`` comes back as a new one holding the normalised data; an ``ImageFileDataset``
    as a new one whose transform normalises each image (before its own transform). Either records
    ``.mean`` and ``.std`` (tuples) and keeps the other attributes. Raises ValueError when a std is not
    positive (a constant channel) or when the dataset is already normalised.
    """
    if not isinstance(dataset, (InMemoryDataset, ImageFileDataset)):
        raise TypeError(f"dataset must be an InMemoryDataset or an ImageFileDataset, got {type(dataset).__name__}")
    n_channels = dataset.data.shape[1] if isinstance(dataset, InMemoryDataset) else dataset.channels
    recorded = (getattr(dataset, "mean", None), getattr(dataset, "std", None))
    if recorded != (None, None) and (any(recorded[0]) or any(s != 1 for s in recorded[1])):
        raise ValueError(f"dataset is already normalised (mean {recorded[0]}, std {recorded[1]}); normalise the "
                         "raw images of load_image_folder instead")
    mean, std = _per_channel(mean, n_channels, "mean"), _per_channel(std, n_channels, "std")
    if not (std > 0).all():
        channel = int((~(std > 0)).nonzero()[0])
        raise ValueError(f"std must be positive in every channel, got {std.tolist()}: channel {channel} has the "
                         "same value in every image, so it cannot be standardised")
    if isinstance(dataset, ImageFileDataset):
        result = dataset.subset(slice(None))
        normalize = transforms.Normalize(mean.tolist(), std.tolist())
        result.transform = normalize if dataset.transform is None else transforms.Compose([normalize,
                                                                                           dataset.transform])
    else:
        data = (dataset.data - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        result = InMemoryDataset(data, dataset.targets, train=dataset.train, transform=dataset.transform,
                                 target_transform=dataset.target_transform, classes=dataset.classes)
        _carry_image_attributes(dataset, result, slice(None))
    result.mean, result.std = tuple(mean.tolist()), tuple(std.tolist())
    return result


def split_per_class(dataset, val_fraction=0.1, seed=0):
    """``(train, val)`` subsets of an ``InMemoryDataset`` or ``ImageFileDataset``: from each class,
    round(val_fraction * n) of its n images go to val (at least 1 when n >= 2, never all of them; none
    when n == 1), drawn with a torch.Generator seeded by ``seed``. Both keep the items' order, the classes
    and the other attributes (paths, groups, ...); val has ``train`` False."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(dataset.targets)
    in_val = torch.zeros(len(targets), dtype=torch.bool)
    for class_id in targets.unique().tolist():  # sorted, so the draws do not depend on the items' order
        members = (targets == class_id).nonzero().flatten()
        n = len(members)
        n_val = 0 if n < 2 else min(max(math.floor(val_fraction * n + 0.5), 1), n - 1)
        in_val[members[torch.randperm(n, generator=generator)[:n_val]]] = True
    train, val = dataset.subset((~in_val).nonzero().flatten()), dataset.subset(in_val.nonzero().flatten())
    val.train = False
    return train, val


def _held_out_ids(classes, spec, seed):
    """Sorted class ids that ``spec`` (see held_out_class_split) names."""
    n_classes = len(classes)
    fraction = spec if isinstance(spec, float) else None
    if isinstance(spec, str):
        tokens = [token.strip() for token in spec.split(",") if token.strip()]
        if len(tokens) == 1 and tokens[0] not in classes and re.fullmatch(r"0?\.\d+", tokens[0]):
            fraction = float(tokens[0])
        spec_items = tokens
    elif fraction is None:
        spec_items = [spec] if isinstance(spec, (numbers.Integral, str)) else list(spec)
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"held-out class fraction {spec!r} must lie between 0 and 1 (exclusive)")
        n_held_out = max(1, math.floor(fraction * n_classes + 0.5))
        generator = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n_classes, generator=generator)[:n_held_out].tolist())
    index = {name: k for k, name in enumerate(classes)}
    ids = set()
    for item in spec_items:
        if isinstance(item, str) and item in index:
            ids.add(index[item])
        elif (isinstance(item, numbers.Integral) and not isinstance(item, bool)) or (
                isinstance(item, str) and re.fullmatch(r"\d+", item)):
            if not 0 <= int(item) < n_classes:
                raise ValueError(f"held-out classes {spec!r}: class index {item} is out of range 0..{n_classes - 1}")
            ids.add(int(item))
        else:
            shown = ", ".join(classes[:10]) + (", ..." if n_classes > 10 else "")
            raise ValueError(f"held-out classes {spec!r}: {item!r} is neither a class name nor a class index; "
                             f"the classes are {shown}")
    return sorted(ids)


def class_subset(dataset, class_ids):
    """The items of ``dataset`` (an ``InMemoryDataset`` or ``ImageFileDataset``) whose class is in
    ``class_ids``, relabelled 0 .. len(class_ids) - 1 in the order of ``class_ids``, with those classes'
    names; the other attributes (mean and std, paths, groups, ...) go with the items."""
    targets = torch.as_tensor(dataset.targets)
    class_ids = torch.as_tensor(class_ids, dtype=torch.long)
    new_id = torch.full((max(len(dataset.classes), int(targets.max()) + 1),), -1, dtype=torch.long)
    new_id[class_ids] = torch.arange(len(class_ids))
    part = dataset.subset(torch.isin(targets, class_ids).nonzero().flatten())
    part.targets = new_id[torch.as_tensor(part.targets)]
    part.classes = [dataset.classes[k] for k in class_ids.tolist()]
    return part


def held_out_class_split(dataset, spec, seed=0):
    """``(seen, held_out, held_out_class_names)``: the dataset split by class, for testing on classes
    never seen in training.

    ``spec`` is a fraction in (0, 1) (that share of the classes, rounded, at least 1, drawn with ``seed``),
    a list of class names or indices, or a string of them separated by commas ("cat,dog", "3,7", "0.2").
    Both parts (subsets of an ``InMemoryDataset`` or ``ImageFileDataset``) keep their paths and groups and
    are relabelled 0 .. k - 1 in class order, their ``classes`` listing their own classes. Raises
    ValueError naming ``spec`` when it names an unknown class or leaves fewer than 2 classes on a side.
    """
    if isinstance(spec, bool) or spec is None:
        raise TypeError(f"held-out classes must be a fraction, class names or indices, got {spec!r}")
    held_ids = _held_out_ids(list(dataset.classes), spec, seed)
    seen_ids = [k for k in range(len(dataset.classes)) if k not in set(held_ids)]
    if len(held_ids) < 2 or len(seen_ids) < 2:
        raise ValueError(f"held-out classes {spec!r} leave {len(seen_ids)} seen and {len(held_ids)} held-out "
                         f"classes of {len(dataset.classes)}; metric learning needs at least 2 classes on each side")
    held_out = class_subset(dataset, held_ids)
    return class_subset(dataset, seen_ids), held_out, list(held_out.classes)


def export_image_folder(dataset, folder, root="data", download=False, progress=True):
    """Write a known MNIST-like dataset (``"mnist"``, ``"fashion-mnist"``) as a folder of PNG files, one
    sub-folder per class (``folder/<class>/train-00000.png``, ``test-00000.png``, ...: both splits), the
    layout ``load_image_folder`` reads; e.g. to check that training from a folder matches the built-in
    path. Class names with a ``/`` have it replaced by ``-``. Returns the number of files written."""
    written = 0
    for train in (True, False):
        split = load_dataset(dataset, root=root, train=train, download=download)
        images = torch.as_tensor(np.asarray(split.data))
        class_folders = [os.path.join(folder, name.replace("/", "-")) for name in split.classes]
        for class_folder in class_folders:
            os.makedirs(class_folder, exist_ok=True)
        prefix = "train" if train else "test"
        for index in tqdm(range(len(images)), desc=f"writing {prefix} images", disable=not progress):
            Image.fromarray(images[index].numpy()).save(
                os.path.join(class_folders[int(split.targets[index])], f"{prefix}-{index:05d}.png"))
        written += len(images)
    return written


def load_folder_splits(root, image_size=None, channels=None, held_out_classes=None, val_fraction=0.1, seed=0,
                       skip_bad_images=False, progress=True, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES):
    """A folder of your own images (see ``load_image_folder``) as the splits the study trains on:
    ``(train, val, held_out)``.

    ``held_out_classes`` (see ``held_out_class_split``; None: none) are set aside whole, as unseen classes
    (``held_out`` is None without them); of the other classes' images, ``val_fraction`` of each class goes
    to ``val`` (``split_per_class``). All three are normalised with the per-channel mean and std of the
    ``train`` images (``channel_statistics``), recorded as their ``.mean`` and ``.std``. Seeded by ``seed``.
    Folders whose images would take more than ``max_memory_bytes`` are read from disk as they are drawn.
    """
    images = load_image_folder(root, image_size, channels, skip_bad_images=skip_bad_images, progress=progress,
                               max_memory_bytes=max_memory_bytes)
    held_out = None
    if held_out_classes is not None:
        images, held_out, _ = held_out_class_split(images, held_out_classes, seed)
    train, val = split_per_class(images, val_fraction, seed)
    mean, std = channel_statistics(train, seed=seed, progress=progress)
    return tuple(None if part is None else normalized(part, mean, std) for part in (train, val, held_out))


# ---------------------------------------------------------------------------------------------------
# Names that live elsewhere now: Omniglot's readers moved to omniglot.py. Old scripts import them from
# here; they are imported on first use (PEP 562), as omniglot imports this module.

def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)
