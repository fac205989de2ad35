"""Contrastive and triplet losses, offline (pairs/triplets given) and online (mined in the batch), and
the multi-similarity loss (``MultiSimilarityLoss``, with its own pair mining, on cosine similarities).

Distances are squared Euclidean distances (``distances.row_distances``, ``distances.indexed_squared_distances``),
as in the classic design, or with ``distance="euclidean"`` their square roots (``utils.as_distance``);
the triplet losses take a soft margin (``soft=True``, softplus instead of the hinge). Each per-pair
and per-triplet formula is written once, in ``contrastive_terms`` and ``triplet_terms``, and every
loss here is built from them. The contrastive
losses differ only by a constant factor, an explicit ``scale`` argument: 0.5 for ``ContrastiveLoss``
and the autoencoder losses (the classic offline formula), 1 for ``OnlineContrastiveLoss`` (the
classic online code had none). Where a plain distance is needed (the contrastive hinge), the square
root is taken of ``d + 1e-9`` so its gradient stays finite when two embeddings coincide.

Online losses (``OnlineContrastiveLoss``, ``OnlineTripletLoss`` and the mined forms of the
autoencoder losses) add ``(0 * embeddings).sum()`` to their mean: zero, with zero gradients, for
finite embeddings, so a selector that finds nothing still gives a zero loss that backpropagates;
but NaN as soon as any embedding of the batch is NaN or infinite, selected or not, so a training
loop's non-finite-loss check stops it instead of seeing a silent 0 (a NaN embedding makes every
distance comparison false, and the hard-negative selectors then select nothing). The offline losses'
mean (``ContrastiveLoss``, ``TripletLoss``) follows the same rule over their inputs: an empty batch gives
a zero that backpropagates, not the NaN of an empty mean.

Mining: every online loss mines the rows it owns (``_mined``). One process owns every row of its batch;
under ``torch.distributed`` (a process group of world size > 1, e.g. DistributedDataParallel with
``datasets.DistributedBalancedBatchSampler``), ``OnlineContrastiveLoss``, ``OnlineTripletLoss`` and the
mined forms of the autoencoder losses with ``gather=True`` (the default) ask ``distributed`` for the global
batch (``distributed.global_batch``: every rank's embeddings and labels, gradients flowing back to the
rank owning each row) and mine the rows of their own share of it: the distances of those rows to the
global batch (``distances.row_distances``, a ``(B_r, N)`` block, never ``(N, N)``), and the pairs / triplets
whose first member / anchor is theirs (the selectors' ``select_pairs`` / ``select_triplets``). Together
the ranks select what one process selects on the global batch (``utils``' selectors say how, the random
ones included). Each term's distance is the block's value, the one the selector compared, with the
gradient of the exact distance of its two embeddings (``_compared_distances``), so the backward pass keeps
no ``(B_r, N)`` matrix. The loss is scaled so that DistributedDataParallel's gradient average equals one
process's gradient of the mean over the whole global batch (``_global_mean``, through
``distributed.global_mean``; the autoencoder losses' reconstruction and KL terms, per item, likewise).
Without a process group nothing changes. The offline losses take no part: their pairs / triplets are given.

``PairwiseAutoencoderLoss`` and ``TripletAutoencoderLoss`` train siamese / triplet autoencoders and VAEs:
``weight * metric loss + (1 - weight) * (reconstruction + beta * KL to the prior)``, the metric loss
being the contrastive / triplet formula on Euclidean or KL latent distances (``gaussian_kl``,
``symmetric_gaussian_kl``, ``kl_to_standard_normal``).
"""

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cross_batch_memory import CrossBatchMemory
from distances import (BlockBuffer, float32_distances, indexed_squared_distances, paired_squared_distances,
                       row_distances)
from distributed import global_batch, global_mean, owned, rows_to_mine
from utils import (DISTANCES, _as_labels, _check_margin, as_distance, check_choice, check_flag, check_real,
                   multi_similarity_pairs)

# Added under the square root of a squared distance: sqrt'(0) is infinite, sqrt'(EPS) is not.
EPS = 1e-9


def contrastive_terms(squared_distances, target, margin, distance="squared"):
    """Per-pair contrastive terms (Hadsell, Chopra and LeCun, 2006), without any constant factor.

    Takes squared distances ``d (P,)``, ``target (P,)`` (1 for a same-class pair, 0 otherwise; any
    numeric dtype) and the margin. Returns ``(P,)``: with ``distance="squared"`` (the classic form)
    ``target * d + (1 - target) * relu(margin - sqrt(d))^2``, the square root taken of ``d + EPS`` so
    that the gradient stays finite at ``d = 0``; with ``distance="euclidean"`` the same in the plain
    distance ``D = sqrt(d)`` without squares, ``target * D + (1 - target) * relu(margin - D)``
    (``utils.as_distance``: exact, and a zero gradient at ``D = 0``).
    """
    target = target.to(squared_distances.dtype)
    if check_choice(distance, DISTANCES, "distance") == "euclidean":
        plain = as_distance(squared_distances, "euclidean")
        return target * plain + (1 - target) * F.relu(margin - plain)
    hinge = F.relu(margin - (squared_distances + EPS).sqrt()).pow(2)
    return target * squared_distances + (1 - target) * hinge


