"""Tests for distances.py's ``indexed_squared_distances``: the pairs of rows of one batch with a backward of
its own. Its values must be bitwise those of ``paired_squared_distances`` on the indexed rows (what the
online losses computed before it), and its gradient that of autograd through the indexing, over many random
batches with repeated and coinciding rows (hypothesis), and in float64 by gradcheck; every error path too.
The other distance functions are tested in test_utils.py (through the names utils still imports).
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distances
from distances import indexed_squared_distances, paired_squared_distances

HYPOTHESIS = dict(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def parts_of(entries):
    """indexed_squared_distances taking its pairs in parts of ``entries`` entries (None: as it is)."""
    kept = distances.PAIR_PART_ENTRIES
    distances.PAIR_PART_ENTRIES = kept if entries is None else entries
    try:
        yield
    finally:
        distances.PAIR_PART_ENTRIES = kept


def reference(vectors, first, second):
    """The indexing way: two ``(P, D)`` copies, autograd through both."""
    return paired_squared_distances(vectors[first], vectors[second])


@st.composite
def batches(draw):
    n_rows, dim, n_pairs = draw(st.integers(1, 40)), draw(st.integers(1, 70)), draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_rows, dim, generator=generator, dtype=dtype) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()) and n_rows > 1:  # coinciding rows: exact zeros
        vectors[1] = vectors[0]
    first = torch.randint(0, n_rows, (n_pairs,), generator=generator)
    second = torch.randint(0, n_rows, (n_pairs,), generator=generator)
    if draw(st.booleans()):
        first = first.sort().values  # the losses' pairs come ordered by their first member
    return vectors, first, second


@settings(**HYPOTHESIS)
@given(batches(), st.one_of(st.none(), st.integers(1, 500)))
def test_values_are_bitwise_those_of_the_indexed_rows_and_gradients_match_autograd(batch, part_entries):
    """Also with the pairs in parts of a few entries (``part_entries``: 1 to 500; None: the default parts)."""
    vectors, first, second = batch
    weights = torch.linspace(-2, 3, len(first), dtype=vectors.dtype)
    ours_input = vectors.clone().requires_grad_()
    with parts_of(part_entries):
        ours = indexed_squared_distances(ours_input, first, second)
        (ours * weights).sum().backward()
    theirs_input = vectors.clone().requires_grad_()
    theirs = reference(theirs_input, first, second)
    assert ours.dtype == theirs.dtype and ours.shape == (len(first),)
    assert torch.equal(ours, theirs)
    (theirs * weights).sum().backward()
    # the same products per pair; only the order in which a row's contributions are summed may differ
    tolerance = 1e-5 if vectors.dtype == torch.float32 else 1e-12
    scale = (4 * vectors.abs().max() * weights.abs().sum()).item() + 1e-30  # a bound on any row's summed terms
    assert torch.allclose(ours_input.grad, theirs_input.grad, rtol=tolerance, atol=tolerance * scale)


def test_gradcheck_in_float64_with_repeated_pairs():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    first = torch.tensor([0, 0, 3, 6, 2, 2, 5])
    second = torch.tensor([1, 4, 3, 0, 2, 6, 1])
    assert torch.autograd.gradcheck(lambda v: indexed_squared_distances(v, first, second), (vectors,))


def test_coinciding_rows_give_zero_with_a_zero_gradient():
    vectors = torch.tensor([[1.0, 2.0], [1.0, 2.0], [4.0, 6.0]], requires_grad=True)
    distances = indexed_squared_distances(vectors, torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert distances.tolist() == [0.0, 25.0]
    distances[0].backward()
    assert torch.equal(vectors.grad, torch.zeros(3, 2))


def test_empty_pairs_give_an_empty_result_and_a_zero_gradient():
    vectors = torch.randn(4, 3, requires_grad=True)
    no_pairs = torch.tensor([], dtype=torch.long)
    distances = indexed_squared_distances(vectors, no_pairs, no_pairs)
    assert distances.shape == (0,)
    (distances.sum() + 0 * vectors.sum()).backward()
    assert torch.equal(vectors.grad, torch.zeros(4, 3))


def test_non_finite_rows_give_non_finite_distances():
    vectors = torch.tensor([[0.0, 0.0], [float("inf"), 0.0], [float("nan"), 1.0]])
    distances = indexed_squared_distances(vectors, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]))
    assert distances[0] == float("inf") and distances[1:].isnan().all()


def test_half_precision_computes_in_float32_and_the_gradient_reaches_the_half_tensor():
    vectors = torch.randn(6, 4).bfloat16().requires_grad_()
    first, second = torch.tensor([0, 1, 5]), torch.tensor([2, 3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances = indexed_squared_distances(vectors, first, second)
    assert distances.dtype == torch.float32
    assert torch.equal(distances, reference(vectors.float(), first, second))
    distances.sum().backward()
    assert vectors.grad is not None and vectors.grad.dtype == torch.bfloat16


def test_int32_indices_are_accepted():
    vectors = torch.randn(5, 3)
    first, second = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([2, 2], dtype=torch.int32)
    expected = reference(vectors, first.long(), second.long())
    assert torch.equal(indexed_squared_distances(vectors, first, second), expected)


@pytest.mark.parametrize("part_entries", [None, 3, 7])
def test_first_and_second_derivatives_pass_gradcheck_in_parts_too(part_entries):
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    first, second = torch.tensor([0, 0, 2, 5, 4]), torch.tensor([1, 3, 2, 0, 4])
    with parts_of(part_entries):
        assert torch.autograd.gradcheck(lambda v: indexed_squared_distances(v, first, second), (vectors,))
        assert torch.autograd.gradgradcheck(lambda v: indexed_squared_distances(v, first, second), (vectors,))


@pytest.mark.parametrize("vectors, first, second, error, match", [
    ([[0.0, 1.0]], torch.tensor([0]), torch.tensor([0]), TypeError, "embeddings must be a torch.Tensor"),
    (torch.zeros(3), torch.tensor([0]), torch.tensor([0]), ValueError, r"embeddings must have shape \(B, D\)"),
    (torch.zeros(3, 2, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), TypeError, "floating point"),
    (torch.zeros(3, 2), [0], torch.tensor([0]), TypeError, r"first must be a \(P,\) integer tensor"),
    (torch.zeros(3, 2), torch.tensor([0]), torch.tensor([0.0]), TypeError, r"second must be a \(P,\) integer tensor"),
    (torch.zeros(3, 2), torch.tensor([[0]]), torch.tensor([0]), TypeError, r"first must be a \(P,\) integer"),
    (torch.zeros(3, 2), torch.tensor([0, 1]), torch.tensor([0]), ValueError, "same length, got 2 and 1"),
    (torch.zeros(3, 2), torch.tensor([0, 3]), torch.tensor([0, 1]), IndexError, "index out of range"),
])
def test_bad_arguments_are_errors_that_say_which(vectors, first, second, error, match):
    with pytest.raises(error, match=match):
        indexed_squared_distances(vectors, first, second)
