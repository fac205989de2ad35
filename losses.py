"""Contrastive and triplet losses, offline (pairs/triplets given) and online (mined in the batch).

All distances are squared Euclidean distances, as in the classic design. Where a plain distance is
needed (the contrastive hinge), the square root is taken of ``d + 1e-9`` so its gradient stays
finite when two embeddings coincide. An online loss whose selector finds nothing returns a zero
that is still connected to the embeddings, so ``loss.backward()`` works and gives zero gradients.

``PairwiseAutoencoderLoss`` and ``TripletAutoencoderLoss`` train siamese / triplet autoencoders and VAEs:
``weight * metric loss + (1 - weight) * (reconstruction + beta * KL to the prior)``, the metric loss
being the contrastive / triplet formula on Euclidean or KL latent distances (``gaussian_kl``,
``symmetric_gaussian_kl``, ``kl_to_standard_normal``).
"""

import numbers

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


# ---------------------------------------------------------------------------------------------------
# Siamese and triplet autoencoders: weight * metric loss + (1 - weight) * (reconstruction + KL) loss


def gaussian_kl(mean1, log_var1, mean2, log_var2):
    """KL divergence ``KL(N1 || N2)`` between diagonal Gaussians, row by row.

    ``N1 = N(mean1, diag(exp(log_var1)))`` and ``N2 = N(mean2, diag(exp(log_var2)))``, all four
    ``(B, L)``. Returns ``(B,)``: ``0.5 * sum(log_var2 - log_var1 + (exp(log_var1) + (mean1 - mean2)^2)
    / exp(log_var2) - 1)`` over the ``L`` dimensions (the closed form; zero when the two coincide).
    """
    _check_same_shape(mean1=mean1, log_var1=log_var1, mean2=mean2, log_var2=log_var2)
    per_dimension = (log_var2 - log_var1 + (log_var1 - log_var2).exp()
                     + (mean1 - mean2).pow(2) * (-log_var2).exp() - 1)
    return 0.5 * per_dimension.sum(1)


def symmetric_gaussian_kl(mean1, log_var1, mean2, log_var2):
    """``(KL(N1 || N2) + KL(N2 || N1)) / 2`` of diagonal Gaussians (see ``gaussian_kl``): ``(B,)``.
    Symmetric, so it can compare the two members of an unordered pair."""
    return 0.5 * (gaussian_kl(mean1, log_var1, mean2, log_var2) + gaussian_kl(mean2, log_var2, mean1, log_var1))


def kl_to_standard_normal(mean, log_var):
    """``KL(N(mean, diag(exp(log_var))) || N(0, I))`` row by row: ``(B, L)`` each -> ``(B,)``, equal to
    ``0.5 * sum(mean^2 + exp(log_var) - 1 - log_var)``."""
    _check_same_shape(mean=mean, log_var=log_var)
    return 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)


AUTOENCODER_DISTANCES = ("euclidean", "kl")
RECONSTRUCTION_LOSSES = ("mse", "bce")


class _AutoencoderLoss(nn.Module):
    """What the pairwise and triplet autoencoder losses share: arguments, reconstruction and KL terms,
    and the weighted sum."""

    def __init__(self, weight, margin, beta, distance, reconstruction):
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"weight must be a number in [0, 1], got {type(weight).__name__}")
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1] (1: metric loss only, 0: autoencoder loss only), "
                             f"got {weight}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta must be a number >= 0, got {type(beta).__name__}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if distance not in AUTOENCODER_DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(AUTOENCODER_DISTANCES)}, got {distance!r}")
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {', '.join(RECONSTRUCTION_LOSSES)}, "
                             f"got {reconstruction!r}")
        self.weight, self.beta = float(weight), float(beta)
        self.margin = _check_margin(margin)
        self.distance, self.reconstruction = distance, reconstruction

    def _check(self, output, inputs):
        if not all(hasattr(output, field) for field in ("mean", "log_var", "reconstruction")):
            raise TypeError(f"output must be an AutoencoderOutput (what Autoencoder and VAE return), "
                            f"got {type(output).__name__}")
        if output.reconstruction.shape != inputs.shape:
            raise ValueError(f"the reconstruction has shape {tuple(output.reconstruction.shape)} but the inputs "
                             f"have {tuple(inputs.shape)}; pass the batch the model was called on")
        if self.distance == "kl" and output.log_var is None:
            raise ValueError("distance='kl' compares VAE posteriors, but this output has no log_var (a plain "
                             "Autoencoder); use a VAE or distance='euclidean'")
        if self.reconstruction == "bce" and len(inputs) and (inputs.min() < 0 or inputs.max() > 1):
            raise ValueError("reconstruction='bce' needs inputs in [0, 1] (e.g. pixels / 255, not "
                             "standardised); use reconstruction='mse' for other inputs")

    def _distances(self, output, first, second):
        """``(P,)`` latent distances of items ``first`` and ``second`` (``(P,)`` index tensors): squared
        Euclidean between the means, or the symmetrised KL between the posteriors."""
        if self.distance == "euclidean":
            return (output.mean[first] - output.mean[second]).pow(2).sum(1)
        return symmetric_gaussian_kl(output.mean[first], output.log_var[first],
                                     output.mean[second], output.log_var[second])

    def _terms(self, output, inputs, metric, n_selected):
        """Reconstruction (mean over all input values) and prior KL (per item, divided by the number of
        values of one input, so ``beta = 1`` weighs it as in the ELBO) and their weighted sum with
        ``metric``."""
        if self.reconstruction == "mse":
            reconstruction = F.mse_loss(output.reconstruction, inputs)
        else:
            reconstruction = F.binary_cross_entropy_with_logits(output.reconstruction, inputs)
        if output.log_var is None:
            kl = torch.zeros((), dtype=reconstruction.dtype, device=reconstruction.device)
        else:
            kl = kl_to_standard_normal(output.mean, output.log_var).mean() / inputs[0].numel()
        autoencoder = reconstruction + self.beta * kl
        total = self.weight * metric + (1 - self.weight) * autoencoder
        return {"total": total, "metric": metric, "reconstruction": reconstruction, "kl": kl,
                "n_selected": n_selected}


