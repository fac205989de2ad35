"""Metrics for training and evaluating embedding networks.

Two kinds live here:

- Running metrics that `trainer.fit` feeds batch by batch (the classic `Metric` protocol:
  `metric(outputs, target, loss_outputs)`, `reset()`, `value()`, `name()`):
  `AccumulatedAccuracyMetric` and `AverageNonzeroTripletsMetric`.
- Evaluation functions for a trained embedding: `extract_embeddings` turns a loader into an
  (N, D) embedding matrix with (N,) labels, and `knn_predict` / `knn_accuracy` score it by
  nearest-neighbour classification. Further evaluation metrics (recall@k, mAP, ...) belong here too.
"""

import torch
from torch import nn


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


class AccumulatedAccuracyMetric(Metric):
    """Classification accuracy in percent, accumulated over an epoch.

    The prediction is argmax(outputs[0], dim=1) for scores outputs[0] of shape (B, C); the truth
    is target[0] of shape (B,). The correct count stays a tensor on the device of the scores, so
    a batch costs no host transfer beyond the scalar that `value()` reads.
    `value()` is NaN before the first batch.
    """

    def __init__(self):
        self.correct = 0
        self.total = 0

    def __call__(self, outputs, target, loss):
        if target is None or len(target) == 0:
            raise TypeError("AccumulatedAccuracyMetric needs class labels: use a dataset that "
                            "yields (data, labels)")
        scores = outputs[0]
        labels = target[0]
        if scores.dim() != 2 or labels.shape != scores.shape[:1]:
            raise ValueError(f"AccumulatedAccuracyMetric expects scores (B, C) and labels (B,), "
                             f"got {tuple(scores.shape)} and {tuple(labels.shape)}")
        predictions = scores.detach().argmax(dim=1)
        self.correct = self.correct + (predictions == labels.to(predictions.device)).sum()
        self.total += labels.numel()
        return self.value()

    def reset(self):
        self.correct = 0
        self.total = 0

    def value(self):
        if self.total == 0:
            return float("nan")
        return 100.0 * float(self.correct) / self.total

    def name(self):
        return "Accuracy"


class AverageNonzeroTripletsMetric(Metric):
    """Mean, over the batches of an epoch, of the number of triplets with a non-zero loss.

    Reads loss[1] from a loss that returns (loss, n_triplets), such as `OnlineTripletLoss`;
    n_triplets may be a Python int or a 0-d tensor (kept on its device until `value()`).
    `value()` is NaN before the first batch.
    """

    def __init__(self):
        self.sum = 0
        self.count = 0

    def __call__(self, outputs, target, loss):
        if not isinstance(loss, (tuple, list)) or len(loss) < 2:
            raise TypeError("AverageNonzeroTripletsMetric needs a loss that returns "
                            "(loss, n_triplets), e.g. OnlineTripletLoss")
        n_triplets = loss[1]
        if isinstance(n_triplets, torch.Tensor):
            n_triplets = n_triplets.detach()
        self.sum = self.sum + n_triplets
        self.count += 1
        return self.value()

    def reset(self):
        self.sum = 0
        self.count = 0

    def value(self):
        if self.count == 0:
            return float("nan")
        return float(self.sum) / self.count

    def name(self):
        return "Average nonzero triplets"


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
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 \
            or not embeddings.is_floating_point():
        raise TypeError(f"{what}_embeddings must be a 2-D floating tensor (N, D)")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{what}_labels must have shape ({embeddings.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{what}_labels must be integers")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{what}_embeddings is empty")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{what}_embeddings contains NaN or inf")
    return labels


def _nearest_neighbours(distances, k):
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
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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
        # |q|^2 + |g|^2 - 2 q.g with one fused matmul and in-place updates: the (C, G) matrix
        # is the memory traffic that dominates, so it is written as few times as possible.
        distances = torch.addmm(gallery_squared_norms, queries, gallery_embeddings.T, alpha=-2.0)
        distances.add_(queries.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)
        if exclude_self:
            rows = torch.arange(queries.shape[0], device=device)
            distances[rows, rows + start] = float("inf")
        neighbour_ids = gallery_label_ids[_nearest_neighbours(distances, k)]  # (C, k) nearest 1st
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
