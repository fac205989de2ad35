"""Tests for datasets.py: InMemoryDataset, SiameseMNIST, TripletMNIST, BalancedBatchSampler, the generic splits
(split_per_class, held_out_class_split, on datasets read from image folders and streamed from disk alike) and
the old import paths of the names that moved to known_datasets.py and image_folders.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

import datasets
import image_folders
import known_datasets
from datasets import (BalancedBatchSampler, BatchRandomAffine, InMemoryDataset, SiameseMNIST, TripletMNIST, _ClassBlocks,
                      held_out_class_split, split_per_class)
from folder_fixtures import class_folder
from image_folders import load_image_folder
from test_utils import assert_moved_name

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMNIST(torch.utils.data.Dataset):
    """MNIST-like: uint8 .data (N, 28, 28) whose pixels (0, 0) and (0, 1) encode the item index."""

    def __init__(self, targets, train=True, transform=None, target_transform=None, seed=0):
        self.targets = torch.as_tensor(targets)
        generator = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 256, (len(self.targets), 28, 28), dtype=torch.uint8, generator=generator)
        index = torch.arange(len(self.targets))
        self.data[:, 0, 0], self.data[:, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
        self.train, self.transform, self.target_transform = train, transform, target_transform
        self.classes = [f"digit {c}" for c in range(int(self.targets.max()) + 1)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index].numpy())
        target = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def index_of(image):
    """Item index encoded in the first two pixels of a ToTensor image (MNIST or ImageFolder kind)."""
    if image.shape[0] == 3:  # RGB ImageFolder images: red and green of pixel (0, 0)
        low, high = image[0, 0, 0], image[1, 0, 0]
    else:
        low, high = image[0, 0, 0], image[0, 0, 1]
    return int(round(float(low) * 255)) + 256 * int(round(float(high) * 255))


def memory_dataset(targets, **kwargs):
    """InMemoryDataset whose image i is filled with the value i, so images name their item."""
    targets = torch.as_tensor(targets)
    data = torch.arange(len(targets), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()
    return InMemoryDataset(data, targets, **kwargs)


def memory_index(image):
    return int(image.flatten()[0])


def make_image_folder(root, class_sizes):
    """RGB PNGs in root/c{k}/; ImageFolder's sorted order gives item i pixel (0, 0) = (i % 256, i // 256, 0)."""
    index = 0
    for k, size in enumerate(class_sizes):
        (root / f"c{k}").mkdir()
        for j in range(size):
            pixels = np.full((6, 6, 3), 100, dtype=np.uint8)
            pixels[0, 0] = (index % 256, index // 256, 0)
            Image.fromarray(pixels).save(root / f"c{k}" / f"{j:03d}.png")
            index += 1
    return ImageFolder(str(root), transform=transforms.ToTensor())


LABELS = [0, 1, 2, 3, 4] * 8  # 40 items, 5 classes, interleaved
TO_TENSOR = transforms.ToTensor()


def all_kinds(tmp_path, labels=LABELS, train=True):
    """(dataset, function naming an image's item, labels) for the three dataset kinds with LABELS' class
    sizes; the ImageFolder lists its items sorted by class."""
    folder = make_image_folder(tmp_path, np.bincount(labels))
    return [
        (memory_dataset(labels, train=train), memory_index, torch.tensor(labels)),
        (FakeMNIST(labels, train=train, transform=TO_TENSOR), index_of, torch.tensor(labels)),
        (folder, index_of, torch.tensor(folder.targets)),
    ]


def pair_indices(wrapper, name, indices):
    out = []
    for (image1, image2), target in wrapper.__getitems__(indices):
        out.append((name(image1), name(image2), target))
    return out


# ---------------------------------------------------------------- InMemoryDataset

def test_in_memory_dataset_items_and_attributes():
    data = torch.randn(6, 1, 4, 4)
    dataset = InMemoryDataset(data, [3, 1, 3, 1, 0, 0], train=False)
    assert len(dataset) == 6 and dataset.train is False and dataset.transform is None
    assert dataset.targets.dtype == torch.long and dataset.classes == ["0", "1", "3"]
    image, target = dataset[2]
    assert torch.equal(image, data[2]) and target == 3 and isinstance(target, int)
    assert InMemoryDataset(data, np.zeros(6, dtype=np.int64), classes=("a",)).classes == ["a"]


def test_in_memory_dataset_transforms_and_getitems_match_getitem():
    data = torch.randn(5, 2, 3, 3)
    dataset = InMemoryDataset(data, torch.tensor([0, 1, 2, 1, 0]), transform=lambda x: x * 2,
                              target_transform=lambda t: t + 10)
    image, target = dataset[1]
    assert torch.equal(image, data[1] * 2) and target == 11
    batch = dataset.__getitems__([4, 0, 4])
    assert len(batch) == 3
    for (image, target), index in zip(batch, [4, 0, 4]):
        expected_image, expected_target = dataset[index]
        assert torch.equal(image, expected_image) and target == expected_target


def test_in_memory_dataset_rejects_bad_inputs():
    with pytest.raises(TypeError, match="float tensor"):
        InMemoryDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), [0, 1, 2])
    with pytest.raises(TypeError, match="from_dataset"):
        InMemoryDataset(torch.zeros(3, 2, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="3 integer class ids"):
        InMemoryDataset(torch.zeros(3, 1, 2, 2), [0, 1])
    with pytest.raises(ValueError, match="integer class ids"):
        InMemoryDataset(torch.zeros(2, 1, 2, 2), [0.5, 1.0])


def test_from_dataset_mnist_like_computes_mean_and_std():
    mnist = FakeMNIST([0, 1, 2, 0, 1, 2, 0, 1], train=False)
    memory = InMemoryDataset.from_dataset(mnist)
    assert memory.data.shape == (8, 1, 28, 28) and memory.data.dtype == torch.float32
    assert memory.train is False and memory.classes == mnist.classes
    assert torch.equal(memory.targets, mnist.targets)
    pixels = mnist.data.double() / 255
    assert memory.mean == pytest.approx((pixels.mean().item(),), rel=1e-5)
    assert memory.std == pytest.approx((pixels.std(correction=0).item(),), rel=1e-4)
    assert abs(memory.data.mean().item()) < 1e-4 and memory.data.std(correction=0).item() == pytest.approx(1, rel=1e-4)


def test_from_dataset_matches_to_tensor_and_normalize():
    mnist = FakeMNIST([0, 1, 2, 3])
    memory = InMemoryDataset.from_dataset(mnist, mean=0.1307, std=0.3081)
    assert memory.mean == pytest.approx((0.1307,)) and memory.std == pytest.approx((0.3081,))
    classic = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    for i in range(4):
        assert torch.allclose(memory[i][0], classic(Image.fromarray(mnist.data[i].numpy())), atol=1e-5)


def test_from_dataset_channels_last_numpy_like_cifar():
    class FakeCIFAR:
        data = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
        targets = [0, 1, 0, 1, 2]
        train = True
        classes = ["plane", "car", "bird"]

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    memory = InMemoryDataset.from_dataset(FakeCIFAR(), mean=mean, std=std)
    assert memory.data.shape == (5, 3, 8, 8) and memory.classes == ["plane", "car", "bird"]
    classic = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for i in range(5):
        assert torch.allclose(memory[i][0], classic(Image.fromarray(FakeCIFAR.data[i])), atol=1e-5)
    computed = InMemoryDataset.from_dataset(FakeCIFAR())
    assert len(computed.mean) == 3 and len(computed.std) == 3
    per_channel = computed.data.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1, correction=0), torch.ones(3), atol=1e-4)