def triplet_terms(positive_distances, negative_distances, margin, soft=False):
    """Per-triplet terms ``relu((d_ap + margin) - d_an)`` (Schroff, Kalenichenko and Philbin, 2015), or
    with ``soft=True`` ``softplus((d_ap + margin) - d_an)``, the soft margin of Hermans, Beyer and Leibe
    (2017) (who use it with ``margin = 0`` and plain distances): never exactly zero, so easy triplets
    still pull a little, and its gradient never vanishes at the hinge.

    Takes ``d_ap (T,)`` and ``d_an (T,)``, the anchor-positive and anchor-negative distances, and
    the margin; returns ``(T,)``. Added in this order, a hinge term is non-zero exactly when ``d_an <
    d_ap + margin`` rounds true, the test the selectors of ``utils`` apply.
    """
    excess = (positive_distances + margin) - negative_distances
    return F.softplus(excess) if soft else F.relu(excess)


def _reduce(terms, size_average, *inputs):
    """An offline loss's ``terms (B,)`` of its given pairs / triplets reduced: their mean, by the online
    losses' rule (``_online_mean`` over the ``inputs``: an empty batch gives a zero that backpropagates, not
    the NaN of an empty mean), or their sum with ``size_average=False``."""
    return _online_mean(terms, *inputs) if size_average else terms.sum()


def _online_mean(terms, *embeddings):
    """The mean of the selected ``terms (S,)`` plus ``(0 * embeddings).sum()`` (of each tensor given): 0 with
    zero gradients when nothing was selected, and NaN when any of ``embeddings`` is NaN or infinite (see the
    module docstring). Adding a zero leaves every finite mean as it is."""
    guard = (embeddings[0] * 0).sum()
    for more in embeddings[1:]:
        guard = guard + (more * 0).sum()
    return terms.mean() + guard if len(terms) else guard


class Selection(NamedTuple):
    """What an online loss selected in its last batch: ``selected`` pairs or triplets (an int) and
    ``active``, those with a non-zero loss term (a 0-d tensor on the loss's device in one process, so
    that reading it costs no host transfer until it is needed; an int on several processes). Counted
    over the global batch on several processes."""

    selected: int
    active: object


def _global_mean(terms, embeddings, share):
    """The loss for this rank's ``terms (S_r,)`` of a gathered batch ``embeddings (N, D)``, and the
    ``Selection`` counts of the terms.

    With ``share = None`` (one process): ``_online_mean``. Otherwise ``distributed.global_mean``: the
    global batch's mean ``T / S`` over the ``S`` terms of every rank, with the gradient that
    DistributedDataParallel's average turns into one process's gradient of it; the counts are over all
    ranks. The ``(0 * embeddings).sum()`` guard is on the gathered batch: every rank's loss then depends on
    it, so every rank joins the gather's backward all_reduce, and a non-finite embedding on any rank makes
    every rank's loss non-finite.
    """
    if share is None:
        return _online_mean(terms, embeddings), Selection(len(terms), (terms.detach() > 0).sum())
    mean, n_terms, n_nonzero = global_mean(terms, share)
    guard = (embeddings * 0).sum()
    return (guard if mean is None else mean + guard), Selection(n_terms, n_nonzero)


def _check_scale(scale):
    return check_real(scale, "scale", 0, strict=True)


# The method each kind of selector must have, and an example of one, for the error message.
_SELECTOR_METHODS = {"pair_selector": ("get_pairs", "utils.HardNegativePairSelector()"),
                     "triplet_selector": ("get_triplets", "utils.RandomNegativeTripletSelector(margin)"),
                     "easy_selector": ("get_triplets", "utils.RandomNegativeTripletSelector(margin)")}


def _check_selector(selector, name):
    method, example = _SELECTOR_METHODS[name]
    if not hasattr(selector, method):
        raise TypeError(f"{name} must have a {method}(embeddings, labels) method, e.g. {example}")
    return selector


def _mining_rows(embeddings, share, distance="squared", n_anchors=None, buffer=None):
    """This process's rows of a (gathered) batch ``embeddings (N, D)`` and their distances: ``(rows,
    distances)``, ``rows`` a ``mining_rows.Rows`` (``share`` as ``distributed.global_batch`` gives it; None:
    one process, every row; ``n_anchors``: the batch is the first so many, a memory's items follow),
    ``distances`` the rows' ``(A, N)`` block (``distances.row_distances`` of the detached embeddings, as
    ``distance``), computed once for every selector that mines the batch, into ``buffer``'s memory (a
    ``distances.BlockBuffer``, the loss's: the block is not needed once the loss is computed) if given."""
    rows = rows_to_mine(share, len(embeddings), n_anchors)
    shape = (rows.stop - rows.start, len(embeddings))
    out = None if buffer is None else buffer(shape, embeddings)
    return rows, as_distance(row_distances(embeddings.detach(), rows.start, rows.stop, out=out), distance)


