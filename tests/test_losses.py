"""Tests for losses.py: values written out by hand, brute-force references, gradients, edge cases.

The hand-computed cases use 2-D points with integer coordinates, whose squared distances can be
read off directly; the online losses are also compared with tests/reference.py on random batches,
their gradients are checked with `torch.autograd.gradcheck` in float64 (with a fixed selector
result so the selection cannot change under the finite differences), and every selector/loss
combination is run on the edge-case batches with a backward pass. The losses built on one formula
are checked to agree up to their documented scale factors, and a NaN or infinite embedding must
give a non-finite loss with every selector, so that `trainer.fit` stops. The offline losses follow the
online rule on an empty batch: a zero that backpropagates.

The soft margin and the choice of plain or squared Euclidean distances, against brute force:
``TripletLoss`` / ``OnlineTripletLoss(soft=..., distance=...)`` and ``ContrastiveLoss`` /
``OnlineContrastiveLoss(distance=...)`` are compared with the loops of ``tests/reference.py`` over many
random batches (hypothesis, derandomised); the triplet selectors built with ``distance="euclidean"``
apply their hardness tests to the plain distances (the reference loops handed the plain matrix); the
gradients pass gradcheck and stay finite where two embeddings coincide. Mining over the global batch of
several processes: test_distributed.py.
"""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
import reference
import utils
from losses import ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss
from networks import AutoencoderOutput
from reference import (
    ref_contrastive_loss,
    ref_nonzero_triplet_count,
    ref_online_contrastive_loss,
    ref_online_triplet_loss,
    ref_triplet_loss,
)
from trainer import fit
from utils import (AllTripletSelector, BatchHardTripletSelector, HardestNegativeTripletSelector,
                   HardNegativePairSelector, RandomNegativeTripletSelector, SemihardNegativeTripletSelector,
                   as_distance, pdist)


# ----------------------------------------------------------------------------- helpers

class FixedTriplets:
    """A triplet selector that always returns the same triplets (T, 3)."""

    def __init__(self, triplets):
        self.triplets = torch.as_tensor(triplets, dtype=torch.long).reshape(-1, 3)

    def get_triplets(self, embeddings, labels):
        return self.triplets


class FixedPairs:
    """A pair selector that always returns the same (positive (P, 2), negative (N, 2)) pairs."""

    def __init__(self, positive_pairs, negative_pairs):
        self.positive_pairs = torch.as_tensor(positive_pairs, dtype=torch.long).reshape(-1, 2)
        self.negative_pairs = torch.as_tensor(negative_pairs, dtype=torch.long).reshape(-1, 2)

    def get_pairs(self, embeddings, labels):
        return self.positive_pairs, self.negative_pairs


class Recording:
    """Wraps a selector and keeps what it returned last, to hand it to the reference loss."""

    def __init__(self, selector):
        self.selector = selector
        self.last = None

    def get_triplets(self, embeddings, labels):
        self.last = self.selector.get_triplets(embeddings, labels)
        return self.last

    def get_pairs(self, embeddings, labels):
        self.last = self.selector.get_pairs(embeddings, labels)
        return self.last

    def __getattr__(self, name):
        """The wrapped selector's attribute; its ``select_pairs`` / ``select_triplets`` (the rows of a batch
        a process mines, what the online losses call) recorded too. AttributeError when it has none."""
        attribute = getattr(self.__dict__["selector"], name)
        if name not in ("select_pairs", "select_triplets"):
            return attribute

        def recorded(*args, **kwargs):
            self.last = attribute(*args, **kwargs)
            return self.last

        return recorded