def _concatenate_outputs(outputs):
    """One ``AutoencoderOutput``-like tuple of several, concatenated along the batch."""
    fields = zip(*outputs)
    joined = [None if any(part is None for part in parts) else torch.cat(parts) for parts in fields]
    return type(outputs[0])(*joined)


class PairwiseAutoencoderLoss(_AutoencoderLoss):
    """Siamese autoencoder loss: ``weight * contrastive + (1 - weight) * (reconstruction + beta * KL)``.

    Args:
        weight: M in [0, 1]; 1 gives a plain siamese (contrastive) loss, 0 a plain autoencoder / VAE loss.
        margin: the contrastive margin.
        pair_selector: a ``utils.PairSelector`` that mines pairs in the batch (for ``forward``).
        beta: weight of the VAE's KL divergence to the N(0, I) prior (ignored for a plain autoencoder).
        distance: ``"euclidean"`` (squared distance between the means) or ``"kl"`` (symmetrised KL
            divergence between the two diagonal Gaussian posteriors; VAE only).
        reconstruction: ``"mse"`` or ``"bce"`` (decoder outputs are logits; inputs must lie in [0, 1]).

    The contrastive part is ``ContrastiveLoss``'s: with ``d`` the distance, a pair costs
    ``0.5 * (t * d + (1 - t) * relu(margin - sqrt(d))^2)`` (t = 1 for a same-class pair), averaged
    over the pairs; with ``distance="euclidean"`` it is computed by ``ContrastiveLoss`` itself. The
    reconstruction is the mean over all input values; the KL term is the mean over items of
    ``KL(posterior || N(0, I))`` divided by the number of values of one input.

    ``forward(output, inputs, labels) -> loss``: ``output`` is the model's ``AutoencoderOutput`` for
    the batch ``inputs`` ((B, D) or (B, C, H, W)) with ``labels (B,)``; the pairs are mined with
    ``pair_selector`` on the means; every item is reconstructed once. ``terms(...)`` returns the parts
    as a dict (total, metric, reconstruction, kl, n_selected). ``on_pairs(...)`` scores given pairs.
    No pair selected gives a metric term of zero that still backpropagates.
    """

    def __init__(self, weight, margin=1.0, pair_selector=None, beta=1.0, distance="euclidean",
                 reconstruction="mse"):
        super().__init__(weight, margin, beta, distance, reconstruction)
        if pair_selector is not None and not hasattr(pair_selector, "get_pairs"):
            raise TypeError("pair_selector must have a get_pairs(embeddings, labels) method, "
                            "e.g. utils.HardNegativePairSelector()")
        self.pair_selector = pair_selector
        self.contrastive = ContrastiveLoss(self.margin)

    def forward(self, output, inputs, labels):
        return self.terms(output, inputs, labels)["total"]

    def terms(self, output, inputs, labels):
        """The loss and its parts for a batch, pairs mined by ``pair_selector``: a dict of scalar
        tensors ``total``, ``metric``, ``reconstruction``, ``kl`` and the int ``n_selected`` (pairs)."""
        if self.pair_selector is None:
            raise ValueError("mining pairs in a batch needs a pair_selector (e.g. utils.HardNegativePairSelector()); "
                             "for given pairs use on_pairs")
        self._check(output, inputs)
        labels = _as_labels(labels, output.mean)
        positive_pairs, negative_pairs = self.pair_selector.get_pairs(output.mean.detach(), labels)
        pairs = torch.cat([positive_pairs, negative_pairs])
        target = torch.cat([torch.ones(len(positive_pairs), device=pairs.device),
                            torch.zeros(len(negative_pairs), device=pairs.device)])
        return self._terms(output, inputs, self._contrastive(output, pairs, target), len(pairs))

    def on_pairs(self, output1, output2, input1, input2, target):
        """The loss of given pairs, as ``SiameseAutoencoder`` returns them: outputs and inputs of the
        first and second members (B items each) and ``target (B,)``, 1 for a same-class pair. Both
        members are reconstructed. Returns a scalar."""
        output, inputs = _concatenate_outputs([output1, output2]), torch.cat([input1, input2])
        self._check(output, inputs)
        n = len(input1)
        target = torch.as_tensor(target, device=inputs.device)
        if target.shape != (n,):
            raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
        pairs = torch.stack([torch.arange(n), torch.arange(n, 2 * n)], dim=1).to(inputs.device)
        return self._terms(output, inputs, self._contrastive(output, pairs, target), n)["total"]

    def _contrastive(self, output, pairs, target):
        if len(pairs) == 0:
            return _zero_loss(output.mean)
        first, second = pairs.unbind(1)
        if self.distance == "euclidean":
            return self.contrastive(output.mean[first], output.mean[second], target)
        distances = self._distances(output, first, second)
        target = target.to(distances.dtype)
        return (0.5 * (target * distances + (1 - target) * _hinge_on_distance(self.margin, distances))).mean()


