"""Metrics for training and evaluating embedding networks.

These live here:

- Running metrics that `trainer.fit` feeds batch by batch (the classic `Metric` protocol:
  `metric(outputs, target, loss_outputs)`, `reset()`, `value()`, `name()`):
  `AccumulatedAccuracyMetric` and `AverageNonzeroTripletsMetric`, and the two that `fit`'s collapse
  guard adds by itself: `EmbeddingSpreadMetric` (how spread the embeddings of a batch are,
  `batch_spread`) and `ActiveFractionMetric` (the share of the mined pairs or triplets with a loss).
- Evaluation functions for a trained embedding: `extract_embeddings` turns a loader into an
  (N, D) embedding matrix with (N,) labels, and `knn_predict` / `knn_accuracy` score it by
  nearest-neighbour classification.
- Embedding-quality metrics: `retrieval_metrics` (precision@1, R-precision and MAP@R of the set
  queried against itself, Musgrave, Belongie and Lim, "A Metric Learning Reality Check", 2020),
  `nmi_score` (k-means clustering against the labels), `verification_roc_auc` (same/different
  pairs scored by distance) and `evaluate_embeddings`, which gathers all of them for a train/test
  split.
- Verification: `best_threshold` (the threshold on a score that maximises accuracy). N-way K-shot
  episodes are in episodes.py.

Distances are Euclidean and computed in chunks of queries, so memory stays O(chunk x N): a 60k x
10k or 10k x 10k evaluation never holds a full distance matrix.
"""


import torch
from torch import nn

from distances import indexed_squared_distances, squared_distances
from utils import check_int, moved_attribute


class Metric:
    """Base class of the running metrics that `trainer.fit` updates after every batch.

    `__call__(outputs, target, loss)` takes the model outputs (a tuple of tensors), the targets
    (a tuple of tensors, or None when the dataset yields no target) and whatever the loss function
    returned, updates the running state and returns the current value. `reset()` clears the state
    at the start of an epoch, `value()` returns the current value as a float and `name()` the
    display name (the trainer logs it as 'train_<name>' / 'val_<name>', lower-cased, spaces -> '_').
    """

    def __call__(self, outputs, target, loss):
        raise NotImplementedError

    def reset(self):
        raise NotImplementedError

    def value(self):
        raise NotImplementedError

    def name(self):
        raise NotImplementedError


class RatioOfSumsMetric(Metric):
    """A running metric whose value is `scale * sum(numerators) / sum(denominators)` over an epoch.

    Subclasses implement `batch_terms(outputs, target, loss) -> (numerator, denominator)` for one
    batch. Numerators may be 0-d tensors: they are summed on their device and read back only in
    `value()`, so a batch costs no host transfer. `value()` is NaN before the first batch.
    """

    scale = 1.0

    def __init__(self):
        self.reset()

    def batch_terms(self, outputs, target, loss):
        raise NotImplementedError

    def __call__(self, outputs, target, loss):
        numerator, denominator = self.batch_terms(outputs, target, loss)
        self.numerator = self.numerator + numerator
        self.denominator += denominator
        return self.value()

    def reset(self):
        self.numerator = 0
        self.denominator = 0

    def value(self):
        if self.denominator == 0:
            return float("nan")
        return self.scale * float(self.numerator) / self.denominator


class AccumulatedAccuracyMetric(RatioOfSumsMetric):
    """Classification accuracy in percent, accumulated over an epoch.

    The prediction is argmax(outputs[0], dim=1) for scores outputs[0] of shape (B, C); the truth
    is target[0] of shape (B,). `correct` (a tensor on the device of the scores) and `total` are
    the counts so far; `value()` is NaN before the first batch.
    """

    scale = 100.0

    correct, total = property(lambda self: self.numerator), property(lambda self: self.denominator)

    def batch_terms(self, outputs, target, loss):
        if target is None or len(target) == 0:
            raise TypeError("AccumulatedAccuracyMetric needs class labels: use a dataset that "
                            "yields (data, labels)")
        scores = outputs[0]
        labels = target[0]
        if scores.dim() != 2 or labels.shape != scores.shape[:1]:
            raise ValueError(f"AccumulatedAccuracyMetric expects scores (B, C) and labels (B,), "
                             f"got {tuple(scores.shape)} and {tuple(labels.shape)}")
        predictions = scores.detach().argmax(dim=1)
        return (predictions == labels.to(predictions.device)).sum(), labels.numel()

    def name(self):
        return "Accuracy"


