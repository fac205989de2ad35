"""Contrastive and triplet losses, offline (pairs/triplets given) and online (mined in the batch).

All distances are squared Euclidean distances, as in the classic design. Where a plain distance is
needed (the contrastive hinge), the square root is taken of ``d + 1e-9`` so its gradient stays
finite when two embeddings coincide. An online loss whose selector finds nothing returns a zero
that is still connected to the embeddings, so ``loss.backward()`` works and gives zero gradients.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import _as_labels, _check_margin, pdist

# Added under the square root of a squared distance: sqrt'(0) is infinite, sqrt'(EPS) is not.
EPS = 1e-9


def _hinge_on_distance(margin, squared_distances):
    """``relu(margin - sqrt(d))^2`` for squared distances ``d``, with a finite gradient at 0."""
    return F.relu(margin - (squared_distances + EPS).sqrt()).pow(2)


def _reduce(losses, size_average):
    return losses.mean() if size_average else losses.sum()


def _zero_loss(embeddings):
    """A zero scalar that backpropagates (zero gradients) into ``embeddings``. Summing an empty
    slice gives exactly +0.0 even when the embeddings hold inf or NaN, unlike ``0 * sum``."""
    return embeddings[:0].sum()


def _check_same_shape(**tensors):
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected embeddings of one shape (B, D), got {shapes}")


class ContrastiveLoss(nn.Module):
    """Contrastive loss on given pairs (Hadsell, Chopra and LeCun, 2006).

    ``forward(output1 (B, D), output2 (B, D), target (B,), size_average=True)``: with
    ``d = |output1 - output2|^2`` and ``target`` 1 for a same-class pair, 0 otherwise, each pair
    costs ``0.5 * (target * d + (1 - target) * relu(margin - sqrt(d))^2)``. Returns the mean over the
    batch, or the sum with ``size_average=False``.
    """

    def __init__(self, margin):
        super().__init__()
        self.margin = _check_margin(margin)
        self.eps = EPS

    def forward(self, output1, output2, target, size_average=True):
        _check_same_shape(output1=output1, output2=output2)
        target = torch.as_tensor(target, device=output1.device)
        if target.shape != (len(output1),):
            raise ValueError(f"target must have shape ({len(output1)},), got {tuple(target.shape)}")
        target = target.to(output1.dtype)
        distances = (output2 - output1).pow(2).sum(1)
        losses = 0.5 * (target * distances + (1 - target) * _hinge_on_distance(self.margin, distances))
        return _reduce(losses, size_average)


class TripletLoss(nn.Module):
    """Triplet loss on given triplets (Schroff, Kalenichenko and Philbin, 2015).

    ``forward(anchor (B, D), positive (B, D), negative (B, D), size_average=True)``: each triplet
    costs ``relu(|anchor - positive|^2 - |anchor - negative|^2 + margin)``. Returns the mean, or the
    sum with ``size_average=False``.
    """

    def __init__(self, margin):
        super().__init__()
        self.margin = _check_margin(margin)

    def forward(self, anchor, positive, negative, size_average=True):
        _check_same_shape(anchor=anchor, positive=positive, negative=negative)
        distance_positive = (anchor - positive).pow(2).sum(1)
        distance_negative = (anchor - negative).pow(2).sum(1)
        losses = F.relu(distance_positive - distance_negative + self.margin)
        return _reduce(losses, size_average)


class OnlineContrastiveLoss(nn.Module):
    """Contrastive loss over the pairs a :class:`utils.PairSelector` mines in the batch.

    ``forward(embeddings (B, D), target (B,))`` returns a scalar: the mean, over the selected
    positive pairs' ``d`` and negative pairs' ``relu(margin - sqrt(d))^2`` taken together, with
    ``d`` the squared distance (the classic formula: no 0.5 factor here, unlike
    :class:`ContrastiveLoss`). No pair selected gives a zero loss that still backpropagates.
    """

    def __init__(self, margin, pair_selector):
        super().__init__()
        self.margin = _check_margin(margin)
        if not hasattr(pair_selector, "get_pairs"):
            raise TypeError("pair_selector must have a get_pairs(embeddings, labels) method, "
                            "e.g. utils.HardNegativePairSelector()")
        self.pair_selector = pair_selector

    def forward(self, embeddings, target):
        target = _as_labels(target, embeddings)
        positive_pairs, negative_pairs = self.pair_selector.get_pairs(embeddings, target)
        if len(positive_pairs) + len(negative_pairs) == 0:
            return _zero_loss(embeddings)
        distances = pdist(embeddings)
        positive_loss = distances[positive_pairs[:, 0], positive_pairs[:, 1]]
        negative_loss = _hinge_on_distance(self.margin, distances[negative_pairs[:, 0], negative_pairs[:, 1]])
        return torch.cat([positive_loss, negative_loss]).mean()


class OnlineTripletLoss(nn.Module):
    """Triplet loss over the triplets a :class:`utils.TripletSelector` mines in the batch.

    ``forward(embeddings (B, D), target (B,))`` returns ``(loss, n_triplets)``: the mean over the
    selected triplets of ``relu((D[a, p] + margin) - D[a, n])`` with ``D`` the squared distances
    (in that order, so a triplet's loss is non-zero exactly when the selectors call it hard), and
    the number of selected triplets whose loss is non-zero (a Python int; the classic code counted
    all selected triplets). No triplet selected gives ``(zero loss that still backpropagates, 0)``.
    """

    def __init__(self, margin, triplet_selector):
        super().__init__()
        self.margin = _check_margin(margin)
        if not hasattr(triplet_selector, "get_triplets"):
            raise TypeError("triplet_selector must have a get_triplets(embeddings, labels) method, "
                            "e.g. utils.RandomNegativeTripletSelector(margin)")
        self.triplet_selector = triplet_selector

    def forward(self, embeddings, target):
        target = _as_labels(target, embeddings)
        triplets = self.triplet_selector.get_triplets(embeddings, target)
        if len(triplets) == 0:
            return _zero_loss(embeddings), 0
        distances = pdist(embeddings)
        anchors, positives, negatives = triplets.unbind(1)
        losses = F.relu((distances[anchors, positives] + self.margin) - distances[anchors, negatives])
        return losses.mean(), int((losses > 0).sum())
