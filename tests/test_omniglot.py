"""One-shot learning: omniglot.py's readers (zip, folder, torchvision layout, Lake's one-shot runs) on
fixtures written in the exact formats, batched augmentation (datasets.BatchRandomAffine), the N-way
K-shot episode sampler and scorer (metrics), the verification threshold, and SiameseNetwork; then the
study (training in quick mode, saved weights, Lake's one-shot runs), its command line ``python
omniglot.py`` (one line and exit status 2 for a user's mistake), where a run writes (a trial never the
committed results or weights), and the old import paths of the Omniglot names."""

import ast
import hashlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import datasets
import experiments
import metrics
import omniglot as omniglot_module  # (``omniglot`` is the fixture of the alphabets below)
from datasets import BalancedBatchSampler, BatchRandomAffine, InMemoryDataset, SiameseMNIST, TripletMNIST
from losses import ContrastiveLoss
from metrics import best_threshold, episode_accuracies, few_shot_accuracy, n_way_k_shot_accuracy, sample_episodes
from networks import ShiftAveragedEmbedding, SiameseNetwork
from omniglot import OmniglotAlphabets, OneShotRuns, one_shot_run_errors
from omniglot_fixtures import ALPHABETS, DRAWERS, SIZE, write_alphabets, write_runs, zip_folder

N_CLASSES = sum(ALPHABETS.values())


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """{'folder', 'zip', 'records'}: the alphabets written under a top folder, and zipped with it."""
    base = tmp_path_factory.mktemp("omniglot")
    folder = base / "extracted"
    records = write_alphabets(folder)
    return {"folder": folder, "zip": zip_folder(folder, base / "images_background_small1.zip"), "records": records}


# ------------------------------------------------------------------------------- OmniglotAlphabets

@pytest.mark.parametrize("source", ["zip", "folder"])
def test_alphabets_read_every_image_with_its_labels(omniglot, source):
    dataset = OmniglotAlphabets(omniglot[source])
    records = omniglot["records"]
    assert len(dataset) == len(records) == N_CLASSES * DRAWERS
    assert dataset.data.shape == (len(records), 1, SIZE, SIZE) and dataset.data.dtype == torch.float32
    assert dataset.classes == ["Alpha/character01", "Alpha/character02", "Alpha/character03",
                               "Beta/character01", "Beta/character02"]
    assert dataset.alphabet_names == ["Alpha", "Beta"]
    assert dataset.files == [f"images_background_small1/{r[0]}" for r in records]
    assert dataset.subset == "images_background_small1"
    for k, (_, alphabet, character, drawer, mask) in enumerate(records):
        assert dataset.classes[int(dataset.targets[k])] == f"{alphabet}/character{character:02d}"
        assert dataset.alphabet_names[int(dataset.alphabets[k])] == alphabet
        assert int(dataset.characters[k]) == character and int(dataset.drawers[k]) == drawer
        assert torch.equal(dataset.data[k, 0], torch.from_numpy(mask).float())  # ink 1, background 0
    assert dataset.class_alphabets.tolist() == [0, 0, 0, 1, 1]
    assert dataset.train and dataset.transform is None and dataset.augmentation is None
    image, target = dataset[5]
    assert torch.equal(image, dataset.data[5]) and target == int(dataset.targets[5])


def test_zip_and_folder_give_the_same_dataset(omniglot):
    from_zip, from_folder = OmniglotAlphabets(omniglot["zip"]), OmniglotAlphabets(omniglot["folder"])
    assert torch.equal(from_zip.data, from_folder.data) and torch.equal(from_zip.targets, from_folder.targets)
    assert from_zip.files == from_folder.files


def test_invert_false_keeps_black_ink_on_white(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], invert=False)
    assert torch.equal(dataset.data, 1 - OmniglotAlphabets(omniglot["zip"]).data)


def test_alphabet_selection_and_its_errors(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], alphabets=["Beta"])
    assert dataset.classes == ["Beta/character01", "Beta/character02"]
    assert dataset.targets.tolist() == [0] * DRAWERS + [1] * DRAWERS
    assert dataset.alphabet_names == ["Beta"] and dataset.alphabets.tolist() == [0] * (2 * DRAWERS)
    with pytest.raises(ValueError, match=r"unknown alphabets \['Gamma'\].*\['Alpha', 'Beta'\]"):
        OmniglotAlphabets(omniglot["zip"], alphabets=["Gamma"])
    with pytest.raises(TypeError, match="list of names"):
        OmniglotAlphabets(omniglot["zip"], alphabets="Beta")


@pytest.mark.parametrize("image_size", [8, 28, 105])
def test_resizing(omniglot, image_size):
    full = OmniglotAlphabets(omniglot["zip"])
    dataset = OmniglotAlphabets(omniglot["zip"], image_size=image_size)
    assert dataset.data.shape == (len(full), 1, image_size, image_size) and dataset.image_size == image_size
    assert dataset.data.min() >= 0 and dataset.data.max() <= 1
    # antialiased resizing keeps the ink's share of the image
    ink = full.data.mean(dim=(1, 2, 3))
    assert torch.allclose(dataset.data.mean(dim=(1, 2, 3)), ink, atol=0.25 * float(ink.mean()))


