"""Tests for metrics.py: running metrics, embedding extraction and k-NN scoring (against a
brute-force reference)."""

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metrics import (AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, Metric,
                     extract_embeddings, knn_accuracy, knn_predict)


# ---------------------------------------------------------------- Metric protocol

def test_metric_base_class_methods_are_abstract():
    metric = Metric()
    with pytest.raises(NotImplementedError):
        metric((torch.zeros(1),), None, torch.zeros(()))
    for method in (metric.reset, metric.value, metric.name):
        with pytest.raises(NotImplementedError):
            method()


def test_accuracy_accumulates_over_batches_in_percent():
    metric = AccumulatedAccuracyMetric()
    assert metric.name() == "Accuracy"
    assert torch.isnan(torch.tensor(metric.value()))
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    first = metric((scores,), (torch.tensor([0, 1, 1]),), torch.tensor(0.5))
    assert first == pytest.approx(200 / 3)
    # scores for 3 classes, 1 of 2 correct -> 3 of 5 overall
    scores = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    second = metric((scores,), (torch.tensor([2, 1]),), torch.tensor(0.5))
    assert second == pytest.approx(60.0)
    assert metric.value() == pytest.approx(60.0)
    assert isinstance(metric.value(), float)
    metric.reset()
    assert torch.isnan(torch.tensor(metric.value()))


def test_accuracy_keeps_the_count_on_the_device_of_the_scores():
    metric = AccumulatedAccuracyMetric()
    metric((torch.tensor([[1.0, 0.0]]),), (torch.tensor([0]),), None)
    assert isinstance(metric.correct, torch.Tensor)
    assert metric.correct.device == torch.device("cpu")


def test_accuracy_ignores_extra_outputs_and_targets_and_gradients():
    metric = AccumulatedAccuracyMetric()
    scores = torch.tensor([[0.0, 3.0], [2.0, 1.0]], requires_grad=True)
    metric((scores, torch.zeros(2, 5)), (torch.tensor([1, 1]), torch.tensor([7, 7])), None)
    assert metric.value() == pytest.approx(50.0)


def test_accuracy_errors():
    metric = AccumulatedAccuracyMetric()
    with pytest.raises(TypeError, match="labels"):
        metric((torch.zeros(2, 3),), None, None)
    with pytest.raises(TypeError, match="labels"):
        metric((torch.zeros(2, 3),), (), None)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        metric((torch.zeros(2, 3),), (torch.tensor([0, 1, 2]),), None)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        metric((torch.zeros(6),), (torch.tensor([0] * 6),), None)


def test_average_nonzero_triplets_with_ints_and_tensors():
    metric = AverageNonzeroTripletsMetric()
    assert metric.name() == "Average nonzero triplets"
    assert torch.isnan(torch.tensor(metric.value()))
    assert metric(None, None, (torch.tensor(1.0), 4)) == pytest.approx(4.0)
    assert metric(None, None, (torch.tensor(1.0), torch.tensor(7))) == pytest.approx(5.5)
    assert metric(None, None, [torch.tensor(1.0), torch.tensor(0)]) == pytest.approx(11 / 3)
    assert isinstance(metric.value(), float)
    metric.reset()
    assert torch.isnan(torch.tensor(metric.value()))
    metric(None, None, (torch.tensor(0.0), 0))
    assert metric.value() == 0.0


def test_average_nonzero_triplets_needs_a_tuple_loss():
    metric = AverageNonzeroTripletsMetric()
    with pytest.raises(TypeError, match="OnlineTripletLoss"):
        metric(None, None, torch.tensor(1.0))
    with pytest.raises(TypeError, match="OnlineTripletLoss"):
        metric(None, None, (torch.tensor(1.0),))


# ---------------------------------------------------------------- extract_embeddings