def _with_memory(memory, embeddings, labels):
    """``(candidates (N + M, D), their labels (N + M,), remember)`` for a (gathered) batch ``embeddings (N,
    D)``, ``labels (N,)``: in a training step (autograd on, embeddings requiring gradients) the batch
    followed by ``memory``'s items (``CrossBatchMemory.candidates``), and ``remember()`` pushes the batch
    once the loss is computed; otherwise (no memory, or validation) the batch itself and nothing to do."""
    if memory is None or not (torch.is_grad_enabled() and embeddings.requires_grad):
        return embeddings, labels, lambda: None
    candidates, candidate_labels = memory.candidates(embeddings, labels)
    return candidates, candidate_labels, lambda: memory.push(embeddings, labels)


def _check_memory(memory):
    if memory is not None and not isinstance(memory, CrossBatchMemory):
        raise TypeError(f"memory must be a cross_batch_memory.CrossBatchMemory or None, got {type(memory).__name__}")
    return memory


def _mined(selector, kind, embeddings, labels, share, rows, distances):
    """What ``selector`` mines (``kind``: ``"pairs"`` or ``"triplets"``) for this process's anchors of a
    (gathered) batch ``embeddings (N, D)`` with ``labels (N,)``: ``rows`` and their ``distances`` as
    ``_mining_rows`` gives them, ``share`` as ``distributed.global_batch``.

    Returns ``(indices, target)``: pairs ``(P, 2)`` (positives first, ``target (P,)`` 1 / 0) or triplets
    ``(T, 3)`` (``target`` None), global indices whose first member is this process's. The selection is the
    same on any number of processes: the library's selectors mine the block (``select_pairs`` /
    ``select_triplets``); a selector with only ``get_pairs`` / ``get_triplets`` mines the whole batch and the
    process keeps its anchors' tuples (the same, provided it draws alike on every process)."""
    def mine(first):  # the tuples a selector without select_* found whose first member this process mines
        return owned(first, share) & (first < (len(labels) if rows.n_anchors is None else rows.n_anchors))

    if kind == "pairs":
        if hasattr(selector, "select_pairs"):
            positive_pairs, negative_pairs = selector.select_pairs(distances, labels, rows)
        else:
            positive_pairs, negative_pairs = (pairs[mine(pairs[:, 0])] for pairs in
                                              selector.get_pairs(embeddings.detach(), labels))
        indices = torch.cat([positive_pairs, negative_pairs])
        target = torch.cat([torch.ones(len(positive_pairs), device=indices.device),
                            torch.zeros(len(negative_pairs), device=indices.device)])
        return indices, target
    if hasattr(selector, "select_triplets"):
        return selector.select_triplets(distances, labels, rows), None
    triplets = selector.get_triplets(embeddings.detach(), labels)
    return triplets[mine(triplets[:, 0])], None


def _at_least_float32(embeddings):
    """``embeddings`` in float32 when they are half precision (float64 stays): the online losses take their
    terms' distances from them several times, and the gradients then sum in float32 before one cast back."""
    return embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))


def _compared_distances(distances, start, embeddings, first, second, distance="squared"):
    """The distances of the pairs ``(first, second)`` ``(S,)`` each (global indices, ``first`` in the rows
    of ``distances (A, N)`` from ``start``), differentiable in ``embeddings (N, D)``, with the values the
    selector compared (so a hinge is non-zero exactly when the selector called the tuple hard).

    Few tuples (``S * D`` at most the block's size): the block's values with the gradient of the exact
    distance ``as_distance(|e_first - e_second|^2)`` (``distances.indexed_squared_distances``), so no ``(A, N)``
    matrix is kept for the backward pass. Many (e.g. every triplet): the rows' block computed again with
    autograd (the same values, bitwise: the same tiles), and its entries taken."""
    if len(first) * embeddings.shape[1] <= distances.numel():
        exact = as_distance(indexed_squared_distances(embeddings, first, second), distance)
        return distances[first - start, second] + (exact - exact.detach())
    block = as_distance(row_distances(embeddings, start, start + len(distances)), distance)
    return block[first - start, second]


def _check_same_shape(**tensors):
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected embeddings of one shape (B, D), got {shapes}")


