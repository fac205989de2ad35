"""Tests for losses.py: values written out by hand, brute-force references, gradients, edge cases.

The hand-computed cases use 2-D points with integer coordinates, whose squared distances can be
read off directly; the online losses are also compared with tests/reference.py on random batches,
their gradients are checked with `torch.autograd.gradcheck` in float64 (with a fixed selector
result so the selection cannot change under the finite differences), and every selector/loss
combination is run on the edge-case batches with a backward pass. The losses built on one formula
are checked to agree up to their documented scale factors, and a NaN or infinite embedding must
give a non-finite loss with every selector, so that `trainer.fit` stops.
"""

import math

import pytest
import torch

import losses
import utils
from networks import AutoencoderOutput
from reference import (
    ref_contrastive_loss,
    ref_nonzero_triplet_count,
    ref_online_contrastive_loss,
    ref_online_triplet_loss,
    ref_triplet_loss,
)
from trainer import fit


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