def test_from_dataset_rejects_bad_inputs():
    mnist = FakeMNIST([0, 1])
    with pytest.raises(ValueError, match="1 or 1 values"):
        InMemoryDataset.from_dataset(mnist, mean=(0.1, 0.2), std=0.3)
    with pytest.raises(ValueError, match="std must be positive"):
        InMemoryDataset.from_dataset(mnist, mean=0.1, std=0.0)

    class FloatImages:
        data = torch.zeros(2, 4, 4)
        targets = [0, 1]

    with pytest.raises(TypeError, match="uint8"):
        InMemoryDataset.from_dataset(FloatImages())


# ---------------------------------------------------------------- partner drawing helper

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=30), st.integers(0, 2**31))
def test_class_blocks_draw_valid_partners(labels, seed):
    labels = torch.tensor(labels)
    blocks = _ClassBlocks(labels)
    anchors = torch.arange(len(labels)).repeat(3)
    uniforms = torch.rand(len(anchors), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    uniforms[: len(labels)] = 0.0  # extremes of the range
    uniforms[len(labels): 2 * len(labels)] = 1 - 1e-12
    same = torch.ones_like(anchors, dtype=torch.bool)
    positives = blocks.draw(anchors, same, uniforms)
    class_size = (labels[:, None] == labels[None, :]).sum(1)[anchors]
    assert torch.equal(labels[positives], labels[anchors])
    assert torch.equal(positives == anchors, class_size == 1)  # self only for singleton classes
    if len(labels.unique()) > 1:
        negatives = blocks.draw(anchors, ~same, uniforms)
        assert (labels[negatives] != labels[anchors]).all()


def test_class_blocks_draw_is_exactly_uniform_on_a_uniform_grid():
    labels = torch.tensor([2, 0, 1, 0, 2, 0, 0, 1, 2])  # class sizes 4, 2, 3
    blocks = _ClassBlocks(labels)
    steps = 2 * 3 * 4 * 5 * 7  # divisible by every span (class size - 1 and N - class size)
    uniforms = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    for anchor in range(len(labels)):
        anchors = torch.full((steps,), anchor)
        for same in (True, False):
            partners = blocks.draw(anchors, torch.full((steps,), same), uniforms)
            expected = [j for j in range(len(labels)) if j != anchor and (labels[j] == labels[anchor]) == same]
            counts = torch.bincount(partners, minlength=len(labels))
            assert counts.nonzero().flatten().tolist() == expected
            assert (counts[expected] == steps // len(expected)).all()


# ---------------------------------------------------------------- SiameseMNIST

@pytest.mark.parametrize("train", [True, False])
def test_siamese_pairs_are_correct_for_every_dataset_kind(tmp_path, train):
    for dataset, name, labels in all_kinds(tmp_path, train=train):
        siamese = SiameseMNIST(dataset, train=None if hasattr(dataset, "train") else train)
        assert siamese.train is train and len(siamese) == len(LABELS)
        torch.manual_seed(0)
        for _ in range(3):
            for i, j, target in pair_indices(siamese, name, list(range(len(LABELS)))):
                assert i != j
                assert target == int(labels[i] == labels[j])
        if not train:
            targets = siamese.test_pairs[:, 2]
            assert torch.equal(targets, (torch.arange(len(LABELS)) % 2 == 0).long())


def test_siamese_getitem_returns_tensors_and_int_target(tmp_path):
    for dataset, _, _ in all_kinds(tmp_path):
        (image1, image2), target = SiameseMNIST(dataset)[3]
        assert torch.is_tensor(image1) and image1.shape == image2.shape and target in (0, 1)


def test_siamese_mnist_without_transform_gives_pil_images():
    (image1, image2), _ = SiameseMNIST(FakeMNIST([0, 1, 0, 1]))[0]
    assert isinstance(image1, Image.Image) and image1.mode == "L" and image1.size == (28, 28)

    class FakeRGB(FakeMNIST):
        def __init__(self):
            super().__init__([0, 1, 0, 1])
            self.data = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)

    (image1, _), _ = SiameseMNIST(FakeRGB())[1]
    assert image1.mode == "RGB" and np.array_equal(np.asarray(image1), FakeRGB().data[1])


def test_siamese_train_mode_is_balanced_and_draws_fresh_pairs():
    siamese = SiameseMNIST(memory_dataset(torch.arange(200) % 10))
    torch.manual_seed(1)
    draws = [pair_indices(siamese, memory_index, list(range(200))) for _ in range(20)]
    targets = torch.tensor([t for epoch in draws for _, _, t in epoch])
    assert abs(targets.float().mean().item() - 0.5) < 0.03  # 4000 fair coins: sd 0.008
    assert draws[0] != draws[1]
    torch.manual_seed(1)
    assert pair_indices(siamese, memory_index, list(range(200))) == draws[0]


def test_siamese_test_pairs_depend_only_on_seed():
    dataset = memory_dataset(torch.arange(60) % 6, train=False)
    torch.manual_seed(0)
    np.random.seed(0)
    first = SiameseMNIST(dataset).test_pairs
    torch.manual_seed(123)
    np.random.seed(123)
    torch.rand(17)
    second = SiameseMNIST(dataset, seed=29).test_pairs
    assert torch.equal(first, second)
    assert not torch.equal(first, SiameseMNIST(dataset, seed=30).test_pairs)
    siamese = SiameseMNIST(dataset)
    torch.manual_seed(5)
    assert pair_indices(siamese, memory_index, [0, 1, 2]) == [tuple(row) for row in first[:3].tolist()]
    torch.manual_seed(6)
    assert pair_indices(siamese, memory_index, [0, 1, 2]) == [tuple(row) for row in first[:3].tolist()]


def test_siamese_train_argument_overrides_dataset_flag():
    dataset = memory_dataset(LABELS, train=True)
    evaluation = SiameseMNIST(dataset, train=False)
    assert evaluation.train is False and hasattr(evaluation, "test_pairs")
    assert SiameseMNIST(memory_dataset(LABELS, train=False), train=True).train is True

    class NoTrainFlag(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.zeros(1), 0

    assert SiameseMNIST(NoTrainFlag(), labels=[0, 0, 1, 1]).train is True


def test_siamese_singleton_class_falls_back_to_negative_pairs():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])  # class 0 has a single item
    siamese = SiameseMNIST(memory_dataset(labels))
    torch.manual_seed(0)
    for _ in range(50):
        (i, j, target), = pair_indices(siamese, memory_index, [0])
        assert i == 0 and labels[j] != 0 and target == 0
    test_pairs = SiameseMNIST(memory_dataset(labels), train=False).test_pairs
    assert test_pairs[0, 2] == 0 and labels[test_pairs[0, 1]] != 0  # even index, but no positive exists
    assert (test_pairs[:, 0] != test_pairs[:, 1]).all()