class ContrastiveLoss(nn.Module):
    """Contrastive loss on given pairs (Hadsell, Chopra and LeCun, 2006).

    ``forward(output1 (B, D), output2 (B, D), target (B,), size_average=True)``: with
    ``d = |output1 - output2|^2`` and ``target`` 1 for a same-class pair, 0 otherwise, each pair
    costs ``scale * (target * d + (1 - target) * relu(margin - sqrt(d))^2)`` (``contrastive_terms``).
    ``scale`` defaults to the classic 0.5; ``ContrastiveLoss(margin, scale=1.0)`` gives what
    :class:`OnlineContrastiveLoss` gives on the same pairs. ``distance="euclidean"``: the terms in the
    plain distance, without squares (``contrastive_terms``). Returns the mean over the batch, or the
    sum with ``size_average=False``.
    """

    def __init__(self, margin, scale=0.5, distance="squared"):
        super().__init__()
        self.margin = _check_margin(margin)
        self.scale = _check_scale(scale)
        self.distance = check_choice(distance, DISTANCES, "distance")
        self.eps = EPS

    def forward(self, output1, output2, target, size_average=True):
        _check_same_shape(output1=output1, output2=output2)
        target = torch.as_tensor(target, device=output1.device)
        if target.shape != (len(output1),):
            raise ValueError(f"target must have shape ({len(output1)},), got {tuple(target.shape)}")
        distances = paired_squared_distances(output1, output2)
        return _reduce(self.scale * contrastive_terms(distances, target, self.margin, self.distance), size_average,
                       output1, output2)


class TripletLoss(nn.Module):
    """Triplet loss on given triplets (Schroff, Kalenichenko and Philbin, 2015).

    ``forward(anchor (B, D), positive (B, D), negative (B, D), size_average=True)``: each triplet
    costs ``relu((|anchor - positive|^2 + margin) - |anchor - negative|^2)`` (``triplet_terms``).
    ``soft=True``: softplus instead of relu (the soft margin; use it with ``margin=0``);
    ``distance="euclidean"``: plain distances ``|anchor - positive|`` instead of squared ones
    (``utils.as_distance``). Returns the mean, or the sum with ``size_average=False``.
    """

    def __init__(self, margin, soft=False, distance="squared"):
        super().__init__()
        self.margin = _check_margin(margin)
        self.soft = check_flag(soft, "soft")
        self.distance = check_choice(distance, DISTANCES, "distance")

    def forward(self, anchor, positive, negative, size_average=True):
        _check_same_shape(anchor=anchor, positive=positive, negative=negative)
        losses = triplet_terms(as_distance(paired_squared_distances(anchor, positive), self.distance),
                               as_distance(paired_squared_distances(anchor, negative), self.distance),
                               self.margin, self.soft)
        return _reduce(losses, size_average, anchor, positive, negative)


class OnlineContrastiveLoss(nn.Module):
    """Contrastive loss over the pairs a :class:`utils.PairSelector` mines in the batch.

    ``forward(embeddings (B, D), target (B,))`` returns a scalar: the mean over the selected
    positive and negative pairs of ``scale * contrastive_terms``, with ``d`` the squared distances
    ``distances.row_distances(embeddings)``. ``scale`` defaults to the classic online formula's 1 (no 0.5
    factor, unlike :class:`ContrastiveLoss`'s default); ``distance="euclidean"``: the terms in the plain
    distance (``contrastive_terms``; the pair selectors' choices do not depend on it). No pair
    selected gives a zero loss that still backpropagates; a non-finite embedding gives a non-finite
    loss (see the module docstring).
    After each call ``last_selection`` holds the batch's ``Selection`` (pairs selected, and with a
    non-zero term).

    ``gather`` (default True) only acts under ``torch.distributed`` with world size > 1: each rank then
    mines the pairs whose first member it holds among the batches of all ranks gathered in rank order,
    from its own rows' distances (together one process's selection on that global batch; a
    ``utils.AllPositivePairSelector(balance=True)`` needs a generator seeded alike on every rank), and
    the loss is scaled for DistributedDataParallel's gradient average; its value is the global mean on
    every rank (see ``_global_mean``). ``gather=False`` mines each rank's own batch.

    ``memory`` (default None): a ``cross_batch_memory.CrossBatchMemory``; in training steps the pairs are
    mined among the batch and the memory's items (a pair's first member always in the batch), and the batch
    is pushed into it after.
    """

    last_selection = None  # Selection of the last batch (pairs selected, pairs with a non-zero term)

    def __init__(self, margin, pair_selector, scale=1.0, gather=True, distance="squared", memory=None):
        super().__init__()
        self._block = BlockBuffer()  # the rows' distance block's memory, kept between calls
        self.distance = check_choice(distance, DISTANCES, "distance")
        self.margin = _check_margin(margin)
        self.pair_selector = _check_selector(pair_selector, "pair_selector")
        self.scale = _check_scale(scale)
        self.gather = bool(gather)
        self.memory = _check_memory(memory)

    def forward(self, embeddings, target):
        target = _as_labels(target, embeddings)
        embeddings, target, share = global_batch(_at_least_float32(embeddings), target, self.gather)
        candidates, labels, remember = _with_memory(self.memory, embeddings, target)
        rows, distances = _mining_rows(candidates, share, n_anchors=len(embeddings), buffer=self._block)
        pairs, pair_target = _mined(self.pair_selector, "pairs", candidates, labels, share, rows, distances)
        distances = _compared_distances(distances, rows.start, candidates, pairs[:, 0], pairs[:, 1])
        terms = self.scale * contrastive_terms(distances, pair_target, self.margin, self.distance)
        loss, self.last_selection = _global_mean(terms, embeddings, share)
        remember()
        return loss