# Four 2-D points with known squared distances:
#   x0 = (0, 0), x1 = (3, 4), x2 = (1, 0), x3 = (0, 2); labels [0, 0, 1, 1]
#   D01 = 25, D02 = 1, D03 = 4, D12 = 20, D13 = 13, D23 = 5
FOUR_POINTS = [[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]
FOUR_LABELS = [0, 0, 1, 1]


def four_points(dtype=torch.float32):
    return torch.tensor(FOUR_POINTS, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------- ContrastiveLoss

def test_contrastive_loss_by_hand():
    output1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    output2 = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([1, 0, 0])
    # pair 0: same class, d = 25 -> 0.5 * 25
    # pair 1: different, d = 1 -> 0.5 * (2 - sqrt(1 + 1e-9))^2
    # pair 2: different, d = 0 -> 0.5 * (2 - sqrt(1e-9))^2
    terms = [12.5, 0.5 * (2 - math.sqrt(1 + 1e-9)) ** 2, 0.5 * (2 - math.sqrt(1e-9)) ** 2]
    loss = losses.ContrastiveLoss(2.0)
    assert loss(output1, output2, target).item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    assert loss(output1, output2, target, size_average=False).item() == \
        pytest.approx(sum(terms), rel=1e-6)
    assert sum(terms) == pytest.approx(12.5 + 0.5 + 2.0, abs=1e-4)
    assert loss(output1, output2, target).item() == \
        pytest.approx(ref_contrastive_loss(output1, output2, target, 2.0), rel=1e-6)


def test_contrastive_loss_far_negatives_cost_nothing():
    output1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    output2 = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    # both pairs are negatives; |.| = 5 and 1, margin 1: relu(1 - 5) = 0, relu(1 - 1.0000000005) = 0
    loss = losses.ContrastiveLoss(1.0)(output1, output2, torch.tensor([0.0, 0.0]))
    assert loss.item() == 0.0


def test_contrastive_loss_matches_reference_on_random_pairs():
    generator = torch.Generator().manual_seed(0)
    for case in range(20):
        output1 = torch.randn(9, 4, generator=generator)
        output2 = torch.randn(9, 4, generator=generator)
        target = torch.randint(0, 2, (9,), generator=generator)
        margin = [0.5, 1.0, 2.5, 4.0][case % 4]
        for size_average in (True, False):
            got = losses.ContrastiveLoss(margin)(output1, output2, target, size_average)
            expected = ref_contrastive_loss(output1, output2, target, margin, size_average)
            assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- TripletLoss

def test_triplet_loss_by_hand():
    anchor = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    negative = torch.tensor([[2.0, 0.0], [1.0, 1.0], [2.0, 1.0]])
    # |a-p|^2, |a-n|^2: (1, 4) -> relu(1 - 4 + 1) = 0; (4, 2) -> 3; (1, 1) -> 1
    loss = losses.TripletLoss(1.0)
    assert loss(anchor, positive, negative).item() == pytest.approx(4 / 3, rel=1e-6)
    assert loss(anchor, positive, negative, size_average=False).item() == 4.0
    assert loss(anchor, positive, negative).item() == \
        pytest.approx(ref_triplet_loss(anchor, positive, negative, 1.0), rel=1e-6)


def test_triplet_loss_matches_reference_on_random_triplets():
    generator = torch.Generator().manual_seed(1)
    for case in range(20):
        anchor, positive, negative = torch.randn(3, 7, 5, generator=generator)
        margin = [0.0, 0.5, 2.0, 8.0][case % 4]
        for size_average in (True, False):
            got = losses.TripletLoss(margin)(anchor, positive, negative, size_average)
            expected = ref_triplet_loss(anchor, positive, negative, margin, size_average)
            assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------ OnlineContrastiveLoss

def test_online_contrastive_loss_by_hand_with_hard_negatives():
    # positives (0, 1): 25 and (2, 3): 5; the two closest negatives (0, 2): 1 and (0, 3): 4
    # hinges with margin 3: (3 - 1)^2 = 4 and (3 - 2)^2 = 1 (up to the 1e-9 under the root)
    embeddings = four_points()
    loss = losses.OnlineContrastiveLoss(3.0, utils.HardNegativePairSelector())(embeddings,
                                                                                FOUR_LABELS)
    expected = (25 + 5 + (3 - math.sqrt(1 + 1e-9)) ** 2 + (3 - math.sqrt(4 + 1e-9)) ** 2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(35 / 4, rel=1e-6)


def test_online_contrastive_loss_by_hand_with_all_pairs():
    # the farther negatives (1, 2): sqrt 20 and (1, 3): sqrt 13 are beyond the margin 3: cost 0
    embeddings = four_points()
    selector = utils.AllPositivePairSelector(balance=False)
    loss = losses.OnlineContrastiveLoss(3.0, selector)(embeddings, FOUR_LABELS)
    assert loss.item() == pytest.approx((25 + 5 + 4 + 1 + 0 + 0) / 6, rel=1e-6)


@pytest.mark.parametrize("make_selector", [
    lambda seed: utils.AllPositivePairSelector(generator=torch.Generator().manual_seed(seed)),
    lambda seed: utils.AllPositivePairSelector(balance=False),
    lambda seed: utils.HardNegativePairSelector(),
], ids=["balanced", "all", "hard"])
def test_online_contrastive_loss_matches_reference(make_selector):
    generator = torch.Generator().manual_seed(2)
    for case in range(25):
        n_classes = 2 + case % 4
        labels = torch.randint(0, n_classes, (12,), generator=generator)
        embeddings = torch.randn(12, [2, 16][case % 2], generator=generator)
        margin = [0.5, 1.0, 3.0, 6.0][case % 4]
        selector = Recording(make_selector(case))
        got = losses.OnlineContrastiveLoss(margin, selector)(embeddings, labels)
        positive_pairs, negative_pairs = selector.last
        expected = ref_online_contrastive_loss(embeddings, positive_pairs, negative_pairs, margin)
        assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- OnlineTripletLoss

@pytest.mark.parametrize("selector, margin, expected_loss, expected_count", [
    # every triplet: losses 27, 24, 8, 15, 7, 0, 4, 0
    (utils.AllTripletSelector(), 3.0, 85 / 8, 6),
    # closest negatives: (0,1,2) 27, (1,0,3) 15, (2,3,0) 7, (3,2,0) 4
    (utils.HardestNegativeTripletSelector(3.0), 3.0, 53 / 4, 4),
    (utils.BatchHardTripletSelector(), 3.0, 53 / 4, 4),
    # semi-hard with margin 10: only (3, 2, 1): 5 < 13 < 15, loss 5 + 10 - 13 = 2
    (utils.SemihardNegativeTripletSelector(10.0), 10.0, 2.0, 1),
    # semi-hard with margin 3: nothing is semi-hard
    (utils.SemihardNegativeTripletSelector(3.0), 3.0, 0.0, 0),
], ids=["all", "hardest", "batch_hard", "semihard_10", "semihard_3"])
def test_online_triplet_loss_by_hand(selector, margin, expected_loss, expected_count):
    embeddings = four_points()
    recording = Recording(selector)
    loss, n_triplets = losses.OnlineTripletLoss(margin, recording)(embeddings, FOUR_LABELS)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert n_triplets == expected_count and type(n_triplets) is int
    assert (loss.item(), n_triplets) == \
        pytest.approx(ref_online_triplet_loss(embeddings, recording.last, margin), rel=1e-6)


def test_online_triplet_loss_by_hand_random_hard():
    # hard negatives with margin 3: (0,1): {2, 3}, (1,0): {2, 3}, (2,3): {0}, (3,2): {0}
    embeddings = four_points()
    per_choice = {(0, 1, 2): 27, (0, 1, 3): 24, (1, 0, 2): 8, (1, 0, 3): 15,
                  (2, 3, 0): 7, (3, 2, 0): 4}
    for seed in range(10):
        recording = Recording(utils.RandomNegativeTripletSelector(
            3.0, generator=torch.Generator().manual_seed(seed)))
        loss, n_triplets = losses.OnlineTripletLoss(3.0, recording)(embeddings, FOUR_LABELS)
        chosen = [tuple(t) for t in recording.last.tolist()]
        assert [t[:2] for t in chosen] == [(0, 1), (1, 0), (2, 3), (3, 2)]
        assert n_triplets == 4
        assert loss.item() == pytest.approx(sum(per_choice[t] for t in chosen) / 4, rel=1e-6)


TRIPLET_SELECTORS = {
    "all": lambda margin, seed: utils.AllTripletSelector(),
    "hardest": lambda margin, seed: utils.HardestNegativeTripletSelector(margin),
    "random_hard": lambda margin, seed: utils.RandomNegativeTripletSelector(
        margin, generator=torch.Generator().manual_seed(seed)),
    "semihard": lambda margin, seed: utils.SemihardNegativeTripletSelector(
        margin, generator=torch.Generator().manual_seed(seed)),
    "batch_hard": lambda margin, seed: utils.BatchHardTripletSelector(),
}

PAIR_SELECTORS = {
    "balanced_pairs": lambda margin, seed: utils.AllPositivePairSelector(
        generator=torch.Generator().manual_seed(seed)),
    "all_pairs": lambda margin, seed: utils.AllPositivePairSelector(balance=False),
    "hard_pairs": lambda margin, seed: utils.HardNegativePairSelector(),
}


@pytest.mark.parametrize("selector_name", list(TRIPLET_SELECTORS))
def test_online_triplet_loss_matches_reference(selector_name):
    generator = torch.Generator().manual_seed(3)
    for case in range(25):
        n_classes = 2 + case % 4
        labels = torch.randint(0, n_classes, (14,), generator=generator)
        embeddings = torch.randn(14, [2, 16][case % 2], generator=generator)
        margin = [0.25, 1.0, 4.0, 16.0][case % 4]
        recording = Recording(TRIPLET_SELECTORS[selector_name](margin, case))
        loss, n_triplets = losses.OnlineTripletLoss(margin, recording)(embeddings, labels)
        triplets = recording.last
        expected_loss, _ = ref_online_triplet_loss(embeddings, triplets, margin)
        scale = max(1.0, margin)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-4, abs=1e-5 * scale)
        assert n_triplets == ref_nonzero_triplet_count(utils.pdist(embeddings), triplets, margin)
        if selector_name in ("hardest", "random_hard", "semihard"):
            assert n_triplets == len(triplets)  # they only ever pick hard negatives


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("make_loss", [
    lambda: OnlineContrastiveLoss(1.0, HardNegativePairSelector()),
    lambda: OnlineTripletLoss(1.0, HardestNegativeTripletSelector(1.0)),
    lambda: OnlineTripletLoss(1.0, BatchHardTripletSelector(distance="euclidean"), distance="euclidean"),
])
def test_online_losses_keeping_their_block_give_what_a_fresh_loss_gives(make_loss):
    kept = make_loss()
    generator = torch.Generator().manual_seed(5)
    for size in (40, 40, 24, 40):  # the same shape again (the block reused), then another, then back
        embeddings = torch.randn(size, 3, generator=generator)
        labels = torch.randint(0, 4, (size,), generator=generator)
        value = kept(embeddings, labels)
        expected = make_loss()(embeddings, labels)
        assert torch.equal(value[0] if isinstance(value, tuple) else value,
                           expected[0] if isinstance(expected, tuple) else expected)


def test_pdist_gradcheck():
    points = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(utils.pdist, (points.requires_grad_(),))


def test_contrastive_loss_gradcheck():
    generator = torch.Generator().manual_seed(5)
    output1 = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    output2 = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    target = torch.tensor([1, 0, 1, 0, 0, 0])
    margin = 1.75
    distances = (output1 - output2).pow(2).sum(1).sqrt()
    assert torch.all((distances - margin).abs() > 0.05)  # away from the hinge's kink
    assert torch.any(distances[target == 0] < margin)  # some hinges active,
    assert torch.any(distances[target == 0] > margin)  # some not
    loss = losses.ContrastiveLoss(margin)
    for size_average in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, y: loss(x, y, target, size_average),
            (output1.clone().requires_grad_(), output2.clone().requires_grad_()))


def test_triplet_loss_gradcheck():
    generator = torch.Generator().manual_seed(6)
    anchor, positive, negative = torch.randn(3, 8, 4, dtype=torch.float64, generator=generator)
    margin = 1.0
    values = (anchor - positive).pow(2).sum(1) - (anchor - negative).pow(2).sum(1) + margin
    assert torch.all(values.abs() > 0.05) and torch.any(values > 0) and torch.any(values < 0)
    loss = losses.TripletLoss(margin)
    for size_average in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, p, n: loss(a, p, n, size_average),
            (anchor.clone().requires_grad_(), positive.clone().requires_grad_(),
             negative.clone().requires_grad_()))