class AverageNonzeroTripletsMetric(RatioOfSumsMetric):
    """Mean, over the batches of an epoch, of the number of triplets with a non-zero loss.

    Reads loss[1] from a loss that returns (loss, n_triplets), such as `OnlineTripletLoss`;
    n_triplets may be a Python int or a 0-d tensor (kept on its device until `value()`).
    `sum` and `count` are the triplets and batches so far; `value()` is NaN before the first batch.
    """

    sum, count = property(lambda self: self.numerator), property(lambda self: self.denominator)

    def batch_terms(self, outputs, target, loss):
        if not isinstance(loss, (tuple, list)) or len(loss) < 2:
            raise TypeError("AverageNonzeroTripletsMetric needs a loss that returns "
                            "(loss, n_triplets), e.g. OnlineTripletLoss")
        n_triplets = loss[1]
        if isinstance(n_triplets, torch.Tensor):
            n_triplets = n_triplets.detach()
        return n_triplets, 1

    def name(self):
        return "Average nonzero triplets"


def batch_spread(embeddings):
    """How spread a batch of embeddings ``(B, D)`` is: the root mean square distance between two
    distinct items, ``sqrt(mean_{i != j} |e_i - e_j|^2)``, from the per-dimension variances (O(B D), no
    distance matrix). A 0-d tensor on the embeddings' device; 0 for a collapsed batch (every item at one
    point). Needs B >= 2."""
    centred = embeddings - embeddings.mean(dim=0, keepdim=True)
    n = len(embeddings)
    return (centred.pow(2).sum() * (2.0 / (n - 1))).sqrt()


def _embeddings_of(outputs):
    """The embeddings ``(B, D)`` in a batch's model outputs (fit's tuple): the first output, or its
    ``mean`` for an autoencoder's ``AutoencoderOutput``; None when that is not a 2-D float tensor."""
    first = outputs[0] if outputs else None
    first = getattr(first, "mean", first) if not isinstance(first, torch.Tensor) else first
    if isinstance(first, torch.Tensor) and first.dim() == 2 and first.is_floating_point() and len(first) >= 2:
        return first
    return None


class EmbeddingSpreadMetric(Metric):
    """``batch_spread`` of the embeddings (the first model output, or an ``AutoencoderOutput``'s
    ``mean``) of the epoch's latest batch, so at the epoch's end its last one; with ``at_start=True``,
    of the epoch's first batch, before the epoch's training moved the weights. A collapse shows as the
    spread falling towards 0: every item mapped to nearly one point, which triplet mining with hard
    negatives can fall into, even within the first epoch. ``trainer.fit`` adds both by itself (its
    collapse guard). Batches without 2-D embeddings count for nothing; NaN when no batch had any."""

    def __init__(self, at_start=False):
        self.at_start = bool(at_start)
        self.reset()

    def __call__(self, outputs, target, loss):
        embeddings = _embeddings_of(outputs)
        if embeddings is not None and not (self.at_start and self.spread is not None):
            self.spread = batch_spread(embeddings.detach().float())  # a 0-d tensor, read in value()
        return self.value()

    def reset(self):
        self.spread = None

    def value(self):
        return float("nan") if self.spread is None else float(self.spread)

    def name(self):
        return "Spread at start" if self.at_start else "Spread"


class ActiveFractionMetric(RatioOfSumsMetric):
    """The fraction of the pairs or triplets an online loss selected in an epoch whose loss term is
    non-zero (they are what trains the network). Reads ``loss_fn.last_selection`` (a
    ``losses.Selection``), which the online losses set at each call; 0 when nothing was selected (no
    term trains the network then either). ``trainer.fit`` adds it by itself for such losses."""

    def __init__(self, loss_fn):
        if not hasattr(loss_fn, "last_selection"):
            raise TypeError("ActiveFractionMetric needs a loss with a last_selection attribute, such as "
                            "losses.OnlineTripletLoss or losses.OnlineContrastiveLoss")
        self.loss_fn = loss_fn
        super().__init__()

    def batch_terms(self, outputs, target, loss):
        selection = self.loss_fn.last_selection
        if selection is None:
            return 0, 0
        return selection.active, selection.selected

    def value(self):
        return 0.0 if self.denominator == 0 else super().value()

    def name(self):
        return "Active fraction"


