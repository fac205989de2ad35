"""Tests for utils.py: the pair and triplet selectors and the distance functions against the brute-force
references, and the shared helpers (argument checks, the atomic file writer, the table of moved names).

Every selector is compared with the loop implementations of tests/reference.py over many random
batches (hypothesis, plus seeded loops at larger shapes), on hand-picked edge cases, and on every
error path. The references are handed the library's own distance matrix
(`utils.pdist`), so only the selection logic is compared; `utils.pdist` itself is checked
separately against a direct loop. The distance functions (`pdist`, `squared_distances`,
`paired_squared_distances`) are checked against float64 differences within a rounding bound that
holds for any matmul kernel, and pdist's exact symmetry and zero diagonal at many odd shapes with
one and two threads.
"""

import contextlib
import importlib
import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mining_rows
import utils
from mining_rows import Rows
from random_streams import AnchorStreams, draw_key
from reference import (
    ref_all_negative_pairs,
    ref_all_positive_pairs,
    ref_all_triplets,
    ref_anchor_positive_pairs,
    ref_batch_hard_triplets,
    ref_hard_negative_pairs,
    ref_hardest_negative_triplets,
    ref_pdist,
    ref_random_hard_candidates,
    ref_semihard_candidates,
)
from utils import atomic_write, check_choice, check_int, check_real


