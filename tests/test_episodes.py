"""Tests for episodes.py: the N-way K-shot episode sampler (shapes, groups, reproducibility, uniformity,
errors) and scorer (against a brute-force loop, both rules), few_shot_accuracy and n_way_k_shot_accuracy."""

import math

import pytest
import torch
from torch import nn

from datasets import InMemoryDataset
from episodes import episode_accuracies, few_shot_accuracy, n_way_k_shot_accuracy, sample_episodes


def grouped_labels():
    """60 items: 12 classes of 5 items, shuffled; group = class // 4 (3 groups of 4 classes)."""
    labels = torch.arange(12).repeat_interleave(5)
    labels = labels[torch.randperm(60, generator=torch.Generator().manual_seed(1))]
    return labels, labels // 4


@pytest.mark.parametrize("n_way, k_shot, n_query", [(2, 1, 1), (4, 2, 3), (12, 1, 4), (3, 4, 1)])
def test_episodes_have_the_asked_shape_and_disjoint_support_and_query(n_way, k_shot, n_query):
    labels, _ = grouped_labels()
    support, query = sample_episodes(labels, n_way, k_shot, n_query, 50, seed=3)
    assert support.shape == (50, n_way, k_shot) and query.shape == (50, n_way, n_query)
    for episode in range(50):
        items = torch.cat([support[episode], query[episode]], dim=1)  # (n_way, k_shot + n_query)
        assert len(items.flatten().unique()) == items.numel()  # no item twice: support and query disjoint
        row_labels = labels[items]
        assert torch.all(row_labels == row_labels[:, :1])  # one class per row
        assert len(row_labels[:, 0].unique()) == n_way  # n_way distinct classes


def test_within_group_episodes_draw_one_group_and_every_group():
    labels, groups = grouped_labels()
    support, query = sample_episodes(labels, 3, 1, 2, 300, groups=groups, seed=0)
    episode_groups = groups[torch.cat([support, query], dim=2).flatten(1)]
    assert torch.all(episode_groups == episode_groups[:, :1])
    assert set(episode_groups[:, 0].tolist()) == {0, 1, 2}


def test_groups_too_small_for_n_way_are_skipped_and_all_too_small_raises():
    labels = torch.arange(7).repeat_interleave(3)
    groups = torch.tensor([0] * 15 + [1] * 6)  # group 0: classes 0-4, group 1: classes 5, 6
    support, _ = sample_episodes(labels, 5, 1, 1, 100, groups=groups, seed=0)
    assert torch.all(groups[support.flatten()] == 0)
    with pytest.raises(ValueError, match="6-way episodes need 6 classes"):
        sample_episodes(labels, 6, 1, 1, 10, groups=groups)
    with pytest.raises(ValueError, match=">= 4 items"):
        sample_episodes(labels, 2, 2, 2, 10)


def test_classes_with_too_few_items_are_never_drawn():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 2 + [3] * 5)
    support, query = sample_episodes(labels, 3, 2, 1, 200, seed=0)
    assert 2 not in labels[torch.cat([support, query], 2)].unique().tolist()