def test_online_contrastive_loss_gradcheck():
    embeddings = torch.tensor(FOUR_POINTS, dtype=torch.float64) + torch.tensor(
        [[0.1, -0.2], [0.05, 0.1], [-0.1, 0.15], [0.2, 0.0]], dtype=torch.float64)
    # negatives (0, 2) at distance ~1 and (1, 3) at ~3.6 around margin 3: one active, one not
    selector = FixedPairs([[0, 1], [2, 3]], [[0, 2], [1, 3], [0, 3]])
    loss = losses.OnlineContrastiveLoss(3.0, selector)
    assert torch.autograd.gradcheck(lambda x: loss(x, FOUR_LABELS),
                                    (embeddings.requires_grad_(),))


def test_online_triplet_loss_gradcheck():
    embeddings = torch.tensor(FOUR_POINTS, dtype=torch.float64) + torch.tensor(
        [[0.1, -0.2], [0.05, 0.1], [-0.1, 0.15], [0.2, 0.0]], dtype=torch.float64)
    # with margin 3 the first three are active (loss ~27, ~15, ~7), (2, 3, 1) is not (~ -12)
    selector = FixedTriplets([[0, 1, 2], [1, 0, 3], [2, 3, 0], [2, 3, 1]])
    loss = losses.OnlineTripletLoss(3.0, selector)
    assert torch.autograd.gradcheck(lambda x: loss(x, FOUR_LABELS)[0],
                                    (embeddings.requires_grad_(),))


def test_online_losses_gradient_by_hand():
    # One triplet (0, 1, 2): loss = |x0 - x1|^2 - |x0 - x2|^2 + margin
    #   d/dx0 = 2 (x0 - x1) - 2 (x0 - x2) = 2 (x2 - x1); d/dx1 = -2 (x0 - x1); d/dx2 = 2 (x0 - x2)
    embeddings = four_points(torch.float64)
    loss, _ = losses.OnlineTripletLoss(30.0, FixedTriplets([[0, 1, 2]]))(embeddings, FOUR_LABELS)
    assert loss.item() == pytest.approx(25 - 1 + 30)
    loss.backward()
    expected = torch.tensor([[2 * (1 - 3), 2 * (0 - 4)], [6.0, 8.0], [-2.0, 0.0], [0.0, 0.0]],
                            dtype=torch.float64)
    assert torch.allclose(embeddings.grad, expected)


# ----------------------------------------------------------------------------- edge cases

def edge_batches():
    generator = torch.Generator().manual_seed(7)
    unit = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    return {
        "all_distinct": (torch.randn(5, 2, generator=generator), [0, 1, 2, 3, 4]),
        "single_class": (torch.randn(5, 3, generator=generator), [2] * 5),
        "three_plus_one": (torch.randn(4, 2, generator=generator), [0, 0, 0, 1]),
        "identical": (torch.full((6, 3), 0.5), [0, 0, 1, 1, 2, 2]),
        "norm_1e4_spread": (1e4 * unit, [0, 0, 1, 1, 2, 2, 3, 3]),
        "norm_1e4_offset": (1e4 + torch.randn(8, 16, generator=generator),
                            [0, 1, 0, 1, 2, 2, 3, 3]),
        # classes collapsed on two far apart points: every triplet and every pair is easy
        "all_easy": (torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0]]),
                     [0, 0, 1, 1]),
        "batch_of_1": (torch.randn(1, 2, generator=generator), [0]),
        "batch_of_2": (torch.randn(2, 2, generator=generator), [0, 1]),
    }