def test_bad_image_size(omniglot):
    for image_size in (0, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            OmniglotAlphabets(omniglot["zip"], image_size=image_size)


def test_zip_without_top_folder(omniglot, tmp_path):
    archive = zip_folder(omniglot["folder"] / "images_background_small1", tmp_path / "flat.zip",
                         add_directory_entries=False)
    dataset = OmniglotAlphabets(archive)
    assert dataset.subset == "" and len(dataset) == len(omniglot["records"])
    assert torch.equal(dataset.data, OmniglotAlphabets(omniglot["zip"]).data)


def test_torchvision_layout_needs_a_subset_when_it_holds_two(tmp_path):
    root = tmp_path / "data"
    background = write_alphabets(root, top="omniglot-py/images_background")
    write_alphabets(root, top="omniglot-py/images_evaluation", alphabets={"Gamma": 2})
    (root / "omniglot-py" / "images_background.zip").write_bytes(b"not read")  # torchvision leaves its zips
    with pytest.raises(ValueError, match="subset="):
        OmniglotAlphabets(root)
    dataset = OmniglotAlphabets(root, subset="images_background")
    assert len(dataset) == len(background) and dataset.subset == "omniglot-py/images_background"
    evaluation = OmniglotAlphabets(root, subset="images_evaluation")
    assert evaluation.classes == ["Gamma/character01", "Gamma/character02"]
    with pytest.raises(FileNotFoundError, match="images_nowhere"):
        OmniglotAlphabets(root, subset="images_nowhere")


def test_missing_or_wrong_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniglotAlphabets(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a .zip"):
        OmniglotAlphabets(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no Omniglot images"):
        OmniglotAlphabets(tmp_path)


def test_works_with_the_pair_and_triplet_wrappers_and_the_balanced_sampler(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], image_size=16)
    pairs = SiameseMNIST(dataset)
    (first, second), target = pairs[3]
    assert first.shape == second.shape == (1, 16, 16) and target in (0, 1)
    test_pairs = SiameseMNIST(dataset, train=False)
    same = dataset.targets[test_pairs.test_pairs[:, 0]] == dataset.targets[test_pairs.test_pairs[:, 1]]
    assert torch.equal(same.long(), test_pairs.test_pairs[:, 2])
    (anchor, positive, negative), _ = TripletMNIST(dataset)[0]
    assert anchor.shape == (1, 16, 16)
    loader = DataLoader(dataset, batch_sampler=BalancedBatchSampler(dataset.targets, 3, 2, seed=0))
    images, labels = next(iter(loader))
    assert images.shape == (6, 1, 16, 16) and len(labels.unique()) == 3
    batch, _ = next(iter(DataLoader(pairs, batch_size=8)))
    assert batch[0].shape == (8, 1, 16, 16)


def test_augmentation_is_batched_and_reaches_the_wrappers(omniglot):
    def dataset(seed):
        return OmniglotAlphabets(omniglot["zip"], augment=BatchRandomAffine(generator=torch.Generator().manual_seed(seed)))
    batched = dataset(0).__getitems__(list(range(6)))
    one_by_one = dataset(0)
    single = [one_by_one[k] for k in range(6)]
    for (image, target), (alone, alone_target) in zip(batched, single):
        assert torch.allclose(image, alone, atol=1e-6) and target == alone_target
    plain = OmniglotAlphabets(omniglot["zip"])
    assert not all(torch.equal(image, plain.data[k]) for k, (image, _) in enumerate(batched))
    # the wrappers apply `.transform` per image: the augmentation
    augmented = dataset(1)
    assert isinstance(augmented.transform, BatchRandomAffine)
    (first, _), _ = SiameseMNIST(augmented)[0]
    assert first.shape == (1, SIZE, SIZE)


def test_augmentation_then_user_transform(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], augment=True, transform=lambda image: image * 0 + 7,
                                target_transform=lambda target: target + 100)
    samples = dataset.__getitems__([0, 5])
    assert all(torch.all(image == 7) for image, _ in samples)
    assert [target for _, target in samples] == [100, 101]
    assert torch.all(dataset[0][0] == 7)
    with pytest.raises(TypeError, match="augment"):
        OmniglotAlphabets(omniglot["zip"], augment="strong")


# ------------------------------------------------------------------------------- BatchRandomAffine

def test_affine_identity_and_shapes():
    images = torch.rand(5, 1, 12, 12)
    identity = BatchRandomAffine(degrees=0, shear=0, scale=(1, 1), translate=0)
    assert torch.allclose(identity(images), images, atol=1e-5)
    assert identity(images[0]).shape == (1, 12, 12)
    assert identity(images[:0]).shape == (0, 1, 12, 12)


def test_affine_matrices_invert_the_distortion():
    zoom = BatchRandomAffine(degrees=0, shear=0, scale=(2, 2), translate=0)
    assert torch.allclose(zoom.matrices(3), torch.tensor([[0.5, 0, 0], [0, 0.5, 0]]).expand(3, 2, 3))
    shift = BatchRandomAffine(degrees=0, shear=0, scale=(1, 1), translate=0.25).matrices(1000)
    assert torch.allclose(shift[:, :, :2], torch.eye(2).expand(1000, 2, 2))
    assert shift[:, :, 2].abs().max() <= 0.5 and shift[:, :, 2].abs().max() > 0.45  # 2 * translate
    rotation = BatchRandomAffine(degrees=30, shear=0, scale=(1, 1), translate=0).matrices(1000)[:, :, :2]
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(2).expand(1000, 2, 2), atol=1e-5)
    angles = torch.rad2deg(torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])).abs()
    assert angles.max() <= 30 + 1e-3 and angles.max() > 28


