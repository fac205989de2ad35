"""The soft margin and the choice of plain or squared Euclidean distances, against brute force.

``TripletLoss`` / ``OnlineTripletLoss(soft=..., distance=...)`` and ``ContrastiveLoss`` /
``OnlineContrastiveLoss(distance=...)`` are compared with the loops of ``tests/reference.py`` over many
random batches (hypothesis, derandomised); the triplet selectors built with ``distance="euclidean"``
apply their hardness tests to the plain distances (the reference loops handed the plain matrix); the
gradients pass gradcheck and stay finite where two embeddings coincide.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
import utils
from losses import ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss
from utils import (AllTripletSelector, BatchHardTripletSelector, HardestNegativeTripletSelector,
                   HardNegativePairSelector, RandomNegativeTripletSelector, SemihardNegativeTripletSelector,
                   as_distance, pdist)

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