EDGE_BATCHES = edge_batches()
ALL_SELECTORS = {**TRIPLET_SELECTORS, **PAIR_SELECTORS}


def run_online_loss(selector_name, embeddings, labels, margin=1.0):
    """(loss, n_triplets or None, what the selector returned), after loss.backward()."""
    recording = Recording(ALL_SELECTORS[selector_name](margin, 0))
    if selector_name in TRIPLET_SELECTORS:
        loss, n_triplets = losses.OnlineTripletLoss(margin, recording)(embeddings, labels)
    else:
        loss, n_triplets = losses.OnlineContrastiveLoss(margin, recording)(embeddings, labels), None
    loss.backward()
    return loss, n_triplets, recording.last


def selected_nothing(selected):
    if isinstance(selected, tuple):
        return all(len(pairs) == 0 for pairs in selected)
    return len(selected) == 0


@pytest.mark.parametrize("selector_name", list(ALL_SELECTORS))
@pytest.mark.parametrize("batch_name", list(EDGE_BATCHES))
def test_online_losses_on_edge_cases(selector_name, batch_name):
    points, labels = EDGE_BATCHES[batch_name]
    embeddings = points.clone().requires_grad_(True)
    loss, n_triplets, selected = run_online_loss(selector_name, embeddings, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert embeddings.grad is not None
    assert embeddings.grad.shape == embeddings.shape
    assert torch.all(torch.isfinite(embeddings.grad))
    if selected_nothing(selected):
        assert loss.item() == 0.0
        assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
        assert n_triplets in (0, None)
    if batch_name == "all_easy":
        assert loss.item() == 0.0
        assert n_triplets in (0, None)
        assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
    if batch_name in ("all_distinct", "batch_of_1", "batch_of_2") and \
            selector_name != "all_pairs":
        assert selected_nothing(selected)


def test_all_easy_batch_still_selects_for_all_and_batch_hard():
    # all-triplets and batch-hard keep their triplets whatever the loss: loss 0, count 0.
    points, labels = EDGE_BATCHES["all_easy"]
    for name, expected in (("all", 8), ("batch_hard", 4)):
        embeddings = points.clone().requires_grad_(True)
        loss, n_triplets, selected = run_online_loss(name, embeddings, labels)
        assert len(selected) == expected
        assert loss.item() == 0.0 and n_triplets == 0


def test_empty_selection_gives_a_zero_loss_that_backpropagates():
    embeddings = torch.randn(5, 3, requires_grad=True)
    loss, n_triplets = losses.OnlineTripletLoss(
        1.0, utils.HardestNegativeTripletSelector(1.0))(embeddings, [0, 1, 2, 3, 4])
    assert n_triplets == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert embeddings.grad is not None and torch.equal(embeddings.grad, torch.zeros(5, 3))

    embeddings = torch.randn(5, 3, requires_grad=True)
    loss = losses.OnlineContrastiveLoss(1.0, FixedPairs([], []))(embeddings, [0, 0, 1, 1, 2])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert embeddings.grad is not None and torch.equal(embeddings.grad, torch.zeros(5, 3))


@pytest.mark.parametrize("size_average", [True, False])
@pytest.mark.parametrize("make_loss, n_inputs", [
    (lambda: losses.TripletLoss(1.0), 3), (lambda: losses.TripletLoss(0.0, soft=True, distance="euclidean"), 3),
    (lambda: losses.ContrastiveLoss(1.0), 2), (lambda: losses.ContrastiveLoss(1.0, distance="euclidean"), 2)],
    ids=["triplet", "triplet-soft-euclidean", "contrastive", "contrastive-euclidean"])
def test_an_offline_loss_of_an_empty_batch_is_a_zero_that_backpropagates(make_loss, n_inputs, size_average):
    # the online rule (an empty mean would be NaN): as OnlineTripletLoss / OnlineContrastiveLoss give
    inputs = [torch.zeros(0, 2, requires_grad=True) for _ in range(n_inputs)]
    target = [torch.zeros(0)] if n_inputs == 2 else []
    loss = make_loss()(*inputs, *target, size_average=size_average)
    assert loss.shape == () and torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for tensor in inputs:
        assert tensor.grad is not None and torch.equal(tensor.grad, torch.zeros(0, 2))
    shared = torch.zeros(0, 2, requires_grad=True)  # the case: one tensor in every place
    loss = make_loss()(*[shared] * n_inputs, *target, size_average=size_average)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(shared.grad, torch.zeros(0, 2))


def test_the_offline_losses_of_a_batch_are_unchanged_by_the_empty_batch_rule():
    # the guard adds an exact zero: the mean and its gradient are those of the plain mean
    generator = torch.Generator().manual_seed(0)
    anchor, positive, negative = (torch.randn(6, 3, generator=generator, requires_grad=True) for _ in range(3))
    loss = losses.TripletLoss(1.0)(anchor, positive, negative)
    plain = losses.triplet_terms(utils.paired_squared_distances(anchor, positive),
                                 utils.paired_squared_distances(anchor, negative), 1.0).mean()
    assert torch.equal(loss, plain)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(loss, (anchor, positive, negative)),
                                                  torch.autograd.grad(plain, (anchor, positive, negative))))
    target = torch.tensor([1, 0, 1, 0, 0, 1])
    loss = losses.ContrastiveLoss(1.0)(anchor, positive, target)
    plain = (0.5 * losses.contrastive_terms(utils.paired_squared_distances(anchor, positive), target, 1.0)).mean()
    assert torch.equal(loss, plain)


def test_selection_and_loss_agree_on_hardness_at_float32_rounding():
    # D[0, 1] = D[0, 2] = 2^24: in float32 (2^24 + 1) - 2^24 = 0, so the triplet (0, 1, 2) costs
    # nothing and is not counted, and the hard-negative selectors do not pick it either.
    points = torch.tensor([[0.0, 0.0], [4096.0, 0.0], [0.0, 4096.0], [0.0, -4096.0]])
    loss, n_triplets = losses.OnlineTripletLoss(1.0, FixedTriplets([[0, 1, 2]]))(points,
                                                                                 FOUR_LABELS)
    assert loss.item() == 0.0 and n_triplets == 0
    recording = Recording(utils.HardestNegativeTripletSelector(1.0))
    loss, n_triplets = losses.OnlineTripletLoss(1.0, recording)(points, FOUR_LABELS)
    assert [tuple(t[:2]) for t in recording.last.tolist()].count((0, 1)) == 0
    assert n_triplets == len(recording.last)
    loss, n_triplets = losses.OnlineTripletLoss(1.0, FixedTriplets([[0, 1, 2]]))(points.double(),
                                                                                 FOUR_LABELS)
    assert loss.item() == 1.0 and n_triplets == 1