def test_siamese_one_class_gives_positive_pairs_only():
    siamese = SiameseMNIST(memory_dataset([7, 7, 7]))
    torch.manual_seed(0)
    pairs = [pair for _ in range(30) for pair in pair_indices(siamese, memory_index, [0, 1, 2])]
    assert all(i != j and target == 1 for i, j, target in pairs)
    test_pairs = SiameseMNIST(memory_dataset([7, 7]), train=False).test_pairs
    assert test_pairs.tolist() == [[0, 1, 1], [1, 0, 1]]


def test_siamese_two_singletons_pair_with_each_other():
    test_pairs = SiameseMNIST(memory_dataset([3, 4]), train=False).test_pairs
    assert test_pairs.tolist() == [[0, 1, 0], [1, 0, 0]]


def test_wrappers_need_two_items_and_labels():
    for wrapper in (SiameseMNIST, TripletMNIST):
        with pytest.raises(ValueError, match="at least 2 items"):
            wrapper(memory_dataset([0]))

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.zeros(1), 0

    for wrapper in (SiameseMNIST, TripletMNIST):
        with pytest.raises(TypeError, match="labels="):
            wrapper(Unlabelled())
        with pytest.raises(ValueError, match="3 labels for a dataset of 4 items"):
            wrapper(Unlabelled(), labels=[0, 1, 0])
        with pytest.raises(ValueError, match="1-D"):
            wrapper(Unlabelled(), labels=[[0, 1], [0, 1]])


