"""Datasets, wrappers and samplers for siamese and triplet training, and the operations on a labelled
dataset that do not depend on where its images came from.

- InMemoryDataset: a normalised (N, C, H, W) float image tensor with (N,) labels, for fast CPU training.
- SiameseMNIST: wraps a labelled dataset and yields ((img1, img2), target), target 1 = same class.
- TripletMNIST: wraps a labelled dataset and yields ((anchor, positive, negative), []).
- BalancedBatchSampler: batches of n_classes classes x n_samples items, for online pair/triplet mining.
- DistributedBalancedBatchSampler: the same global batches on every process of a DistributedDataParallel
  run, each process yielding its contiguous share (share_bounds).
- random_subset, class_subset, split_per_class (a validation split inside every class) and
  held_out_class_split (unseen classes): they need only a dataset's ``.targets``, ``.classes`` and
  ``.subset(index)``, so they serve a known dataset and a folder of your own images alike.
- BatchRandomAffine: random rotation, shear, zoom and shift (and optionally a smooth elastic warp) of a
  whole batch of image tensors at once.

SiameseMNIST and TripletMNIST accept three kinds of dataset:
- an InMemoryDataset (fast path: images are rows of its tensor, no PIL, batches are gathered at once);
- an MNIST-like torchvision dataset with uint8 `.data` and `.targets`: each image is turned into a PIL
  image ('L' for (H, W), 'RGB' for (H, W, 3)) and the dataset's `transform` is applied to it;
- any other dataset plus one label per item (`labels=`, or the dataset's `.targets` as in ImageFolder):
  the image is `dataset[i][0]`, so the dataset applies its own transform.

Where images come from is not this module's business: ``known_datasets.py`` loads the datasets known
by name (MNIST, Fashion-MNIST, CIFAR-10, ImageNet) and ``image_folders.py`` reads folders of your own
images (and normalises them: ``channel_statistics`` and ``normalized`` read an ImageFileDataset's files
or compose its transform, so they are about images from files). Both import this module, never the
reverse. Names that moved to them (``datasets.load_dataset``, ``datasets.read_image``, ...) and
Omniglot's readers (now in omniglot.py) still resolve here for one release, with a DeprecationWarning
naming their new module (``utils.MOVED_NAMES``).
"""

import math
import numbers
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

import distributed
from utils import check_int, check_real, groups_of_classes, moved_attribute


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
        n_classes, n_samples = check_int(n_classes, "n_classes", 1), check_int(n_samples, "n_samples", 1)
        seed = None if seed is None else check_int(seed, "seed")
        labels = _as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (one class id per item), got shape {tuple(labels.shape)}")
        self.labels = labels.long()
        self.n_classes, self.n_samples, self.seed = n_classes, n_samples, seed
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
# Subsets and splits of a labelled dataset (an InMemoryDataset, or any dataset with .targets, .classes
# and .subset(index), such as image_folders.ImageFileDataset)


def random_subset(dataset, size, generator):
    """A uniformly random subset of ``size`` items of an ``InMemoryDataset`` (kept in their original
    order), drawn with ``generator``; the dataset itself when it is not larger."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:size].sort().values)



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
        elastic: strength of the elastic warp, the largest displacement of its control points as a fraction
            of the image size (0: none, the plain affine map, drawing nothing more). Handwriting varies by
            smooth local bends more than by one affine map (Simard et al., 2003): each image's sampling grid
            is moved by a random field drawn uniformly in [-elastic, elastic] at the corners of a coarse
            grid of ``elastic_cells`` x ``elastic_cells`` cells and interpolated bicubically between them,
            so that it bends strokes without tearing them.
        elastic_cells: cells across the coarse grid of the elastic field (fewer: smoother bends).
    Call on a (C, H, W) image or a (B, C, H, W) batch (float); returns a tensor of the same shape, resampled
    bilinearly with one grid_sample for the whole batch (affine_grid, plus the elastic field when on).
    """

    def __init__(self, degrees=10.0, shear=10.0, scale=(0.85, 1.15), translate=0.1, fill=0.0, generator=None,
                 elastic=0.0, elastic_cells=4):
        self.degrees, self.shear, self.translate, self.elastic = (
            check_real(value, name, 0, finite=True)
            for name, value in (("degrees", degrees), ("shear", shear), ("translate", translate), ("elastic", elastic)))
        if not isinstance(scale, (tuple, list)) or len(scale) != 2:
            raise ValueError(f"scale must be a (low, high) pair with 0 < low <= high, got {scale!r}")
        low = check_real(scale[0], "scale's low", 0, strict=True, finite=True)
        self.scale = (low, check_real(scale[1], "scale's high", low, finite=True))
        self.fill = float(fill)
        self.generator = generator
        self.elastic_cells = check_int(elastic_cells, "elastic_cells", 1)

    def __repr__(self):
        elastic = f", elastic={self.elastic}, elastic_cells={self.elastic_cells}" if self.elastic else ""
        return (f"{type(self).__name__}(degrees={self.degrees}, shear={self.shear}, scale={self.scale}, "
                f"translate={self.translate}, fill={self.fill}{elastic})")

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

    def displacements(self, n, height, width):
        """(n, height, width, 2) float32 elastic displacements of the sampling grid (normalised coordinates,
        which span 2, so a displacement of ``elastic`` x the image size is 2 x elastic): uniform draws on an
        (elastic_cells + 1)^2 grid of control points, interpolated bicubically over the image."""
        knots = self.elastic_cells + 1
        draws = torch.rand(n, 2, knots, knots, generator=self.generator, dtype=torch.float64) * 2 - 1
        field = F.interpolate(draws * (2 * self.elastic), size=(height, width), mode="bicubic", align_corners=True)
        return field.permute(0, 2, 3, 1).float()

    def __call__(self, images):
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim not in (3, 4):
            raise TypeError(f"{type(self).__name__} takes a float tensor (C, H, W) or (B, C, H, W), got "
                            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if len(batch) == 0:
            return images
        theta = self.matrices(len(batch)).to(batch.device, batch.dtype)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        if self.elastic:
            grid = grid + self.displacements(len(batch), *batch.shape[2:]).to(grid.device, grid.dtype)
        # grid_sample pads with zeros: shift so that the padding comes out as `fill`
        warped = F.grid_sample(batch - self.fill, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False) + self.fill
        return warped.squeeze(0) if images.ndim == 3 else warped


# ---------------------------------------------------------------------------------------------------
# Names that live elsewhere now: Omniglot's readers moved to omniglot.py. Old scripts import them from
# here; they are imported on first use (PEP 562), as omniglot imports this module.

def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)