def test_online_losses_in_float64():
    embeddings = four_points(torch.float64)
    loss, n_triplets = losses.OnlineTripletLoss(
        3.0, utils.HardestNegativeTripletSelector(3.0))(embeddings, FOUR_LABELS)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(53 / 4, rel=1e-12)
    loss = losses.OnlineContrastiveLoss(3.0, utils.HardNegativePairSelector())(embeddings,
                                                                                FOUR_LABELS)
    assert loss.dtype == torch.float64


# ----------------------------------------------------------------------------- error paths

LOSS_CLASSES = [
    lambda margin: losses.ContrastiveLoss(margin),
    lambda margin: losses.TripletLoss(margin),
    lambda margin: losses.OnlineContrastiveLoss(margin, utils.HardNegativePairSelector()),
    lambda margin: losses.OnlineTripletLoss(margin, utils.AllTripletSelector()),
]


@pytest.mark.parametrize("make_loss", LOSS_CLASSES,
                         ids=["contrastive", "triplet", "online_contrastive", "online_triplet"])
def test_bad_margin(make_loss):
    for bad in ("1", None, [1.0], 1j):
        with pytest.raises(TypeError, match="margin must be a real number"):
            make_loss(bad)
    for bad in (-1.0, -1, float("nan")):
        with pytest.raises(ValueError, match="margin must be >= 0"):
            make_loss(bad)
    make_loss(0)