def extract_embeddings(loader, model, device=None):
    """Embed every item of a loader with `model.get_embedding`.

    `loader` yields (images, labels) batches: images (B, ...) tensor (or a 1-tuple of one),
    labels (B,). Runs in eval mode under torch.no_grad() and restores the model's previous mode.
    `device` defaults to the device of the model's parameters.
    Returns (embeddings (N, D) float tensor, labels (N,) long tensor), both on `device`.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_embedding", None)):
        raise TypeError("extract_embeddings needs an nn.Module with a get_embedding method, "
                        "e.g. EmbeddingNet, SiameseNet or TripletNet")
    if device is None:
        first_parameter = next(model.parameters(), None)
        device = first_parameter.device if first_parameter is not None else torch.device("cpu")
    device = torch.device(device)

    embedding_batches, label_batches = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, labels in loader:
                if isinstance(images, (tuple, list)) and len(images) == 1:
                    images = images[0]
                if not isinstance(images, torch.Tensor):
                    raise TypeError("extract_embeddings needs batches of (images tensor, labels); "
                                    "pair/triplet datasets yield tuples of images - "
                                    "wrap the underlying single-image dataset instead")
                labels = torch.as_tensor(labels)
                if labels.shape != images.shape[:1]:
                    raise ValueError(f"extract_embeddings needs one label per image, got labels "
                                     f"{tuple(labels.shape)} for images {tuple(images.shape)}")
                non_blocking = device.type == "cuda"
                embeddings = model.get_embedding(images.to(device, non_blocking=non_blocking))
                embedding_batches.append(embeddings)
                label_batches.append(labels.to(device, non_blocking=non_blocking))
    finally:
        model.train(was_training)
    if not embedding_batches:
        raise ValueError("extract_embeddings got an empty loader")
    return torch.cat(embedding_batches).float(), torch.cat(label_batches).long()


def _check_embeddings_and_labels(embeddings, labels, what):
    # `what` names the argument pair in messages: "query" -> query_embeddings / query_labels,
    # "" -> embeddings / labels.
    prefix = f"{what}_" if what else ""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 \
            or not embeddings.is_floating_point():
        raise TypeError(f"{prefix}embeddings must be a 2-D floating tensor (N, D)")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{prefix}labels must have shape ({embeddings.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{prefix}labels must be integers")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{prefix}embeddings is empty")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{prefix}embeddings contains NaN or inf")
    return labels


def smallest_k(distances, k):
    """Indices (C, k) of the k smallest entries of each row of distances (C, G).

    Neighbours are ordered by (distance, gallery index), so equal distances resolve to the lower
    index exactly as a stable sort would. topk is used for speed (a full sort of 60k x 10k is
    ~30x slower); its arbitrary choice among equal values is corrected afterwards.
    """
    n_gallery = distances.shape[1]
    n_candidates = min(k + 1, n_gallery)
    values, indices = distances.topk(n_candidates, dim=1, largest=False, sorted=True)
    if n_candidates > k:
        # When the (k+1)-th distance equals the k-th, topk may have kept a higher gallery index
        # than an equally distant one it dropped; such rows are redone with a stable sort.
        boundary_tie = values[:, k] == values[:, k - 1]
        values, indices = values[:, :k], indices[:, :k]
        if boundary_tie.any():
            rows = boundary_tie.nonzero().squeeze(1)
            indices[rows] = distances[rows].sort(dim=1, stable=True).indices[:, :k]
            values = distances.gather(1, indices)
    # Order equal distances inside the k by index: sort by index, then stable sort by distance.
    indices, by_index = indices.sort(dim=1)
    values = values.gather(1, by_index)
    by_distance = values.sort(dim=1, stable=True).indices
    return indices.gather(1, by_distance)


def knn_predict(query_embeddings, gallery_embeddings, gallery_labels, k=1, exclude_self=False,
                chunk_size=512):
    """Predict a label for each query by a majority vote of its k nearest gallery items.

    Takes query_embeddings (Q, D), gallery_embeddings (G, D), gallery_labels (G,) integers.
    Distances are Euclidean. Neighbours with equal distances are taken in gallery order. A tie in
    the vote goes to the tied label whose closest member is nearest to the query (so k=2 with two
    different labels predicts the label of the nearest neighbour). `exclude_self=True` (queries and
    gallery are the same set, Q == G) leaves out gallery item i for query i. Queries are processed
    `chunk_size` at a time so memory stays O(chunk_size * G).
    Returns predicted labels (Q,) long on the device of the gallery.
    """
    gallery_labels = _check_embeddings_and_labels(gallery_embeddings, gallery_labels, "gallery")
    if not isinstance(query_embeddings, torch.Tensor) or query_embeddings.dim() != 2 \
            or not query_embeddings.is_floating_point():
        raise TypeError("query_embeddings must be a 2-D floating tensor (Q, D)")
    if query_embeddings.shape[1] != gallery_embeddings.shape[1]:
        raise ValueError(f"query and gallery embeddings must have the same width D, got "
                         f"{query_embeddings.shape[1]} and {gallery_embeddings.shape[1]}")
    if not torch.isfinite(query_embeddings).all():
        raise ValueError("query_embeddings contains NaN or inf")
    k = check_int(k, "k", None)  # its range, which depends on the gallery, is checked below
    check_int(chunk_size, "chunk_size", 1)
    n_query, n_gallery = query_embeddings.shape[0], gallery_embeddings.shape[0]
    if exclude_self and n_query != n_gallery:
        raise ValueError("exclude_self=True needs the queries to be the gallery (Q == G), "
                         f"got Q={n_query}, G={n_gallery}")
    n_available = n_gallery - 1 if exclude_self else n_gallery
    if not 1 <= k <= n_available:
        raise ValueError(f"k must be between 1 and the number of usable gallery items "
                         f"({n_available}), got {k}")

    device = gallery_embeddings.device
    # Vote over compact label ids 0..L-1 so arbitrary integer labels index a (C, L) count table.
    unique_labels, gallery_label_ids = torch.unique(gallery_labels.to(device), return_inverse=True)
    gallery_squared_norms = gallery_embeddings.pow(2).sum(dim=1)
    predicted_ids = []
    for start in range(0, n_query, chunk_size):
        queries = query_embeddings[start:start + chunk_size].to(device, gallery_embeddings.dtype)
        distances = squared_distances(queries, gallery_embeddings, gallery_squared_norms)
        if exclude_self:
            rows = torch.arange(queries.shape[0], device=device)
            distances[rows, rows + start] = float("inf")
        neighbour_ids = gallery_label_ids[smallest_k(distances, k)]  # (C, k) nearest 1st
        votes = torch.zeros(queries.shape[0], unique_labels.numel(), dtype=torch.long,
                            device=device)
        votes.scatter_add_(1, neighbour_ids, torch.ones_like(neighbour_ids))
        is_top_label = votes == votes.max(dim=1, keepdim=True).values
        # argmax returns the first True: the nearest neighbour whose label is among the top-voted.
        first_top_neighbour = is_top_label.gather(1, neighbour_ids).to(torch.uint8).argmax(dim=1)
        predicted_ids.append(neighbour_ids.gather(1, first_top_neighbour[:, None]).squeeze(1))
    return unique_labels[torch.cat(predicted_ids)].long()


def knn_accuracy(query_embeddings, query_labels, gallery_embeddings, gallery_labels, k=1,
                 exclude_self=False, chunk_size=512):
    """Fraction of queries whose k-NN vote (see `knn_predict`) matches their label.

    Takes query_embeddings (Q, D), query_labels (Q,), gallery_embeddings (G, D),
    gallery_labels (G,). Returns a Python float in [0, 1].
    """
    query_labels = _check_embeddings_and_labels(query_embeddings, query_labels, "query")
    predictions = knn_predict(query_embeddings, gallery_embeddings, gallery_labels, k=k,
                              exclude_self=exclude_self, chunk_size=chunk_size)
    return (predictions == query_labels.to(predictions.device)).float().mean().item()


# ---------------------------------------------------------------- embedding-quality metrics

def _check_distances_fit(embeddings, squared_norms):
    # A squared distance is at most 4 * the largest squared norm; if that overflows the dtype,
    # distances become inf and ties (or NaN) appear that the embeddings do not have.
    if not torch.isfinite(4 * squared_norms.max()):
        raise ValueError(f"embeddings are too large for squared distances in {embeddings.dtype}: "
                         f"rescale them (e.g. L2-normalise) or convert them to float64")


def retrieval_metrics(embeddings, labels, chunk_size=1024):
    """Precision@1, R-precision and MAP@R of a labelled embedding set queried against itself.

    Takes embeddings (N, D) floating and labels (N,) integers (a tensor or a list). Each item
    queries all the others (itself left out). For a query, R is the number of other items with
    its label, and its neighbours are ranked by Euclidean distance, equal distances by lower index
    (the order a stable sort gives). Distances are compared as computed (squared, by the matmul
    expansion in the embeddings' dtype), so integer-valued embeddings tie exactly. Per query:

    - precision@1: 1 if the nearest neighbour has the query's label, else 0;
    - R-precision: the fraction of same-label items among the R nearest neighbours;
    - MAP@R: (1/R) * sum over the positions i <= R that hold a same-label item of precision@i
      (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", 2020).

    Each metric is the mean over the queries with R >= 1; a query whose label occurs only once
    (a singleton class) has nothing to retrieve and is left out of all three means.
    Queries are processed `chunk_size` at a time and only the max-R nearest neighbours of a chunk
    are selected (topk, not a full sort), so memory stays O(chunk_size * (N + max R)).
    Returns {'precision_at_1': float, 'r_precision': float, 'map_at_r': float}, each in [0, 1].
    Raises ValueError when no label occurs twice.
    """
    labels = _check_embeddings_and_labels(embeddings, labels, "")
    check_int(chunk_size, "chunk_size", 1)
    embeddings = embeddings.detach()  # an evaluation: no autograd graph over the chunks
    device = embeddings.device
    _, label_ids, label_counts = torch.unique(labels.to(device), return_inverse=True,
                                              return_counts=True)
    n_relevant = label_counts[label_ids] - 1  # R of every item as a query
    query_indices = (n_relevant > 0).nonzero().squeeze(1)
    if query_indices.numel() == 0:
        raise ValueError("retrieval_metrics needs a label that occurs at least twice: every "
                         "label is unique, so no query has anything to retrieve")
    squared_norms = embeddings.pow(2).sum(dim=1)
    _check_distances_fit(embeddings, squared_norms)
    # Per-query scores are exact ratios of small integers; float64 keeps them so (MPS has none).
    score_dtype = torch.float32 if device.type == "mps" else torch.float64

    precision_at_1, r_precision, map_at_r = [], [], []
    for start in range(0, query_indices.numel(), chunk_size):
        queries = query_indices[start:start + chunk_size]
        distances = squared_distances(embeddings[queries], embeddings, squared_norms)
        rows = torch.arange(queries.numel(), device=device)
        distances[rows, queries] = float("inf")  # the query itself; every real distance is finite
        chunk_relevant = n_relevant[queries]
        k = int(chunk_relevant.max())
        # Neighbours ordered by (distance, index); the first R of a query's list are its R nearest.
        neighbours = smallest_k(distances, k)  # (C, k)
        within_r = torch.arange(k, device=device) < chunk_relevant[:, None]
        relevant = (label_ids[neighbours] == label_ids[queries, None]) & within_r
        hits = relevant.cumsum(dim=1)  # hits[:, i] = relevant items among the first i + 1
        ranks = torch.arange(1, k + 1, device=device, dtype=score_dtype)
        precision_at_hits = torch.where(relevant, hits.to(score_dtype) / ranks, 0.0)
        r = chunk_relevant.to(score_dtype)
        precision_at_1.append(relevant[:, 0].to(score_dtype))
        r_precision.append(hits[:, -1].to(score_dtype) / r)
        map_at_r.append(precision_at_hits.sum(dim=1) / r)
    return {"precision_at_1": torch.cat(precision_at_1).mean().item(),
            "r_precision": torch.cat(r_precision).mean().item(),
            "map_at_r": torch.cat(map_at_r).mean().item()}


def nmi_score(embeddings, labels, n_clusters=None, seed=0, *, n_init=10):
    """Normalised mutual information between a k-means clustering of the embeddings and the labels.

    Takes embeddings (N, D) floating and labels (N,) integers. Runs scikit-learn's KMeans with
    `n_clusters` clusters (default: the number of distinct labels), `n_init` restarts and
    random_state=seed on a float64 CPU copy of the embeddings (scikit-learn works on NumPy
    arrays), then scores the cluster assignment with `normalized_mutual_info_score`
    (arithmetic normalisation). Returns a Python float in [0, 1]; 1 means the clusters are the
    classes up to renaming.
    """
    labels = _check_embeddings_and_labels(embeddings, labels, "")
    n_items = embeddings.shape[0]
    if n_clusters is None:
        n_clusters = int(torch.unique(labels).numel())
    else:
        check_int(n_clusters, "n_clusters", 1)
        if n_clusters > n_items:
            raise ValueError(f"n_clusters must be at most the number of embeddings ({n_items}), "
                             f"got {n_clusters}")
    check_int(seed, "seed", 0)
    check_int(n_init, "n_init", 1)
    # Imported here so that importing this module (and trainer) does not load scikit-learn.
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    points = embeddings.detach().to("cpu", torch.float64).numpy()
    clusters = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(points)
    return float(normalized_mutual_info_score(labels.cpu().numpy(), clusters))


def _all_pairs_after(first_partner, n_partners):
    """Every pair (p, first_partner[p] + o) for 0 <= o < n_partners[p], as two (P,) tensors."""
    positions = torch.arange(first_partner.numel())
    firsts = positions.repeat_interleave(n_partners)
    group_starts = (n_partners.cumsum(0) - n_partners).repeat_interleave(n_partners)
    offsets = torch.arange(firsts.numel()) - group_starts
    return firsts, first_partner[firsts] + offsets


def _uniform_below(bounds, generator):
    """One uniform random integer in [0, bounds[i]) for every entry of bounds (M,) (all >= 1)."""
    draws = torch.rand(bounds.shape, generator=generator, dtype=torch.float64)
    return (draws * bounds).long().clamp_max_(bounds - 1)


def _verification_pairs(labels, n_per_kind, generator):
    """Same-label and different-label pairs (i, j), i != j, of labels (N,) integers (CPU).

    For each kind: every unordered pair of that kind when there are at most n_per_kind of them,
    else n_per_kind ordered pairs drawn uniformly, with replacement, from `generator`.
    Returns (first (P,), second (P,), same (P,) bool).
    """
    _, label_ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n_items = labels.numel()
    n_positive = int((counts * (counts - 1) // 2).sum())
    n_negative = n_items * (n_items - 1) // 2 - n_positive
    if n_positive == 0:
        raise ValueError("verification_roc_auc needs same-label pairs: every label occurs once, "
                         "give it at least one class with two or more items")
    if n_negative == 0:
        raise ValueError("verification_roc_auc needs different-label pairs: all items have the "
                         "same label, give it at least two classes")
    # Work on positions in label-sorted order, where every class is one contiguous run.
    order = torch.argsort(label_ids, stable=True)
    class_ends = counts.cumsum(0)
    size = counts[label_ids[order]]
    end = class_ends[label_ids[order]]
    start = end - size
    positions = torch.arange(n_items)

    if n_positive <= n_per_kind:
        positive_first, positive_second = _all_pairs_after(positions + 1, end - 1 - positions)
    else:
        # Anchor p with probability proportional to its n_c - 1 partners, then one of them
        # uniformly: every ordered same-label pair is equally likely.
        positive_first = torch.multinomial((size - 1).double(), n_per_kind, replacement=True,
                                           generator=generator)
        class_size = size[positive_first]
        step = 1 + _uniform_below(class_size - 1, generator)
        class_start = start[positive_first]
        positive_second = class_start + (positive_first - class_start + step) % class_size
    if n_negative <= n_per_kind:
        negative_first, negative_second = _all_pairs_after(end, n_items - end)
    else:
        negative_first = torch.multinomial((n_items - size).double(), n_per_kind,
                                           replacement=True, generator=generator)
        # A uniform position among the n - n_c outside the anchor's class run [start, end).
        outside = _uniform_below(n_items - size[negative_first], generator)
        negative_second = torch.where(outside < start[negative_first], outside,
                                      outside + size[negative_first])
    first = order[torch.cat([positive_first, negative_first])]
    second = order[torch.cat([positive_second, negative_second])]
    same = torch.cat([torch.ones(positive_first.numel(), dtype=torch.bool),
                      torch.zeros(negative_first.numel(), dtype=torch.bool)])
    return first, second, same


def verification_roc_auc(embeddings, labels, n_pairs=100_000, seed=0):
    """ROC-AUC of telling same-label pairs from different-label pairs by Euclidean distance.

    Takes embeddings (N, D) floating and labels (N,) integers. Pairs (i, j), i != j, are scored
    by the negative Euclidean distance (higher = same label). n_pairs // 2 same-label and
    n_pairs // 2 different-label pairs are drawn uniformly (with replacement) from a
    torch.Generator seeded with `seed`; a kind with no more than n_pairs // 2 pairs in the set is
    used whole (each unordered pair once). The pairs are drawn on the CPU from the labels alone,
    so the same seed picks the same pairs on any device. AUC by sklearn's `roc_auc_score` (equal
    scores count one half). Returns a Python float in [0, 1]: 1 when every same-label pair is
    closer than every different-label pair, 0 when every one is farther.
    Raises ValueError when there is no same-label or no different-label pair.
    """
    labels = _check_embeddings_and_labels(embeddings, labels, "")
    check_int(n_pairs, "n_pairs", 2)
    check_int(seed, "seed", 0)
    embeddings = embeddings.detach()
    squared_norms = embeddings.pow(2).sum(dim=1)
    _check_distances_fit(embeddings, squared_norms)
    generator = torch.Generator().manual_seed(seed)
    first, second, same = _verification_pairs(labels.cpu(), n_pairs // 2, generator)
    first, second = first.to(embeddings.device), second.to(embeddings.device)
    scores = []
    pair_chunk = 65536  # bounds the (pairs, D) difference buffer
    for start in range(0, first.numel(), pair_chunk):
        scores.append(-indexed_squared_distances(embeddings, first[start:start + pair_chunk],
                                                 second[start:start + pair_chunk]).sqrt())
    scores = torch.cat(scores).cpu().double().numpy()
    from sklearn.metrics import roc_auc_score  # here, not at the top: see nmi_score

    return float(roc_auc_score(same.numpy(), scores))


def _pair_similarities(embeddings, labels, n_pairs, seed):
    """``(similarity (P,), same (P,) bool)`` of seeded pairs of ``embeddings (N, D)`` drawn as
    ``verification_roc_auc`` draws them (half same-label), the similarity being ``1 / (1 + distance)``."""
    labels = _check_embeddings_and_labels(embeddings, labels, "")
    embeddings = embeddings.detach()
    first, second, same = _verification_pairs(labels.cpu(), check_int(n_pairs, "n_pairs", 2) // 2,
                                              torch.Generator().manual_seed(check_int(seed, "seed", 0)))
    first, second = first.to(embeddings.device), second.to(embeddings.device)
    return (1 / (1 + indexed_squared_distances(embeddings, first, second).sqrt())).cpu(), same


def verification_threshold(embeddings, labels, n_pairs=20_000, seed=0):
    """The same/different threshold on the similarity ``1 / (1 + distance)`` (what
    ``SiameseNetwork.embedding_similarity`` and a saved model's ``threshold`` use) that is most accurate
    on seeded pairs of ``embeddings (N, D)`` with ``labels (N,)`` (half same-label, drawn as
    ``verification_roc_auc`` draws them). Returns ``(threshold, accuracy on those pairs)`` (``best_threshold``).
    """
    return best_threshold(*_pair_similarities(embeddings, labels, n_pairs, seed))


def verification_accuracy(embeddings, labels, threshold, n_pairs=20_000, seed=0):
    """Accuracy of declaring a pair "same" when its similarity ``1 / (1 + distance)`` is at least
    ``threshold`` (e.g. a saved model's, chosen on its validation images by ``verification_threshold``), on
    seeded pairs of ``embeddings (N, D)`` with ``labels (N,)``, half of them same-label. Returns a float."""
    similarity, same = _pair_similarities(embeddings, labels, n_pairs, seed)
    return float(((similarity >= threshold) == same).double().mean())


def evaluate_embeddings(train_embeddings, train_labels, test_embeddings, test_labels, k=5,
                        seed=0):
    """Every embedding-quality metric of this module for one train/test split.

    Takes train_embeddings (N, D), train_labels (N,), test_embeddings (M, D), test_labels (M,).
    Returns a dict of Python floats, each in [0, 1]:
    'precision_at_1', 'r_precision', 'map_at_r' (`retrieval_metrics` of the test set against
    itself), 'knn_accuracy' (`knn_accuracy` of the test queries against the train gallery with
    k neighbours), 'nmi' (`nmi_score` of the test set) and 'roc_auc' (`verification_roc_auc` of
    the test set); `seed` seeds k-means and the pair sampling.
    """
    _check_embeddings_and_labels(train_embeddings, train_labels, "train")
    test_labels = _check_embeddings_and_labels(test_embeddings, test_labels, "test")
    if train_embeddings.shape[1] != test_embeddings.shape[1]:
        raise ValueError(f"train and test embeddings must have the same width D, got "
                         f"{train_embeddings.shape[1]} and {test_embeddings.shape[1]}")
    results = retrieval_metrics(test_embeddings, test_labels)
    results["knn_accuracy"] = knn_accuracy(test_embeddings, test_labels, train_embeddings,
                                           train_labels, k=k)
    results["nmi"] = nmi_score(test_embeddings, test_labels, seed=seed)
    results["roc_auc"] = verification_roc_auc(test_embeddings, test_labels, seed=seed)
    return {name: float(value) for name, value in results.items()}


# ---------------------------------------------------------------- one-shot learning

def best_threshold(scores, same):
    """The decision threshold on similarity scores that maximises verification accuracy.

    Takes scores (N,) floating (higher = more alike, e.g. SiameseNetwork.similarity) and same (N,)
    bool (True for a same-class pair). A pair is declared "same" when its score >= threshold. Every
    distinct split of the sorted scores is tried with one sort and cumulative sums: the threshold is
    the midpoint between the two scores on either side of the split, the lowest score when all pairs
    are declared same, and the next float above the highest score when none are. On equal accuracy
    the highest threshold wins.
    Returns (threshold, accuracy), two Python floats; accuracy in [0, 1].
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise TypeError("scores must be a 1-D floating tensor (N,) of similarity scores")
    same = torch.as_tensor(same, device=scores.device)
    if same.dtype != torch.bool or same.shape != scores.shape:
        raise ValueError(f"same must be a bool tensor of shape {tuple(scores.shape)} (True = same class), "
                         f"got {same.dtype} {tuple(same.shape)}")
    if scores.numel() == 0:
        raise ValueError("best_threshold needs at least one scored pair")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contains NaN or inf")
    scores = scores.detach().double()
    ordered, order = torch.sort(scores, descending=True, stable=True)
    same_sorted = same[order]
    n = scores.numel()
    n_different = n - int(same.sum())
    # Declaring the first i + 1 sorted pairs "same": true positives + the different pairs left below.
    true_positives = same_sorted.cumsum(0)
    declared = torch.arange(1, n + 1, device=scores.device)
    correct = true_positives + (n_different - (declared - true_positives))
    # Only splits between two different scores can be made by a threshold.
    valid = torch.ones(n, dtype=torch.bool, device=scores.device)
    valid[:-1] = ordered[:-1] > ordered[1:]
    correct = torch.where(valid, correct, -1)
    best = int(torch.argmax(correct))  # first maximum: the highest threshold
    if n_different >= int(correct[best]):  # declaring nothing "same" is at least as good
        return float(torch.nextafter(ordered[0], ordered.new_tensor(float("inf")))), n_different / n
    if best == n - 1:
        return float(ordered[-1]), int(correct[best]) / n
    above, below = ordered[best], ordered[best + 1]
    midpoint = (above + below) / 2
    threshold = midpoint if midpoint > below else above  # rounding may land on `below`
    return float(threshold), int(correct[best]) / n


def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)