def test_target_transform_merging_classes_changes_positive_pairs():
    labels = torch.arange(40) % 4
    merge = lambda t: t // 2  # noqa: E731 -- classes {0, 1} and {2, 3} become one class each
    merged = labels // 2
    for dataset, name in [(memory_dataset(labels, target_transform=merge), memory_index),
                          (FakeMNIST(labels, transform=TO_TENSOR, target_transform=merge), index_of)]:
        siamese = SiameseMNIST(dataset)
        assert torch.equal(siamese.labels, merged)
        torch.manual_seed(0)
        pairs = [p for _ in range(10) for p in pair_indices(siamese, name, list(range(40)))]
        assert all(target == int(merged[i] == merged[j]) for i, j, target in pairs)
        assert any(target == 1 and labels[i] != labels[j] for i, j, target in pairs)
        triplets = TripletMNIST(dataset, train=False).test_triplets
        assert (merged[triplets[:, 0]] == merged[triplets[:, 1]]).all()
        assert (merged[triplets[:, 0]] != merged[triplets[:, 2]]).all()


def test_plain_dataset_with_explicit_labels(tmp_path):
    folder = make_image_folder(tmp_path, [3, 4, 5])
    labels = [2 - t for t in folder.targets]  # any labelling of the same items works
    siamese = SiameseMNIST(folder, labels=np.array(labels))
    torch.manual_seed(0)
    for i, j, target in pair_indices(siamese, index_of, list(range(12))):
        assert i != j and target == int(labels[i] == labels[j])


@pytest.mark.parametrize("train", [True, False])
def test_in_memory_fast_path_matches_pil_path(train):
    labels = torch.arange(30) % 3
    mean, std = 0.45, 0.3
    classic = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    mnist = FakeMNIST(labels, train=train, transform=classic)
    memory = InMemoryDataset.from_dataset(mnist, mean=mean, std=std)
    for wrapper in (SiameseMNIST, TripletMNIST):
        slow, fast = wrapper(mnist), wrapper(memory)
        for indices in ([0, 5, 29, 5], list(range(30))):
            torch.manual_seed(11)
            slow_batch = slow.__getitems__(indices)
            torch.manual_seed(11)
            fast_batch = fast.__getitems__(indices)
            for (slow_images, slow_target), (fast_images, fast_target) in zip(slow_batch, fast_batch):
                assert slow_target == fast_target
                for slow_image, fast_image in zip(slow_images, fast_images):
                    assert torch.allclose(slow_image, fast_image, atol=1e-5)


def test_getitems_equals_mapping_getitem_under_same_rng_state(tmp_path):
    indices = [5, 0, 17, 5, 39, 22]
    for dataset, _, _ in all_kinds(tmp_path):
        for wrapper in (SiameseMNIST(dataset), TripletMNIST(dataset)):
            torch.manual_seed(3)
            batch = wrapper.__getitems__(indices)
            torch.manual_seed(3)
            one_by_one = [wrapper[i] for i in indices]
            for (images, target), (expected_images, expected_target) in zip(batch, one_by_one):
                assert target == expected_target
                assert all(torch.equal(a, b) for a, b in zip(images, expected_images))


def test_dataloader_batches_over_wrappers(tmp_path):
    for dataset, _, _ in all_kinds(tmp_path):
        loader = DataLoader(SiameseMNIST(dataset), batch_size=8, shuffle=True, num_workers=0)
        batches = list(loader)
        assert len(batches) == 5
        (images1, images2), targets = batches[0]
        assert images1.shape == images2.shape and images1.shape[0] == 8
        assert targets.shape == (8,) and targets.dtype == torch.long
        loader = DataLoader(TripletMNIST(dataset), batch_size=16, num_workers=0)
        (anchors, positives, negatives), empty = next(iter(loader))
        assert anchors.shape == positives.shape == negatives.shape and anchors.shape[0] == 16
        assert empty == []


def test_dataloader_workers_draw_different_pairs():
    # The classic numpy-RNG wrappers gave every worker the same partners; torch seeds each worker.
    siamese = SiameseMNIST(memory_dataset(torch.arange(64) % 8))
    same_anchors_twice = [list(range(64)), list(range(64))]
    loader = DataLoader(siamese, batch_sampler=same_anchors_twice, num_workers=2)
    batches = list(loader)
    partners = [images2.flatten(1)[:, 0] for (_, images2), _ in batches]
    assert not torch.equal(partners[0], partners[1])


