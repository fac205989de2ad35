"""Tests for mining_rows.py against brute-force loops: the batch's classes and each anchor's positives, the
pair counts, the negative pairs found by rank, the balanced draws, and the k smallest entries of a block
(per-row candidates, then one threshold) with its ties; and the checks of a selector's rows."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mining_rows
from mining_rows import (Rows, checked_rows, classes_of, distinct_draws, negative_pairs_of_rank, negatives_after,
                         pair_counts, positive_pairs_of, positives_of, smallest_in_rows)
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


def smallest_by_sorting(values, k):
    """The reference: positions of the k smallest of values (A, N), ties by position, ascending."""
    flat = values.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda position: (flat[position], position))
    return sorted(order[:k])


@settings(**HYPOTHESIS)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 4), st.data())
def test_the_k_smallest_of_a_block_match_a_sort(rows, width, levels, data):
    # few distinct values give many ties; some entries are inf (not candidates)
    values = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, 3.0, 7.0][:levels + 1] + [float("inf")]),
                                             min_size=rows * width, max_size=rows * width))).view(rows, width)
    finite = int(torch.isfinite(values).sum())
    for k in {0, 1, finite // 2, finite}:
        expected = smallest_by_sorting(values, k)
        assert smallest_in_rows(values, k).tolist() == expected
        original = mining_rows.SMALL_BLOCK
        mining_rows.SMALL_BLOCK = 0  # the per-row candidates, however small the block
        try:
            assert smallest_in_rows(values, k).tolist() == expected
        finally:
            mining_rows.SMALL_BLOCK = original


def test_the_candidates_grow_when_one_row_holds_most_of_the_smallest(monkeypatch):
    monkeypatch.setattr(mining_rows, "SMALL_BLOCK", 0)
    values = torch.full((64, 64), 10.0)
    values[5] = torch.arange(64.0) / 100  # row 5 holds the 40 smallest
    chosen = smallest_in_rows(values, 40)
    assert chosen.tolist() == list(range(5 * 64, 5 * 64 + 40))


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