def test_episodes_are_reproducible_and_seed_dependent():
    labels, groups = grouped_labels()
    first = sample_episodes(labels, 3, 2, 1, 40, groups=groups, seed=7)
    again = sample_episodes(labels, 3, 2, 1, 40, groups=groups, seed=7)
    other = sample_episodes(labels, 3, 2, 1, 40, groups=groups, seed=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_episodes_cover_classes_and_items_evenly():
    labels = torch.arange(4).repeat_interleave(3)
    support, query = sample_episodes(labels, 2, 1, 1, 6000, seed=0)
    class_counts = torch.bincount(labels[support[:, :, 0]].flatten(), minlength=4).double()
    assert torch.allclose(class_counts / class_counts.sum(), torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)
    item_counts = torch.bincount(support.flatten(), minlength=12).double()
    assert torch.allclose(item_counts / item_counts.sum(), torch.full((12,), 1 / 12, dtype=torch.float64), atol=0.01)


def test_large_classes_are_sampled_in_chunks():
    labels = torch.arange(5).repeat_interleave(20000)
    support, query = sample_episodes(labels, 5, 1, 1, 100, seed=0)
    assert support.shape == (100, 5, 1) and torch.all(labels[support[:, :, 0]] == labels[query[:, :, 0]])


def test_episode_argument_errors():
    labels, _ = grouped_labels()
    with pytest.raises(ValueError, match="n_way must be >= 2"):
        sample_episodes(labels, 1, 1, 1, 10)
    with pytest.raises(TypeError, match="k_shot must be an int"):
        sample_episodes(labels, 2, 1.0, 1, 10)
    with pytest.raises(TypeError, match="labels"):
        sample_episodes(labels.float(), 2, 1, 1, 10)
    with pytest.raises(ValueError, match="one group"):
        sample_episodes(labels, 2, 1, 1, 10, groups=torch.arange(60) % 2)
    with pytest.raises(ValueError, match="rule"):
        episode_accuracies(torch.zeros(60, 2), *sample_episodes(labels, 2, 1, 1, 3), rule="knn")


def brute_force_accuracies(embeddings, labels, support, query, rule):
    accuracies = []
    for episode_support, episode_query in zip(support.tolist(), query.tolist()):
        correct = 0
        for true_row, items in enumerate(episode_query):
            for item in items:
                if rule == "prototype":
                    distances = [float((embeddings[item] - embeddings[row].mean(0)).norm()) for row in episode_support]
                    predicted = min(range(len(distances)), key=lambda r: (distances[r], r))
                else:
                    candidates = [(float((embeddings[item] - embeddings[s]).norm()), r)
                                  for r, row in enumerate(episode_support) for s in row]
                    predicted = min(candidates)[1]
                correct += predicted == true_row
        accuracies.append(correct / (len(episode_query) * len(episode_query[0])))
    return accuracies


@pytest.mark.parametrize("rule", ["prototype", "nearest"])
def test_episode_accuracies_match_brute_force(rule):
    generator = torch.Generator().manual_seed(0)
    labels, _ = grouped_labels()
    embeddings = torch.randn(60, 3, generator=generator, dtype=torch.float64) + labels[:, None].double() * 0.3
    support, query = sample_episodes(labels, 4, 3, 2, 30, seed=5)
    accuracies = episode_accuracies(embeddings, support, query, rule)
    assert accuracies.shape == (30,)
    assert accuracies.tolist() == pytest.approx(brute_force_accuracies(embeddings, labels, support, query, rule))


def test_prototype_and_nearest_rules_differ_only_beyond_one_shot():
    labels, _ = grouped_labels()
    embeddings = torch.randn(60, 4, generator=torch.Generator().manual_seed(2))
    one_shot = sample_episodes(labels, 5, 1, 3, 50, seed=0)
    assert torch.equal(episode_accuracies(embeddings, *one_shot, "prototype"),
                       episode_accuracies(embeddings, *one_shot, "nearest"))
    three_shot = sample_episodes(labels, 5, 3, 2, 50, seed=0)
    assert not torch.equal(episode_accuracies(embeddings, *three_shot, "prototype"),
                           episode_accuracies(embeddings, *three_shot, "nearest"))


def test_perfect_embedding_scores_one_and_random_scores_chance():
    labels, groups = grouped_labels()
    perfect = nn.functional.one_hot(labels, 12).float()
    for rule in ("prototype", "nearest"):
        result = few_shot_accuracy(perfect, labels, 4, 2, 200, groups=groups, seed=0, n_query=3, rule=rule)
        assert result == {"accuracy": 1.0, "ci95": 0.0, "n_episodes": 200, "n_way": 4, "k_shot": 2, "n_query": 3,
                          "rule": rule}
    noise = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    chance = few_shot_accuracy(noise, labels, 4, 1, 2000, seed=0)
    assert abs(chance["accuracy"] - 0.25) < 3 * chance["ci95"] + 0.01


def test_confidence_interval_is_1_96_standard_errors():
    labels, _ = grouped_labels()
    embeddings = torch.randn(60, 2, generator=torch.Generator().manual_seed(3))
    result = few_shot_accuracy(embeddings, labels, 3, 1, 100, seed=4, n_query=2)
    accuracies = episode_accuracies(embeddings, *sample_episodes(labels, 3, 1, 2, 100, seed=4)).double()
    assert result["accuracy"] == pytest.approx(float(accuracies.mean()))
    assert result["ci95"] == pytest.approx(1.96 * float(accuracies.std()) / 10)
    assert math.isnan(few_shot_accuracy(embeddings, labels, 3, 1, 1)["ci95"])


class OneHotOfFirstPixel(nn.Module):
    """Embeds an image whose first pixel holds its class id as the one-hot vector of that class."""

    def __init__(self, n_classes):
        super().__init__()
        self.n_classes = n_classes
        self.unused = nn.Linear(1, 1)  # gives the model a device

    def get_embedding(self, x):
        return nn.functional.one_hot(x.flatten(1)[:, 0].long(), self.n_classes).float()


def test_n_way_k_shot_accuracy_on_a_dataset():
    labels, groups = grouped_labels()
    dataset = InMemoryDataset(labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), labels)
    result = n_way_k_shot_accuracy(OneHotOfFirstPixel(12), dataset, n_way=5, k_shot=1, n_episodes=100, seed=0)
    assert result["accuracy"] == 1.0 and result["n_way"] == 5 and "within_alphabet" not in result
    within = n_way_k_shot_accuracy(OneHotOfFirstPixel(12), dataset, n_way=4, n_episodes=10, groups=groups)
    assert within["accuracy"] == 1.0
    with pytest.raises(ValueError, match="5-way episodes need 5 classes"):
        n_way_k_shot_accuracy(OneHotOfFirstPixel(12), dataset, n_way=5, groups=groups)
    with pytest.raises(ValueError, match="one integer group id per item"):
        n_way_k_shot_accuracy(OneHotOfFirstPixel(12), dataset, groups=True)  # the old within_alphabet position
    with pytest.raises(TypeError, match="within_alphabet"):
        n_way_k_shot_accuracy(OneHotOfFirstPixel(12), dataset, within_alphabet=True)