def test_affine_fills_with_the_background():
    white = torch.ones(4, 1, 10, 10)
    shifted = BatchRandomAffine(degrees=45, translate=0.3, fill=1.0)(white)
    assert torch.allclose(shifted, white)
    black_background = BatchRandomAffine(degrees=45, translate=0.3, fill=0.0)(white)
    assert black_background.min() < 0.5


def test_affine_is_reproducible_with_a_generator():
    images = torch.rand(3, 1, 10, 10)
    first = BatchRandomAffine(generator=torch.Generator().manual_seed(4))(images)
    assert torch.equal(first, BatchRandomAffine(generator=torch.Generator().manual_seed(4))(images))
    torch.manual_seed(0)
    global_draw = BatchRandomAffine()(images)
    torch.manual_seed(0)
    assert torch.equal(global_draw, BatchRandomAffine()(images))


@pytest.mark.parametrize("arguments", [{"degrees": -1}, {"shear": "x"}, {"translate": True}, {"scale": (1.2, 0.8)},
                                       {"scale": 1.0}, {"scale": (0, 1)}])
def test_affine_argument_errors(arguments):
    with pytest.raises(ValueError):
        BatchRandomAffine(**arguments)


def test_affine_needs_float_tensors():
    with pytest.raises(TypeError, match="float tensor"):
        BatchRandomAffine()(torch.zeros(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float tensor"):
        BatchRandomAffine()(torch.zeros(4, 4))


# ------------------------------------------------------------------------------- OneShotRuns

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    answers = write_runs(base / "all_runs")
    return {"folder": base / "all_runs", "zip": zip_folder(base, base / "all_runs.zip"), "answers": answers}


@pytest.mark.parametrize("source", ["folder", "zip"])
def test_one_shot_runs_reader(runs, source):
    benchmark = OneShotRuns(runs[source])
    assert len(benchmark) == 2 and benchmark.names == ["run01", "run02"]
    for run in benchmark:
        assert run.training_images.shape == run.test_images.shape == (20, 1, SIZE, SIZE)
        assert run.answers.tolist() == runs["answers"][run.name]
        assert run.training_files == [f"{run.name}/training/class{k:02d}.png" for k in range(1, 21)]
        assert run.test_files == [f"{run.name}/test/item{k:02d}.png" for k in range(1, 21)]
        # the test item shows its class's character: the ink differs only by the drawer pixel
        differences = (run.test_images - run.training_images[run.answers]).abs().sum(dim=(1, 2, 3))
        assert torch.all(differences == 2)
        assert float(run.training_images.max()) == 1.0 and float(run.training_images[:, :, 0, 0].max()) == 0.0
    assert torch.equal(benchmark[1].answers, torch.tensor(runs["answers"]["run02"]))


def test_one_shot_runs_resize(runs):
    benchmark = OneShotRuns(runs["zip"], image_size=28)
    assert benchmark[0].training_images.shape == (20, 1, 28, 28)


def test_one_shot_run_errors_scores_nearest_training_image(runs):
    benchmark = OneShotRuns(runs["folder"])

    class Flatten(nn.Module):
        def get_embedding(self, x):
            return x.flatten(1)

    result = one_shot_run_errors(Flatten(), benchmark)
    assert result == {"names": ["run01", "run02"], "errors": [0.0, 0.0], "mean_error": 0.0}

    class Constant(nn.Module):  # every distance ties: each item goes to training image 0
        def get_embedding(self, x):
            return torch.zeros(len(x), 3)

    result = one_shot_run_errors(Constant(), benchmark)
    expected = [sum(answer != 0 for answer in runs["answers"][name]) / 20 for name in ("run01", "run02")]
    assert result["errors"] == pytest.approx(expected) and result["mean_error"] == pytest.approx(sum(expected) / 2)
    with pytest.raises(TypeError, match="get_embedding"):
        one_shot_run_errors(object(), benchmark)


def _copy_runs(runs, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(runs["folder"], target)
    return target


def test_one_shot_runs_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="class_labels.txt"):
        OneShotRuns(tmp_path)
    broken = _copy_runs(runs, tmp_path)
    labels = broken / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="gives no class for"):
        OneShotRuns(broken)
    labels.write_text("\n".join(lines[:-1] + ["run01/test/item01.png run01/training/class99.png"]) + "\n")
    with pytest.raises(ValueError, match="class99.png, which is not in run01"):
        OneShotRuns(broken)
    labels.write_text("run01/test/item01.png\n")
    with pytest.raises(ValueError, match="every line"):
        OneShotRuns(broken)
    labels.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="twice"):
        OneShotRuns(broken)


# ------------------------------------------------------------------------------- episodes

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