def test_offline_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="expected embeddings of one shape"):
        losses.ContrastiveLoss(1.0)(torch.zeros(3, 2), torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="expected embeddings of one shape"):
        losses.ContrastiveLoss(1.0)(torch.zeros(3, 2), torch.zeros(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        losses.ContrastiveLoss(1.0)(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="expected embeddings of one shape"):
        losses.TripletLoss(1.0)(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="expected embeddings of one shape"):
        losses.TripletLoss(1.0)(torch.zeros(3), torch.zeros(3), torch.zeros(3))


def test_online_losses_reject_bad_selectors_and_labels():
    with pytest.raises(TypeError, match="pair_selector must have a get_pairs"):
        losses.OnlineContrastiveLoss(1.0, utils.AllTripletSelector())
    with pytest.raises(TypeError, match="triplet_selector must have a get_triplets"):
        losses.OnlineTripletLoss(1.0, utils.HardNegativePairSelector())
    embeddings = torch.randn(4, 2)
    with pytest.raises(ValueError, match="one label per embedding"):
        losses.OnlineContrastiveLoss(1.0, utils.HardNegativePairSelector())(embeddings, [0, 0, 1])
    with pytest.raises(ValueError, match="one label per embedding"):
        losses.OnlineTripletLoss(1.0, utils.AllTripletSelector())(embeddings, [0, 0, 1, 1, 1])
    with pytest.raises(TypeError, match="floating point"):
        losses.OnlineTripletLoss(1.0, utils.AllTripletSelector())(embeddings.long(), [0, 0, 1, 1])


def test_scale_and_choice_arguments_are_checked():
    for make_loss in (lambda scale: losses.ContrastiveLoss(1.0, scale=scale),
                      lambda scale: losses.OnlineContrastiveLoss(1.0, utils.HardNegativePairSelector(), scale)):
        for bad in ("1", None, True):
            with pytest.raises(TypeError, match="scale must be a real number"):
                make_loss(bad)
        for bad in (0, -0.5, float("nan")):
            with pytest.raises(ValueError, match="scale must be > 0"):
                make_loss(bad)
    with pytest.raises(ValueError, match="unknown distance 'cosine'; choose one of euclidean, kl"):
        losses.PairwiseAutoencoderLoss(0.5, distance="cosine")
    with pytest.raises(ValueError, match="unknown reconstruction 'l1'; choose one of mse, bce"):
        losses.TripletAutoencoderLoss(0.5, reconstruction="l1")


# ----------------------------------------------------------------------------- one formula, scales

def test_contrastive_loss_has_a_finite_gradient_at_zero_distance():
    # d = 0 for every pair: the hinge's sqrt(d + EPS) keeps the target-0 gradient finite, and the
    # target-1 term d has a zero gradient there.
    points = torch.tensor([[0.5, -1.0], [2.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    for target in ([0, 0, 0], [1, 1, 1], [1, 0, 1]):
        output1, output2 = points.clone().requires_grad_(True), points.clone().requires_grad_(True)
        loss = losses.ContrastiveLoss(1.5)(output1, output2, torch.tensor(target))
        gradients = torch.autograd.grad(loss, (output1, output2))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gradients)
        expected = 0.5 * (1.5 - math.sqrt(losses.EPS)) ** 2 * target.count(0) / 3
        assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_contrastive_losses_agree_on_the_same_pairs_up_to_their_scale():
    generator = torch.Generator().manual_seed(8)
    embeddings = torch.randn(10, 4, dtype=torch.float64, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    positive_pairs, negative_pairs = utils.AllPositivePairSelector(balance=False).get_pairs(embeddings, labels)
    pairs = torch.cat([positive_pairs, negative_pairs])
    target = torch.cat([torch.ones(len(positive_pairs)), torch.zeros(len(negative_pairs))])
    first, second = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    fixed = FixedPairs(positive_pairs, negative_pairs)
    margin = 2.0
    online = losses.OnlineContrastiveLoss(margin, fixed)(embeddings, labels)
    unscaled = losses.ContrastiveLoss(margin, scale=1.0)(first, second, target)
    classic = losses.ContrastiveLoss(margin)(first, second, target)
    expected = ref_online_contrastive_loss(embeddings, positive_pairs, negative_pairs, margin)
    assert 0 < expected and online.item() == pytest.approx(expected, rel=1e-12)
    assert unscaled.item() == pytest.approx(expected, rel=1e-12)  # pdist vs differences: rounding only
    assert classic.item() == pytest.approx(0.5 * expected, rel=1e-12)
    assert losses.OnlineContrastiveLoss(margin, fixed, scale=0.5)(embeddings, labels).item() == \
        pytest.approx(classic.item(), rel=1e-12)
    # the autoencoder losses use the classic 0.5: at weight 1 they are ContrastiveLoss itself
    output = AutoencoderOutput(embeddings, embeddings.clone(), embeddings)
    mined = losses.PairwiseAutoencoderLoss(1.0, margin, fixed).terms(output, embeddings.clone(), labels)
    assert torch.equal(mined["metric"], classic) and mined["n_selected"] == len(pairs)
    given = losses.PairwiseAutoencoderLoss(1.0, margin).on_pairs(
        AutoencoderOutput(first, first, first), AutoencoderOutput(second, second, second), first, second, target)
    assert torch.equal(given, classic)


def test_triplet_losses_agree_on_the_same_triplets():
    generator = torch.Generator().manual_seed(9)
    embeddings = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    triplets = utils.AllTripletSelector().get_triplets(embeddings, labels)
    anchors, positives, negatives = (embeddings[column] for column in triplets.unbind(1))
    online, _ = losses.OnlineTripletLoss(1.0, FixedTriplets(triplets))(embeddings, labels)
    offline = losses.TripletLoss(1.0)(anchors, positives, negatives)
    assert online.item() == pytest.approx(offline.item(), rel=1e-12)
    assert offline.item() == pytest.approx(ref_triplet_loss(anchors, positives, negatives, 1.0), rel=1e-12)
    assert torch.equal(losses.triplet_terms(torch.tensor([1.0, 5.0]), torch.tensor([3.0, 3.0]), 1.0),
                       torch.tensor([0.0, 3.0]))


# ----------------------------------------------------------------------------- non-finite embeddings

NON_FINITE_BATCH_LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def batch_with(bad, row=0):
    embeddings = torch.randn(12, 3, generator=torch.Generator().manual_seed(10))
    embeddings[row, 1] = bad
    return embeddings.requires_grad_(True)


def online_loss_for(selector_name, margin=1.0):
    """The online loss of the selector: a callable embeddings, labels -> scalar loss."""
    selector = ALL_SELECTORS[selector_name](margin, 0)
    if selector_name in TRIPLET_SELECTORS:
        loss = losses.OnlineTripletLoss(margin, selector)
        return lambda embeddings, labels: loss(embeddings, labels)[0]
    return losses.OnlineContrastiveLoss(margin, selector)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("selector_name", list(ALL_SELECTORS))
def test_a_non_finite_embedding_gives_a_non_finite_online_loss(selector_name, bad):
    # Hard-negative selectors find nothing in a NaN distance matrix; the loss must still say NaN.
    embeddings = batch_with(bad)
    loss = online_loss_for(selector_name)(embeddings, NON_FINITE_BATCH_LABELS)
    assert loss.dim() == 0 and not torch.isfinite(loss)
    loss.backward()
    assert embeddings.grad is not None and embeddings.grad.shape == embeddings.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("make_loss", [
    lambda: losses.PairwiseAutoencoderLoss(1.0, pair_selector=utils.HardNegativePairSelector()),
    lambda: losses.PairwiseAutoencoderLoss(0.5, pair_selector=FixedPairs([], [])),
    lambda: losses.TripletAutoencoderLoss(1.0, triplet_selector=utils.HardestNegativeTripletSelector(1.0)),
    lambda: losses.TripletAutoencoderLoss(0.5, triplet_selector=FixedTriplets([[1, 2, 3]])),
], ids=["pairs", "no_pairs", "hardest_triplets", "triplet_without_the_bad_row"])
def test_a_non_finite_mean_gives_a_non_finite_autoencoder_loss(make_loss, bad):
    means = batch_with(bad)
    inputs = torch.rand(12, 5, generator=torch.Generator().manual_seed(11))
    terms = make_loss().terms(AutoencoderOutput(means, inputs.clone(), means), inputs, NON_FINITE_BATCH_LABELS)
    assert not torch.isfinite(terms["metric"]) and not torch.isfinite(terms["total"])
    assert torch.isfinite(terms["reconstruction"])


class NaNInRowZero(torch.nn.Module):
    """A linear embedding whose output row 0 is NaN, as a diverged network gives."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        embeddings = self.linear(x)
        is_first = torch.arange(len(x)) == 0
        return torch.where(is_first[:, None], float("nan"), embeddings)


@pytest.mark.parametrize("selector_name", list(ALL_SELECTORS))
def test_fit_stops_when_an_embedding_is_nan(selector_name):
    torch.manual_seed(12)
    model = NaNInRowZero()
    inputs = torch.randn(12, 4)
    loader = [(inputs, torch.tensor(NON_FINITE_BATCH_LABELS))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    with pytest.raises(FloatingPointError):
        fit(loader, None, model, online_loss_for(selector_name), optimizer, None, n_epochs=1, device="cpu",
            progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step was taken


# ----------------------------------------------------------------------------- soft margin and plain distances

VARIANTS = [(soft, distance) for soft in (False, True) for distance in ("squared", "euclidean")]
MARGINS = st.sampled_from([0.0, 0.2, 1.0])


def batch(seed, n_classes=3, per_class=4, dim=2, duplicate=False):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    embeddings = torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    if duplicate:  # two items at one point: a zero distance
        embeddings[1] = embeddings[0]
    return embeddings, labels


@settings(max_examples=40)
@given(st.integers(0, 10_000), MARGINS, st.sampled_from(VARIANTS))
def test_triplet_loss_matches_the_reference(seed, margin, variant):
    soft, distance = variant
    anchor, positive, negative = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(seed),
                                             dtype=torch.float64)
    expected = reference.ref_triplet_losses(torch.cat([anchor, positive, negative]),
                                            [(i, 5 + i, 10 + i) for i in range(5)], margin, soft, distance)
    loss = TripletLoss(margin, soft=soft, distance=distance)
    assert float(loss(anchor, positive, negative)) == pytest.approx(sum(expected) / 5, rel=1e-12, abs=1e-12)
    assert float(loss(anchor, positive, negative, size_average=False)) == pytest.approx(sum(expected), rel=1e-12,
                                                                                        abs=1e-12)


@settings(max_examples=40)
@given(st.integers(0, 10_000), MARGINS, st.sampled_from(VARIANTS), st.booleans())
def test_online_triplet_loss_matches_the_reference(seed, margin, variant, duplicate):
    soft, distance = variant
    embeddings, labels = batch(seed, duplicate=duplicate)
    loss, n_active = OnlineTripletLoss(margin, AllTripletSelector(), soft=soft, distance=distance)(embeddings, labels)
    triplets = reference.ref_all_triplets(labels.tolist())
    terms = reference.ref_triplet_losses(embeddings, triplets, margin, soft, distance)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9, abs=1e-12)
    assert n_active == sum(1 for term in terms if term > 0)


@settings(max_examples=40)
@given(st.integers(0, 10_000), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from(["squared", "euclidean"]))
def test_contrastive_losses_match_the_reference(seed, margin, distance):
    embeddings, labels = batch(seed, duplicate=seed % 2 == 0)
    first, second = embeddings[:6], embeddings[6:]
    target = (labels[:6] == labels[6:]).long()
    expected = [reference.ref_contrastive_term(x, y, t, margin, distance)
                for x, y, t in zip(first.tolist(), second.tolist(), target.tolist())]
    value = ContrastiveLoss(margin, scale=1.0, distance=distance)(first, second, target)
    assert float(value) == pytest.approx(sum(expected) / 6, rel=1e-9, abs=1e-12)
    online = OnlineContrastiveLoss(margin, HardNegativePairSelector(), distance=distance)
    positives, negatives = HardNegativePairSelector().get_pairs(embeddings, labels)
    rows = embeddings.tolist()
    terms = [reference.ref_contrastive_term(rows[i], rows[j], 1, margin, distance) for i, j in positives.tolist()]
    terms += [reference.ref_contrastive_term(rows[i], rows[j], 0, margin, distance) for i, j in negatives.tolist()]
    assert float(online(embeddings, labels)) == pytest.approx(sum(terms) / len(terms), rel=1e-9, abs=1e-12)


@settings(max_examples=60)
@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.5, 1.0]))
def test_selectors_on_plain_distances_follow_the_reference_on_the_plain_matrix(seed, margin):
    embeddings, labels = batch(seed, n_classes=4, per_class=3)
    plain = as_distance(pdist(embeddings), "euclidean")
    label_list = labels.tolist()
    hardest = HardestNegativeTripletSelector(margin, distance="euclidean").get_triplets(embeddings, labels)
    assert sorted(map(tuple, hardest.tolist())) == sorted(reference.ref_hardest_negative_triplets(plain, label_list,
                                                                                                  margin))
    batch_hard = BatchHardTripletSelector(distance="euclidean").get_triplets(embeddings, labels)
    assert sorted(map(tuple, batch_hard.tolist())) == sorted(reference.ref_batch_hard_triplets(plain, label_list))
    for make, candidates in ((RandomNegativeTripletSelector, reference.ref_random_hard_candidates),
                             (SemihardNegativeTripletSelector, reference.ref_semihard_candidates)):
        allowed = candidates(plain, label_list, margin)
        chosen = make(margin, generator=torch.Generator().manual_seed(seed), distance="euclidean").get_triplets(
            embeddings, labels)
        assert sorted((a, p) for a, p, _ in chosen.tolist()) == sorted(pair for pair, ns in allowed.items() if ns)
        assert all(n in allowed[(a, p)] for a, p, n in chosen.tolist())
    # a hardest triplet on plain distances is exactly one with a non-zero plain-distance hinge
    loss = OnlineTripletLoss(margin, HardestNegativeTripletSelector(margin, distance="euclidean"), distance="euclidean")
    _, n_active = loss(embeddings, labels)
    assert n_active == len(hardest)


@pytest.mark.parametrize("soft, distance", VARIANTS)
@pytest.mark.parametrize("duplicate", [False, True])
def test_gradients_pass_gradcheck_and_stay_finite_at_zero_distance(soft, distance, duplicate):
    embeddings, labels = batch(3, duplicate=duplicate)
    embeddings.requires_grad_()
    selector = BatchHardTripletSelector(distance=distance)

    def online(x):
        return OnlineTripletLoss(0.5, selector, soft=soft, distance=distance)(x, labels)[0]

    def offline(x):
        return TripletLoss(0.5, soft=soft, distance=distance)(x[:4], x[4:8], x[8:])

    for function in (online, offline):
        value = function(embeddings)
        (gradient,) = torch.autograd.grad(value, embeddings)
        assert torch.isfinite(value) and torch.isfinite(gradient).all()
        if not duplicate:  # gradcheck needs differentiability around the point; sqrt has none at 0
            assert torch.autograd.gradcheck(function, (embeddings,))


def test_identical_embeddings_give_softplus_of_the_margin_with_zero_gradient():
    embeddings = torch.zeros(6, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, _ = OnlineTripletLoss(0.3, BatchHardTripletSelector(distance="euclidean"), soft=True,
                                distance="euclidean")(embeddings, labels)
    loss.backward()
    assert loss.item() == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(0.3, dtype=torch.float64))))
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_a_selector_comparing_another_distance_is_refused():
    with pytest.raises(ValueError, match="distance='euclidean'"):
        OnlineTripletLoss(1.0, HardestNegativeTripletSelector(1.0), distance="euclidean")
    with pytest.raises(ValueError, match="distance='squared'"):
        OnlineTripletLoss(1.0, BatchHardTripletSelector(distance="euclidean"))
    OnlineTripletLoss(1.0, AllTripletSelector(), distance="euclidean")  # compares no distance: any loss


@pytest.mark.parametrize("build", [
    lambda: TripletLoss(1.0, distance="plain"), lambda: OnlineTripletLoss(1.0, AllTripletSelector(), distance="l2"),
    lambda: ContrastiveLoss(1.0, distance="cosine"), lambda: BatchHardTripletSelector(distance="manhattan"),
    lambda: HardestNegativeTripletSelector(1.0, distance="sqeuclidean"), lambda: utils.as_distance(torch.ones(1), "x")])
def test_an_unknown_distance_is_refused_by_name(build):
    with pytest.raises(ValueError, match="unknown distance"):
        build()


def test_soft_must_be_true_or_false():
    with pytest.raises(TypeError, match="soft"):
        TripletLoss(1.0, soft=1)
    with pytest.raises(TypeError, match="soft"):
        OnlineTripletLoss(1.0, AllTripletSelector(), soft="yes")


def _mean(terms):
    return sum(terms) / len(terms) if terms else 0.0


@settings(max_examples=40)
@given(st.integers(0, 10_000), MARGINS, st.sampled_from(VARIANTS), st.booleans())
def test_an_easy_selector_adds_the_mean_loss_of_its_triplets(seed, margin, variant, duplicate):
    """The mixed objective: the mean term of the hard selector's triplets plus that of the easy one's,
    the count and ``last_selection`` those of the hard selector alone."""
    soft, distance = variant
    embeddings, labels = batch(seed, duplicate=duplicate)
    embeddings.requires_grad_(True)
    hard, easy = BatchHardTripletSelector(distance=distance), HardestNegativeTripletSelector(margin, distance=distance)
    loss_fn = OnlineTripletLoss(margin, hard, soft=soft, distance=distance, easy_selector=easy)
    loss, n_active = loss_fn(embeddings, labels)
    D = as_distance(pdist(embeddings.detach()), distance)
    hard_terms = reference.ref_triplet_losses(embeddings.detach(), reference.ref_batch_hard_triplets(D, labels),
                                              margin, soft, distance)
    easy_terms = reference.ref_triplet_losses(embeddings.detach(), reference.ref_hardest_negative_triplets(
        D, labels, margin), margin, soft, distance)
    assert loss.item() == pytest.approx(_mean(hard_terms) + _mean(easy_terms), rel=1e-9, abs=1e-12)
    assert n_active == sum(1 for term in hard_terms if term > 0)
    assert loss_fn.last_selection.selected == len(hard_terms)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_an_easy_selector_must_mine_triplets_in_the_loss_distance():
    with pytest.raises(TypeError, match="easy_selector must have a get_triplets"):
        OnlineTripletLoss(1.0, BatchHardTripletSelector(), easy_selector=HardNegativePairSelector())
    with pytest.raises(ValueError, match="easy_selector compares 'squared'"):
        OnlineTripletLoss(1.0, BatchHardTripletSelector(distance="euclidean"), distance="euclidean",
                          easy_selector=RandomNegativeTripletSelector(1.0))


def test_a_nan_embedding_gives_a_nan_mixed_loss():
    embeddings, labels = batch(0)
    embeddings[3, 0] = float("nan")
    loss, _ = OnlineTripletLoss(1.0, BatchHardTripletSelector(), easy_selector=RandomNegativeTripletSelector(1.0))(
        embeddings, labels)
    assert not torch.isfinite(loss)


# ----------------------------------------------------------------------------- multi-similarity

@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(2, 5), st.integers(1, 4), st.sampled_from([None, 0.0, 0.1, 0.5]),
       st.sampled_from([0.5, 2.0, 4.0]), st.sampled_from([1.0, 10.0, 50.0]), st.sampled_from([-0.5, 0.0, 0.5, 1.0]),
       st.integers(0, 2 ** 16))
def test_multi_similarity_loss_matches_the_paper_written_as_loops(batch, dim, n_classes, epsilon, alpha, beta,
                                                                  base, seed):
    # (st.floats would trip over the flush-to-zero mode that trainer.fit sets; 2-D and up: no exact ties of
    # the similarities, which rounding would decide)
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(n_classes, (batch,), generator=generator)
    loss = losses.MultiSimilarityLoss(alpha, beta, base, epsilon)(embeddings, labels)
    expected = reference.ref_multi_similarity_loss(embeddings, labels, alpha, beta, base, epsilon)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_multi_similarity_gradients_are_the_papers_pair_weights():
    # Wang et al., eq. 5: dL/dS_ik = -w+_ik / m for a kept positive, +w-_ik / m for a kept negative, with
    # w+ = 1 / (exp(-alpha (base - S_ik)) + sum_P exp(-alpha (S_ik' - S_ik))) and w- likewise with beta
    alpha, beta, base = 2.0, 10.0, 0.5
    similarities = (torch.rand(3, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1)
    similarities.requires_grad_()
    positives = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    negatives = torch.tensor([[0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    losses.multi_similarity_terms(similarities, positives, negatives, alpha, beta, base).sum().backward()
    S = similarities.detach()
    for a in range(3):
        for k in range(7):
            if positives[a, k]:
                others = sum(math.exp(-alpha * (S[a, j] - S[a, k])) for j in range(7) if positives[a, j])
                expected = -1 / (math.exp(-alpha * (base - S[a, k])) + others)
            elif negatives[a, k]:
                others = sum(math.exp(beta * (S[a, j] - S[a, k])) for j in range(7) if negatives[a, j])
                expected = 1 / (math.exp(beta * (base - S[a, k])) + others)
            else:
                expected = 0.0
            assert similarities.grad[a, k].item() == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_multi_similarity_mining_matches_the_papers_rule_with_ties():
    generator = torch.Generator().manual_seed(2)
    for _ in range(50):
        n_items = int(torch.randint(2, 10, (1,), generator=generator))
        labels = torch.randint(3, (n_items,), generator=generator)
        start = int(torch.randint(0, n_items, (1,), generator=generator))
        stop = int(torch.randint(start, n_items + 1, (1,), generator=generator))
        # quarter steps: exact in binary, so ties at S +- epsilon happen and are decided as the paper's strict <
        rows = torch.randint(-4, 5, (stop - start, n_items), generator=generator).double() / 4
        for epsilon in (None, 0.0, 0.25, 0.5):
            positives, negatives = utils.multi_similarity_pairs(rows, labels, (start, stop), epsilon)
            shifted = torch.cat([torch.zeros(start, n_items, dtype=torch.float64), rows])  # row a is anchor a's
            expected = reference.ref_multi_similarity_pairs(shifted, labels, epsilon)[start:stop]
            assert [(p.nonzero().squeeze(1).tolist(), n.nonzero().squeeze(1).tolist())
                    for p, n in zip(positives, negatives)] == expected, (labels, start, stop, epsilon)


def test_multi_similarity_loss_gradcheck_and_finite_where_embeddings_coincide_or_vanish():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(8, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    loss_fn = losses.MultiSimilarityLoss(2.0, 10.0, 0.5, epsilon=0.1)
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (embeddings,))
    coinciding = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]], requires_grad=True)
    loss = losses.MultiSimilarityLoss()(coinciding, torch.tensor([0, 0, 1, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(coinciding.grad).all()


def test_multi_similarity_loss_of_nothing_kept_is_a_zero_that_backpropagates_and_nan_stays_nan():
    embeddings = torch.randn(5, 4, requires_grad=True)
    loss = losses.MultiSimilarityLoss()(embeddings, torch.zeros(5, dtype=torch.long))  # one class: no negative
    loss.backward()
    assert loss.item() == 0 and torch.equal(embeddings.grad, torch.zeros(5, 4))
    poisoned = embeddings.detach().clone()
    poisoned[2, 1] = float("nan")
    assert torch.isnan(losses.MultiSimilarityLoss()(poisoned, torch.tensor([0, 0, 1, 1, 2])))
    loss_fn = losses.MultiSimilarityLoss()
    loss_fn(embeddings.detach(), torch.tensor([0, 0, 1, 1, 2]))
    assert loss_fn.last_selection.selected == 5


@pytest.mark.parametrize("arguments, error, message", [
    (dict(alpha=0), ValueError, "alpha must be > 0, got 0"),
    (dict(beta=-1.0), ValueError, "beta must be > 0, got -1.0"),
    (dict(alpha=True), TypeError, "alpha must be a real number, got bool"),
    (dict(base=float("nan")), ValueError, "base must be a number, got nan"),
    (dict(base=float("inf")), ValueError, "base must be finite, got inf"),
    (dict(epsilon=-0.1), ValueError, "epsilon must be >= 0, got -0.1"),
    (dict(epsilon="0.1"), TypeError, "epsilon must be a real number, got str"),
    (dict(gather=1), TypeError, "gather must be True or False, got 1"),
])
def test_multi_similarity_loss_arguments_are_checked_by_name(arguments, error, message):
    with pytest.raises(error, match=re.escape(message)):
        losses.MultiSimilarityLoss(**arguments)