# ---------------------------------------------------------------- TripletMNIST

@pytest.mark.parametrize("train", [True, False])
def test_triplets_are_correct_for_every_dataset_kind(tmp_path, train):
    for dataset, name, labels in all_kinds(tmp_path, train=train):
        triplet = TripletMNIST(dataset, train=None if hasattr(dataset, "train") else train)
        assert triplet.train is train
        torch.manual_seed(0)
        for _ in range(3):
            for (anchor, positive, negative), empty in triplet.__getitems__(list(range(len(LABELS)))):
                a, p, n = name(anchor), name(positive), name(negative)
                assert empty == [] and a != p
                assert labels[a] == labels[p] and labels[a] != labels[n]


def test_triplet_test_mode_is_fixed_by_seed():
    dataset = memory_dataset(torch.arange(50) % 5, train=False)
    torch.manual_seed(0)
    np.random.seed(0)
    first = TripletMNIST(dataset).test_triplets
    torch.manual_seed(99)
    np.random.seed(99)
    assert torch.equal(first, TripletMNIST(dataset, seed=29).test_triplets)
    assert not torch.equal(first, TripletMNIST(dataset, seed=1).test_triplets)
    assert torch.equal(first[:, 0], torch.arange(50))
    triplet = TripletMNIST(dataset)
    (a, p, n), _ = triplet[7]
    assert [memory_index(a), memory_index(p), memory_index(n)] == first[7].tolist()


def test_triplet_singleton_anchor_is_its_own_positive():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    triplet = TripletMNIST(memory_dataset(labels))
    torch.manual_seed(0)
    for _ in range(20):
        (anchor, positive, negative), _ = triplet[0]
        assert memory_index(anchor) == memory_index(positive) == 0 and labels[memory_index(negative)] != 0
    test_triplets = TripletMNIST(memory_dataset(labels), train=False).test_triplets
    assert test_triplets[0, 1] == 0
    assert (test_triplets[1:, 0] != test_triplets[1:, 1]).all()


def test_triplet_one_class_raises():
    with pytest.raises(ValueError, match="at least 2 classes"):
        TripletMNIST(memory_dataset([4, 4, 4]))
    with pytest.raises(ValueError, match="at least 2 classes"):  # classes merged by target_transform
        TripletMNIST(memory_dataset([0, 1, 2], target_transform=lambda t: 0))


# ---------------------------------------------------------------- BalancedBatchSampler

def check_batches(batches, labels, n_classes, n_samples):
    labels = torch.as_tensor(labels)
    for batch in batches:
        assert len(batch) == n_classes * n_samples and len(set(batch)) == len(batch)
        assert all(isinstance(i, int) for i in batch)
        _, counts = labels[torch.tensor(batch)].unique(return_counts=True)
        assert len(counts) == n_classes and (counts == n_samples).all()


@pytest.mark.parametrize("convert", [torch.tensor, np.array, list])
def test_sampler_batches_have_the_right_shape(convert):
    labels = [k for k, size in enumerate([5, 9, 12, 30, 4, 7]) for _ in range(size)]
    sampler = BalancedBatchSampler(convert(labels), n_classes=3, n_samples=4, seed=0)
    for _ in range(5):
        batches = list(sampler)
        assert len(batches) == len(sampler) == len(labels) // 12
        check_batches(batches, labels, 3, 4)


def test_sampler_accepts_reversed_numpy_view():
    labels = np.repeat(np.arange(4), 6)[::-1]
    check_batches(list(BalancedBatchSampler(labels, 2, 3, seed=1)), labels.copy(), 2, 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 15), min_size=2, max_size=7), st.integers(1, 2), st.integers(0, 1000), st.data())