def test_n_way_k_shot_accuracy_on_omniglot_alphabets(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"])

    class Flatten(nn.Module):
        def get_embedding(self, x):
            return x.flatten(1)

    # a drawer changes one pixel, a character moves a 5x5 block: pixels are a perfect embedding here
    result = n_way_k_shot_accuracy(Flatten(), dataset, n_way=3, k_shot=1, n_episodes=50, groups=dataset.alphabets,
                                   n_query=3)
    assert result["accuracy"] == 1.0


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


# ------------------------------------------------------------------------------- SiameseNetwork

@pytest.mark.parametrize("image_size, flat", [(28, 64), (56, 64 * 3 * 3), (105, 64 * 6 * 6)])
def test_siamese_network_shapes(image_size, flat):
    net = SiameseNetwork(image_size=image_size, embedding_dim=32)
    assert net.encoder[-1].in_features == flat and net.encoder[-1].out_features == 32
    x1, x2 = torch.randn(3, 1, image_size, image_size), torch.randn(3, 1, image_size, image_size)
    output1, output2 = net(x1, x2)
    assert output1.shape == output2.shape == (3, 32)
    net.eval()
    assert torch.allclose(net(x1, x2)[0], net.forward_one(x1), atol=1e-5)
    assert torch.allclose(net.get_embedding(x2), net.forward_one(x2))
    parameters = sum(p.numel() for p in net.parameters())
    assert parameters < 500_000  # a few MB at most once saved


def test_siamese_network_shares_one_encoder():
    net = SiameseNetwork(image_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    output1, output2 = net(x, x)
    assert torch.equal(output1, output2)
    convolutions = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 4  # one encoder, not one per input
    with torch.no_grad():
        net.encoder[0].weight.add_(1)
    changed1, changed2 = net(x, x)
    assert torch.equal(changed1, changed2) and not torch.equal(changed1, output1)


def test_similarity_is_in_0_1_and_decreases_with_distance():
    net = SiameseNetwork(image_size=28).eval()
    x1, x2 = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    scores = net.similarity(x1, x2)
    assert scores.shape == (6,) and torch.all(scores > 0) and torch.all(scores <= 1)
    assert torch.allclose(net.similarity(x1, x1), torch.ones(6))
    distances = (net.forward_one(x1) - net.forward_one(x2)).norm(dim=1)
    assert torch.allclose(scores, 1 / (1 + distances))
    origin = torch.zeros(5, 3)
    points = torch.tensor([0.0, 0.5, 1.0, 10.0, 1e4])[:, None] * torch.tensor([[1.0, 2.0, 2.0]])
    values = SiameseNetwork.embedding_similarity(origin, points)
    assert values[0] == 1 and torch.all(values[1:] < values[:-1]) and values[-1] > 0
    assert values[2] == pytest.approx(1 / 4)  # distance 3


def test_similarity_gradient_is_finite_for_identical_embeddings():
    embeddings = torch.zeros(2, 3, requires_grad=True)
    SiameseNetwork.embedding_similarity(embeddings, torch.zeros(2, 3)).sum().backward()
    assert torch.isfinite(embeddings.grad).all()


def test_verify_thresholds_the_similarity():
    net = SiameseNetwork(image_size=28).eval()
    x1, x2 = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
    scores = net.similarity(x1, x2).detach()
    threshold = float(scores.median())
    decisions = net.verify(x1, x2, threshold)
    assert decisions.dtype == torch.bool and torch.equal(decisions, scores >= threshold)
    assert torch.all(net.verify(x1, x1, 1.0))
    with pytest.raises(TypeError, match="threshold"):
        net.verify(x1, x2, "0.5")


def test_contrastive_loss_trains_the_siamese_network():
    torch.manual_seed(0)
    net = SiameseNetwork(image_size=16, embedding_dim=8, channels=8)
    x1, x2 = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    label = torch.tensor([1, 0, 1, 0, 1, 0])
    loss = ContrastiveLoss(margin=2.0)(*net(x1, x2), label)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = ContrastiveLoss(margin=2.0)(*net(x1, x2), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_siamese_network_options_and_config():
    net = SiameseNetwork(image_size=56, embedding_dim=16, channels=8, n_blocks=3, normalize=True).eval()
    embeddings = net.forward_one(torch.randn(4, 1, 56, 56))
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(4))
    rebuilt = SiameseNetwork(**net.config())
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    x = torch.randn(2, 1, 56, 56)
    assert torch.equal(rebuilt.forward_one(x), net.forward_one(x))


def test_siamese_network_errors():
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        SiameseNetwork(image_size=15)
    with pytest.raises(TypeError, match="embedding_dim must be an int"):
        SiameseNetwork(embedding_dim=2.0)
    net = SiameseNetwork(image_size=28)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        net.forward_one(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="one shape"):
        net.similarity(torch.randn(2, 1, 28, 28), torch.randn(3, 1, 28, 28))


def test_quarter_turns_add_rotated_classes(omniglot):
    plain = OmniglotAlphabets(omniglot["zip"])
    turned = OmniglotAlphabets(omniglot["zip"], quarter_turns=(0, 1, 2, 3))
    n = len(plain)
    assert len(turned) == 4 * n and len(turned.classes) == 4 * N_CLASSES
    assert turned.classes[:N_CLASSES] == plain.classes
    assert turned.classes[N_CLASSES] == "Alpha/character01@90" and turned.classes[-1] == "Beta/character02@270"
    for k in range(4):
        block = slice(k * n, (k + 1) * n)
        assert torch.equal(turned.data[block], torch.rot90(plain.data, k, dims=(2, 3)))
        assert torch.equal(turned.targets[block], plain.targets + k * N_CLASSES)
        assert torch.equal(turned.alphabets[block], plain.alphabets) and torch.equal(turned.drawers[block], plain.drawers)
        assert torch.all(turned.turns[block] == k)
    assert torch.equal(turned.class_alphabets, plain.class_alphabets.repeat(4))
    only_turned = OmniglotAlphabets(omniglot["zip"], quarter_turns=(2,))
    assert torch.equal(only_turned.data, torch.rot90(plain.data, 2, dims=(2, 3)))
    assert only_turned.classes[0] == "Alpha/character01@180"
    for bad in [(), (4,), (0, 0), 1, (True,)]:
        with pytest.raises(ValueError, match="quarter_turns"):
            OmniglotAlphabets(omniglot["zip"], quarter_turns=bad)


def test_mirror_adds_mirrored_classes_after_the_turned_ones(omniglot):
    turned = OmniglotAlphabets(omniglot["zip"], quarter_turns=(0, 1))
    mirrored = OmniglotAlphabets(omniglot["zip"], quarter_turns=(0, 1), mirror=True)
    n, n_classes = len(turned), len(turned.classes)
    assert len(mirrored) == 2 * n and len(mirrored.classes) == 2 * n_classes
    assert mirrored.classes[:n_classes] == turned.classes
    assert mirrored.classes[n_classes] == "Alpha/character01~mirrored"
    assert mirrored.classes[-1] == "Beta/character02@90~mirrored"
    assert torch.equal(mirrored.data[:n], turned.data)
    for i in range(0, n, 7):  # column j of a mirrored image is column S - 1 - j of the original
        assert torch.equal(mirrored.data[n + i][..., 0], turned.data[i][..., -1])
        assert torch.equal(mirrored.data[n + i], turned.data[i][..., torch.arange(turned.image_size - 1, -1, -1)])
    assert torch.equal(mirrored.targets, torch.cat([turned.targets, turned.targets + n_classes]))
    for name in ("alphabets", "drawers", "turns", "characters"):
        assert torch.equal(getattr(mirrored, name), getattr(turned, name).repeat(2))
    assert torch.equal(mirrored.class_alphabets, turned.class_alphabets.repeat(2))
    assert mirrored.mirrored.tolist() == [False] * n + [True] * n and not turned.mirrored.any()
    assert len(mirrored.files) == 2 * n
    with pytest.raises(TypeError, match="mirror must be True or False"):
        OmniglotAlphabets(omniglot["zip"], mirror=1)


def test_alphabet_names_in(omniglot):
    assert OmniglotAlphabets.alphabet_names_in(omniglot["zip"]) == ["Alpha", "Beta"]
    assert OmniglotAlphabets.alphabet_names_in(omniglot["folder"]) == ["Alpha", "Beta"]


# ------------------------------------------------------------------------------- the study and its command line

@pytest.fixture
def omniglot_root(tmp_path):
    root = tmp_path / "omniglot"
    write_alphabets(root / "small1", alphabets={"Alpha": 3, "Beta": 2}, drawers=6, size=28)
    write_alphabets(root / "small2", top="images_background_small2", alphabets={"Beta": 2, "Gamma": 20, "Delta": 5},
                    drawers=6, size=28)
    zip_folder(root / "small1", root / "images_background_small1.zip")
    zip_folder(root / "small2", root / "images_background_small2.zip")
    return root


def test_load_omniglot_evaluates_only_new_alphabets(omniglot_root):
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28, quarter_turns=(0, 1),
                                                 augment={"degrees": 5.0})
    assert train_set.alphabet_names == ["Alpha", "Beta"] and len(train_set.classes) == 10
    assert train_set.augmentation.degrees == 5.0 and eval_set.augmentation is None and not eval_set.train
    assert eval_set.alphabet_names == ["Delta", "Gamma"]
    with pytest.raises(ValueError, match="no alphabet that"):
        omniglot_module.load_omniglot(omniglot_root, evaluation="images_background_small1")
    with pytest.raises(FileNotFoundError, match="--omniglot-root"):
        omniglot_module.load_omniglot(omniglot_root / "nowhere")


def test_omniglot_quick_command(omniglot_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    result = omniglot_module.main(["--quick", "--no-progress", "--omniglot-root", str(omniglot_root), "--weights",
                                   str(weights)])
    assert result["recipe"]["epochs"] == 1 and result["quick"]
    tasks = [row["task"] for row in result["evaluation"]["episodes"]]
    assert tasks == ["20-way 1-shot, within alphabet", "5-way 1-shot, within alphabet", "20-way 1-shot, across alphabets"]
    assert result["evaluation"]["episodes"][0]["alphabets"] == ["Gamma"]
    assert all(row["n_episodes"] == 100 for row in result["evaluation"]["episodes"])
    assert result["evaluation"]["verification"]["validation_drawers"] == [1, 2, 3]
    table = (tmp_path / "results" / "quick" / "omniglot.md").read_text()
    assert "| 20-way 1-shot, within alphabet | Gamma | 100 |" in table
    assert "| 20-way 1-shot, within alphabet, shift-averaged (+-2 px) | Gamma | 100 |" in table
    assert result["evaluation_shift_averaged"]["test_shift"] == 2
    assert not weights.exists()  # a quick run saves no weights
    assert "Results in results/quick/omniglot.md" in capsys.readouterr().out


def test_train_save_load_and_one_shot_runs_command(omniglot_root, tmp_path, capsys):
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model, history = omniglot_module.train_omniglot(train_set, method="siamese", epochs=1, embedding_dim=8, channels=8,
                                             progress=False)
    assert len(history["train_loss"]) == 1 and not model.training
    path = omniglot_module.save_omniglot_model(model, str(tmp_path / "saved" / "model.pt"), command="test")
    loaded = omniglot_module.load_omniglot_model(path)
    assert isinstance(loaded, SiameseNetwork) and loaded.config() == model.config()
    images = eval_set.data[:4]
    assert torch.equal(loaded.forward_one(images), model.forward_one(images))
    runs = write_runs(tmp_path / "runs", n_runs=3, size=28)
    capsys.readouterr()
    result = omniglot_module.main(["--one-shot-runs", str(tmp_path / "runs"), "--weights", path])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:3] == [f"{name}: error {100 * error:.1f}%" for name, error in zip(result["names"], result["errors"])]
    assert result["names"] == sorted(runs)
    assert re.fullmatch(r"mean error: \d+\.\d%", lines[-1])
    assert lines[-1] == f"mean error: {100 * result['mean_error']:.1f}%"
    with pytest.raises(FileNotFoundError, match="--weights"):
        omniglot_module.load_omniglot_model(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("method", ["online-contrastive", "online-triplet"])
def test_online_methods_train_the_siamese_network(omniglot_root, method):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model, history = omniglot_module.train_omniglot(train_set, method=method, epochs=1, embedding_dim=8, channels=8,
                                             batch_classes=5, batch_samples=3, progress=False)
    assert len(history["train_loss"]) == 1 and isinstance(model, SiameseNetwork)
    with pytest.raises(ValueError, match="unknown Omniglot method"):
        omniglot_module.train_omniglot(train_set, method="softmax")


def test_alphabet_batches_group_the_sampler_by_alphabet(omniglot_root):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)  # Alpha: 3 characters, Beta: 2
    model, history = omniglot_module.train_omniglot(train_set, epochs=1, embedding_dim=8, channels=8, batch_classes=2,
                                             batch_samples=3, alphabet_batches=True, progress=False)
    assert len(history["train_loss"]) == 1
    with pytest.raises(ValueError, match="every group needs at least n_classes=3 classes, but one has only 2"):
        omniglot_module.train_omniglot(train_set, epochs=1, batch_classes=3, alphabet_batches=True, progress=False)


def test_evaluate_omniglot_with_test_shift_embeds_the_shift_average(omniglot_root):
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model = SiameseNetwork(28, 8, channels=8).eval()
    plain = omniglot_module.evaluate_omniglot(model, eval_set, n_episodes=50)
    shifted = omniglot_module.evaluate_omniglot(model, eval_set, n_episodes=50, test_shift=1)
    averaged = ShiftAveragedEmbedding(model, 1)
    direct = n_way_k_shot_accuracy(averaged, eval_set, 5, 1, 50, groups=eval_set.alphabets)
    assert shifted["episodes"][1]["accuracy"] == pytest.approx(direct["accuracy"])
    assert (plain["test_shift"], shifted["test_shift"]) == (0, 1)
    assert plain["verification"]["roc_auc"] != shifted["verification"]["roc_auc"]


def test_run_omniglot_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown Omniglot recipe settings"):
        omniglot_module.run_omniglot(epoch=3)


def test_train_omniglot_takes_its_defaults_from_the_recipe(omniglot_root, monkeypatch):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    calls = []

    def record(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, **options):
        calls.append({"loader": train_loader, "loss_fn": loss_fn, "optimizer": optimizer, "epochs": n_epochs})
        return {}

    monkeypatch.setattr(omniglot_module, "fit", record)  # what train_omniglot would train with, without training
    recipe = omniglot_module.OMNIGLOT_RECIPE
    model, _ = omniglot_module.train_omniglot(train_set, progress=False)
    online = calls[-1]
    assert online["epochs"] == recipe["epochs"] and online["loss_fn"].margin == recipe["margin"]
    assert online["optimizer"].defaults["lr"] == recipe["learning_rate"]
    sampler = online["loader"].batch_sampler
    assert (sampler.n_classes, sampler.n_samples) == (len(train_set.classes), recipe["batch_samples"])
    assert sampler.class_groups is None  # alphabet_batches is False in the recipe
    assert model.config()["embedding_dim"] == recipe["embedding_dim"]
    omniglot_module.train_omniglot(train_set, method="siamese", epochs=2, embedding_dim=8, channels=8, progress=False)
    siamese = calls[-1]
    assert siamese["epochs"] == 2 and siamese["loss_fn"].margin == omniglot_module.CONTRASTIVE_MARGIN
    assert siamese["loader"].batch_size == recipe["pair_batch"]
    with pytest.raises(TypeError, match=r"unknown settings \['epoch'\]"):
        omniglot_module.train_omniglot(train_set, epoch=1)
    assert omniglot_module.omniglot_settings() == recipe and omniglot_module.omniglot_settings() is not recipe
    assert omniglot_module.omniglot_settings(epochs=3, method=None) == {**recipe, "epochs": 3}


def test_old_import_paths_resolve_to_the_moved_objects():
    moved = {datasets: ["OMNIGLOT_IMAGE_SIZE", "OmniglotAlphabets", "OneShotRun", "OneShotRuns"],
             metrics: ["one_shot_run_errors"],
             experiments: ["OMNIGLOT_ROOT", "OMNIGLOT_BACKGROUND", "OMNIGLOT_EVALUATION", "OMNIGLOT_WEIGHTS",
                           "OMNIGLOT_METHODS", "OMNIGLOT_RECIPE", "CONTRASTIVE_MARGIN", "OMNIGLOT_EPISODES",
                           "OMNIGLOT_TEST_SHIFT", "OMNIGLOT_QUICK", "load_omniglot", "train_omniglot", "omniglot_pairs",
                           "drawer_halves", "evaluate_omniglot", "omniglot_table", "save_omniglot_model",
                           "load_omniglot_model", "run_omniglot", "run_one_shot_runs", "omniglot_main",
                           "OmniglotAlphabets", "OneShotRuns", "one_shot_run_errors"]}
    for module, names in moved.items():
        for name in names:
            assert getattr(module, name) is getattr(omniglot_module, name), f"{module.__name__}.{name}"
    from datasets import OmniglotAlphabets
    from experiments import run_omniglot
    from metrics import one_shot_run_errors
    assert (OmniglotAlphabets, run_omniglot, one_shot_run_errors) == (
        omniglot_module.OmniglotAlphabets, omniglot_module.run_omniglot, omniglot_module.one_shot_run_errors)
    import autoencoders
    assert experiments.run_experiment is autoencoders.run_experiment
    for module in moved:
        with pytest.raises(AttributeError, match=f"^module '{module.__name__}' has no attribute 'no_such_name'$"):
            getattr(module, "no_such_name")
    assert not hasattr(metrics, "within_alphabet") and not hasattr(datasets, "_FileTree")


def _python(code_or_arguments, cwd):
    """Run a fresh interpreter in the repository (``-c code`` or a script with arguments); its stdout."""
    arguments = ["-c", code_or_arguments] if isinstance(code_or_arguments, str) else code_or_arguments
    completed = subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_experiments_loads_neither_autoencoders_nor_omniglot():
    # (torchvision.models cannot be checked this way: `import torchvision`, which datasets needs, loads it)
    loaded = _python("import sys, experiments; "
                     "print([name for name in ('autoencoders', 'features', 'omniglot') if name in sys.modules])",
                     REPOSITORY)
    assert loaded.strip() == "[]"


def test_omniglot_imports_no_command_line_only_what_builds_a_method():
    tree = ast.parse(inspect.getsource(omniglot_module))
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert {module for module, _ in imported} & {"experiments", "autoencoders"} == set()  # one direction only
    assert {name for module, name in imported if module == "methods"} == {"EVALUATION_BATCH", "build_method"}
    assert not hasattr(omniglot_module, "OMNIGLOT_OPTIONS") and not hasattr(omniglot_module, "options_given")


def test_omniglot_command_line_scores_one_shot_runs(tmp_path, capsys):
    model = SiameseNetwork(28, 8, channels=8).eval()
    weights = omniglot_module.save_omniglot_model(model, str(tmp_path / "model.pt"))
    write_runs(tmp_path / "runs", n_runs=2, size=28)
    arguments = ["--one-shot-runs", str(tmp_path / "runs"), "--weights", weights]
    result = omniglot_module.main(arguments)
    assert result == omniglot_module.run_one_shot_runs(str(tmp_path / "runs"), weights)
    with pytest.raises(ValueError, match="unrecognized arguments: --dataset mnist"):
        omniglot_module.main([*arguments, "--dataset", "mnist"])  # omniglot.py is always Omniglot
    printed = _python([os.path.join(REPOSITORY, "omniglot.py"), *arguments], tmp_path)
    assert printed.strip().splitlines()[-1] == f"mean error: {100 * result['mean_error']:.1f}%"


@pytest.mark.parametrize("unused", [["--margin", "2"], ["--channels-last"], ["--batch-norm", "--lr-step", "4"],
                                    ["--run-dir", "elsewhere"], ["--classic"]])
def test_the_omniglot_command_line_refuses_the_options_it_does_not_read(unused):
    with pytest.raises(ValueError, match="unrecognized arguments") as refused:
        omniglot_module.main(["--quick", "--seed", "3", *unused])  # refused before any data is looked for
    error = str(refused.value)
    assert all(option in error for option in unused if option.startswith("--"))
    assert "--seed" not in error.split("unrecognized arguments")[1]


def _command_line(arguments, cwd):
    """``python omniglot.py ARGUMENTS`` in a fresh interpreter: (exit status, stdout, stderr)."""
    completed = subprocess.run([sys.executable, os.path.join(REPOSITORY, "omniglot.py"), *map(str, arguments)],
                               cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return completed.returncode, completed.stdout, completed.stderr


def test_a_user_mistake_on_the_command_line_is_one_line_and_status_2(omniglot_root, tmp_path):
    not_a_zip = tmp_path / "not-a-zip"
    not_a_zip.mkdir()
    (not_a_zip / "images_background_small1.zip").write_text("not a zip")
    model = omniglot_module.save_omniglot_model(SiameseNetwork(28, 8, channels=8).eval(), str(tmp_path / "m.pt"))
    write_runs(tmp_path / "runs", n_runs=1, size=28)
    mistakes = {("--epochs", "-3"): "--epochs must be >= 0, got -3",
                ("--epochs", "x"): "argument --epochs: invalid int value: 'x'",
                ("--embedding-dim", "0"): "--embedding-dim must be >= 1",
                ("--methods", "softmax"): "unknown --methods 'softmax'",
                ("--margin", "2"): "unrecognized arguments: --margin 2",
                ("--device", "nonsense", "--one-shot-runs", tmp_path / "runs", "--weights", model): "nonsense",
                ("--quick", "--no-progress", "--omniglot-root", omniglot_root, "--selectors", "bogus"):
                    "unknown selector 'bogus'",
                ("--quick", "--omniglot-root", tmp_path / "nowhere"): "images_background_small1.zip",
                ("--quick", "--omniglot-root", not_a_zip): "is neither a folder nor a .zip file",
                ("--one-shot-runs", not_a_zip / "images_background_small1.zip", "--weights", model):
                    "is neither a folder nor a .zip file",
                ("--one-shot-runs", tmp_path / "m.pt", "--weights", model): "m.pt holds no runNN/class_labels.txt",
                ("--one-shot-runs", tmp_path / "runs", "--weights", tmp_path / "none.pt"): "no weights at",
                ("--one-shot-runs", tmp_path / "runs", "--weights", not_a_zip / "images_background_small1.zip"):
                    "is not a model file"}
    for arguments, message in mistakes.items():
        status, stdout, stderr = _command_line(arguments, tmp_path)
        assert status == 2 and "Traceback" not in stderr, (arguments, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("omniglot.py: error: "), (arguments, stderr)
        assert message in stderr, (arguments, stderr)
    assert os.listdir(tmp_path / "not-a-zip") == ["images_background_small1.zip"]  # nothing written anywhere
    status, stdout, stderr = _command_line(["--one-shot-runs", tmp_path / "runs", "--weights", model], tmp_path)
    assert status == 0 and stdout.strip().splitlines()[-1].startswith("mean error: "), stderr


def _digests(*folders):
    """{path: sha256} of every file under the folders."""
    digests = {}
    for folder in folders:
        for current, _, files in os.walk(folder):
            for name in files:
                with open(os.path.join(current, name), "rb") as file:
                    digests[os.path.join(current, name)] = hashlib.sha256(file.read()).hexdigest()
    return digests


def test_where_a_run_writes_only_the_study_writes_the_committed_files(tmp_path):
    recipe, weights = omniglot_module.omniglot_settings(), omniglot_module.OMNIGLOT_WEIGHTS
    outputs = omniglot_module.omniglot_outputs
    assert outputs(recipe) == ("results", weights)
    assert outputs(recipe, quick=True) == (os.path.join("results", "quick"), None)
    trial = os.path.join("runs", "omniglot", "epochs-3")
    assert outputs({**recipe, "epochs": 3}) == (os.path.join(trial, "results"),
                                                os.path.join(trial, "models", "omniglot_siamese.pt"))
    assert outputs({**recipe, "epochs": 3}, weights=str(tmp_path / "mine.pt")) == (
        os.path.join(trial, "results"), str(tmp_path / "mine.pt"))
    assert outputs({**recipe, "epochs": 3}, weights=None, results_dir=None) == (None, None)
    assert outputs(recipe, seed=1, runs_dir="elsewhere")[0] == os.path.join("elsewhere", "omniglot", "seed-1", "results")
    assert outputs(recipe, n_episodes=50)[0] == os.path.join("runs", "omniglot", "episodes-50", "results")
    changed = outputs({**recipe, "method": "siamese", "augment": None, "quarter_turns": (0,)})[0]
    assert os.path.basename(os.path.dirname(changed)).startswith("augment-None_method-siamese_quarter_turns-")


def test_a_trial_run_leaves_the_committed_results_and_weights_alone(omniglot_root, tmp_path, monkeypatch, capsys):
    committed = tmp_path / "weights" / "omniglot_siamese.pt"
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_WEIGHTS", str(committed))  # the checkout's stays out of reach
    monkeypatch.chdir(tmp_path)
    before = _digests(os.path.join(REPOSITORY, "results"), os.path.join(REPOSITORY, "weights"))
    result = omniglot_module.main(["--epochs", "0", "--embedding-dim", "8", "--no-progress", "--omniglot-root",
                                   str(omniglot_root)])
    assert result["recipe"]["epochs"] == 0 and not result["quick"]
    folder = tmp_path / "runs" / "omniglot" / "embedding_dim-8_epochs-0"
    assert sorted(os.listdir(folder / "results")) == ["omniglot.json", "omniglot.md"]
    assert os.listdir(folder / "models") == ["omniglot_siamese.pt"]
    assert not committed.exists() and not (tmp_path / "results").exists()
    assert _digests(os.path.join(REPOSITORY, "results"), os.path.join(REPOSITORY, "weights")) == before
    weights = os.path.join("runs", "omniglot", "embedding_dim-8_epochs-0", "models", "omniglot_siamese.pt")
    assert f"Results in runs/omniglot/embedding_dim-8_epochs-0/results/omniglot.md; weights in {weights}." \
        in capsys.readouterr().out