# Many examples, no per-example deadline (conftest.py's default profile derandomises them).
HYPOTHESIS = dict(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Margins exact in float32 (0 and powers of two) and a few that are not: the reference rounds the
# threshold D[a, p] + margin in float32 as the library does, so both kinds must agree exactly.
MARGINS = [0.0, 0.25, 0.5, 1.0, 2.0, 8.0, 64.0, 256.0, 0.1, 0.3, 1e-3, 1.7]


# ----------------------------------------------------------------------------- batch builders

def make_batch(counts, dim, kind, seed, label_values=None, label_container="tensor"):
    """Embeddings (B, dim) float32 and labels (B,) for classes of the given sizes, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    if label_values is None:
        label_values = list(range(len(counts)))
    class_index = torch.tensor([c for c, count in enumerate(counts) for _ in range(count)],
                               dtype=torch.long)
    class_index = class_index[torch.randperm(len(class_index), generator=generator)]
    batch_size = len(class_index)
    if kind == "gaussian":
        embeddings = torch.randn(batch_size, dim, generator=generator) / math.sqrt(dim) * 2
    elif kind == "small_int":
        # few distinct values: many exactly tied distances
        low, high = (-2, 3) if dim == 2 else (-1, 2)
        embeddings = torch.randint(low, high, (batch_size, dim), generator=generator).float()
    elif kind == "clustered":
        centres = torch.randn(len(counts), dim, generator=generator) * 2 / math.sqrt(dim)
        noise = torch.randn(batch_size, dim, generator=generator) / math.sqrt(dim)
        embeddings = centres[class_index] + noise
    else:
        raise AssertionError(kind)
    labels = [label_values[c] for c in class_index.tolist()]
    if label_container == "tensor":
        labels = torch.tensor(labels, dtype=torch.long)
    elif label_container == "int32":
        labels = torch.tensor(labels, dtype=torch.int32)
    elif label_container == "numpy":
        labels = np.array(labels)
    return embeddings, labels


@st.composite
def batches(draw, max_classes=6, max_per_class=6):
    """(embeddings, labels, margin): unbalanced classes, shuffled labels, dims 2 and 128, ties."""
    n_classes = draw(st.integers(1, max_classes))
    counts = draw(st.lists(st.integers(1, max_per_class), min_size=n_classes, max_size=n_classes))
    label_values = draw(st.lists(st.integers(-1000, 1000), min_size=n_classes,
                                 max_size=n_classes, unique=True))
    dim = draw(st.sampled_from([2, 128]))
    kind = draw(st.sampled_from(["gaussian", "small_int", "clustered"]))
    container = draw(st.sampled_from(["tensor", "int32", "numpy", "list"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    margin = draw(st.sampled_from(MARGINS))
    embeddings, labels = make_batch(counts, dim, kind, seed, label_values, container)
    return embeddings, labels, margin


def seeded_batches(n_cases, seed_offset):
    """Larger batches for the seeded loops: (embeddings, labels, margin)."""
    shapes = [(8, 6), (4, 12), (12, 3), (5, 1)]
    kinds = ["gaussian", "small_int", "clustered"]
    for case in range(n_cases):
        rng = np.random.default_rng(seed_offset + case)
        n_classes, per_class = shapes[case % len(shapes)]
        counts = [int(rng.integers(max(1, per_class - 2), per_class + 3)) for _ in range(n_classes)]
        dim = [2, 128][case % 2]
        kind = kinds[case % 3]
        embeddings, labels = make_batch(counts, dim, kind, seed_offset + case)
        yield embeddings, labels, MARGINS[int(rng.integers(len(MARGINS)))]


def edge_case_batches():
    """Named edge-case batches: (name, embeddings, labels, margin)."""
    generator = torch.Generator().manual_seed(1234)
    unit = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    return [
        ("all_distinct", torch.randn(5, 2, generator=generator), [0, 1, 2, 3, 4], 1.0),
        ("single_class", torch.randn(5, 3, generator=generator), [7] * 5, 1.0),
        ("three_plus_one", torch.randn(4, 2, generator=generator), [0, 0, 0, 1], 1.0),
        ("identical", torch.full((6, 3), 0.5), [0, 0, 1, 1, 2, 2], 1.0),
        ("identical_single_class", torch.zeros(3, 4), [1, 1, 1], 1.0),
        ("norm_1e4_spread", 1e4 * unit, [0, 0, 1, 1, 2, 2, 3, 3], 1.0),
        ("norm_1e4_offset", 1e4 + torch.randn(8, 16, generator=generator),
         [0, 1, 0, 1, 2, 2, 3, 3], 8.0),
        ("batch_of_1", torch.randn(1, 2, generator=generator), [0], 1.0),
        ("batch_of_2_same", torch.randn(2, 2, generator=generator), [0, 0], 1.0),
        ("batch_of_2_different", torch.randn(2, 2, generator=generator), [0, 1], 1.0),
    ]


EDGE_CASES = edge_case_batches()
EDGE_IDS = [case[0] for case in EDGE_CASES]


@pytest.fixture
def single_thread():
    """One torch thread for tests that make thousands of tiny calls: on a busy 2-core machine,
    OpenMP threads waiting for each other make each small op far slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- assertion helpers

def rows(tensor):
    """A (T, k) index tensor as a list of tuples."""
    return [tuple(row) for row in tensor.tolist()]


def distances_of(embeddings):
    return utils.row_distances(embeddings)


def assert_index_tensor(tensor, width, device):
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.long
    assert tensor.dim() == 2 and tensor.shape[1] == width, tuple(tensor.shape)
    assert tensor.device == device


def check_pairs_exact(selector, embeddings, labels):
    positives, negatives = selector.get_pairs(embeddings, labels)
    assert_index_tensor(positives, 2, embeddings.device)
    assert_index_tensor(negatives, 2, embeddings.device)
    return rows(positives), rows(negatives)


def check_all_positive_pairs_unbalanced(embeddings, labels):
    positives, negatives = check_pairs_exact(utils.AllPositivePairSelector(balance=False),
                                             embeddings, labels)
    assert positives == ref_all_positive_pairs(labels)
    assert negatives == ref_all_negative_pairs(labels)


def check_all_positive_pairs_balanced(embeddings, labels, seed):
    selector = utils.AllPositivePairSelector(balance=True,
                                             generator=torch.Generator().manual_seed(seed))
    positives, negatives = check_pairs_exact(selector, embeddings, labels)
    reference_positives = ref_all_positive_pairs(labels)
    reference_negatives = ref_all_negative_pairs(labels)
    assert positives == reference_positives
    assert len(negatives) == min(len(reference_positives), len(reference_negatives))
    assert len(set(negatives)) == len(negatives), "duplicate negative pairs"
    assert set(negatives) <= set(reference_negatives)
    again = utils.AllPositivePairSelector(balance=True,
                                          generator=torch.Generator().manual_seed(seed))
    assert check_pairs_exact(again, embeddings, labels) == (positives, negatives)


def check_hard_negative_pairs(embeddings, labels):
    positives, negatives = check_pairs_exact(utils.HardNegativePairSelector(), embeddings, labels)
    assert positives == ref_all_positive_pairs(labels)
    assert negatives == ref_hard_negative_pairs(distances_of(embeddings), labels)


def get_triplets(selector, embeddings, labels):
    triplets = selector.get_triplets(embeddings, labels)
    assert_index_tensor(triplets, 3, embeddings.device)
    return rows(triplets)


def check_all_triplets(embeddings, labels):
    assert get_triplets(utils.AllTripletSelector(), embeddings, labels) == ref_all_triplets(labels)


def check_hardest(embeddings, labels, margin):
    got = get_triplets(utils.HardestNegativeTripletSelector(margin), embeddings, labels)
    assert got == ref_hardest_negative_triplets(distances_of(embeddings), labels, margin)


def check_batch_hard(embeddings, labels):
    got = get_triplets(utils.BatchHardTripletSelector(), embeddings, labels)
    assert got == ref_batch_hard_triplets(distances_of(embeddings), labels)


def check_random_choice(make_selector, candidates_fn, embeddings, labels, margin, seed):
    """Random-hard / semi-hard: conditions, exact (a, p) coverage in order, reproducibility."""
    candidates = candidates_fn(distances_of(embeddings), labels, margin)
    got = get_triplets(make_selector(margin, torch.Generator().manual_seed(seed)),
                       embeddings, labels)
    for a, p, n in got:
        assert n in candidates[(a, p)], (a, p, n)
    expected_pairs = [pair for pair, admissible in candidates.items() if admissible]
    assert [(a, p) for a, p, _ in got] == expected_pairs
    again = get_triplets(make_selector(margin, torch.Generator().manual_seed(seed)),
                         embeddings, labels)
    assert again == got


def random_hard(margin, generator=None):
    return utils.RandomNegativeTripletSelector(margin, generator=generator)


def semihard(margin, generator=None):
    return utils.SemihardNegativeTripletSelector(margin, generator=generator)


def check_random_hard(embeddings, labels, margin, seed=0):
    check_random_choice(random_hard, ref_random_hard_candidates, embeddings, labels, margin, seed)


def check_semihard(embeddings, labels, margin, seed=0):
    check_random_choice(semihard, ref_semihard_candidates, embeddings, labels, margin, seed)


# ----------------------------------------------------------------------------- pdist

def expansion_error_bound(queries, gallery):
    """A bound (Q, G) float64 on the rounding error of ``|q|^2 + |g|^2 - 2 q.g`` in the inputs'
    dtype, valid for any summation order, blocking or FMA use of the matmul kernel: each of the
    two norms and the dot product is off by at most ``gamma_D * (|q|^2 + |g|^2)``, and the few
    additions after them by a few units of roundoff of the same size. Doubled for the centring and
    the symmetrising average of ``pdist``, whose effects are smaller still."""
    unit_roundoff = torch.finfo(queries.dtype).eps / 2
    dim = queries.shape[-1]
    norms_q = queries.double().pow(2).sum(-1)
    norms_g = gallery.double().pow(2).sum(-1)
    return 2 * (2 * dim + 16) * unit_roundoff * (norms_q[..., :, None] + norms_g[..., None, :]) + 1e-30


def brute_force_squared_distances(queries, gallery):
    """(Q, G) float64 squared distances from the differences, no expansion: the reference."""
    return (queries.double()[..., :, None, :] - gallery.double()[..., None, :, :]).pow(2).sum(-1)


def centred(vectors):
    """The rows as pdist centres them, in their own dtype (the bound needs the norms it saw)."""
    return vectors - vectors.mean(dim=0, keepdim=True)


def assert_exact_pdist_properties(distances, embeddings):
    assert distances.shape == (len(embeddings), len(embeddings))
    assert distances.dtype == embeddings.dtype
    assert torch.equal(distances, distances.t())
    assert torch.equal(distances.diagonal(), torch.zeros(len(embeddings), dtype=distances.dtype))
    assert torch.all(distances >= 0)
    vectors = centred(embeddings)
    error = (distances.double() - brute_force_squared_distances(embeddings, embeddings)).abs()
    assert torch.all(error <= expansion_error_bound(vectors, vectors))


@settings(**HYPOTHESIS)
@given(batches())
def test_pdist_matches_loop_and_has_exact_properties(batch):
    embeddings, _, _ = batch
    distances = utils.pdist(embeddings)
    assert_exact_pdist_properties(distances, embeddings)
    reference = torch.tensor(ref_pdist(embeddings), dtype=torch.float64)
    vectors = centred(embeddings)
    assert torch.all((distances.double() - reference).abs() <= expansion_error_bound(vectors, vectors))


@st.composite
def vector_batches(draw, max_rows=70, max_dim=130):
    """(B, D) float32 or float64 vectors of varied scale and offset, B and D mostly not powers of 2."""
    rows_, dim = draw(st.integers(1, max_rows)), draw(st.integers(1, max_dim))
    scale = 10.0 ** draw(st.integers(-4, 4))
    offset = draw(st.sampled_from([0.0, 1.0, -30.0, 1e3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return (offset + scale * torch.randn(rows_, dim, generator=generator, dtype=torch.float64)).to(dtype)


def at_thread_counts(function, *arguments):
    """function(*arguments) computed with 1 and with 2 torch threads (the setting restored)."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(function(*arguments))
    finally:
        torch.set_num_threads(threads)
    return results


@settings(**HYPOTHESIS)
@given(vector_batches())
@example(torch.randn(5, 128, generator=torch.Generator().manual_seed(0)))
@example(torch.randn(5, 128, generator=torch.Generator().manual_seed(1)) * 1e3 + 7)
def test_pdist_is_exactly_symmetric_with_a_zero_diagonal_at_any_shape(embeddings):
    # A matmul kernel may round (i, j) and (j, i) differently, and |v_i|^2 - v_i.v_i is rarely an
    # exact 0 at these sizes: pdist must still be exactly symmetric with an exactly zero diagonal.
    for distances in at_thread_counts(utils.pdist, embeddings):
        assert_exact_pdist_properties(distances, embeddings)


@settings(**HYPOTHESIS)
@given(vector_batches(max_rows=40), vector_batches(max_rows=40), st.booleans())
def test_squared_distances_match_a_float64_brute_force(queries, gallery, batched):
    gallery = gallery[:, :queries.shape[1]].to(queries.dtype)
    if gallery.shape[1] < queries.shape[1]:
        queries = queries[:, :gallery.shape[1]]
    if batched:  # (E, Q, D) x (E, G, D): three episodes, the second and third ones scaled
        queries = torch.stack([queries, 2 * queries, -queries])
        gallery = torch.stack([gallery, 2 * gallery, gallery])
    for distances in at_thread_counts(utils.squared_distances, queries, gallery):
        assert distances.shape == (*queries.shape[:-1], gallery.shape[-2]) and distances.dtype == queries.dtype
        assert torch.all(distances >= 0)
        error = (distances.double() - brute_force_squared_distances(queries, gallery)).abs()
        assert torch.all(error <= expansion_error_bound(queries, gallery))
        # precomputed gallery norms (what chunked callers pass) give the very same values
        assert torch.equal(utils.squared_distances(queries, gallery, gallery.pow(2).sum(-1)),
                           utils.squared_distances(queries, gallery))


def test_paired_squared_distances_are_exact_for_equal_rows_and_match_the_matrix():
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 9, 37, generator=generator)
    paired = utils.paired_squared_distances(x, y)
    assert paired.shape == (9,)
    # a sum of 37 float32 squares: within 37 + 1 roundings of the float64 value
    torch.testing.assert_close(paired.double(), brute_force_squared_distances(x, y).diagonal(),
                               rtol=38 * torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(utils.paired_squared_distances(x, x), torch.zeros(9))
    x.requires_grad_(True)
    (gradient,) = torch.autograd.grad(utils.paired_squared_distances(x, x.detach()).sum(), x)
    assert torch.equal(gradient, torch.zeros_like(x))


def test_distances_propagate_non_finite_embeddings():
    embeddings = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    for bad in (float("nan"), float("inf")):
        broken = embeddings.clone()
        broken[2, 1] = bad
        distances = utils.pdist(broken)
        assert not torch.isfinite(distances[2, [0, 1, 3, 4, 5]]).any()
        assert not torch.isfinite(utils.squared_distances(broken, embeddings)[2]).any()
        assert not torch.isfinite(utils.paired_squared_distances(broken, embeddings)[2])


@pytest.mark.parametrize("batch_size", [4, 8, 16, 32])
@pytest.mark.parametrize("dim", [2, 128])
def test_pdist_is_exact_on_small_integer_coordinates(batch_size, dim):
    # Power-of-two batch: the column mean is exact, so every intermediate value is exact too.
    generator = torch.Generator().manual_seed(batch_size * 1000 + dim)
    embeddings = torch.randint(-2, 3, (batch_size, dim), generator=generator).float()
    assert utils.pdist(embeddings).tolist() == ref_pdist(embeddings)


def test_pdist_float64_and_far_from_origin():
    generator = torch.Generator().manual_seed(5)
    embeddings = 1e4 + torch.randn(16, 8, generator=generator, dtype=torch.float64)
    distances = utils.pdist(embeddings)
    assert distances.dtype == torch.float64
    reference = torch.tensor(ref_pdist(embeddings), dtype=torch.float64)
    assert torch.allclose(distances, reference, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- pair selectors

@settings(**HYPOTHESIS)
@given(batches())
def test_all_positive_pairs_unbalanced_match_reference(batch):
    embeddings, labels, _ = batch
    check_all_positive_pairs_unbalanced(embeddings, labels)


@settings(**HYPOTHESIS)
@given(batches(), st.integers(0, 2 ** 31 - 1))
def test_all_positive_pairs_balanced_is_a_reproducible_subset(batch, seed):
    embeddings, labels, _ = batch
    check_all_positive_pairs_balanced(embeddings, labels, seed)


@settings(**HYPOTHESIS)
@given(batches())
def test_hard_negative_pairs_match_reference(batch):
    embeddings, labels, _ = batch
    check_hard_negative_pairs(embeddings, labels)


def test_pair_selectors_seeded_loop(single_thread):
    for case, (embeddings, labels, _) in enumerate(seeded_batches(60, seed_offset=10_000)):
        check_all_positive_pairs_unbalanced(embeddings, labels)
        check_all_positive_pairs_balanced(embeddings, labels, seed=case)
        check_hard_negative_pairs(embeddings, labels)


def test_hard_negative_pairs_tie_order_on_a_grid():
    # Four points on a unit square, two classes on the diagonals: all four negative pairs are at
    # distance 1, so the choice is decided by (i, j) order alone.
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = [0, 0, 1, 1]
    positives, negatives = utils.HardNegativePairSelector().get_pairs(embeddings, labels)
    assert rows(positives) == [(0, 1), (2, 3)]
    assert rows(negatives) == [(0, 2), (0, 3)]
    # The closest negative pairs are kept, ties at the cut decided by (i, j); output in (i, j) order.
    embeddings = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 2.0], [3.0, 1.0],
                               [0.0, 0.0], [1.0, 0.0], [4.0, 4.0]])
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    expected = ref_hard_negative_pairs(ref_pdist(embeddings), labels)
    assert utils.pdist(embeddings).tolist() == ref_pdist(embeddings)
    assert rows(utils.HardNegativePairSelector().get_pairs(embeddings, labels)[1]) == expected
    assert {(0, 5), (2, 3), (0, 6), (1, 4), (5, 6)} <= set(expected) and expected == sorted(expected)


def test_balanced_negatives_follow_the_global_seed_without_a_generator():
    embeddings, labels = make_batch([5, 5, 5], 2, "gaussian", seed=3)
    torch.manual_seed(42)
    first = utils.AllPositivePairSelector().get_pairs(embeddings, labels)[1]
    torch.manual_seed(42)
    second = utils.AllPositivePairSelector().get_pairs(embeddings, labels)[1]
    assert torch.equal(first, second)


def test_balanced_negatives_are_uniform_over_the_negative_pairs(single_thread):
    # 1 positive pair among 4 points, 5 negative pairs: each draw keeps one negative pair.
    embeddings = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    labels = [0, 0, 1, 2]
    reference_negatives = ref_all_negative_pairs(labels)
    selector = utils.AllPositivePairSelector(generator=torch.Generator().manual_seed(99))
    counts = {pair: 0 for pair in reference_negatives}
    draws = 2000
    for _ in range(draws):
        (pair,) = rows(selector.get_pairs(embeddings, labels)[1])
        counts[pair] += 1
    assert_uniform(list(counts.values()), draws)


# ----------------------------------------------------------------------------- triplet selectors

@settings(**HYPOTHESIS)
@given(batches(max_classes=5, max_per_class=5))
def test_all_triplets_match_reference(batch):
    embeddings, labels, _ = batch
    check_all_triplets(embeddings, labels)


@settings(**HYPOTHESIS)
@given(batches())
def test_hardest_negative_triplets_match_reference(batch):
    embeddings, labels, margin = batch
    check_hardest(embeddings, labels, margin)


@settings(**HYPOTHESIS)
@given(batches())
def test_batch_hard_triplets_match_reference(batch):
    embeddings, labels, _ = batch
    check_batch_hard(embeddings, labels)


@settings(**HYPOTHESIS)
@given(batches(), st.integers(0, 2 ** 31 - 1))
def test_random_hard_triplets_meet_their_condition(batch, seed):
    embeddings, labels, margin = batch
    check_random_hard(embeddings, labels, margin, seed)


@settings(**HYPOTHESIS)
@given(batches(), st.integers(0, 2 ** 31 - 1))
def test_semihard_triplets_meet_their_condition(batch, seed):
    embeddings, labels, margin = batch
    check_semihard(embeddings, labels, margin, seed)


def test_triplet_selectors_seeded_loop(single_thread):
    for case, (embeddings, labels, margin) in enumerate(seeded_batches(60, seed_offset=20_000)):
        check_all_triplets(embeddings, labels)
        check_hardest(embeddings, labels, margin)
        check_batch_hard(embeddings, labels)
        check_random_hard(embeddings, labels, margin, seed=case)
        check_semihard(embeddings, labels, margin, seed=case)


@pytest.mark.parametrize("shape", [(10, 25), (100, 4)])
def test_triplet_selectors_at_training_shapes(shape):
    n_classes, per_class = shape
    embeddings, labels = make_batch([per_class] * n_classes, 2, "clustered", seed=n_classes)
    margin = 1.0
    distances = utils.row_distances(embeddings)
    check_hardest(embeddings, labels, margin)
    check_batch_hard(embeddings, labels)
    check_random_hard(embeddings, labels, margin)
    check_semihard(embeddings, labels, margin)
    check_all_triplets(embeddings, labels)
    assert len(ref_hardest_negative_triplets(distances, labels, margin)) > 0


@pytest.mark.parametrize("batch_size", [8, 16, 32])
@pytest.mark.parametrize("dim", [2, 128])
def test_selectors_on_exact_integer_distances(batch_size, dim):
    # Exact distances, so the reference may use its own loop distances: both formulas agree
    # bit for bit, and the many exact ties exercise every tie-breaking rule.
    generator = torch.Generator().manual_seed(batch_size + dim)
    embeddings = torch.randint(-1, 2, (batch_size, dim), generator=generator).float()
    labels = torch.randint(0, 3, (batch_size,), generator=generator)
    loop_distances = ref_pdist(embeddings)
    assert utils.pdist(embeddings).tolist() == loop_distances
    margin = 2.0
    hard_pairs = utils.HardNegativePairSelector().get_pairs(embeddings, labels)[1]
    assert rows(hard_pairs) == ref_hard_negative_pairs(loop_distances, labels)
    hardest = utils.HardestNegativeTripletSelector(margin).get_triplets(embeddings, labels)
    assert rows(hardest) == ref_hardest_negative_triplets(loop_distances, labels, margin)
    batch_hard = utils.BatchHardTripletSelector().get_triplets(embeddings, labels)
    assert rows(batch_hard) == ref_batch_hard_triplets(loop_distances, labels)
    candidates = ref_semihard_candidates(loop_distances, labels, margin)
    for a, p, n in rows(semihard(margin).get_triplets(embeddings, labels)):
        assert n in candidates[(a, p)]


def test_tie_breaking_picks_the_first_index():
    # Anchor 0 at the origin; its positives 1, 2 both at distance 4; negatives 3, 4 both at 1.
    # Eight integer points: the distances are exact, so the ties are exact.
    embeddings = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0],
                               [5.0, 5.0], [5.0, 6.0], [6.0, 5.0]])
    labels = [0, 0, 0, 1, 1, 2, 2, 1]
    assert utils.pdist(embeddings).tolist() == ref_pdist(embeddings)
    batch_hard = rows(utils.BatchHardTripletSelector().get_triplets(embeddings, labels))
    assert batch_hard[0] == (0, 1, 3)
    hardest = rows(utils.HardestNegativeTripletSelector(1.0).get_triplets(embeddings, labels))
    assert hardest[:2] == [(0, 1, 3), (0, 2, 3)]
    assert hardest == ref_hardest_negative_triplets(ref_pdist(embeddings), labels, 1.0)


def test_batch_hard_never_uses_the_anchor_as_its_own_positive():
    # All distances 0: a first-argmax over a mask that kept the diagonal would pick p = a.
    embeddings = torch.zeros(6, 2)
    labels = [0, 0, 0, 1, 1, 1]
    triplets = rows(utils.BatchHardTripletSelector().get_triplets(embeddings, labels))
    assert triplets == [(0, 1, 3), (1, 0, 3), (2, 0, 3), (3, 4, 0), (4, 3, 0), (5, 3, 0)]


def test_selectors_run_in_chunks_without_changing_the_result(monkeypatch):
    embeddings, labels = make_batch([4, 5, 3], 2, "clustered", seed=8)
    distances = utils.row_distances(embeddings)
    margin = 1.0
    # A chunk size smaller than one row forces one chunk per anchor / per (a, p) row.
    monkeypatch.setattr(utils, "CHUNK_ELEMENTS", 7)
    assert rows(utils.AllTripletSelector().get_triplets(embeddings, labels)) == \
        ref_all_triplets(labels)
    assert rows(utils.HardestNegativeTripletSelector(margin).get_triplets(embeddings, labels)) == \
        ref_hardest_negative_triplets(distances, labels, margin)
    check_random_hard(embeddings, labels, margin)
    check_semihard(embeddings, labels, margin)


def test_custom_negative_selection_function_contract():
    embeddings, labels = make_batch([3, 2, 2], 2, "gaussian", seed=4)
    labels_list = labels.tolist()
    distances = utils.row_distances(embeddings).tolist()
    calls = []

    def farthest_negative(negative_distances, positive_distances, margin, generator):
        calls.append((negative_distances.clone(), positive_distances.clone(), margin, generator))
        finite = negative_distances.masked_fill(negative_distances.isinf(), -1.0)
        return finite.argmax(dim=1, keepdim=True).expand(positive_distances.shape)

    generator = torch.Generator().manual_seed(0)
    selector = utils.FunctionNegativeTripletSelector(0.5, farthest_negative, generator=generator)
    triplets = rows(selector.get_triplets(embeddings, labels))
    # The returned column is used as the negative, whatever the margin.
    expected = []
    for a, p in ref_anchor_positive_pairs(labels):
        negatives = [n for n in range(7) if labels_list[n] != labels_list[a]]
        expected.append((a, p, max(negatives, key=lambda n: (distances[a][n], -n))))
    assert triplets == expected
    # The function sees each anchor's distances to the batch (inf where not a negative) and its
    # positives' distances in index order.
    (negative_distances, positive_distances, margin, given_generator), = calls
    # The generator reaches it as per-anchor streams keyed by one draw from the generator.
    assert margin == 0.5 and isinstance(given_generator, AnchorStreams)
    assert given_generator.anchors.tolist() == list(range(7))
    assert int(given_generator.key) == int(draw_key(torch.Generator().manual_seed(0)))
    for a in range(7):
        row = negative_distances[a].tolist()
        for n in range(7):
            expected_value = distances[a][n] if labels_list[n] != labels_list[a] else math.inf
            assert row[n] == expected_value
        positives = [distances[a][p] for p in range(7)
                     if p != a and labels_list[p] == labels_list[a]]
        assert positive_distances[a].tolist()[:len(positives)] == positives

    def never(negative_distances, positive_distances, margin, generator):
        return torch.full(positive_distances.shape, -1, dtype=torch.long)

    nothing = utils.FunctionNegativeTripletSelector(0.5, never).get_triplets(embeddings, labels)
    assert_index_tensor(nothing, 3, embeddings.device)
    assert len(nothing) == 0

    # A function that picks a same-class item would make a fake triplet: it is refused.
    def first_item(negative_distances, positive_distances, margin, generator):
        return torch.zeros(positive_distances.shape, dtype=torch.long)

    with pytest.raises(ValueError, match="not a negative of its anchor"):
        utils.FunctionNegativeTripletSelector(1.0, first_item).get_triplets(torch.randn(3, 2), [5, 5, 5])

    def wrong_shape(negative_distances, positive_distances, margin, generator):
        return torch.zeros(len(positive_distances), dtype=torch.long)

    with pytest.raises(ValueError, match="returned shape"):
        utils.FunctionNegativeTripletSelector(1.0, wrong_shape).get_triplets(embeddings, labels)


def test_selection_functions_directly():
    inf = math.inf
    # Columns are batch indices; inf marks items that are not negatives of the row's anchor.
    negative_distances = torch.tensor([[inf, 3.0, 1.0, 2.0], [inf, 5.0, inf, inf]])
    positive_distances = torch.tensor([[0.5, 1.5], [6.0, 0.0]])
    assert utils.hardest_negative(negative_distances, positive_distances, 1.0).tolist() == \
        [[2, 2], [1, -1]]
    chosen = utils.random_hard_negative(negative_distances, positive_distances, 1.0,
                                        torch.Generator().manual_seed(0)).tolist()
    assert chosen[0][0] == 2 and chosen[0][1] in (2, 3) and chosen[1] == [1, -1]
    seen = {tuple(utils.random_hard_negative(negative_distances, positive_distances, 1.0,
                                             torch.Generator().manual_seed(seed))[0].tolist())
            for seed in range(20)}
    assert seen == {(2, 2), (2, 3)}
    chosen = utils.semihard_negative(negative_distances, positive_distances, 1.0,
                                     torch.Generator().manual_seed(0))
    assert chosen.tolist() == [[2, 3], [-1, -1]]
    # Strict inequalities at both ends: D[a, n] == D[a, p] or == D[a, p] + margin is not semi-hard,
    # D[a, n] == D[a, p] + margin is not hard.
    negative_distances = torch.tensor([[2.0, inf, 1.0]])
    positive_distances = torch.tensor([[1.0]])
    assert utils.semihard_negative(negative_distances, positive_distances, 1.0).tolist() == [[-1]]
    assert utils.random_hard_negative(negative_distances, positive_distances, 1.0).tolist() == [[2]]
    assert utils.hardest_negative(negative_distances, positive_distances, 0.0).tolist() == [[-1]]
    # Hardest: the lowest index among equally close negatives.
    negative_distances = torch.tensor([[inf, 1.0, 3.0, 1.0]])
    assert utils.hardest_negative(negative_distances, torch.tensor([[1.0]]), 1.0).tolist() == [[1]]


def test_random_selectors_follow_the_global_seed_without_a_generator():
    embeddings, labels = make_batch([6, 6, 6], 2, "clustered", seed=11)
    for make in (random_hard, semihard):
        torch.manual_seed(7)
        first = make(4.0).get_triplets(embeddings, labels)
        torch.manual_seed(7)
        second = make(4.0).get_triplets(embeddings, labels)
        assert torch.equal(first, second)
        assert len(first) > 0


def test_random_selectors_differ_across_seeds():
    embeddings, labels = make_batch([6, 6, 6], 2, "clustered", seed=11)
    draws = {tuple(map(tuple, random_hard(64.0, torch.Generator().manual_seed(seed))
                       .get_triplets(embeddings, labels).tolist()))
             for seed in range(5)}
    assert len(draws) > 1


# ----------------------------------------------------------------------------- uniformity

def assert_uniform(counts, draws):
    """Chi-square goodness of fit to the uniform law, with a very generous threshold."""
    k = len(counts)
    expected = draws / k
    statistic = sum((count - expected) ** 2 / expected for count in counts)
    degrees = k - 1
    # About ten standard deviations above the mean of a chi-square with `degrees` dof.
    assert statistic < degrees + 10 * math.sqrt(2 * degrees) + 10, (counts, statistic)
    assert min(counts) > 0


# The three ways the random selection functions draw: small batches sort whole rows; from REJECTION_FROM items
# on, proposals (rejection), then the exact draw on the sorted entries inside each row's widest interval; and
# that exact draw alone (no proposals). Every way is uniform among the admissible negatives.
DRAWING_WAYS = {"sorted rows": {}, "proposals then exact": {"REJECTION_FROM": 1},
                "exact inside intervals": {"REJECTION_FROM": 1, "REJECTION_ROUNDS": 0}}


@pytest.fixture(params=list(DRAWING_WAYS))
def drawing_way(request, monkeypatch):
    for name, value in DRAWING_WAYS[request.param].items():
        monkeypatch.setattr(mining_rows, name, value)
    return request.param


@contextlib.contextmanager
def mining_settings(**settings):
    """mining_rows' module settings changed for the block of the with statement, then restored."""
    saved = {name: getattr(mining_rows, name) for name in settings}
    for name, value in settings.items():
        setattr(mining_rows, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mining_rows, name, value)


@settings(**HYPOTHESIS)
@given(batches(), st.integers(1, 40), st.integers(1, 8), st.sampled_from(list(DRAWING_WAYS.values())),
       st.integers(0, 2 ** 31 - 1))
def test_selectors_walking_the_block_in_parts_select_what_they_select_at_once(batch, part_entries, sample, way,
                                                                               seed):
    # parts of about part_entries entries (a row at least) and the hard-negative pair selector's bound from a
    # sample of about `sample` entries, however small the batch (what they do on large batches on the CPU);
    # the random selectors each way they draw
    embeddings, labels, margin = batch
    with mining_settings(**way):
        at_once = {name: get_triplets(make(margin, torch.Generator().manual_seed(seed)), embeddings, labels)
                   for name, make in (("random-hard", random_hard), ("semi-hard", semihard))}
    with mining_settings(PART_SIZE=part_entries, SMALL_BLOCK=0, SAMPLE=sample, **way):
        check_hardest(embeddings, labels, margin)
        check_batch_hard(embeddings, labels)
        check_hard_negative_pairs(embeddings, labels)
        for name, make in (("random-hard", random_hard), ("semi-hard", semihard)):
            assert get_triplets(make(margin, torch.Generator().manual_seed(seed)), embeddings, labels) == \
                at_once[name], name


@settings(**HYPOTHESIS)
@given(batches(max_classes=7, max_per_class=8), st.data(), st.integers(0, 2 ** 31 - 1))
def test_pair_selectors_select_the_same_pairs_from_masks_and_from_classes(batch, data, seed):
    # a small block's pairs come from two masks of its rows, a larger one's from the classes (and, balanced, the
    # ranks of the draws; hard negatives, a bound and a listing): SMALL_BLOCK = 0 forces that way. The same
    # pairs, the same balancing draw, for any rows of the batch, also when only the first n_anchors items may be
    # first members (a memory's items after them). Unbalanced, every pair is listed from the masks at any size:
    # those are checked against loops
    embeddings, labels, _ = batch
    labels = torch.as_tensor(np.asarray(labels)).long()
    n_items = len(labels)
    n_anchors = data.draw(st.integers(1, n_items))
    start = data.draw(st.integers(0, n_anchors))
    stop = data.draw(st.integers(start, n_anchors))
    distances = utils.row_distances(torch.as_tensor(embeddings))
    makers = {"balanced": lambda: utils.AllPositivePairSelector(True, torch.Generator().manual_seed(seed)),
              "hard": utils.HardNegativePairSelector}
    values = labels.tolist()
    for rows in (Rows(0, n_anchors, None, n_anchors), Rows(start, stop, None, n_anchors)):
        positives, negatives = utils.AllPositivePairSelector(False).select_pairs(None, labels, rows)
        pairs = [(i, j) for i in range(rows.start, rows.stop) for j in range(i + 1, n_items)]
        assert positives.tolist() == [[i, j] for i, j in pairs if values[i] == values[j]], rows
        assert negatives.tolist() == [[i, j] for i, j in pairs if values[i] != values[j]], rows
        for name, make in makers.items():
            block = distances[rows.start:rows.stop] if name == "hard" else None
            from_masks = make().select_pairs(block, labels, rows)
            with mining_settings(SMALL_BLOCK=0):
                from_classes = make().select_pairs(block, labels, rows)
            assert all(torch.equal(mine, theirs) for mine, theirs in zip(from_masks, from_classes)), (rows, name)
            assert all(pairs.dtype == torch.long and pairs.shape[1:] == (2,) for pairs in from_masks)


@pytest.mark.parametrize("make_selector, candidates_fn, margin", [
    (random_hard, ref_random_hard_candidates, 1.5),
    (semihard, ref_semihard_candidates, 3.0),
])
def test_random_choices_are_uniform_among_admissible_negatives(make_selector, candidates_fn,
                                                               margin, single_thread, drawing_way):
    embeddings, labels = make_batch([3, 4, 5], 2, "clustered", seed=21)
    candidates = candidates_fn(utils.row_distances(embeddings), labels, margin)
    several = {pair: admissible for pair, admissible in candidates.items() if len(admissible) >= 2}
    assert len(several) >= 5 and any(len(v) >= 4 for v in several.values())
    selector = make_selector(margin, torch.Generator().manual_seed(2024))
    counts = {pair: {n: 0 for n in admissible} for pair, admissible in several.items()}
    draws = 1500
    for _ in range(draws):
        for a, p, n in selector.get_triplets(embeddings, labels).tolist():
            if (a, p) in counts:
                counts[(a, p)][n] += 1  # KeyError would mean an inadmissible negative
    total_statistic, total_degrees = 0.0, 0
    for per_negative in counts.values():
        assert_uniform(list(per_negative.values()), draws)
        expected = draws / len(per_negative)
        total_statistic += sum((c - expected) ** 2 / expected for c in per_negative.values())
        total_degrees += len(per_negative) - 1
    assert total_statistic < total_degrees + 6 * math.sqrt(2 * total_degrees)


# ----------------------------------------------------------------------------- edge cases

ALL_TRIPLET_SELECTORS = {
    "all": lambda margin: utils.AllTripletSelector(),
    "hardest": lambda margin: utils.HardestNegativeTripletSelector(margin),
    "random_hard": lambda margin: random_hard(margin, torch.Generator().manual_seed(0)),
    "semihard": lambda margin: semihard(margin, torch.Generator().manual_seed(0)),
    "batch_hard": lambda margin: utils.BatchHardTripletSelector(),
}


@pytest.mark.parametrize("name, embeddings, labels, margin", EDGE_CASES, ids=EDGE_IDS)
def test_pair_selectors_on_edge_cases(name, embeddings, labels, margin):
    check_all_positive_pairs_unbalanced(embeddings, labels)
    check_all_positive_pairs_balanced(embeddings, labels, seed=3)
    check_hard_negative_pairs(embeddings, labels)
    if name in ("all_distinct", "batch_of_1", "batch_of_2_different"):
        positives, negatives = utils.AllPositivePairSelector().get_pairs(embeddings, labels)
        assert positives.shape == (0, 2) and negatives.shape == (0, 2)


@pytest.mark.parametrize("selector_name", list(ALL_TRIPLET_SELECTORS))
@pytest.mark.parametrize("name, embeddings, labels, margin", EDGE_CASES, ids=EDGE_IDS)
def test_triplet_selectors_on_edge_cases(selector_name, name, embeddings, labels, margin):
    distances = utils.row_distances(embeddings)
    got = get_triplets(ALL_TRIPLET_SELECTORS[selector_name](margin), embeddings, labels)
    if selector_name == "all":
        assert got == ref_all_triplets(labels)
    elif selector_name == "hardest":
        assert got == ref_hardest_negative_triplets(distances, labels, margin)
    elif selector_name == "batch_hard":
        assert got == ref_batch_hard_triplets(distances, labels)
    elif selector_name == "random_hard":
        check_random_hard(embeddings, labels, margin)
    else:
        check_semihard(embeddings, labels, margin)
    if name in ("all_distinct", "single_class", "identical_single_class", "batch_of_1",
                "batch_of_2_same", "batch_of_2_different"):
        assert got == []
    if name == "identical" and selector_name == "semihard":
        assert got == []  # every loss value equals the margin exactly: not semi-hard


def test_empty_batch_with_tensor_labels():
    embeddings = torch.zeros(0, 2)
    labels = torch.zeros(0, dtype=torch.long)
    for selector in ALL_TRIPLET_SELECTORS.values():
        assert_index_tensor(selector(1.0).get_triplets(embeddings, labels), 3, embeddings.device)
    for selector in (utils.AllPositivePairSelector(), utils.HardNegativePairSelector()):
        for pairs in selector.get_pairs(embeddings, labels):
            assert_index_tensor(pairs, 2, embeddings.device)
            assert len(pairs) == 0


def test_threshold_is_rounded_in_the_embeddings_dtype():
    # D[0, 1] = D[0, 2] = D[0, 3] = 2^24 exactly. In float32, 2^24 + 1 rounds back to 2^24, so
    # D[0, n] < D[0, 1] + 1 is false and negative 2 is not hard; in float64 it is.
    points = [[0.0, 0.0], [4096.0, 0.0], [0.0, 4096.0], [0.0, -4096.0]]
    labels = [0, 0, 1, 1]
    embeddings = torch.tensor(points)
    assert utils.pdist(embeddings)[0].tolist() == [0.0, 2.0 ** 24, 2.0 ** 24, 2.0 ** 24]
    distances = utils.row_distances(embeddings)
    hardest = rows(utils.HardestNegativeTripletSelector(1.0).get_triplets(embeddings, labels))
    assert hardest == ref_hardest_negative_triplets(distances, labels, 1.0)
    assert (0, 1, 2) not in hardest
    assert all(t[:2] != (0, 1) for t in rows(random_hard(1.0).get_triplets(embeddings, labels)))
    embeddings64 = embeddings.double()
    hardest64 = rows(utils.HardestNegativeTripletSelector(1.0).get_triplets(embeddings64, labels))
    assert (0, 1, 2) in hardest64
    assert hardest64 == ref_hardest_negative_triplets(utils.row_distances(embeddings64), labels, 1.0)


def test_identical_embeddings_hardest_and_random_choose_among_all_negatives():
    embeddings = torch.full((6, 3), 0.5)
    labels = [0, 0, 1, 1, 2, 2]
    hardest = rows(utils.HardestNegativeTripletSelector(1.0).get_triplets(embeddings, labels))
    assert hardest[:2] == [(0, 1, 2), (1, 0, 2)]
    assert len(hardest) == 6
    random_rows = rows(random_hard(1.0).get_triplets(embeddings, labels))
    assert [(a, p) for a, p, _ in random_rows] == ref_anchor_positive_pairs(labels)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("selector_name", ["hardest", "random_hard", "semihard"])
def test_hard_negative_selectors_select_nothing_on_non_finite_distances(selector_name, bad):
    # Every distance is NaN then; D[a, n] < D[a, p] + margin is false, so nothing is hard. (Binary
    # search misreads NaN: the random selectors used to pick a non-negative and raise.)
    embeddings, labels = make_batch([4, 4, 4], 3, "gaussian", seed=5)
    embeddings[0, 1] = bad
    triplets = ALL_TRIPLET_SELECTORS[selector_name](1.0).get_triplets(embeddings, labels)
    assert_index_tensor(triplets, 3, embeddings.device)
    assert len(triplets) == 0


def test_selectors_accept_float64_and_non_contiguous_inputs():
    embeddings, labels = make_batch([4, 4, 4], 3, "clustered", seed=2)
    embeddings64 = embeddings.double().t().contiguous().t()  # non-contiguous view
    assert not embeddings64.is_contiguous()
    distances = utils.row_distances(embeddings64)
    assert distances.dtype == torch.float64
    assert rows(utils.HardestNegativeTripletSelector(1.0).get_triplets(embeddings64, labels)) == \
        ref_hardest_negative_triplets(distances, labels, 1.0)
    assert rows(utils.BatchHardTripletSelector().get_triplets(embeddings64, labels)) == \
        ref_batch_hard_triplets(distances, labels)
    check_random_hard(embeddings64, labels, 1.0)
    check_semihard(embeddings64, labels, 1.0)


def test_selectors_ignore_requires_grad_and_the_cpu_flag():
    embeddings, labels = make_batch([3, 3], 2, "gaussian", seed=6)
    embeddings.requires_grad_(True)
    for selector in (utils.HardestNegativeTripletSelector(1.0, cpu=True),
                     utils.RandomNegativeTripletSelector(1.0, cpu=True),
                     utils.SemihardNegativeTripletSelector(1.0, cpu=True),
                     utils.BatchHardTripletSelector(), utils.AllTripletSelector()):
        triplets = selector.get_triplets(embeddings, labels)
        assert not triplets.requires_grad and triplets.dtype == torch.long
    for selector in (utils.HardNegativePairSelector(cpu=True), utils.AllPositivePairSelector()):
        for pairs in selector.get_pairs(embeddings, labels):
            assert not pairs.requires_grad and pairs.dtype == torch.long


# ----------------------------------------------------------------------------- error paths

def every_selector():
    return [utils.AllPositivePairSelector(), utils.AllPositivePairSelector(balance=False),
            utils.HardNegativePairSelector(), utils.AllTripletSelector(),
            utils.HardestNegativeTripletSelector(1.0), utils.RandomNegativeTripletSelector(1.0),
            utils.SemihardNegativeTripletSelector(1.0), utils.BatchHardTripletSelector()]


def select(selector, embeddings, labels):
    if hasattr(selector, "get_pairs"):
        return selector.get_pairs(embeddings, labels)
    return selector.get_triplets(embeddings, labels)


@pytest.mark.parametrize("selector", every_selector(), ids=lambda s: type(s).__name__)
def test_selectors_reject_bad_embeddings_and_labels(selector):
    good = torch.randn(4, 2)
    labels = [0, 0, 1, 1]
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        select(selector, good.tolist(), labels)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, D\)"):
        select(selector, good.flatten(), labels)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, D\)"):
        select(selector, good.unsqueeze(0), labels)
    with pytest.raises(TypeError, match="floating point"):
        select(selector, good.long(), labels)
    with pytest.raises(ValueError, match="one label per embedding"):
        select(selector, good, [0, 0, 1])
    with pytest.raises(ValueError, match="one label per embedding"):
        select(selector, good, [0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\)"):
        select(selector, good, [[0, 0, 1, 1]])
    with pytest.raises(TypeError, match="labels must be integers"):
        select(selector, good, [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("batch_size, dim", [(1, 3), (7, 2), (64, 5), (65, 5), (200, 16), (300, 130)])
def test_row_distances_of_any_rows_are_those_of_the_whole_batch_bitwise(batch_size, dim):
    vectors = torch.randn(batch_size, dim, generator=torch.Generator().manual_seed(batch_size)) * 3 + 5
    whole = utils.row_distances(vectors)
    assert whole.shape == (batch_size, batch_size) and whole.dtype == vectors.dtype
    assert torch.equal(whole.diagonal(), torch.zeros(batch_size)) and bool((whole >= 0).all())
    # the same values as pdist up to rounding (the expansion's bound), without its symmetrising average
    error = (whole.double() - brute_force_squared_distances(vectors, vectors)).abs()
    assert bool((error <= 2 * expansion_error_bound(centred(vectors), centred(vectors)) + 1e-6).all())
    cuts = sorted({0, 1, batch_size // 3, batch_size // 2, utils.ROW_TILE, batch_size - 1, batch_size})
    for start, stop in itertools.combinations([cut for cut in cuts if cut <= batch_size], 2):
        assert torch.equal(utils.row_distances(vectors, start, stop), whole[start:stop]), (start, stop)
    assert utils.row_distances(vectors, 2 % batch_size, 2 % batch_size).shape == (0, batch_size)
    differentiable = vectors.clone().requires_grad_()
    with_graph = utils.row_distances(differentiable, batch_size // 2, batch_size)
    assert torch.equal(with_graph.detach(), whole[batch_size // 2:])  # autograd's tiles, the same values
    with_graph.sum().backward()
    assert torch.isfinite(differentiable.grad).all()


def test_row_distances_check_their_rows():
    with pytest.raises(ValueError, match=r"need 0 <= start <= stop <= 4"):
        utils.row_distances(torch.zeros(4, 2), 3, 5)
    with pytest.raises(ValueError, match=r"need 0 <= start <= stop <= 4"):
        utils.row_distances(torch.zeros(4, 2), 3, 2)
    with pytest.raises(ValueError, match=r"shape \(B, D\)"):
        utils.row_distances(torch.zeros(4))


def test_row_distances_write_into_out_and_check_it():
    vectors = torch.randn(130, 5, generator=torch.Generator().manual_seed(3))
    out = torch.full((70, 130), float("nan"))  # every entry must be written: rows 60 .. 129 cover partial tiles
    assert utils.row_distances(vectors, 60, 130, out=out) is out
    assert torch.equal(out, utils.row_distances(vectors, 60, 130))
    for wrong in (torch.empty(70, 129), torch.empty(70, 130, dtype=torch.float64), torch.empty(130, 70).T, "block"):
        with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(70, 130\)"):
            utils.row_distances(vectors, 60, 130, out=wrong)
    with pytest.raises(ValueError, match="out= takes distances without autograd"):
        utils.row_distances(vectors.clone().requires_grad_(), 60, 130, out=out)


def test_a_block_buffer_keeps_one_block_on_the_cpu_only():
    buffer = utils.BlockBuffer()
    like = torch.zeros(3)
    first = buffer((4, 6), like)
    assert first.shape == (4, 6) and first.dtype == torch.float32 and buffer((4, 6), like) is first
    assert buffer((5, 6), like) is not first and buffer((5, 6), like).shape == (5, 6)  # a new shape: a new block
    assert buffer((5, 6), like.double()).dtype == torch.float64
    assert buffer((4, 6), torch.zeros(3, device="meta")) is None  # other devices: their allocator's memory


def test_select_calls_check_the_block_they_are_given():
    embeddings, labels = make_batch([3, 3], 2, "gaussian", seed=1)
    with pytest.raises(ValueError, match=r"distances must be the rows' block of shape \(2, 6\)"):
        utils.BatchHardTripletSelector().select_triplets(utils.row_distances(embeddings), labels, (0, 2))
    with pytest.raises(ValueError, match="distances must be"):
        utils.HardNegativePairSelector().select_pairs(None, labels)
    with pytest.raises(ValueError, match="rows must lie in"):
        utils.AllTripletSelector().select_triplets(None, labels, (4, 9))


def test_pdist_rejects_bad_input():
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        utils.pdist([[0.0, 1.0]])
    with pytest.raises(ValueError, match=r"shape \(B, D\)"):
        utils.pdist(torch.zeros(3))
    with pytest.raises(TypeError, match="floating point"):
        utils.pdist(torch.zeros(3, 2, dtype=torch.int64))


MARGIN_SELECTORS = [utils.HardestNegativeTripletSelector, utils.RandomNegativeTripletSelector,
                    utils.SemihardNegativeTripletSelector,
                    lambda margin: utils.FunctionNegativeTripletSelector(margin,
                                                                         utils.hardest_negative)]


@pytest.mark.parametrize("make_selector", MARGIN_SELECTORS)
def test_margin_errors(make_selector):
    for bad in ("1.0", None, [1.0], 1 + 2j):
        with pytest.raises(TypeError, match="margin must be a real number"):
            make_selector(bad)
    for bad in (-0.5, -1, float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="margin must be >= 0"):
            make_selector(bad)
    make_selector(0)  # an int margin is fine
    make_selector(np.float32(0.5))


def test_not_callable_selection_function():
    with pytest.raises(TypeError, match="negative_selection_fn must be callable"):
        utils.FunctionNegativeTripletSelector(1.0, "hardest")


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        utils.RandomNegativeTripletSelector(1.0, generator=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        utils.SemihardNegativeTripletSelector(1.0, generator=np.random.default_rng(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        utils.AllPositivePairSelector(generator=42)


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with atomic_write(path, "w") as file:
        file.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as file:
            file.write("half of the second")
            raise RuntimeError("interrupted")
    assert path.read_text() == "first"  # the old content, untouched
    assert os.listdir(path.parent) == ["file.txt"]  # and no temporary file left behind
    with atomic_write(path) as file:
        file.write(b"\x00binary")
    assert path.read_bytes() == b"\x00binary"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the usual permissions


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_check_choice_names_the_argument_and_the_choices():
    assert check_choice("b", ("a", "b"), "mode") == "b"
    with pytest.raises(ValueError, match="unknown mode 'c'; choose one of a, b"):
        check_choice("c", ("a", "b"), "mode")
    with pytest.raises(ValueError, match="unknown mode 'a'"):
        atomic_write("x", "a").__enter__()


# ----------------------------------------------------------------------------- argument checks, moved names

def test_check_int_names_the_argument_and_takes_numpy_integers():
    assert check_int(np.int64(3), "n", 1) == 3 and type(check_int(np.int64(3), "n", 1)) is int
    assert check_int(-5, "offset", None) == -5  # no lower bound
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", 1)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int(bad, "n", None)


def assert_moved_name(old_module, name, new_module):
    """``old_module.name`` and ``from old_module import name`` give ``new_module.name`` with a
    DeprecationWarning naming its new place; any other name is an ordinary AttributeError."""
    old, new = old_module.__name__, new_module.__name__
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        assert getattr(old_module, name) is getattr(new_module, name)
    with pytest.warns(DeprecationWarning, match=f"moved to {new}.{name}"):
        exec(f"from {old} import {name}", {})
    with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'no_such_name'"):
        getattr(old_module, "no_such_name")


def test_a_moved_name_still_resolves_with_a_warning_naming_its_new_module():
    import experiments
    import results

    with pytest.warns(DeprecationWarning, match=r"experiments\.run_omniglot moved to omniglot\.run_omniglot"):
        moved = experiments.run_omniglot
    import omniglot
    assert moved is omniglot.run_omniglot
    assert utils.MOVED_NAMES["experiments"]["merge_results"] == "results"
    assert results.merge_results is not None
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        experiments.no_such_name  # noqa: B018 - any other name is an ordinary AttributeError
    for module, names in utils.MOVED_NAMES.items():  # every entry points to where the name lives now
        for name, new_module in names.items():
            assert hasattr(importlib.import_module(new_module), name), (module, name, new_module)


# ----------------------------------------------------------------------------- as_distance

def test_as_distance_gives_euclidean_roots_with_a_zero_gradient_at_zero():
    squared = torch.tensor([0.0, 1e-45, 4.0, 9.0], requires_grad=True)  # 1e-45: a float32 denormal
    euclidean = utils.as_distance(squared, "euclidean")
    assert euclidean.tolist()[2:] == [2.0, 3.0]
    assert euclidean[0].item() == 0.0
    euclidean.sum().backward()
    assert torch.isfinite(squared.grad).all()  # sqrt's own gradient at 0 is infinite
    assert squared.grad[0].item() == 0.0
    assert squared.grad[2:].tolist() == pytest.approx([0.25, 1 / 6])
    assert utils.as_distance(squared, "squared") is squared
    with pytest.raises(ValueError, match="unknown distance 'cosine'"):
        utils.as_distance(squared, "cosine")


def test_check_real_refuses_infinite_values_only_when_asked():
    assert check_real(float("inf"), "x", 0) == float("inf") and check_real(2, "x", 0, finite=True) == 2.0
    for value in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="x must be finite, got"):
            check_real(value, "x", finite=True)
    with pytest.raises(ValueError, match="x must be >= 0"):
        check_real(float("nan"), "x", 0, finite=True)