def test_sampler_invariants_on_random_label_sets(class_sizes, n_samples, seed, data):
    n_classes = data.draw(st.integers(1, len(class_sizes)))
    labels = torch.arange(len(class_sizes)).repeat_interleave(torch.tensor(class_sizes))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    sampler = BalancedBatchSampler(labels, n_classes, n_samples, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // (n_classes * n_samples)
    check_batches(batches, labels, n_classes, n_samples)


def test_sampler_refills_short_classes_without_repeats_inside_a_batch():
    labels = [0] * 3 + [1] * 3 + [2] * 30  # small classes must be reused within one epoch
    sampler = BalancedBatchSampler(labels, n_classes=2, n_samples=2, seed=4)
    for _ in range(20):
        check_batches(list(sampler), labels, 2, 2)


@pytest.mark.parametrize("seed", range(8))
def test_sampler_covers_balanced_labels_exactly_once(seed):
    labels = torch.arange(10).repeat(12)[torch.randperm(120, generator=torch.Generator().manual_seed(seed))]
    for n_classes, n_samples in [(3, 4), (5, 2), (10, 12), (2, 6)]:
        batches = list(BalancedBatchSampler(labels, n_classes, n_samples, seed=seed))
        assert sorted(i for batch in batches for i in batch) == list(range(120))


@pytest.mark.parametrize("seed", range(8))
def test_sampler_covers_most_of_unbalanced_labels(seed):
    sizes = [5, 8, 13, 20, 30, 7, 17, 40, 9, 11]
    labels = torch.arange(10).repeat_interleave(torch.tensor(sizes))
    sampler = BalancedBatchSampler(labels, n_classes=3, n_samples=4, seed=seed)
    seen = {i for batch in sampler for i in batch}
    assert len(seen) >= 0.9 * len(labels)


def test_sampler_seed_and_set_epoch_replay():
    labels = torch.arange(6).repeat(10)
    sampler = BalancedBatchSampler(labels, 3, 2, seed=7)
    epochs = [list(sampler) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert [list(s) for s in [BalancedBatchSampler(labels, 3, 2, seed=7)] * 3] == epochs
    assert list(BalancedBatchSampler(labels, 3, 2, seed=8)) != epochs[0]
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1] and list(sampler) == epochs[2]
    resumed = BalancedBatchSampler(labels, 3, 2, seed=7)
    resumed.set_epoch(2)
    torch.manual_seed(1234)  # a seeded sampler ignores the global RNG
    assert list(resumed) == epochs[2]


def test_sampler_without_seed_follows_torch_global_rng():
    labels = torch.arange(6).repeat(10)
    torch.manual_seed(0)
    first = [list(BalancedBatchSampler(labels, 3, 2)) for _ in range(2)]
    torch.manual_seed(0)
    second = [list(BalancedBatchSampler(labels, 3, 2)) for _ in range(2)]
    assert first == second and first[0] != first[1]


def test_sampler_drives_a_dataloader():
    labels = torch.arange(5).repeat(8)
    dataset = memory_dataset(labels)
    loader = DataLoader(dataset, batch_sampler=BalancedBatchSampler(dataset.targets, 2, 4, seed=0))
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for images, targets in batches:
        assert images.shape == (8, 1, 4, 4)
        assert torch.equal(labels[images.flatten(1)[:, 0].long()], targets)
        assert (targets.unique(return_counts=True)[1] == 4).all()


@pytest.mark.parametrize("seed", range(6))
def test_grouped_sampler_draws_each_batch_inside_one_group(seed):
    generator = torch.Generator().manual_seed(seed)
    n_groups = 3
    class_sizes = torch.randint(4, 12, (12,), generator=generator)
    labels = torch.arange(12).repeat_interleave(class_sizes)
    class_group = torch.arange(12) % n_groups  # classes 0, 3, 6, 9 in group 0, ...
    groups = (class_group[labels] + 10).numpy()  # any integer ids
    sampler = BalancedBatchSampler(labels, n_classes=3, n_samples=4, seed=seed, groups=groups)
    batches = list(sampler)
    check_batches(batches, labels, 3, 4)
    for batch in batches:
        assert len(set(class_group[labels[torch.tensor(batch)]].tolist())) == 1
    used_groups = {int(class_group[labels[batch[0]]]) for epoch in range(4) for batch in sampler}
    assert used_groups == set(range(n_groups))  # every group gets batches
    assert batches == list(BalancedBatchSampler(labels, 3, 4, seed=seed, groups=groups))  # seeded


def test_grouped_sampler_errors():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="one integer group id per item"):
        BalancedBatchSampler(labels, 2, 2, groups=[0, 1])
    with pytest.raises(ValueError, match="one integer group id per item"):
        BalancedBatchSampler(labels, 2, 2, groups=[0.0] * 8)
    with pytest.raises(ValueError, match="every class must lie inside one group"):
        BalancedBatchSampler(labels, 2, 2, groups=[0, 1, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="at least n_classes=3 classes, but one has only 2; lower n_classes"):
        BalancedBatchSampler(labels, 3, 2, groups=[0, 0, 0, 0, 1, 1, 1, 1])


def test_sampler_errors():
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(TypeError, match="n_classes must be an int"):
        BalancedBatchSampler(labels, 2.0, 2)
    with pytest.raises(TypeError, match="n_samples must be an int"):
        BalancedBatchSampler(labels, 2, True)
    with pytest.raises(ValueError, match="n_classes must be >= 1, got 0"):
        BalancedBatchSampler(labels, 0, 2)
    with pytest.raises(ValueError, match="n_samples must be >= 1, got -1"):
        BalancedBatchSampler(labels, 2, -1)
    with pytest.raises(ValueError, match="seed must be >= 0, got -3"):
        BalancedBatchSampler(labels, 2, 2, seed=-3)
    with pytest.raises(ValueError, match="1-D"):
        BalancedBatchSampler([[0, 1], [1, 0]], 1, 1)
    with pytest.raises(ValueError, match="8 items, fewer than one batch .* = 9"):
        BalancedBatchSampler(labels, 3, 3)
    with pytest.raises(ValueError, match="n_classes=4 but labels hold only 3 classes"):
        BalancedBatchSampler(labels, 4, 1)
    with pytest.raises(ValueError, match=r"n_samples=3 items, but: class 2 \(2 items\); lower n_samples or "
                                         r"filter those classes out"):
        BalancedBatchSampler(labels, 2, 3)
    with pytest.raises(ValueError, match=r"class 1 \(1 items\), class 2 \(2 items\)"):
        BalancedBatchSampler([0, 0, 0, 0, 1, 2, 2, 0, 0], 2, 3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BalancedBatchSampler([], 1, 1)


# ---------------------------------------------------------------------------------------------------
# split_per_class and held_out_class_split


def split_folder(root):
    return class_folder(root, {"g/a": 10, "g/b": 2, "h/c": 1, "h/d": 5}, size=(4, 4))


@pytest.mark.parametrize("memory", [True, False])
def test_split_per_class(tmp_path, memory):
    dataset = load_image_folder(split_folder(tmp_path), progress=False, **({} if memory else {"max_memory_bytes": 0}))
    train, val = split_per_class(dataset, val_fraction=0.25, seed=0)
    # round(2.5) -> 3 of 10, at least 1 of 2, none of 1, round(1.25) -> 1 of 5
    assert torch.bincount(val.targets, minlength=4).tolist() == [3, 1, 0, 1]
    assert torch.bincount(train.targets, minlength=4).tolist() == [7, 1, 1, 4]
    assert sorted(train.paths + val.paths) == sorted(dataset.paths) and not set(train.paths) & set(val.paths)
    assert train.paths == sorted(train.paths, key=dataset.paths.index)  # the items keep their order
    index = {path: k for k, path in enumerate(dataset.paths)}
    assert val.groups.tolist() == [int(dataset.groups[index[path]]) for path in val.paths]
    assert val.targets.tolist() == [int(dataset.targets[index[path]]) for path in val.paths]
    assert train.classes == val.classes == dataset.classes and val.group_names == ["g", "h"]
    assert train.train and not val.train
    if memory:
        assert torch.equal(val.data[0], dataset.data[index[val.paths[0]]])
    assert split_per_class(dataset, 0.25, seed=0)[1].paths == val.paths
    assert any(split_per_class(dataset, 0.25, seed=seed)[1].paths != val.paths for seed in (1, 2, 3))
    assert torch.bincount(split_per_class(dataset, 0.9)[1].targets, minlength=4).tolist() == [9, 1, 0, 4]
    for bad in (0, 1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            split_per_class(dataset, bad)


@pytest.mark.parametrize("memory", [True, False])
def test_held_out_class_split(tmp_path, memory):
    root = class_folder(tmp_path, {"g/a": 2, "g/b": 1, "h/c": 3, "h/d": 1, "h/e": 2, "i/f": 1}, size=(4, 4))
    dataset = load_image_folder(root, progress=False, **({} if memory else {"max_memory_bytes": 0}))
    seen, held_out, names = held_out_class_split(dataset, ["h/c", "g/a"])
    assert names == held_out.classes == ["g/a", "h/c"]
    assert seen.classes == ["g/b", "h/d", "h/e", "i/f"]
    assert held_out.targets.tolist() == [0, 0, 1, 1, 1] and seen.targets.tolist() == [0, 1, 2, 2, 3]
    assert held_out.paths == dataset.paths[0:2] + dataset.paths[3:6]
    assert held_out.groups.tolist() == [0, 0, 1, 1, 1] and seen.groups.tolist() == [0, 1, 1, 1, 2]
    assert seen.group_names == held_out.group_names == dataset.group_names
    if memory:
        assert torch.equal(held_out.data[2], dataset.data[3])
    for spec in ([0, 2], "g/a, h/c", "0,2", "2,g/a"):
        assert held_out_class_split(dataset, spec)[2] == ["g/a", "h/c"], spec
    seen, held_out, names = held_out_class_split(dataset, 0.5, seed=0)
    assert len(names) == 3 and len(seen.classes) == 3 and not set(names) & set(seen.classes)
    assert len(seen) + len(held_out) == len(dataset)
    assert held_out_class_split(dataset, "0.5", seed=0)[2] == names == held_out_class_split(dataset, 0.5, seed=0)[2]
    assert any(held_out_class_split(dataset, 0.5, seed=seed)[2] != names for seed in (1, 2, 3))
    assert len(held_out_class_split(dataset, 0.3)[2]) == 2  # round(1.8)


def test_held_out_class_split_errors(tmp_path):
    dataset = load_image_folder(class_folder(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 1}, size=(4, 4)), progress=False)
    for spec, message in [(["a"], "\\['a'\\] leave 3 seen and 1 held-out classes of 4"),
                          ("a,b,c", "'a,b,c' leave 1 seen and 3 held-out"),
                          (0.1, "0.1 leave 3 seen and 1 held-out"),
                          (["a", "zebra"], "'zebra' is neither a class name nor a class index; the classes are a, b"),
                          ([0, 4], "class index 4 is out of range 0..3"),
                          ("1,7", "class index 7 is out of range"),
                          (1.5, "fraction 1.5 must lie between 0 and 1"),
                          ([0.5], "0.5 is neither a class name nor a class index")]:
        with pytest.raises(ValueError, match=f"held-out class.*{message}"):
            held_out_class_split(dataset, spec)
    for spec in (None, True):
        with pytest.raises(TypeError, match="held-out classes must be a fraction"):
            held_out_class_split(dataset, spec)


# ---------------------------------------------------------------------------------------------------
# Names that moved out of datasets.py still resolve for one release, with a warning naming their new module


@pytest.mark.parametrize("name, new_module", [("read_image", image_folders), ("load_folder_splits", image_folders),
                                              ("ImageFileDataset", image_folders), ("load_dataset", known_datasets),
                                              ("KNOWN_DATASETS", known_datasets), ("read_idx", known_datasets)])
def test_old_datasets_paths_warn_and_give_the_moved_object(name, new_module):
    assert_moved_name(datasets, name, new_module)


def test_datasets_imports_neither_known_datasets_nor_image_folders():
    """The imports go one way: known_datasets.py and image_folders.py build on datasets.py."""
    code = "import sys, datasets; print(sorted(set(sys.modules) & {'known_datasets', 'image_folders'}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


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


def test_affine_without_elastic_draws_nothing_more():
    images = torch.rand(3, 1, 10, 10)
    plain_generator, elastic_off = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = BatchRandomAffine(generator=plain_generator)(images)
    assert torch.equal(plain, BatchRandomAffine(generator=elastic_off, elastic=0.0, elastic_cells=2)(images))
    assert torch.equal(plain_generator.get_state(), elastic_off.get_state())
    assert "elastic" not in repr(BatchRandomAffine()) and "elastic=0.05" in repr(BatchRandomAffine(elastic=0.05))


def test_elastic_field_passes_through_its_control_points_and_is_smooth():
    warp = BatchRandomAffine(elastic=0.1, elastic_cells=3, generator=torch.Generator().manual_seed(1))
    field = warp.displacements(4, 31, 31)
    assert field.shape == (4, 31, 31, 2) and field.dtype == torch.float32
    knots = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    # control points at every 10th pixel (align_corners): the field there is the draw, x 2 x elastic
    assert torch.allclose(field[:, ::10, ::10].permute(0, 3, 1, 2), (knots * 0.2).float(), atol=1e-6)
    assert field.abs().max() <= 0.2 * 1.6  # bicubic interpolation overshoots its knots by a bounded factor
    steps = torch.cat([(field[:, 1:] - field[:, :-1]).flatten(), (field[:, :, 1:] - field[:, :, :-1]).flatten()])
    assert steps.abs().max() < 0.4 * 0.2  # neighbouring pixels move alike: bends, no tears


def test_elastic_warp_moves_a_dot_by_at_most_its_field():
    dot = torch.zeros(50, 1, 41, 41)
    dot[:, :, 20, 20] = 1.0
    blurred = torch.nn.functional.avg_pool2d(dot, 5, stride=1, padding=2)  # a blob, so bilinear sampling keeps it
    identity = {"degrees": 0, "shear": 0, "scale": (1, 1), "translate": 0}
    warped = BatchRandomAffine(**identity, elastic=0.05, generator=torch.Generator().manual_seed(2))(blurred)
    coordinates = torch.arange(41, dtype=torch.float32)
    mass = warped.sum((1, 2, 3))
    centre_y = (warped.sum(3).squeeze(1) * coordinates).sum(1) / mass
    centre_x = (warped.sum(2).squeeze(1) * coordinates).sum(1) / mass
    moved = torch.stack([centre_y - 20, centre_x - 20], 1).abs()
    assert moved.max() <= 0.05 * 41 * 1.6 and moved.max() > 0.3  # within its field, and not left in place
    assert mass.min() > 0.5 and mass.max() < 1.5  # bent, stretched or squeezed locally, not erased


@pytest.mark.parametrize("arguments, error, message", [
    ({"degrees": -1}, ValueError, "degrees must be >= 0"), ({"shear": "x"}, TypeError, "shear must be a real number"),
    ({"translate": True}, TypeError, "translate must be a real number"),
    ({"scale": (1.2, 0.8)}, ValueError, "scale's high must be >= 1.2"), ({"scale": 1.0}, ValueError, "scale must be"),
    ({"scale": (1, 2, 3)}, ValueError, "scale must be"), ({"scale": (0, 1)}, ValueError, "scale's low must be > 0"),
    ({"scale": ("a", 1)}, TypeError, "scale's low must be a real number"),
    ({"scale": (1, float("inf"))}, ValueError, "scale's high must be finite"),
    ({"elastic": -0.1}, ValueError, "elastic must be >= 0"), ({"elastic": "x"}, TypeError, "elastic must be a real"),
    ({"elastic": float("inf")}, ValueError, "elastic must be finite"),
    ({"degrees": float("nan")}, ValueError, "degrees must be >= 0, got nan"),
    ({"elastic_cells": 0}, ValueError, "elastic_cells must be >= 1")])
def test_affine_argument_errors_name_the_argument(arguments, error, message):
    with pytest.raises(error, match=message):
        BatchRandomAffine(**arguments)


def test_affine_needs_float_tensors():
    with pytest.raises(TypeError, match="float tensor"):
        BatchRandomAffine()(torch.zeros(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float tensor"):
        BatchRandomAffine()(torch.zeros(4, 4))