class FixedLinearMap(nn.Module):
    """An imperfect embedding: a fixed random linear map of the flattened image."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.randn(in_features, out_features, generator=torch.Generator().manual_seed(11))

    def get_embedding(self, x):
        return x.flatten(1) @ self.weight


def test_n_way_k_shot_accuracy_passes_every_argument_to_the_episodes():
    # 12 classes of 8 noisy vectors each: accuracy well inside (0, 1), so every argument moves it
    generator = torch.Generator().manual_seed(5)
    labels = torch.arange(12).repeat_interleave(8)
    centres = torch.randn(12, 6, generator=generator)
    images = (centres[labels] + 1.2 * torch.randn(len(labels), 6, generator=generator)).view(-1, 1, 2, 3)
    groups = labels // 4
    dataset = InMemoryDataset(images, labels)
    model = FixedLinearMap(6, 4)
    embeddings = model.get_embedding(images)
    arguments = {"n_way": 3, "k_shot": 2, "n_episodes": 300, "groups": groups, "seed": 9, "n_query": 3,
                 "rule": "nearest"}
    result = n_way_k_shot_accuracy(model, dataset, batch_size=7, **arguments)
    expected = few_shot_accuracy(embeddings, labels, **arguments)
    assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert result == {**expected, "accuracy": result["accuracy"], "ci95": pytest.approx(expected["ci95"])}
    assert 0.4 < result["accuracy"] < 0.95
    # a version that dropped any one argument (its default instead) would score otherwise
    for name, other in (("n_query", 1), ("seed", 0), ("rule", "prototype"), ("groups", None), ("k_shot", 1)):
        changed = n_way_k_shot_accuracy(model, dataset, **{**arguments, name: other})
        assert changed["accuracy"] != result["accuracy"], name


