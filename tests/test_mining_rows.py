"""Tests for mining_rows.py against brute-force loops: the batch's classes and each anchor's positives, the
pair counts, the pairs of a small block's rows, the negative pairs found by rank, the balanced draws, the k
smallest admitted entries of a block (a sampled bound, then one pass) with its ties, the parts a block is walked
in and the anchors' distances to their negatives; and the checks of a selector's rows."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mining_rows
from mining_rows import (Rows, batch_pair_counts, checked_rows, classes_of, distinct_draws, negative_pairs_of_rank,
                         negatives_after, pair_counts, pair_positions, pairs_at, positive_pairs_of, positives_of,
                         smallest_admitted, smallest_stable, distances_to_negatives, flat_at_most, flat_between,
                         flat_nonzero, row_parts)
from random_streams import uniform

HYPOTHESIS = dict(max_examples=60, deadline=None)
labels_strategy = st.lists(st.integers(0, 6), min_size=1, max_size=40).map(torch.tensor)


def all_negative_pairs(labels):
    labels = labels.tolist()
    return [(i, j) for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] != labels[j]]


@settings(**HYPOTHESIS)
@given(labels_strategy)
def test_classes_positives_and_pair_counts_match_loops(labels):
    classes = classes_of(labels)
    values = labels.tolist()
    for item, label in enumerate(values):
        members = [j for j, other in enumerate(values) if other == label]
        row = classes.members[classes.class_of[item]].tolist()
        assert row[:len(members)] == members and all(j == len(values) for j in row[len(members):])
        assert int(classes.place[item]) == members.index(item)
    anchors = torch.arange(len(values))
    columns, valid = positives_of(classes, anchors)
    for anchor in range(len(values)):
        expected = [j for j, other in enumerate(values) if other == values[anchor] and j != anchor]
        assert columns[anchor][valid[anchor]].tolist() == expected
    negatives = all_negative_pairs(labels)
    positives = [(i, j) for i, j in itertools.combinations(range(len(values)), 2) if values[i] == values[j]]
    assert pair_counts(classes, len(values)) == (len(positives), len(negatives))
    for n_anchors in range(len(values) + 1):  # pairs whose first member is among the first n_anchors
        assert pair_counts(classes, len(values), n_anchors) == (sum(1 for i, _ in positives if i < n_anchors),
                                                                sum(1 for i, _ in negatives if i < n_anchors))
    assert [tuple(pair) for pair in positive_pairs_of(classes, anchors).tolist()] == positives
    assert negatives_after(classes, anchors).tolist() == [sum(1 for i, _ in negatives if i == a)
                                                         for a in range(len(values))]


@settings(**HYPOTHESIS)
@given(labels_strategy, st.integers(0, 3), st.integers(0, 3))
def test_negative_pairs_found_by_rank_are_those_at_that_place_in_order(labels, cut_start, cut_stop):
    negatives = all_negative_pairs(labels)
    classes = classes_of(labels)
    ranks = torch.arange(len(negatives))
    start = min(cut_start, len(labels))
    stop = max(start, len(labels) - cut_stop)
    mine = [pair for pair in negatives if start <= pair[0] < stop]
    original = mining_rows.SMALL_BLOCK
    for small_block in (original, 0):  # the listing of a small block, and the ranks' own search
        mining_rows.SMALL_BLOCK = small_block
        try:
            for rows, expected in ((Rows(0, len(labels)), negatives), (Rows(start, stop), mine)):
                assert [tuple(pair) for pair in negative_pairs_of_rank(classes, ranks, rows).tolist()] == expected
                some = ranks[::3].contiguous()
                assert [tuple(pair) for pair in negative_pairs_of_rank(classes, some, rows).tolist()] == \
                    [negatives[rank] for rank in some.tolist() if rows.start <= negatives[rank][0] < rows.stop]
        finally:
            mining_rows.SMALL_BLOCK = original


@settings(**HYPOTHESIS)
@given(labels_strategy, st.data())
def test_pair_positions_list_the_rows_pairs_in_order_and_count_the_batch_pairs(labels, data):
    start = data.draw(st.integers(0, len(labels)))
    rows = Rows(start, data.draw(st.integers(start, len(labels))))
    values = labels.tolist()
    expected = {same: [(i, j) for i, j in itertools.combinations(range(len(values)), 2)
                       if rows.start <= i < rows.stop and (values[i] == values[j]) == same] for same in (True, False)}
    positive, negative = pair_positions(labels, rows)
    for positions, same in ((positive, True), (negative, False)):
        pairs = pairs_at(positions, rows, len(labels))
        assert pairs.dtype == torch.long and pairs.shape == (len(expected[same]), 2)
        assert [tuple(pair) for pair in pairs.tolist()] == expected[same]
    every = {same: [(i, j) for i, j in itertools.combinations(range(len(values)), 2)
                    if (values[i] == values[j]) == same] for same in (True, False)}
    assert batch_pair_counts(labels, rows, positive, negative) == (
        len(every[True]), len(every[False]), sum(1 for i, _ in every[False] if i < rows.start))


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (7, 10), (10, 10), (50, 100_000), (1, 1)])
def test_distinct_draws_are_a_sorted_subset_of_the_right_size(k, n):
    drawn = distinct_draws(torch.tensor(4), k, n, torch.device("cpu"))
    assert len(drawn) == k and len(set(drawn.tolist())) == k and drawn.tolist() == sorted(drawn.tolist())
    assert all(0 <= value < n for value in drawn.tolist())
    assert torch.equal(drawn, distinct_draws(torch.tensor(4), k, n, torch.device("cpu")))  # a function of the key


def first_distinct_of_the_stream(key, k, n):
    """The reference: the first k distinct values of floor(n * uniform(key, t)), t = 0, 1, ..., sorted
    (the complement of the first n - k when k > n / 2), by a loop over the stream."""
    wanted = n - k if 2 * k > n else k
    met, t = [], 0
    while len(met) < wanted:
        value = min(int(float(uniform(key, t)) * n), n - 1)
        if value not in met:
            met.append(value)
        t += 1
    return sorted(set(range(n)) - set(met)) if 2 * k > n else sorted(met)


@settings(**HYPOTHESIS)
@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 300), st.data())
@pytest.mark.parametrize("table", [True, False])
def test_distinct_draws_are_the_first_distinct_values_of_the_stream(table, key, n, data):
    k = data.draw(st.integers(0, n))
    original = mining_rows.SMALL_BLOCK
    mining_rows.SMALL_BLOCK = original if table else 0  # a table of first draws, or a sort of the draws
    try:
        drawn = distinct_draws(torch.tensor(key), k, n, torch.device("cpu"))
    finally:
        mining_rows.SMALL_BLOCK = original
    assert drawn.dtype == torch.long and drawn.tolist() == first_distinct_of_the_stream(key, k, n)


def test_distinct_draws_choose_every_value_equally_often():
    counts = torch.zeros(12)
    keys = 3000
    for key in range(keys):
        counts[distinct_draws(torch.tensor(key), 4, 12, torch.device("cpu"))] += 1
    expected = keys * 4 / 12
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < 11 + 10 * (2 * 11) ** 0.5, counts


def smallest_by_sorting(values, k, mask):
    """The reference: positions of the k smallest of values (A, N) where mask, ties by position, ascending."""
    flat, admitted = values.flatten().tolist(), mask.flatten().tolist()
    order = sorted((position for position in range(len(flat)) if admitted[position]),
                   key=lambda position: (flat[position], position))
    return sorted(order[:k])


def admitted_by(mask):
    """An ``admitted`` predicate of smallest_admitted: the entries where ``mask`` is True."""
    return lambda rows, columns: mask[rows, columns]


@settings(**HYPOTHESIS)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 4), st.data())
def test_the_k_smallest_admitted_entries_of_a_block_match_a_sort(rows, width, levels, data):
    # few distinct values give many ties; some entries are inf, some are not admitted
    values = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, 3.0, 7.0][:levels + 1] + [float("inf")]),
                                             min_size=rows * width, max_size=rows * width))).view(rows, width)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * width, max_size=rows * width)))
    mask = mask.view(rows, width)
    n_finite, n_admitted = int((torch.isfinite(values) & mask).sum()), int(mask.sum())
    for k in {0, min(1, n_admitted), n_finite // 2, n_finite, n_admitted}:
        expected = smallest_by_sorting(values, k, mask)
        assert smallest_admitted(values, k, admitted_by(mask), int(mask.sum())).tolist() == expected
        original = mining_rows.SAMPLE, mining_rows.PART_SIZE
        # parts of a few rows, however small the block, and a sample of 1-3 entries
        mining_rows.SAMPLE, mining_rows.PART_SIZE = data.draw(st.integers(1, 3)), width
        try:
            assert smallest_admitted(values, k, admitted_by(mask), int(mask.sum())).tolist() == expected
        finally:
            mining_rows.SAMPLE, mining_rows.PART_SIZE = original


@settings(**HYPOTHESIS)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, math.inf, math.nan]), min_size=1, max_size=30), st.data())
def test_the_k_smallest_with_ties_to_the_lower_positions_match_a_sort(values, data):
    """numpy's way (float32 and float64 on the CPU) and torch's (bfloat16 here, as on other devices) alike."""
    finite_or_inf = sum(1 for value in values if not math.isnan(value))
    k = data.draw(st.integers(0, finite_or_inf))
    order = sorted((i for i, value in enumerate(values) if not math.isnan(value)), key=lambda i: (values[i], i))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        chosen = smallest_stable(torch.tensor(values, dtype=dtype), k)
        assert chosen.dtype == torch.long and chosen.tolist() == sorted(order[:k])


def test_the_bound_is_raised_when_the_sample_misses_the_smallest(monkeypatch):
    monkeypatch.setattr(mining_rows, "SAMPLE", 64)  # every 64th entry: column 0 of each row
    values = 100 + torch.arange(64 * 64.0).view(64, 64) / 1e4
    values[:, 0] = torch.arange(64.0)  # the sample: its low quantiles bound far fewer than 100 entries
    everything = torch.ones(64, 64, dtype=torch.bool)
    chosen = smallest_admitted(values, 100, admitted_by(everything), 64 * 64)
    assert chosen.tolist() == smallest_by_sorting(values, 100, everything)


def test_flat_nonzero_lists_the_true_positions_ascending():
    mask = torch.rand(37, 53, generator=torch.Generator().manual_seed(0)) < 0.3
    listed = flat_nonzero(mask)
    assert listed.dtype == torch.long and torch.equal(listed, mask.flatten().nonzero().squeeze(1))
    assert flat_nonzero(torch.zeros(0, 4, dtype=torch.bool)).tolist() == []


def test_the_flat_comparisons_list_what_torch_lists():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(37, 53, generator=generator)
    values[3, 4] = values[5, 6] = float("nan")  # NaN is never listed
    values[7] = 0.5  # ties at the bounds
    low, high = torch.rand(37, 1, generator=generator) * 0.5, 0.5 + torch.rand(37, 1, generator=generator) * 0.5
    high[7] = 0.5
    assert torch.equal(flat_at_most(values, torch.tensor(0.5)), flat_nonzero(values <= 0.5))
    assert torch.equal(flat_between(values, low, high), flat_nonzero((values > low) & (values < high)))
    assert torch.equal(flat_between(values, None, high), flat_nonzero(values < high))
    assert torch.equal(flat_at_most(values.double(), math.inf), flat_nonzero(~values.double().isnan()))
    tracked = values.clone().requires_grad_()  # tensors that autograd tracks are read as they are
    assert torch.equal(flat_between(tracked, low, high.clone().requires_grad_()), flat_between(values, low, high))
    assert torch.equal(flat_at_most(tracked, 0.5), flat_at_most(values, 0.5))


@pytest.mark.parametrize("distinct", [True, False])
def test_keys_are_sorted_stably_with_or_without_ties(distinct):
    generator = torch.Generator().manual_seed(1)
    keys = torch.randperm(20_000, generator=generator) if distinct else \
        torch.randint(0, 40, (20_000,), generator=generator)  # many ties, which a fast sort would reorder
    ordered, order = mining_rows._sorted_stably(keys)
    expected = keys.sort(stable=True)
    assert torch.equal(ordered, expected.values) and torch.equal(order, expected.indices)


def test_distances_to_negatives_keep_exactly_the_negatives():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    distances = torch.arange(7 * 7, dtype=torch.float32).view(7, 7)
    anchors = torch.tensor([0, 4, 6])
    columns, valid = positives_of(classes_of(labels), anchors)
    kept = distances_to_negatives(distances[anchors], anchors, columns, valid)
    expected = torch.where(labels[anchors, None] != labels, distances[anchors], math.inf)
    assert torch.equal(kept, expected) and distances[0, 0] == 0  # a copy: the block itself is unchanged


def test_row_parts_cover_the_rows_in_order(monkeypatch):
    monkeypatch.setattr(mining_rows, "PART_SIZE", 10)
    assert row_parts(torch.empty(7, 4)) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert row_parts(torch.empty(3, 50)) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least a row each
    assert row_parts(torch.empty(0, 4)) == [slice(0, 0)]
    assert row_parts(torch.empty(7, 4, device="meta")) == [slice(0, 7)]  # not the CPU: the whole block


def test_a_selectors_rows_and_block_are_checked():
    labels = torch.tensor([0, 0, 1, 1, 2])
    block = torch.zeros(2, 5)
    checked, rows, anchors = checked_rows(block, labels, (1, 3))
    assert rows == Rows(1, 3) and anchors.tolist() == [1, 2] and torch.equal(checked, labels)
    with pytest.raises(ValueError, match="rows must lie in 0 .. 5"):
        checked_rows(None, labels, (2, 7), needs_distances=False)
    with pytest.raises(ValueError, match=r"distances must be the rows' block of shape \(2, 5\)"):
        checked_rows(torch.zeros(5, 5), labels, (1, 3))
    with pytest.raises(ValueError, match="distances must be"):
        checked_rows(None, labels, (1, 3))
    with pytest.raises(ValueError, match="labels must be integers"):
        checked_rows(None, torch.zeros(5), None, needs_distances=False)