class TinyEmbedder(nn.Module):
    """Embeds (B, 3) inputs into (B, 2); forward returns something else so the test can tell
    that get_embedding is the method used."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return -self.linear(x)

    def get_embedding(self, x):
        return self.dropout(self.linear(x))


def make_loader(n=10, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=generator)
    y = torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size), x, y


@pytest.mark.parametrize("was_training", [True, False])
def test_extract_embeddings_matches_get_embedding_and_restores_mode(was_training):
    torch.manual_seed(0)
    model = TinyEmbedder()
    model.train(was_training)
    loader, x, y = make_loader()
    embeddings, labels = extract_embeddings(loader, model)
    assert model.training == was_training
    # eval mode: dropout off, so the result is exactly the linear layer
    assert torch.allclose(embeddings, model.linear(x).detach())
    assert embeddings.shape == (10, 2) and embeddings.dtype == torch.float32
    assert not embeddings.requires_grad
    assert torch.equal(labels, y) and labels.dtype == torch.long


def test_extract_embeddings_restores_mode_after_an_error():
    model = TinyEmbedder().train()
    bad_loader = [(torch.zeros(2, 3), torch.zeros(3))]
    with pytest.raises(ValueError, match="one label per image"):
        extract_embeddings(bad_loader, model)
    assert model.training


def test_extract_embeddings_accepts_one_tuple_data_and_explicit_device():
    model = TinyEmbedder()
    x = torch.randn(5, 3)
    loader = [((x[:3],), torch.tensor([1, 2, 3])), ((x[3:],), [4, 5])]
    embeddings, labels = extract_embeddings(loader, model, device="cpu")
    assert torch.allclose(embeddings, model.linear(x).detach())
    assert labels.tolist() == [1, 2, 3, 4, 5]


def test_extract_embeddings_errors():
    model = TinyEmbedder()
    with pytest.raises(TypeError, match="get_embedding"):
        extract_embeddings([], nn.Linear(3, 2))
    with pytest.raises(TypeError, match="get_embedding"):
        extract_embeddings([], lambda x: x)
    with pytest.raises(ValueError, match="empty"):
        extract_embeddings([], model)
    pairs = [((torch.zeros(2, 3), torch.zeros(2, 3)), torch.tensor([1, 0]))]
    with pytest.raises(TypeError, match="pair/triplet"):
        extract_embeddings(pairs, model)


# ---------------------------------------------------------------- k-NN

def reference_knn_predict(query, gallery, gallery_labels, k, exclude_self):
    """Brute force: sort the gallery by (squared distance, index), vote over the first k labels,
    break vote ties toward the tied label met first in that order."""
    predictions = []
    gallery_rows = gallery.tolist()
    for query_index, query_row in enumerate(query.tolist()):
        candidates = []
        for gallery_index, gallery_row in enumerate(gallery_rows):
            if exclude_self and gallery_index == query_index:
                continue
            distance = sum((a - b) ** 2 for a, b in zip(query_row, gallery_row))
            candidates.append((distance, gallery_index))
        candidates.sort()
        neighbour_labels = [int(gallery_labels[index]) for _, index in candidates[:k]]
        counts = Counter(neighbour_labels)
        best = max(counts.values())
        predictions.append(next(label for label in neighbour_labels if counts[label] == best))
    return predictions


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_knn_predict_matches_brute_force_on_small_integer_grids(data):
    # Integer coordinates in a small box make exact distance ties and vote ties common, and
    # keep every distance exactly representable so the comparison is exact.
    exclude_self = data.draw(st.booleans())
    n_gallery = data.draw(st.integers(2 if exclude_self else 1, 12))
    n_query = n_gallery if exclude_self else data.draw(st.integers(1, 12))
    width = data.draw(st.integers(1, 3))
    coordinate = st.integers(-2, 2)
    gallery = torch.tensor(data.draw(st.lists(st.lists(coordinate, min_size=width,
                                                       max_size=width),
                                              min_size=n_gallery, max_size=n_gallery)),
                           dtype=torch.float32)
    query = gallery.clone() if exclude_self else torch.tensor(
        data.draw(st.lists(st.lists(coordinate, min_size=width, max_size=width),
                           min_size=n_query, max_size=n_query)), dtype=torch.float32)
    gallery_labels = torch.tensor(data.draw(st.lists(st.sampled_from([-3, 0, 5, 9]),
                                                     min_size=n_gallery, max_size=n_gallery)))
    k = data.draw(st.integers(1, n_gallery - 1 if exclude_self else n_gallery))
    chunk_size = data.draw(st.integers(1, 13))

    predictions = knn_predict(query, gallery, gallery_labels, k=k, exclude_self=exclude_self,
                              chunk_size=chunk_size)
    expected = reference_knn_predict(query, gallery, gallery_labels, k, exclude_self)
    assert predictions.tolist() == expected
    assert predictions.dtype == torch.long

    query_labels = torch.tensor(data.draw(st.lists(st.sampled_from([-3, 0, 5, 9, 11]),
                                                   min_size=n_query, max_size=n_query)))
    accuracy = knn_accuracy(query, query_labels, gallery, gallery_labels, k=k,
                            exclude_self=exclude_self, chunk_size=chunk_size)
    expected_accuracy = sum(p == t for p, t in zip(expected, query_labels.tolist())) / n_query
    assert accuracy == pytest.approx(expected_accuracy)
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_predict_matches_brute_force_on_random_floats(k, exclude_self):
    generator = torch.Generator().manual_seed(k)
    gallery = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    query = gallery if exclude_self else torch.randn(25, 4, generator=generator,
                                                     dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=generator)
    predictions = knn_predict(query, gallery, labels, k=k, exclude_self=exclude_self,
                              chunk_size=7)
    assert predictions.tolist() == reference_knn_predict(query, gallery, labels, k, exclude_self)


def test_knn_vote_ties_go_to_the_label_of_the_nearest_tied_neighbour():
    gallery = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    labels = torch.tensor([7, 3, 3, 7, 1])
    query = torch.tensor([[0.0], [2.4], [10.0]])
    # k=2: one vote each -> nearest wins: 7 for x=0, 3 for x=2.4 (neighbours 2, 3), 1 for x=10
    assert knn_predict(query, gallery, labels, k=2).tolist() == [7, 3, 1]
    # k=4 from x=0: labels 7, 3, 3, 7 -> 2-2 tie, 7 is nearest
    # from x=10: labels 1, 7, 3, 3 -> 3 has the majority although it is not nearest
    assert knn_predict(query[[0, 2]], gallery, labels, k=4).tolist() == [7, 3]


def test_knn_equal_distances_resolve_to_the_lower_gallery_index():
    gallery = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    labels = torch.tensor([4, 5, 6, 7])
    query = torch.zeros(1, 1)
    for k, expected in [(1, 4), (2, 4), (3, 4), (4, 4)]:
        assert knn_predict(query, gallery, labels, k=k).item() == expected
    # without item 0 the first of the tied neighbours is item 1
    assert knn_predict(query, gallery[1:], labels[1:], k=1).item() == 5


def test_knn_exclude_self_leaves_out_the_query_only():
    embeddings = torch.tensor([[0.0], [0.0], [10.0], [10.1]])
    labels = torch.tensor([0, 1, 2, 2])
    # item 0's duplicate (item 1) still counts; only the item itself is excluded
    assert knn_predict(embeddings, embeddings, labels, k=1, exclude_self=True).tolist() == \
        [1, 0, 2, 2]
    assert knn_predict(embeddings, embeddings, labels, k=1).tolist() == [0, 0, 2, 2]
    assert knn_accuracy(embeddings, labels, embeddings, labels, exclude_self=True) == 0.5
    assert knn_accuracy(embeddings, labels, embeddings, labels) == 0.75


def test_knn_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(1)
    gallery = torch.randn(300, 8, generator=generator)
    labels = torch.randint(0, 10, (300,), generator=generator)
    query = torch.randn(123, 8, generator=generator)
    full = knn_predict(query, gallery, labels, k=5, chunk_size=10_000)
    for chunk_size in (1, 7, 64, 123):
        assert torch.equal(knn_predict(query, gallery, labels, k=5, chunk_size=chunk_size), full)


def test_knn_accuracy_on_separated_clusters_is_perfect_and_labels_may_be_lists():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat_interleave(20)
    points = centres[labels] + 0.1 * torch.randn(60, 2, generator=generator)
    assert knn_accuracy(points, labels.tolist(), points, labels.tolist(), k=5,
                        exclude_self=True) == 1.0


def test_knn_errors():
    gallery = torch.randn(5, 3)
    labels = torch.arange(5)
    query = torch.randn(4, 3)
    query_labels = torch.arange(4)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        knn_accuracy(query, query_labels, gallery, labels, k=0)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        knn_accuracy(query, query_labels, gallery, labels, k=6)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        knn_accuracy(gallery, labels, gallery, labels, k=5, exclude_self=True)
    with pytest.raises(TypeError, match="k must be an int"):
        knn_accuracy(query, query_labels, gallery, labels, k=True)
    with pytest.raises(TypeError, match="k must be an int"):
        knn_accuracy(query, query_labels, gallery, labels, k=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_accuracy(query, query_labels, gallery, labels, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        knn_accuracy(query, query_labels, gallery, labels, chunk_size=2.5)
    with pytest.raises(ValueError, match="exclude_self"):
        knn_accuracy(query, query_labels, gallery, labels, exclude_self=True)
    with pytest.raises(ValueError, match="same width"):
        knn_accuracy(torch.randn(4, 2), query_labels, gallery, labels)
    with pytest.raises(TypeError, match="query_embeddings"):
        knn_accuracy(torch.randint(0, 3, (4, 3)), query_labels, gallery, labels)
    with pytest.raises(TypeError, match="gallery_embeddings"):
        knn_accuracy(query, query_labels, torch.randn(5), labels)
    with pytest.raises(TypeError, match="gallery_embeddings"):
        knn_predict(query, [[0.0, 1.0, 2.0]], [0])
    with pytest.raises(ValueError, match="gallery_labels must have shape"):
        knn_accuracy(query, query_labels, gallery, torch.arange(4))
    with pytest.raises(ValueError, match="query_labels must have shape"):
        knn_accuracy(query, torch.arange(5), gallery, labels)
    with pytest.raises(TypeError, match="query_labels must be integers"):
        knn_accuracy(query, query_labels.float(), gallery, labels)
    with pytest.raises(TypeError, match="gallery_labels must be integers"):
        knn_accuracy(query, query_labels, gallery, labels.float())
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), gallery, labels)
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(query, query_labels, gallery.index_fill(0, torch.tensor([1]), float("nan")),
                     labels)
    with pytest.raises(ValueError, match="NaN"):
        knn_predict(query.index_fill(0, torch.tensor([0]), float("inf")), gallery, labels)