class TripletAutoencoderLoss(_AutoencoderLoss):
    """Triplet autoencoder loss: ``weight * triplet + (1 - weight) * (reconstruction + beta * KL)``.

    Arguments as ``PairwiseAutoencoderLoss``, with a ``triplet_selector`` (a ``utils.TripletSelector``)
    instead of a pair selector. The triplet part is ``TripletLoss``'s: ``relu(d(a, p) - d(a, n) +
    margin)`` averaged over the triplets, ``d`` the squared Euclidean distance between the means
    (computed by ``TripletLoss`` itself) or the symmetrised KL divergence between the posteriors.

    ``forward(output, inputs, labels) -> loss`` mines triplets in the batch; ``terms(...)`` returns
    the parts; ``on_triplets(...)`` scores given triplets (``TripletAutoencoder``'s outputs).
    """

    def __init__(self, weight, margin=1.0, triplet_selector=None, beta=1.0, distance="euclidean",
                 reconstruction="mse"):
        super().__init__(weight, margin, beta, distance, reconstruction)
        if triplet_selector is not None and not hasattr(triplet_selector, "get_triplets"):
            raise TypeError("triplet_selector must have a get_triplets(embeddings, labels) method, "
                            "e.g. utils.RandomNegativeTripletSelector(margin)")
        self.triplet_selector = triplet_selector
        self.triplet = TripletLoss(self.margin)

    def forward(self, output, inputs, labels):
        return self.terms(output, inputs, labels)["total"]

    def terms(self, output, inputs, labels):
        """The loss and its parts for a batch, triplets mined by ``triplet_selector``: a dict of scalar
        tensors ``total``, ``metric``, ``reconstruction``, ``kl`` and the int ``n_selected`` (triplets)."""
        if self.triplet_selector is None:
            raise ValueError("mining triplets in a batch needs a triplet_selector (e.g. "
                             "utils.RandomNegativeTripletSelector(margin)); for given triplets use on_triplets")
        self._check(output, inputs)
        labels = _as_labels(labels, output.mean)
        triplets = self.triplet_selector.get_triplets(output.mean.detach(), labels)
        return self._terms(output, inputs, self._triplet(output, triplets), len(triplets))

    def on_triplets(self, output1, output2, output3, input1, input2, input3):
        """The loss of given (anchor, positive, negative) triplets, as ``TripletAutoencoder`` returns
        them (B items each); all three are reconstructed. Returns a scalar."""
        output = _concatenate_outputs([output1, output2, output3])
        inputs = torch.cat([input1, input2, input3])
        self._check(output, inputs)
        n = len(input1)
        triplets = torch.arange(3 * n, device=inputs.device).view(3, n).T
        return self._terms(output, inputs, self._triplet(output, triplets), n)["total"]

    def _triplet(self, output, triplets):
        if len(triplets) == 0:
            return _zero_loss(output.mean)
        anchors, positives, negatives = triplets.unbind(1)
        if self.distance == "euclidean":
            return self.triplet(output.mean[anchors], output.mean[positives], output.mean[negatives])
        losses = F.relu(self._distances(output, anchors, positives) - self._distances(output, anchors, negatives)
                        + self.margin)
        return losses.mean()