class OnlineTripletLoss(nn.Module):
    """Triplet loss over the triplets a :class:`utils.TripletSelector` mines in the batch.

    ``forward(embeddings (B, D), target (B,))`` returns ``(loss, n_triplets)``: the mean over the
    selected triplets of ``triplet_terms(D[a, p], D[a, n], margin)`` with ``D`` the squared
    distances ``distances.row_distances(embeddings)`` (non-zero exactly when the selectors call the triplet
    hard), and the number of selected triplets whose loss is non-zero (a Python int; the classic
    code counted all selected triplets). No triplet selected gives ``(zero loss that still
    backpropagates, 0)``; a non-finite embedding gives a non-finite loss (see the module docstring).
    After each call ``last_selection`` holds the batch's ``Selection`` (triplets selected, and with a
    non-zero loss), which ``trainer.fit`` reports as the active fraction.

    ``soft=True``: the soft margin, ``softplus`` instead of ``relu`` (``triplet_terms``; with
    ``margin=0`` it is Hermans et al.'s, every term non-zero). ``distance="euclidean"``: ``D`` the plain
    distances (``utils.as_distance``); the selector must compare the same distance (its ``distance``
    argument), else ValueError, since its hardness tests add the margin to that distance.

    ``easy_selector`` (default None): a second selector, usually an easier one (random-hard), whose
    triplets' mean loss is added to the first's: a mixed objective, the hard terms on top of an easier
    one that keeps the embeddings spread (see results/README.md, "Recipes"). ``last_selection`` and the count stay
    those of ``triplet_selector``.

    ``gather`` (default True) only acts under ``torch.distributed`` with world size > 1: each rank then
    mines the triplets whose anchor it holds, against the positives and negatives of the batches of all
    ranks gathered in rank order, from its own rows' distances (together one process's selection on that
    global batch; the random-hard and semi-hard selectors need a generator seeded alike on every rank),
    and the loss is scaled for DistributedDataParallel's gradient average; its value and the count are
    those of the global batch on every rank (see ``_global_mean``). ``gather=False`` mines each rank's
    own batch.

    ``memory`` (default None): a ``cross_batch_memory.CrossBatchMemory``; in training steps the batch's
    anchors take their positives and negatives among the batch and the memory's items (both selectors),
    and the batch is pushed into it after.
    """

    last_selection = None  # Selection of the last batch (triplets selected, triplets with a non-zero loss)

    def __init__(self, margin, triplet_selector, gather=True, soft=False, distance="squared", easy_selector=None,
                 memory=None):
        super().__init__()
        self._block = BlockBuffer()  # the rows' distance block's memory, kept between calls
        self.margin = _check_margin(margin)
        self.soft = check_flag(soft, "soft")
        self.distance = check_choice(distance, DISTANCES, "distance")
        self.triplet_selector = self._checked(triplet_selector, "triplet_selector")
        self.easy_selector = None if easy_selector is None else self._checked(easy_selector, "easy_selector")
        self.gather = bool(gather)
        self.memory = _check_memory(memory)

    def _checked(self, selector, name):
        selector = _check_selector(selector, name)
        selector_distance = getattr(selector, "distance", self.distance)
        if selector_distance != self.distance:
            raise ValueError(f"the {name} compares {selector_distance!r} distances but the loss "
                             f"{self.distance!r} ones, so it would call triplets hard by another distance than "
                             f"the loss's; build the selector with distance={self.distance!r}")
        return selector

    def forward(self, embeddings, target):
        target = _as_labels(target, embeddings)
        embeddings, target, share = global_batch(_at_least_float32(embeddings), target, self.gather)
        candidates, labels, remember = _with_memory(self.memory, embeddings, target)
        mining = (candidates, labels, share,
                  *_mining_rows(candidates, share, self.distance, len(embeddings), buffer=self._block))
        loss, self.last_selection = self._selected_mean(self.triplet_selector, embeddings, *mining)
        if self.easy_selector is not None:  # one block of distances for both selectors
            loss = loss + self._selected_mean(self.easy_selector, embeddings, *mining)[0]
        remember()
        return loss, int(self.last_selection.active)

    def _selected_mean(self, selector, batch, candidates, labels, share, rows, distances):
        """``_global_mean`` of the terms of the triplets ``selector`` mines for this process's anchors of
        ``batch``, among ``candidates`` (the batch, then a memory's items) with ``labels``."""
        triplets, _ = _mined(selector, "triplets", candidates, labels, share, rows, distances)
        anchors, positives, negatives = triplets.unbind(1)
        start = rows.start
        terms = triplet_terms(_compared_distances(distances, start, candidates, anchors, positives, self.distance),
                              _compared_distances(distances, start, candidates, anchors, negatives, self.distance),
                              self.margin, self.soft)
        return _global_mean(terms, batch, share)


