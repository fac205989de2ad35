"""Tests for metrics.py: running metrics, embedding extraction, k-NN scoring, and the embedding-quality
metrics (retrieval_metrics: precision@1, R-precision, MAP@R; nmi_score, verification_roc_auc,
evaluate_embeddings), each against a brute-force loop reference or hand-computed values.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import metrics
from metrics import (AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, Metric, _verification_pairs, best_threshold,
                     evaluate_embeddings, extract_embeddings, knn_accuracy, knn_predict, nmi_score, retrieval_metrics,
                     verification_roc_auc)


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


def squared_distance(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def reference_retrieval_metrics(embeddings, labels):
    """Loop over queries: rank every other item by (squared distance, index), read the relevance
    of the first R, and average over the queries with R >= 1. None when there is no such query."""
    rows, labels = embeddings.tolist(), [int(label) for label in labels]
    precision_at_1, r_precision, map_at_r = [], [], []
    for query, query_row in enumerate(rows):
        others = [item for item in range(len(rows)) if item != query]
        n_relevant = sum(1 for item in others if labels[item] == labels[query])
        if n_relevant == 0:
            continue
        ranking = sorted((squared_distance(query_row, rows[item]), item) for item in others)
        relevance = [labels[item] == labels[query] for _, item in ranking[:n_relevant]]
        precision_at_1.append(1.0 if relevance[0] else 0.0)
        r_precision.append(sum(relevance) / n_relevant)
        hits, total = 0, 0.0
        for position, is_relevant in enumerate(relevance, start=1):
            if is_relevant:
                hits += 1
                total += hits / position
        map_at_r.append(total / n_relevant)
    if not precision_at_1:
        return None
    return {"precision_at_1": sum(precision_at_1) / len(precision_at_1),
            "r_precision": sum(r_precision) / len(r_precision),
            "map_at_r": sum(map_at_r) / len(map_at_r)}


def assert_same_metrics(result, expected):
    assert set(result) == {"precision_at_1", "r_precision", "map_at_r"}
    for name, value in expected.items():
        assert isinstance(result[name], float)
        assert result[name] == pytest.approx(value, abs=1e-12), name


def reference_all_pairs(labels):
    """Every unordered pair i < j, split into same-label and different-label lists."""
    labels = [int(label) for label in labels]
    same, different = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            (same if labels[i] == labels[j] else different).append((i, j))
    return same, different


def reference_roc_auc(embeddings, labels):
    """AUC over all pairs by counting: P(score of a same pair > score of a different pair),
    ties counting one half; score = -Euclidean distance."""
    rows = embeddings.tolist()
    same, different = reference_all_pairs(labels)
    same_scores = [-math.sqrt(squared_distance(rows[i], rows[j])) for i, j in same]
    different_scores = [-math.sqrt(squared_distance(rows[i], rows[j])) for i, j in different]
    wins = 0.0
    for positive in same_scores:
        for negative in different_scores:
            wins += 1.0 if positive > negative else 0.5 if positive == negative else 0.0
    return wins / (len(same_scores) * len(different_scores))


def separated_clusters(n_classes, n_per_class, seed, dim=2, spread=0.1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    centres = 10.0 * torch.randn(n_classes, dim, generator=generator, dtype=torch.float64)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator,
                                                    dtype=torch.float64)
    return points, labels


def noisy_classes(n_items, n_classes, seed, dim=8):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n_items,), generator=generator)
    centres = torch.randn(n_classes, dim, generator=generator, dtype=torch.float64)
    points = centres[labels] + torch.randn(n_items, dim, generator=generator, dtype=torch.float64)
    return points, labels


# ---------------------------------------------------------------- retrieval_metrics

def test_retrieval_metrics_on_a_hand_computed_example():
    # x:      0  1  2  3  6  10      labels A=0 (items 0, 2, 3, 4), B=1 (item 1), C=2 (item 5)
    # B and C are singletons (R = 0): left out. For A, R = 3.
    # query 0 (x=0): neighbours 1(d1,B) 2(d2,A) 3(d3,A)        -> rel 0 1 1
    #   P@1 0, R-precision 2/3, MAP@R (1/2 + 2/3) / 3 = 7/18
    # query 2 (x=2): 1(d1,B) and 3(d1,A) tie -> lower index 1 first, then 0(d2,A) -> rel 0 1 1
    #   P@1 0, R-precision 2/3, MAP@R 7/18   (the other tie order would give 5/9)
    # query 3 (x=3): 2(d1,A) 1(d2,B) then 0 and 4 tie at d3 -> 0(A)   -> rel 1 0 1
    #   P@1 1, R-precision 2/3, MAP@R (1 + 2/3) / 3 = 5/9
    # query 4 (x=6): 3(d3,A) then 2(A) and 5(C) tie at d4 -> 2 first   -> rel 1 1 0
    #   P@1 1, R-precision 2/3, MAP@R (1 + 1) / 3 = 2/3
    # means over 4 queries: P@1 1/2, R-precision 2/3, MAP@R (7+7+10+12)/18/4 = 1/2
    embeddings = torch.tensor([[0.0], [1.0], [2.0], [3.0], [6.0], [10.0]])
    labels = torch.tensor([0, 1, 0, 0, 0, 2])
    expected = {"precision_at_1": 0.5, "r_precision": 2 / 3, "map_at_r": 0.5}
    for chunk_size in (1, 2, 4, 1024):
        assert_same_metrics(retrieval_metrics(embeddings, labels, chunk_size=chunk_size),
                            expected)
    assert_same_metrics(retrieval_metrics(embeddings.double(), labels.tolist()), expected)
    assert reference_retrieval_metrics(embeddings, labels) == pytest.approx(expected)


def test_retrieval_metrics_map_at_r_depends_on_where_the_relevant_items_rank():
    # x: 0 1 3 5 8, labels 7 7 -1 7 7: class 7 has 4 items (R = 3), item 2 is a singleton.
    # query 0 (x=0): 1(d1) 2(d3,other) 3(d5)  -> rel 1 0 1: P@1 1, R-prec 2/3, MAP (1 + 2/3)/3 = 5/9
    # query 1 (x=1): 0(d1) 2(d2,other) 3(d4)  -> rel 1 0 1: 1, 2/3, 5/9
    # query 3 (x=5): 2(d2,other) 4(d3) 1(d4)  -> rel 0 1 1: 0, 2/3, (1/2 + 2/3)/3 = 7/18
    # query 4 (x=8): 3(d3) 2(d5,other) 1(d7)  -> rel 1 0 1: 1, 2/3, 5/9
    # R-precision cannot tell these orders apart; MAP@R can: (3 * 5/9 + 7/18) / 4 = 37/72.
    embeddings = torch.tensor([[0.0], [1.0], [3.0], [5.0], [8.0]], dtype=torch.float64)
    labels = torch.tensor([7, 7, -1, 7, 7])
    expected = {"precision_at_1": 3 / 4, "r_precision": 2 / 3, "map_at_r": 37 / 72}
    assert_same_metrics(retrieval_metrics(embeddings, labels), expected)
    assert reference_retrieval_metrics(embeddings, labels) == pytest.approx(expected)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_retrieval_metrics_match_brute_force_on_small_integer_grids(data):
    # Integer coordinates in a small box give many exact distance ties (also across the R
    # boundary, where topk alone would pick arbitrarily) and exactly representable distances;
    # the label alphabet makes singleton classes common.
    n_items = data.draw(st.integers(1, 14))
    width = data.draw(st.integers(1, 3))
    coordinate = st.integers(-2, 2)
    embeddings = torch.tensor(data.draw(st.lists(st.lists(coordinate, min_size=width,
                                                          max_size=width),
                                                 min_size=n_items, max_size=n_items)),
                              dtype=data.draw(st.sampled_from([torch.float32, torch.float64])))
    labels = torch.tensor(data.draw(st.lists(st.sampled_from([-3, 0, 5, 9, 100]),
                                             min_size=n_items, max_size=n_items)))
    chunk_size = data.draw(st.integers(1, 15))
    expected = reference_retrieval_metrics(embeddings, labels)
    if expected is None:
        with pytest.raises(ValueError, match="occurs at least twice"):
            retrieval_metrics(embeddings, labels, chunk_size=chunk_size)
    else:
        assert_same_metrics(retrieval_metrics(embeddings, labels, chunk_size=chunk_size),
                            expected)


@pytest.mark.parametrize("seed", range(6))
def test_retrieval_metrics_match_brute_force_on_random_floats(seed):
    generator = torch.Generator().manual_seed(seed)
    n_items, dim = 45, (2, 8)[seed % 2]
    embeddings = torch.randn(n_items, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 6, (n_items,), generator=generator)
    labels[:3] = torch.tensor([10, 11, 12])  # singleton classes
    assert_same_metrics(retrieval_metrics(embeddings, labels, chunk_size=8),
                        reference_retrieval_metrics(embeddings, labels))


def test_retrieval_metrics_break_ties_by_index_when_every_point_coincides():
    # All distances are 0: the ranking is pure index order, for every R and every chunk.
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (60,), generator=generator)
    embeddings = torch.zeros(60, 3)
    expected = reference_retrieval_metrics(embeddings, labels)
    for chunk_size in (1, 7, 60):
        assert_same_metrics(retrieval_metrics(embeddings, labels, chunk_size=chunk_size),
                            expected)


def test_retrieval_metrics_match_brute_force_on_a_larger_tie_heavy_grid():
    generator = torch.Generator().manual_seed(4)
    embeddings = torch.randint(-3, 4, (160, 2), generator=generator).float()
    labels = torch.randint(0, 6, (160,), generator=generator)
    labels[::37] = torch.arange(100, 100 + len(labels[::37]))  # a few singletons
    assert_same_metrics(retrieval_metrics(embeddings, labels, chunk_size=16),
                        reference_retrieval_metrics(embeddings, labels))


def test_retrieval_metrics_chunking_does_not_change_the_result():
    embeddings, labels = noisy_classes(157, 9, seed=5)
    labels[:2] = torch.tensor([50, 51])
    full = retrieval_metrics(embeddings, labels, chunk_size=10_000)
    for chunk_size in (1, 3, 64, 156, 157):
        assert retrieval_metrics(embeddings, labels, chunk_size=chunk_size) == full
    grid = torch.randint(-2, 3, (90, 2), generator=torch.Generator().manual_seed(6)).double()
    grid_labels = torch.arange(90) % 4
    full = retrieval_metrics(grid, grid_labels, chunk_size=90)
    for chunk_size in (1, 5, 89):
        assert retrieval_metrics(grid, grid_labels, chunk_size=chunk_size) == full


def test_retrieval_metrics_select_only_max_r_neighbours_per_chunk(monkeypatch):
    # Memory: each step sees a (chunk, N) distance block and asks for k = the chunk's max R,
    # not for all N - 1 neighbours; singleton queries are never processed.
    calls = []
    original = metrics.smallest_k

    def recording(distances, k):
        calls.append((tuple(distances.shape), k))
        return original(distances, k)

    monkeypatch.setattr(metrics, "smallest_k", recording)
    labels = torch.cat([torch.arange(4).repeat_interleave(10), torch.tensor([7, 8])])
    embeddings, _ = noisy_classes(42, 1, seed=7)
    retrieval_metrics(embeddings, labels, chunk_size=16)
    assert calls == [((16, 42), 9), ((16, 42), 9), ((8, 42), 9)]


def test_retrieval_metrics_are_perfect_on_separated_clusters_and_accept_any_labels():
    embeddings, labels = separated_clusters(5, 12, seed=8)
    odd_labels = (labels * 1000 - 2500).tolist()  # negative and large values, as a list
    result = retrieval_metrics(embeddings.float(), odd_labels, chunk_size=7)
    assert result == {"precision_at_1": 1.0, "r_precision": 1.0, "map_at_r": 1.0}


def test_retrieval_metrics_errors():
    embeddings = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="occurs at least twice"):
        retrieval_metrics(embeddings, torch.arange(6))
    with pytest.raises(ValueError, match="occurs at least twice"):
        retrieval_metrics(embeddings[:1], labels[:1])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        retrieval_metrics(embeddings, labels, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        retrieval_metrics(embeddings, labels, chunk_size=2.5)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        retrieval_metrics(embeddings, labels, chunk_size=True)
    with pytest.raises(TypeError, match=r"embeddings must be a 2-D floating tensor \(N, D\)"):
        retrieval_metrics(torch.randn(6), labels)
    with pytest.raises(TypeError, match="embeddings must be a 2-D floating tensor"):
        retrieval_metrics(torch.randint(0, 3, (6, 3)), labels)
    with pytest.raises(TypeError, match="embeddings must be a 2-D floating tensor"):
        retrieval_metrics(embeddings.tolist(), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        retrieval_metrics(embeddings, labels[:5])
    with pytest.raises(TypeError, match="labels must be integers"):
        retrieval_metrics(embeddings, labels.float())
    with pytest.raises(ValueError, match="embeddings is empty"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or inf"):
        retrieval_metrics(embeddings.index_fill(0, torch.tensor([2]), float("nan")), labels)
    with pytest.raises(ValueError, match="too large.*float64"):
        retrieval_metrics(embeddings * 1e19, labels)


# ---------------------------------------------------------------- nmi_score

def test_nmi_is_one_for_a_perfect_clustering():
    embeddings, labels = separated_clusters(4, 15, seed=9)
    assert nmi_score(embeddings, labels) == pytest.approx(1.0)
    assert nmi_score(embeddings.float(), labels.tolist(), seed=3, n_init=2) == pytest.approx(1.0)


def test_nmi_is_invariant_to_renaming_the_labels():
    embeddings, labels = noisy_classes(120, 5, seed=10, dim=4)
    renamed = torch.tensor([40, -2, 7, 3, 11])[labels]
    score = nmi_score(embeddings, labels)
    assert 0.0 < score < 1.0
    assert nmi_score(embeddings, renamed) == pytest.approx(score, abs=1e-12)
    assert nmi_score(embeddings, labels) == score  # same seed, same clustering


def test_nmi_with_more_clusters_than_classes():
    # 4 tight clusters, labelled 2 classes (2 clusters each): with n_clusters=4 the clustering
    # refines the classes, so I = H(labels) = ln 2, H(clusters) = ln 4 and
    # NMI = ln 2 / ((ln 2 + ln 4) / 2) = 2/3.
    embeddings, cluster_ids = separated_clusters(4, 10, seed=11)
    labels = cluster_ids // 2
    assert nmi_score(embeddings, labels, n_clusters=4) == pytest.approx(2 / 3)


def test_nmi_errors():
    embeddings, labels = separated_clusters(2, 3, seed=12)
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        nmi_score(embeddings, labels, n_clusters=0)
    with pytest.raises(ValueError, match="n_clusters must be at most the number of embeddings"):
        nmi_score(embeddings, labels, n_clusters=7)
    with pytest.raises(TypeError, match="n_clusters must be an int"):
        nmi_score(embeddings, labels, n_clusters=2.0)
    with pytest.raises(TypeError, match="n_clusters must be an int"):
        nmi_score(embeddings, labels, n_clusters=True)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        nmi_score(embeddings, labels, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        nmi_score(embeddings, labels, seed="0")
    with pytest.raises(ValueError, match="n_init must be >= 1"):
        nmi_score(embeddings, labels, n_init=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        nmi_score(embeddings, labels[:4])
    with pytest.raises(ValueError, match="NaN or inf"):
        nmi_score(embeddings.index_fill(0, torch.tensor([0]), float("inf")), labels)


# ---------------------------------------------------------------- verification_roc_auc

def test_roc_auc_is_one_for_perfect_separation_with_all_pairs_and_with_sampled_pairs():
    embeddings, labels = separated_clusters(3, 20, seed=13)
    assert verification_roc_auc(embeddings, labels) == 1.0  # 570 + 1200 pairs: all used
    assert verification_roc_auc(embeddings, labels, n_pairs=100) == 1.0  # sampled


def test_roc_auc_is_zero_when_same_label_pairs_are_farthest():
    # Unit square with the diagonals labelled alike: same-label pairs at sqrt 2, the others at 1.
    square = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert verification_roc_auc(square, labels) == 0.0
    assert verification_roc_auc(square, labels, n_pairs=2, seed=5) == 0.0  # 1 + 1 sampled
    # The same with 10 classes: 20 points evenly on the unit circle, antipodes labelled alike,
    # so every same-label pair is at distance 2 and every other pair closer (at most 1.976).
    # n_pairs=20: the 10 same-label pairs all used, 10 of the 180 others sampled.
    angles = torch.arange(20, dtype=torch.float64) * (2 * math.pi / 20)
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert verification_roc_auc(circle, torch.arange(20) % 10, n_pairs=20) == 0.0


@pytest.mark.parametrize("grid", [False, True])
def test_roc_auc_over_all_pairs_matches_brute_force(grid):
    generator = torch.Generator().manual_seed(14)
    if grid:  # many equal scores: ties count one half
        embeddings = torch.randint(-2, 3, (30, 2), generator=generator).double()
    else:
        embeddings = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,), generator=generator)
    assert verification_roc_auc(embeddings, labels) == \
        pytest.approx(reference_roc_auc(embeddings, labels), abs=1e-12)


def test_roc_auc_is_reproducible_with_the_seed_and_close_to_the_all_pairs_value():
    embeddings, labels = noisy_classes(400, 4, seed=15, dim=3)
    all_pairs = verification_roc_auc(embeddings, labels, n_pairs=200_000)  # 79,800 pairs: all
    sampled = verification_roc_auc(embeddings, labels, n_pairs=2000, seed=1)
    assert verification_roc_auc(embeddings, labels, n_pairs=2000, seed=1) == sampled
    assert verification_roc_auc(embeddings, labels, n_pairs=2000, seed=2) != sampled
    assert sampled == pytest.approx(all_pairs, abs=0.05)
    assert 0.5 < all_pairs < 1.0


def test_verification_pairs_use_every_pair_once_when_there_are_few():
    labels = torch.tensor([3, 1, 3, 3, 1, 8, 1])
    same, different = reference_all_pairs(labels)
    first, second, is_same = _verification_pairs(labels, 100, torch.Generator().manual_seed(0))
    pairs = {tuple(sorted(pair)) for pair in zip(first.tolist(), second.tolist())}
    assert len(pairs) == len(first) == len(same) + len(different)
    assert pairs == set(same) | set(different)
    for i, j, flag in zip(first.tolist(), second.tolist(), is_same.tolist()):
        assert flag == (labels[i] == labels[j])


def test_verification_pairs_mix_all_positives_with_sampled_negatives():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # 4 same-label pairs, 24 different
    first, second, is_same = _verification_pairs(labels, 7, torch.Generator().manual_seed(1))
    assert is_same.tolist() == [True] * 4 + [False] * 7
    assert {(i, j) for i, j in zip(first[:4].tolist(), second[:4].tolist())} == \
        set(reference_all_pairs(labels)[0])
    assert (labels[first[4:]] != labels[second[4:]]).all()


def test_verification_pairs_are_drawn_uniformly():
    # Classes of 10 and 20 items: 45 + 190 same-label pairs, 200 different-label pairs. Drawing
    # a class first would favour the small class's pairs 4x; uniform draws hit every pair equally.
    labels = torch.tensor([1] * 10 + [0] * 20)[torch.randperm(30, generator=torch.Generator()
                                                               .manual_seed(2))]
    generator = torch.Generator().manual_seed(3)
    same_counts, different_counts = Counter(), Counter()
    for _ in range(200):
        first, second, is_same = _verification_pairs(labels, 199, generator)
        assert (first != second).all()
        assert torch.equal(labels[first] == labels[second], is_same)
        assert is_same.sum() == 199 and (~is_same).sum() == 199
        for i, j, flag in zip(first.tolist(), second.tolist(), is_same.tolist()):
            (same_counts if flag else different_counts)[(min(i, j), max(i, j))] += 1
    for counts, n_pairs in ((same_counts, 235), (different_counts, 200)):
        assert len(counts) == n_pairs
        expected = 200 * 199 / n_pairs
        assert all(0.7 * expected < count < 1.3 * expected for count in counts.values())


def test_roc_auc_draws_half_of_an_odd_n_pairs_of_each_kind():
    embeddings, labels = noisy_classes(50, 2, seed=16)
    first, second, is_same = _verification_pairs(labels, 7 // 2,
                                                 torch.Generator().manual_seed(0))
    assert is_same.tolist() == [True] * 3 + [False] * 3
    assert 0.0 <= verification_roc_auc(embeddings, labels, n_pairs=7) <= 1.0


def test_roc_auc_errors():
    embeddings = torch.randn(6, 2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="needs same-label pairs"):
        verification_roc_auc(embeddings, torch.arange(6))
    with pytest.raises(ValueError, match="needs different-label pairs"):
        verification_roc_auc(embeddings, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="needs same-label pairs"):
        verification_roc_auc(embeddings[:1], labels[:1])
    with pytest.raises(ValueError, match="n_pairs must be >= 2"):
        verification_roc_auc(embeddings, labels, n_pairs=1)
    with pytest.raises(TypeError, match="n_pairs must be an int"):
        verification_roc_auc(embeddings, labels, n_pairs=1e5)
    with pytest.raises(TypeError, match="n_pairs must be an int"):
        verification_roc_auc(embeddings, labels, n_pairs=True)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        verification_roc_auc(embeddings, labels, seed=-3)
    with pytest.raises(TypeError, match="seed must be an int"):
        verification_roc_auc(embeddings, labels, seed=None)
    with pytest.raises(TypeError, match="labels must be integers"):
        verification_roc_auc(embeddings, labels.double())
    with pytest.raises(ValueError, match="too large.*float64"):
        verification_roc_auc(embeddings * 1e20, labels)


# ---------------------------------------------------------------- evaluate_embeddings

def test_evaluate_embeddings_gathers_every_metric_as_floats():
    train, train_labels = noisy_classes(150, 5, seed=17, dim=4)
    test, test_labels = noisy_classes(60, 5, seed=17, dim=4)  # same centres, other noise draw
    test = test.float()
    result = evaluate_embeddings(train.float(), train_labels, test, test_labels, k=3, seed=4)
    assert list(result) == ["precision_at_1", "r_precision", "map_at_r", "knn_accuracy", "nmi",
                            "roc_auc"]
    assert all(type(value) is float and 0.0 <= value <= 1.0 for value in result.values())
    expected = dict(retrieval_metrics(test, test_labels))
    expected["knn_accuracy"] = knn_accuracy(test, test_labels, train.float(), train_labels, k=3)
    expected["nmi"] = nmi_score(test, test_labels, seed=4)
    expected["roc_auc"] = verification_roc_auc(test, test_labels, seed=4)
    assert result == expected


def test_evaluate_embeddings_on_separated_clusters_is_perfect():
    train, train_labels = separated_clusters(4, 20, seed=18)
    generator = torch.Generator().manual_seed(19)
    test = train[::2] + 0.01 * torch.randn(40, 2, generator=generator, dtype=torch.float64)
    result = evaluate_embeddings(train, train_labels.tolist(), test, train_labels[::2])
    assert result == pytest.approx({name: 1.0 for name in result})
    # embeddings straight from a model (requiring grad) are evaluated the same way
    assert evaluate_embeddings(train.requires_grad_(), train_labels, test.requires_grad_(),
                               train_labels[::2]) == result


def test_evaluate_embeddings_errors():
    train, train_labels = noisy_classes(20, 2, seed=20)
    test, test_labels = noisy_classes(10, 2, seed=21)
    with pytest.raises(ValueError, match="same width"):
        evaluate_embeddings(train, train_labels, test[:, :3], test_labels)
    with pytest.raises(ValueError, match=r"train_labels must have shape \(20,\)"):
        evaluate_embeddings(train, train_labels[:5], test, test_labels)
    with pytest.raises(TypeError, match="test_embeddings must be a 2-D floating tensor"):
        evaluate_embeddings(train, train_labels, test.long(), test_labels)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        evaluate_embeddings(train, train_labels, test, test_labels, k=21)
    with pytest.raises(ValueError, match="occurs at least twice"):
        evaluate_embeddings(train, train_labels, test, torch.arange(10))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        evaluate_embeddings(train, train_labels, test, test_labels, seed=-1)


# ------------------------------------------------------------------------------- best_threshold

def brute_force_threshold_accuracy(scores, same):
    candidates = sorted(set(scores.tolist())) + [math.inf]
    return max(sum((s >= t) == y for s, y in zip(scores.tolist(), same.tolist())) for t in candidates) / len(scores)


def accuracy_at(scores, same, threshold):
    return float(((scores.double() >= threshold) == same).double().mean())


@pytest.mark.parametrize("seed", range(30))
def test_best_threshold_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 60, (), generator=generator))
    same = torch.rand(n, generator=generator) < 0.5
    # coarse scores give many ties; same pairs score higher on average
    scores = (torch.rand(n, generator=generator) * 8 + same * 3).floor() / 12
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == pytest.approx(brute_force_threshold_accuracy(scores, same))
    assert accuracy_at(scores, same, threshold) == pytest.approx(accuracy)


def test_best_threshold_midpoints_and_extremes():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1])
    assert best_threshold(scores, torch.tensor([True, True, False, False])) == (pytest.approx(0.55), 1.0)
    threshold, accuracy = best_threshold(scores, torch.tensor([True, True, True, True]))
    assert accuracy == 1.0 and threshold == pytest.approx(0.1)
    threshold, accuracy = best_threshold(scores, torch.tensor([False, False, False, False]))
    assert accuracy == 1.0 and threshold > float(scores[0]) and threshold == pytest.approx(0.9)
    threshold, accuracy = best_threshold(torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert accuracy == 0.5 and threshold > 0.5  # on a tie, the higher threshold
    adjacent = torch.tensor([1.0, float(np.nextafter(np.float64(1.0), 0))], dtype=torch.float64)
    threshold, accuracy = best_threshold(adjacent, torch.tensor([True, False]))
    assert accuracy == 1.0 and accuracy_at(adjacent, torch.tensor([True, False]), threshold) == 1.0


def test_best_threshold_errors():
    with pytest.raises(TypeError, match="floating"):
        best_threshold(torch.tensor([1, 2]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        best_threshold(torch.tensor([0.1, 0.2]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        best_threshold(torch.tensor([0.1, 0.2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="at least one"):
        best_threshold(torch.tensor([]), torch.tensor([], dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        best_threshold(torch.tensor([0.1, float("nan")]), torch.tensor([True, False]))