def multi_similarity_terms(similarities, positives, negatives, alpha, beta, base):
    """Per-anchor multi-similarity terms (Wang et al., CVPR 2019, eq. 4 over the mined pairs).

    Takes the anchors' rows ``similarities (A, N)`` (cosine similarities), the kept pairs ``positives`` and
    ``negatives`` (``(A, N)`` bool, ``utils.multi_similarity_pairs``) and the loss's ``alpha``, ``beta`` and
    ``base`` (the paper's lambda). Returns ``(A,)``: ``log(1 + sum_P exp(-alpha (S - base))) / alpha +
    log(1 + sum_N exp(beta (S - base))) / beta``, 0 for an anchor without kept pairs. Each sum is a
    log-sum-exp over the kept entries and a zero, so a large ``beta`` does not overflow."""
    def log_one_plus_sum_exp(scaled, keep):
        kept = torch.where(keep, scaled, -math.inf)
        return torch.logsumexp(torch.cat([torch.zeros_like(kept[:, :1]), kept], dim=1), dim=1)

    return (log_one_plus_sum_exp(-alpha * (similarities - base), positives) / alpha
            + log_one_plus_sum_exp(beta * (similarities - base), negatives) / beta)


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss with its pair mining (Wang et al., "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", CVPR 2019), on cosine similarities of L2-normalised embeddings.

    ``forward(embeddings (B, D), target (B,))`` returns a scalar: the mean over every anchor of the batch of
    ``multi_similarity_terms`` over the pairs ``utils.multi_similarity_pairs`` keeps (``epsilon``; None
    keeps every pair). Defaults ``alpha=2, beta=50, base=0.5, epsilon=0.1`` are pytorch-metric-learning's
    (the paper's lambda is ``base``). The similarities are ``1 - |u_i - u_j|^2 / 2`` of the normalised
    embeddings ``u``, from ``distances.row_distances`` (so each row is bitwise the same however the batch is
    split between processes); an all-zero embedding normalises to zero (similarity 0 to everything), so
    the loss stays finite. An anchor without kept pairs adds 0 to the mean; a non-finite embedding gives a
    non-finite loss (the module docstring's guard). ``last_selection``: ``Selection`` of anchors and of
    those with a non-zero term.

    ``gather`` (default True) acts under ``torch.distributed`` as in ``OnlineContrastiveLoss``: each rank
    mines and sums the terms of its own anchors against the global batch, and the loss is the global mean.
    ``memory``: a ``cross_batch_memory.CrossBatchMemory`` whose items join the similarities' columns in
    training steps (``OnlineTripletLoss``'s rule).
    """

    last_selection = None

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, gather=True, memory=None):
        super().__init__()
        self.alpha = check_real(alpha, "alpha", 0, strict=True)
        self.beta = check_real(beta, "beta", 0, strict=True)
        self.base = check_real(base, "base")
        if not math.isfinite(self.base):
            raise ValueError(f"base must be finite, got {base}")
        self.epsilon = None if epsilon is None else check_real(epsilon, "epsilon", 0)
        self.gather = check_flag(gather, "gather")
        self.memory = _check_memory(memory)

    def forward(self, embeddings, target):
        target = _as_labels(target, embeddings)
        embeddings, target, share = global_batch(_at_least_float32(embeddings), target, self.gather)
        candidates, labels, remember = _with_memory(self.memory, embeddings, target)
        normalised = F.normalize(candidates, dim=1)
        rows = rows_to_mine(share, len(normalised), len(embeddings))
        similarities = 1 - row_distances(normalised, rows.start, rows.stop) / 2
        positives, negatives = multi_similarity_pairs(similarities, labels, rows, self.epsilon)
        terms = multi_similarity_terms(similarities, positives, negatives, self.alpha, self.beta, self.base)
        loss, self.last_selection = _global_mean(terms, embeddings, share)
        remember()
        return loss


# ---------------------------------------------------------------------------------------------------
# Siamese and triplet autoencoders: weight * metric loss + (1 - weight) * (reconstruction + KL) loss


@float32_distances
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


@float32_distances
def symmetric_gaussian_kl(mean1, log_var1, mean2, log_var2):
    """``(KL(N1 || N2) + KL(N2 || N1)) / 2`` of diagonal Gaussians (see ``gaussian_kl``): ``(B,)``.
    Symmetric, so it can compare the two members of an unordered pair."""
    return 0.5 * (gaussian_kl(mean1, log_var1, mean2, log_var2) + gaussian_kl(mean2, log_var2, mean1, log_var1))


@float32_distances
def kl_to_standard_normal(mean, log_var):
    """``KL(N(mean, diag(exp(log_var))) || N(0, I))`` row by row: ``(B, L)`` each -> ``(B,)``, equal to
    ``0.5 * sum(mean^2 + exp(log_var) - 1 - log_var)``."""
    _check_same_shape(mean=mean, log_var=log_var)
    return 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)


AUTOENCODER_DISTANCES = ("euclidean", "kl")
RECONSTRUCTION_LOSSES = ("mse", "bce")


class _AutoencoderLoss(nn.Module):
    """What the pairwise and triplet autoencoder losses share: arguments, the mined (``forward``,
    ``terms``) and given (``_on_given``) forms, latent distances, reconstruction and KL terms and the
    weighted sum. A subclass names the attribute holding its selector (``selector_name``) and says
    and how to score (``_metric_terms``) its index tuples, pairs ``(P, 2)`` or
    triplets ``(T, 3)``."""

    selector_name = None
    last_selection = None  # Selection of the last batch's pairs or triplets (metric terms)

    def __init__(self, weight, margin, beta, distance, reconstruction, selector, gather=True):
        super().__init__()
        self._block = BlockBuffer()  # the rows' distance block's memory, kept between calls
        self.gather = bool(gather)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"weight must be a number in [0, 1], got {type(weight).__name__}")
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1] (1: metric loss only, 0: autoencoder loss only), "
                             f"got {weight}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta must be a number >= 0, got {type(beta).__name__}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.weight, self.beta = float(weight), float(beta)
        self.margin = _check_margin(margin)
        self.distance = check_choice(distance, AUTOENCODER_DISTANCES, "distance")
        self.reconstruction = check_choice(reconstruction, RECONSTRUCTION_LOSSES, "reconstruction")
        if selector is not None:
            _check_selector(selector, self.selector_name)
        setattr(self, self.selector_name, selector)

    def forward(self, output, inputs, labels):
        return self.terms(output, inputs, labels)["total"]

    def terms(self, output, inputs, labels):
        """The loss and its parts for a batch, its pairs or triplets mined on the means by the
        selector: a dict of scalar tensors ``total``, ``metric``, ``reconstruction``, ``kl`` and the
        int ``n_selected`` (pairs or triplets)."""
        selector = getattr(self, self.selector_name)
        if selector is None:
            kind = self.selector_name.split("_")[0]
            raise ValueError(f"mining {kind}s in a batch needs a {self.selector_name} (e.g. "
                             f"{_SELECTOR_METHODS[self.selector_name][1]}); for given {kind}s use on_{kind}s")
        self._check(output, inputs)
        labels = _as_labels(labels, output.mean)
        # the KL latent distance needs every rank's log-variances too; the Euclidean one only the means
        log_var = output.log_var if self.distance == "kl" else None
        mean, labels, share, log_var = global_batch(output.mean, labels, self.gather, log_var)
        indices, target = _mined(selector, self.selector_name.replace("_selector", "s"), mean, labels, share,
                                 *_mining_rows(mean, share, buffer=self._block))
        if share is None:
            return self._terms(output, inputs, indices, target)
        return self._terms(output._replace(mean=mean, log_var=log_var), inputs, indices, target, share,
                           local=output)

    def _on_given(self, outputs, inputs, target=None):
        """The loss (scalar) of given pairs or triplets: ``outputs`` and ``inputs`` hold each member's
        ``B`` items, item ``i`` of every member forming tuple ``i``; every member is reconstructed."""
        output, joined = _concatenate_outputs(outputs), torch.cat(inputs)
        self._check(output, joined)
        n = len(inputs[0])
        indices = torch.arange(len(inputs) * n, device=joined.device).view(len(inputs), n).T
        return self._terms(output, joined, indices, target)["total"]

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
            return indexed_squared_distances(output.mean, first, second)
        return symmetric_gaussian_kl(output.mean[first], output.log_var[first],
                                     output.mean[second], output.log_var[second])

    def _terms(self, output, inputs, indices, target, share=None, local=None):
        """The parts of the loss: the metric loss, the mean of ``_metric_terms`` over ``indices``
        (guarded as an online loss's: zero when empty, non-finite with any non-finite mean), the
        reconstruction (mean over all input values), the prior KL (per item, divided by the number
        of values of one input, so ``beta = 1`` weighs it as in the ELBO) and their weighted sum.

        With a ``share`` of a gathered batch (``terms``): ``output`` holds the gathered means and
        log-variances, ``local`` this rank's own output, ``indices`` the tuples this rank owns; every
        part is then a mean over the global batch, scaled for DistributedDataParallel's gradient
        average as the online losses are (``_global_mean``)."""
        metric, self.last_selection = _global_mean(self._metric_terms(output, indices, target), output.mean, share)
        reconstruction, kl = self._autoencoder_parts(output if share is None else local, inputs, share)
        autoencoder = reconstruction + self.beta * kl
        total = self.weight * metric + (1 - self.weight) * autoencoder
        return {"total": total, "metric": metric, "reconstruction": reconstruction, "kl": kl,
                "n_selected": self.last_selection.selected}

    def _autoencoder_parts(self, output, inputs, share=None):
        """``(reconstruction, kl)`` of ``output`` for ``inputs`` (this rank's items): the reconstruction
        loss, mean over all input values, and the prior KL, mean over items divided by the number of
        values of one input; with a ``share``, both as per-item terms averaged over the global batch
        (``_global_mean``)."""
        loss = F.mse_loss if self.reconstruction == "mse" else F.binary_cross_entropy_with_logits
        if share is None:
            reconstruction = loss(output.reconstruction, inputs)
        else:
            per_item = loss(output.reconstruction, inputs, reduction="none").flatten(1).mean(1)
            reconstruction, _ = _global_mean(per_item, output.reconstruction, share)
        if output.log_var is None:
            return reconstruction, torch.zeros((), dtype=reconstruction.dtype, device=reconstruction.device)
        kl = kl_to_standard_normal(output.mean, output.log_var)
        if share is None:
            return reconstruction, kl.mean() / inputs[0].numel()
        return reconstruction, _global_mean(kl / inputs[0].numel(), output.mean, share)[0]


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
        gather: on several processes, mine over the global batch (see the module docstring): each part
            of ``forward``'s loss is then that of one process on the whole global batch, for
            DistributedDataParallel's gradient average. ``False`` mines each rank's share alone.

    The contrastive part is ``ContrastiveLoss``'s with its classic factor 0.5: with ``d`` the
    distance, a pair costs ``0.5 * contrastive_terms(d, t, margin)`` = ``0.5 * (t * d + (1 - t) *
    relu(margin - sqrt(d))^2)`` (t = 1 for a same-class pair), averaged over the pairs; so with
    ``distance="euclidean"`` it equals ``ContrastiveLoss(margin)`` on the mined pairs, and half of
    ``OnlineContrastiveLoss`` (up to its distance matrix's rounding). The reconstruction is the mean
    over all input values; the KL term is the mean over items of ``KL(posterior || N(0, I))``
    divided by the number of values of one input.

    ``forward(output, inputs, labels) -> loss``: ``output`` is the model's ``AutoencoderOutput`` for
    the batch ``inputs`` ((B, D) or (B, C, H, W)) with ``labels (B,)``; the pairs are mined with
    ``pair_selector`` on the means; every item is reconstructed once. ``terms(...)`` returns the parts
    as a dict (total, metric, reconstruction, kl, n_selected). ``on_pairs(...)`` scores given pairs.
    No pair selected gives a metric term of zero that still backpropagates; a non-finite mean gives
    a non-finite metric term, as in the online losses.
    """

    selector_name = "pair_selector"
    # ContrastiveLoss's classic factor; OnlineContrastiveLoss's classic one is 1.
    contrastive_scale = 0.5

    def __init__(self, weight, margin=1.0, pair_selector=None, beta=1.0, distance="euclidean",
                 reconstruction="mse", gather=True):
        super().__init__(weight, margin, beta, distance, reconstruction, pair_selector, gather)

    def on_pairs(self, output1, output2, input1, input2, target):
        """The loss of given pairs, as ``SiameseAutoencoder`` returns them: outputs and inputs of the
        first and second members (B items each) and ``target (B,)``, 1 for a same-class pair. Both
        members are reconstructed. Returns a scalar."""
        target = torch.as_tensor(target, device=input1.device)
        if target.shape != (len(input1),):
            raise ValueError(f"target must have shape ({len(input1)},), got {tuple(target.shape)}")
        return self._on_given((output1, output2), (input1, input2), target)

    def _metric_terms(self, output, pairs, target):
        distances = self._distances(output, *pairs.unbind(1))
        return self.contrastive_scale * contrastive_terms(distances, target, self.margin)


class TripletAutoencoderLoss(_AutoencoderLoss):
    """Triplet autoencoder loss: ``weight * triplet + (1 - weight) * (reconstruction + beta * KL)``.

    Arguments as ``PairwiseAutoencoderLoss``, with a ``triplet_selector`` (a ``utils.TripletSelector``)
    instead of a pair selector. The triplet part is ``TripletLoss``'s: ``triplet_terms(d(a, p),
    d(a, n), margin)`` = ``relu((d(a, p) + margin) - d(a, n))`` averaged over the triplets, ``d`` the
    squared Euclidean distance between the means (so it equals ``TripletLoss(margin)`` on the mined
    triplets) or the symmetrised KL divergence between the posteriors.

    ``forward(output, inputs, labels) -> loss`` mines triplets in the batch; ``terms(...)`` returns
    the parts; ``on_triplets(...)`` scores given triplets (``TripletAutoencoder``'s outputs). No
    triplet selected gives a metric term of zero that still backpropagates; a non-finite mean gives
    a non-finite metric term, as in the online losses.
    """

    selector_name = "triplet_selector"

    def __init__(self, weight, margin=1.0, triplet_selector=None, beta=1.0, distance="euclidean",
                 reconstruction="mse", gather=True):
        super().__init__(weight, margin, beta, distance, reconstruction, triplet_selector, gather)

    def on_triplets(self, output1, output2, output3, input1, input2, input3):
        """The loss of given (anchor, positive, negative) triplets, as ``TripletAutoencoder`` returns
        them (B items each); all three are reconstructed. Returns a scalar."""
        return self._on_given((output1, output2, output3), (input1, input2, input3))

    def _metric_terms(self, output, triplets, target=None):
        anchors, positives, negatives = triplets.unbind(1)
        return triplet_terms(self._distances(output, anchors, positives),
                             self._distances(output, anchors, negatives), self.margin)
