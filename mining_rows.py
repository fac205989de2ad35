"""The structure a selector needs to mine some rows of a batch: which rows (``Rows``) and the parts to walk
their block in (``row_parts``), the batch's classes and each anchor's positives and its distances to negatives, the
negative pairs counted and found by rank (or listed, for a small block: ``pair_positions``), the k smallest
admitted entries of a block of rows (``smallest_admitted``), and a uniformly random admissible entry per (row,
slot) (``uniform_admissible``).

Everything here works from the labels ``(N,)`` or a ``(A, N)`` block of rows, never an ``(N, N)``
matrix, on the tensors' device, so that a process mining its own ``A`` rows of a batch of ``N`` needs
memory for its block only. ``utils``' selectors are built on it.
"""

from typing import NamedTuple

import math

import numpy as np
import torch

from random_streams import KEY_RANGE, AnchorStreams, uniform

# The pair selectors take the pairs of a block of rows of up to this many entries from masks of it (pair_positions)
# rather than from the classes and a sampled bound (utils), ranges of up to this many values are drawn from with a
# table of first draws (distinct_draws), and batches whose classes x items is at most this find a negative pair's
# second member in a table of each class's non-members (negative_pairs_of_rank); measured the faster way there
# (benchmarks/bench_selectors.py), and the result is the same either way.
SMALL_BLOCK = 1 << 18
# On the CPU the selectors walk a block of rows in parts of about this many entries (16 MB of float32), so that
# the copies and masks made from a part are served again by the allocator and the cache rather than mapped afresh
# for a whole block: at 2048 x 4096 the selectors took 0.6-0.8 of their time on the whole block (measured with
# parts of 2^18 to 2^30 entries; this size was the fastest). A GPU takes the block at once. Same result either way.
PART_SIZE = 1 << 22
# distinct_draws uses its table of first draws only for ranges of at most this many values per draw: over a wider
# range, sorting the few draws costs less than the table (measured: 0.12 against 0.23 ms for 962 draws over 31,744
# values, 1.1 against 2.2 ms for 15,920 over 262,144 the other way). The same values either way.
TABLE_SPREAD = 24
SAMPLE = 1 << 16  # entries of a block that smallest_admitted's bound is estimated from


class Rows(NamedTuple):
    """Which anchors (a triplet's anchor, a pair's first member) of a batch of N items a selector mines:
    the rows ``start .. stop - 1``, and ``concatenate``, how to pool a choice over the whole batch with the
    other processes (``concatenate(tensor (k, ...))`` -> every process's tensors in rank order; None when
    this process mines every row). ``Rows(0, N)`` is one process; ``distributed.rows_to_mine`` gives a rank's.
    ``n_anchors``: the items that may be anchors are the first ``n_anchors`` (the batch; None: all N); those
    after them (a ``cross_batch_memory.CrossBatchMemory``'s) are candidates only, never anchors."""

    start: int
    stop: int
    concatenate: object = None
    n_anchors: object = None


def row_parts(block):
    """The row slices in which to walk ``block (A, N)`` (a tensor, for its shape and device): parts of about
    ``PART_SIZE`` entries on the CPU (at least one row each), the whole block on other devices;
    ``[slice(0, 0)]`` for a block without rows."""
    n_rows, width = block.shape
    step = max(1, PART_SIZE // max(width, 1)) if block.device.type == "cpu" else max(n_rows, 1)
    return [slice(first, first + step) for first in range(0, n_rows, step)] or [slice(0, 0)]


def checked_rows(distances, labels, rows, needs_distances=True):
    """``(labels (N,), rows, anchors (A,))`` for a selector's ``select_*`` call, checked: ``rows`` None
    means all; ``distances`` must be the ``(A, N)`` block of those rows (or None when not needed)."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers of shape (N,), got {labels.dtype} of shape {tuple(labels.shape)}")
    rows = Rows(0, len(labels)) if rows is None else Rows(*rows)
    n_anchors = len(labels) if rows.n_anchors is None else rows.n_anchors
    if not 0 <= rows.start <= rows.stop <= n_anchors <= len(labels):
        raise ValueError(f"rows must lie in 0 .. {n_anchors} (the batch's anchors) of {len(labels)} items, got "
                         f"{rows.start} .. {rows.stop}")
    expected = (rows.stop - rows.start, len(labels))
    if distances is not None or needs_distances:
        if not isinstance(distances, torch.Tensor) or tuple(distances.shape) != expected:
            got = tuple(distances.shape) if isinstance(distances, torch.Tensor) else type(distances).__name__
            raise ValueError(f"distances must be the rows' block of shape {expected} (distances.row_distances), "
                             f"got {got}")
        labels = labels.to(distances.device)
    return labels, rows, torch.arange(rows.start, rows.stop, device=labels.device)


class Classes(NamedTuple):
    """The classes of a batch of N labels: ``members (C, M)`` each class's items ascending (padded with
    N), ``class_of (N,)`` and ``place (N,)`` each item's class and rank in it, ``sizes (C,)``."""

    members: torch.Tensor
    class_of: torch.Tensor
    place: torch.Tensor
    sizes: torch.Tensor


def classes_of(labels):
    """``Classes`` of ``labels (N,)``: one stable sort, O(N log N), no (N, N) mask."""
    order = torch.sort(labels, stable=True).indices
    _, class_sorted, sizes = torch.unique_consecutive(labels[order], return_inverse=True, return_counts=True)
    place_sorted = torch.arange(len(labels), device=labels.device) - (sizes.cumsum(0) - sizes)[class_sorted]
    width = int(sizes.max()) if len(labels) else 0
    members = torch.full((len(sizes), width), len(labels), dtype=torch.long, device=labels.device)
    members[class_sorted, place_sorted] = order
    class_of, place = torch.empty_like(order), torch.empty_like(order)
    class_of[order], place[order] = class_sorted, place_sorted
    return Classes(members, class_of, place, sizes)


def positives_of(classes, anchors):
    """Each anchor's positives (same class, not itself), ascending: ``(columns (A, M - 1), valid (A, M - 1))``,
    padding columns 0 and not valid."""
    width = max(classes.members.shape[1] - 1, 0)
    slot = torch.arange(width, device=anchors.device)
    slot = slot + (slot >= classes.place[anchors, None])  # skip the anchor itself
    columns = classes.members[classes.class_of[anchors, None], slot]
    valid = slot < classes.sizes[classes.class_of[anchors], None]
    return torch.where(valid, columns, 0), valid


def pair_counts(classes, n_items, n_anchors=None):
    """``(positive, negative)`` numbers of unordered pairs ``(i, j)``, ``i < j``, of a batch of ``n_items``
    whose first member ``i`` is one of the first ``n_anchors`` (None: any), as ints."""
    n_anchors = n_items if n_anchors is None else n_anchors
    if not n_items:
        return 0, 0
    positive = classes.sizes * (classes.sizes - 1) // 2
    if n_anchors < n_items:  # less the pairs within the candidates-only items
        later = ((classes.members >= n_anchors) & (classes.members < n_items)).sum(dim=1)
        positive = positive - later * (later - 1) // 2
    positive = int(positive.sum())
    return positive, n_anchors * (n_items - 1) - n_anchors * (n_anchors - 1) // 2 - positive


def is_negative_pair(labels, first, second):
    """Whether ``(first, second)`` (long tensors of indices into ``labels (N,)``, broadcast together) are
    negative pairs as the pair selectors count them: ``second > first`` and their labels differ."""
    return (second > first) & (labels[first] != labels[second])


def negatives_after(classes, items):
    """How many negative pairs ``(i, j)``, ``j > i``, each of ``items (A,)`` heads: ``(A,)`` long."""
    n_items = len(classes.class_of)
    return (n_items - 1 - items) - (classes.sizes[classes.class_of[items]] - 1 - classes.place[items])


def positive_pairs_of(classes, anchors):
    """The positive pairs ``(i, j)``, ``i < j``, whose first member is one of ``anchors``: ``(P, 2)`` in
    ``(i, j)`` order."""
    columns, valid = positives_of(classes, anchors)
    keep = flat_nonzero(valid & (columns > anchors[:, None]))
    return torch.stack([anchors[keep // max(columns.shape[1], 1)], columns.flatten()[keep]], dim=1)



def pair_positions(labels, rows):
    """The pairs ``(i, j)``, ``i < j``, whose first member is in ``rows`` (a ``Rows`` of a batch ``labels
    (N,)``), as flat positions ``(i - rows.start) * N + j`` of the rows' block, ascending (so in ``(i, j)``
    order): ``(positive (P,), negative (Q,))``. Two masks of the ``(A, N)`` block: for a small one (at most
    ``SMALL_BLOCK`` entries), where they cost less than counting the pairs by class (``positive_pairs_of``,
    ``negative_pairs_of_rank``, which give the same pairs), or when every pair is wanted anyway.
    ``pairs_at`` turns positions into pairs. Negative as ``is_negative_pair`` says, from one comparison of the
    labels that both masks share."""
    after = torch.arange(len(labels), device=labels.device) > torch.arange(rows.start, rows.stop,
                                                                         device=labels.device)[:, None]
    same = labels[rows.start:rows.stop, None] == labels
    return flat_nonzero(after & same), flat_nonzero(after & ~same)


def batch_pair_counts(labels, rows, positive, negative):
    """``(n_positive, n_negative, negatives_before)`` for ``pair_positions``' lists ``positive``, ``negative`` of
    ``rows`` (a ``Rows`` of a batch ``labels (N,)``): the batch's numbers of positive and negative pairs whose
    first member is one of its anchors, and of the negative pairs whose first member comes before ``rows``, as
    ints. The lists' lengths when ``rows`` are every anchor; else counted by class (``pair_counts``)."""
    n_anchors = len(labels) if rows.n_anchors is None else rows.n_anchors
    if rows.start == 0 and rows.stop == n_anchors:
        return len(positive), len(negative), 0
    classes = classes_of(labels)
    return (*pair_counts(classes, len(labels), n_anchors), pair_counts(classes, len(labels), rows.start)[1])


def pairs_at(positions, rows, n_items):
    """The pairs ``(P, 2)`` at ``positions (P,)`` of the block of ``rows`` of a batch of ``n_items`` (flat, as
    ``pair_positions`` gives them)."""
    return torch.stack([positions // n_items + rows.start, positions % n_items], dim=1)


def padded_columns(mask):
    """For each row of ``mask (A, N)`` bool, the columns where it is True, ascending, left-aligned
    and padded: returns ``(columns (A, K), valid (A, K))`` with ``K`` the largest row count and
    padding columns set to 0 (and ``valid`` False). Built by one cumsum and one scatter, no sort."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if len(mask) else 0
    slot = torch.where(mask, mask.cumsum(dim=1) - 1, width)  # column ``width`` collects the rest
    columns = torch.zeros((len(mask), width + 1), dtype=torch.long, device=mask.device)
    column_ids = torch.arange(mask.shape[1], device=mask.device).expand_as(slot)
    columns.scatter_(1, slot, torch.where(mask, column_ids, 0))
    valid = torch.arange(width, device=mask.device) < counts.unsqueeze(1)
    return columns[:, :width], valid


def distinct_draws(key, k, n, device):
    """``k`` distinct ints of ``0 .. n - 1``, a uniformly random subset, ascending: the first distinct
    values of the stream ``floor(n * uniform(key, t))``, t = 0, 1, ... (the complement's when k > n / 2)."""
    if 2 * k > n:
        excluded = distinct_draws(key, n - k, n, device)
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[excluded] = False
        return flat_nonzero(keep)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    draws = k + 2 * k * k // max(n, 1) + 16  # about twice the expected repeats: one round, usually
    while True:
        order = torch.arange(draws, device=device)
        values = (uniform(key, order) * n).long().clamp_max(max(n - 1, 0))
        chosen = _earliest_distinct(values, order, k, n)
        if chosen is not None:
            return chosen
        draws *= 2


def _earliest_distinct(values, order, k, n):
    """The ``k`` values of ``values (T,)`` (ints in ``0 .. n - 1``, ``order`` = ``arange(T)``) met first,
    ascending; None when there are fewer than ``k`` distinct ones. Both ways give the same values."""
    if n <= min(SMALL_BLOCK, TABLE_SPREAD * len(values)):  # a table of first draws costs less than sorting them
        first = torch.full((n,), len(values), dtype=torch.long, device=values.device)
        first.scatter_reduce_(0, values, order, "amin")
        met = (first.index_select(0, values) == order).cumsum(0)  # distinct values met up to each draw
        if int(met[-1]) < k:
            return None
        return flat_nonzero(first <= (met < k).sum())  # first draws up to the k-th new value
    distinct, inverse = torch.unique(values, return_inverse=True)
    if len(distinct) < k:
        return None
    first = torch.full_like(distinct, len(values)).scatter_reduce_(0, inverse, order, "amin")
    return distinct[first <= first.kthvalue(k).values]  # the k earliest first draws: one selection, no sort


def negative_pairs_of_rank(classes, ranks, rows):
    """The negative pairs ``(i, j)``, ``i < j``, at positions ``ranks (k,)`` (ascending) of the batch's
    negative pairs in ``(i, j)`` order, keeping those whose first member is in ``rows``: ``(k', 2)``.
    Row ``i`` holds ``(N - 1 - i) - (its class members after i)`` of them, so a rank names its row by a
    search over the rows' counts and its place ``r`` in that row; ``j`` is then the r-th column after ``i``
    outside ``i``'s class. No (N, N) work: when classes x items is small, ``j`` is read from a table of each
    class's non-members (``i - place(i)`` of them lie at or before ``i``); otherwise it is counted with one
    comparison per class member. Same pairs either way."""
    per_row = negatives_after(classes, torch.arange(len(classes.class_of), device=ranks.device))
    ends = per_row.cumsum(0)
    first = torch.searchsorted(ends, ranks, right=True)
    mine = slice(*torch.searchsorted(first, first.new_tensor([rows.start, rows.stop])).tolist())  # first ascends
    first, ranks = first[mine], ranks[mine]
    offset = ranks - (ends - per_row).index_select(0, first)
    n_classes, n_items = classes.members.shape[0], len(classes.class_of)
    if n_classes * n_items <= SMALL_BLOCK:
        class_ids = torch.arange(n_classes, device=ranks.device)
        outside, _ = padded_columns(classes.class_of != class_ids[:, None])  # (C, W): each class's non-members
        at = classes.class_of.index_select(0, first) * outside.shape[1] + first - classes.place.index_select(0, first)
        return torch.stack([first, outside.flatten().index_select(0, at + offset)], dim=1)
    base = first + 1 + offset
    slot = torch.arange(classes.members.shape[1], device=ranks.device)
    members = classes.members[classes.class_of[first]]
    # the class members after i, each minus the members before it: those <= base come before the answer
    after = (slot > classes.place[first, None]) & (slot < classes.sizes[classes.class_of[first], None])
    shifted = members - (slot - classes.place[first, None] - 1)
    second = base + (after & (shifted <= base[:, None])).sum(1)
    return torch.stack([first, second], dim=1)


def smallest_admitted(values, k, admitted, n_admitted):
    """Flat positions, ascending, of the ``k`` smallest entries of ``values (A, N)`` among the admitted
    ones (ties at the k-th value going to the lower positions): ``admitted(rows, columns) -> bool`` says
    which entries count, for long tensors of block rows and columns (broadcast together), ``n_admitted`` how
    many do; ``k`` at most the admitted entries that are not NaN.

    No selection over all ``A * N`` entries and no mask of the block: a bound from an evenly spread sample of
    about ``SAMPLE`` entries (its admitted values' quantile ``k / n_admitted``, with room to spare), then one
    pass, part by part (``row_parts``), listing the entries ``<= bound``; the admitted ones among them go into
    one small selection. The bound is raised when fewer than ``k`` are listed, so the result does not depend
    on the sample."""
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    width = values.shape[1]

    def admitted_at(positions):
        return positions[admitted(positions // width, positions % width)]

    sample = values.flatten()[admitted_at(torch.arange(0, values.numel(), max(1, values.numel() // SAMPLE),
                                                       device=values.device))]
    sample = sample[~sample.isnan()]
    expected = k * len(sample) / max(n_admitted, 1)  # admitted sample entries below the k-th smallest
    room = 1.25
    while True:
        rank = math.ceil(room * expected + 4 * math.sqrt(expected) + 16)
        bound = kth_smallest(sample, rank) if rank <= len(sample) else math.inf
        positions = torch.cat([flat_at_most(values[part], bound) + part.start * width for part in row_parts(values)])
        positions = admitted_at(positions)
        if len(positions) >= k or bound == math.inf:
            return positions[smallest_stable(values.flatten()[positions], k)]
        room *= 4


def flat_at_most(values, bound):
    """The flat positions (ascending, long) of the entries of ``values`` that are ``<= bound`` (a number or 0-d
    tensor; NaN never is); on the CPU numpy's comparison, four times faster than torch's there (measured)."""
    if numpy_can_view(values):
        return torch.from_numpy(np.flatnonzero(values.detach().numpy() <= float(bound))).long()
    return flat_nonzero(values <= bound)


def flat_between(values, low, high):
    """The flat positions (ascending, long) of the entries of ``values (A, N)`` strictly between ``low`` and
    ``high`` (``(A, 1)`` each, a row's bounds; ``low`` None: no lower bound; NaN never is); on the CPU numpy's
    comparisons, several times faster than torch's there (measured)."""
    if numpy_can_view(values):
        inside = values.detach().numpy() < high.detach().numpy()
        if low is not None:
            inside &= values.detach().numpy() > low.detach().numpy()
        return torch.from_numpy(np.flatnonzero(inside)).long()
    inside = values < high
    return flat_nonzero(inside if low is None else inside & (values > low))


def flat_nonzero(mask):
    """The flat positions (ascending, long) where ``mask`` is True; on the CPU numpy's, several times faster
    than ``torch.nonzero`` there (0.3 against 2.4 ms for a million entries, measured)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy())).long()
    return mask.flatten().nonzero().squeeze(1)


def distances_to_negatives(distances, anchors, positive_columns, positive_valid):
    """A copy of the anchors' distances ``distances (A, N)`` with inf at every column of the anchor's own
    class (itself and its positives ``positive_columns (A, K)`` where ``positive_valid``, as ``positives_of``
    gives them), so that what is finite are its distances to its negatives. A class has few members, so this
    costs a copy and a scatter, not a comparison of the labels over the block."""
    same_class = torch.where(positive_valid, positive_columns, anchors[:, None])
    return distances.clone().scatter_(1, torch.cat([anchors[:, None], same_class], dim=1), math.inf)


def smallest_stable(values, k):
    """Positions, ascending, of the ``k`` smallest of ``values (N,)`` (all if ``k >= N``), ties
    at the k-th value going to the lower positions. O(N): one selection, no sort."""
    if k >= len(values):
        return torch.arange(len(values), device=values.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if numpy_can_view(values):  # numpy's comparisons and listings cost a fraction of torch's on the CPU
        array, kth = values.detach().numpy(), kth_smallest(values, k).numpy()
        chosen = array < kth
        chosen[np.flatnonzero(array == kth)[:k - np.count_nonzero(chosen)]] = True  # the first ties fill the rest
        return torch.from_numpy(np.flatnonzero(chosen)).long()
    kth = kth_smallest(values, k)
    below = values < kth
    at_kth = values == kth
    n_below = int(below.sum())
    if n_below + int(at_kth.sum()) > k:  # more ties at the k-th value than places: the first ones
        at_kth &= at_kth.cumsum(0) <= k - n_below
    return flat_nonzero(below | at_kth)


def kth_smallest(values, k):
    """The k-th smallest of ``values (N,)``, 1-based, as a 0-d tensor. On the CPU numpy's
    introselect on the same memory is ten times faster than ``torch.kthvalue`` (measured)."""
    if not numpy_can_view(values):
        return values.kthvalue(k).values
    return torch.as_tensor(np.partition(values.detach().numpy(), k - 1)[k - 1])


def numpy_can_view(tensor):
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# A uniformly random admissible entry per (row, slot)


def random_integers(rows, counters, generator):
    """Random ints in [0, 2^32), int64, of the broadcast shape of ``rows`` and ``counters`` (long tensors):
    an ``AnchorStreams``'s numbers ``counters`` of the anchors at ``rows`` (the same whoever draws them), or
    fresh ones from a ``torch.Generator`` (on its own device) or torch's global RNG."""
    if isinstance(generator, AnchorStreams):
        return generator.integers_at(rows, counters)
    shape = torch.broadcast_shapes(rows.shape, counters.shape)
    if generator is None:
        return torch.randint(KEY_RANGE, shape, device=rows.device)
    return torch.randint(KEY_RANGE, shape, generator=generator, device=generator.device).to(rows.device)


# Proposals per (anchor, slot) before the exact fallback of the random selection functions, made in stages
# of PROPOSALS_PER_STAGE for the slots still without a negative, in batches of REJECTION_FROM items or more
# (below, the exact draw alone costs less: measured, benchmarks/bench_selectors.py).
REJECTION_ROUNDS = 32
PROPOSALS_PER_STAGE = 4
REJECTION_FROM = 1024


def uniform_admissible(negative_distances, low_threshold, high_threshold, right, generator):
    """A uniformly random negative ``n`` with ``low_threshold < D[a, n] < high_threshold`` (with
    ``right=True``; ``right=False`` admits all below ``high_threshold``), per (anchor, slot), from
    ``negative_distances (A, N)`` (inf where not a negative) and thresholds ``(A, K)``. Returns columns
    ``(A, K)`` long, -1 where there is none. ``generator``: ``random_integers``'.

    Batches of ``REJECTION_FROM`` items or more sort no whole row: each slot proposes up to
    ``REJECTION_ROUNDS`` uniformly random columns of its row and keeps the first admissible one (uniform
    among the admissible, as any rejection sampler); the slots left without one (few admissible, or none:
    for ``right=False`` the row's closest negative says which have none, before any proposal) are drawn
    exactly by ``_uniform_in_sorted`` on their rows alone. Slot ``k``'s numbers are its anchor's numbers
    ``round * K + k``, the exact draw's ``REJECTION_ROUNDS * K + k``: an anchor's choice depends on its row
    and its stream only."""
    # NaN distances (from a NaN embedding) must admit nothing, as ``NaN < t`` and ``d < NaN`` are
    # false; a NaN threshold (padding slot, NaN embedding) becomes an empty interval.
    high_threshold = high_threshold.masked_fill(high_threshold.isnan(), -math.inf)
    low_threshold = low_threshold.masked_fill(low_threshold.isnan(), math.inf)
    width, slots = negative_distances.shape[1], high_threshold.shape[1]
    chosen = torch.full(high_threshold.shape, -1, dtype=torch.long, device=high_threshold.device)
    if width < REJECTION_FROM:
        draws = random_integers(torch.arange(len(chosen), device=chosen.device)[:, None],
                                 REJECTION_ROUNDS * slots + torch.arange(slots, device=chosen.device), generator)
        return _uniform_in_sorted(negative_distances, low_threshold, high_threshold, right, draws)
    possible = high_threshold > (negative_distances.amin(1, keepdim=True) if not right else low_threshold)
    pending = possible.flatten().nonzero().squeeze(1)  # flat (anchor, slot) positions still to draw
    for first_round in range(0, REJECTION_ROUNDS, PROPOSALS_PER_STAGE):
        row, slot = pending // slots, pending % slots
        counters = torch.arange(first_round, first_round + PROPOSALS_PER_STAGE, device=row.device) * slots
        columns = (random_integers(row[:, None], counters + slot[:, None], generator) * width) >> 32
        values = negative_distances.view(-1)[row[:, None] * width + columns]  # flat: the fast index
        admissible = values < high_threshold.flatten()[pending, None]
        if right:
            admissible &= values > low_threshold.flatten()[pending, None]
        found = admissible.any(1)
        hit, missed = flat_nonzero(found), flat_nonzero(~found)
        first = admissible[hit].int().argmax(1, keepdim=True)  # the first admissible proposal
        chosen.view(-1)[pending[hit]] = columns[hit].gather(1, first).squeeze(1)
        pending = pending[missed]
        if len(pending) == 0:
            return chosen
    left = torch.zeros_like(possible).flatten().index_fill_(0, pending, True).view_as(possible)
    rows = left.any(1).nonzero().squeeze(1)
    if 2 * len(rows) > len(left):  # most rows: all of them, those without a slot left listing nothing
        rows = torch.arange(len(left), device=left.device)
    else:
        negative_distances = negative_distances[rows]
    draws = random_integers(rows[:, None], REJECTION_ROUNDS * slots + torch.arange(slots, device=left.device),
                             generator)
    still = left[rows]  # the other slots' intervals emptied
    exact = _uniform_in_sorted(negative_distances, low_threshold[rows].masked_fill(~still, math.inf),
                               high_threshold[rows].masked_fill(~still, -math.inf), right, draws)
    chosen[rows] = torch.where(still, exact, chosen[rows])
    return chosen


def _uniform_in_sorted(negative_distances, low_threshold, high_threshold, right, draws):
    """``uniform_admissible``'s exact draw, with ``draws (A, K)`` random ints in [0, 2^32): each row's
    negatives sorted, and each slot takes a uniformly random one of those inside its own interval (two
    binary searches). Batches of ``REJECTION_FROM`` items or more in float32 sort only the entries inside
    each row's widest interval, all rows in one sort (``_inside_sorted``); others sort whole rows."""
    if negative_distances.shape[1] < REJECTION_FROM or negative_distances.dtype != torch.float32:
        values, columns = _sort_rows(negative_distances)
        # NaN distances (a NaN embedding) sort last but would mislead the binary searches: inf keeps the rows
        # sorted and admits nothing
        values = values.masked_fill_(values.isnan(), math.inf)
        high = torch.searchsorted(values, high_threshold)
        low = torch.searchsorted(values, low_threshold, right=True) if right else torch.zeros_like(high)
    else:
        keys, columns = _inside_sorted(negative_distances, low_threshold, high_threshold, right)
        row = torch.arange(len(negative_distances), device=keys.device)[:, None]
        high = torch.searchsorted(keys, _row_keys(row, high_threshold))
        low = torch.searchsorted(keys, _row_keys(row, low_threshold), right=True) if right else \
            torch.searchsorted(keys, _row_keys(row, torch.zeros_like(high_threshold)))
        columns = columns[None]
    rank = (low + ((high - low).clamp_min(0) * draws >> 32)).clamp_max(max(columns.shape[1] - 1, 0))
    return torch.where(high > low, columns.expand(len(rank), -1).gather(1, rank) if columns.shape[1] else rank, -1)


def _row_keys(row, values):
    """int64 keys ordering ``(row, value)`` pairs lexicographically, for float32 values >= 0 (their bits,
    as integers, are in the order of the values; below 0 counts as 0, beyond the largest float as it)."""
    bits = values.float().clamp(0, torch.finfo(torch.float32).max).add_(0.0).view(torch.int32).long()
    return (row << 32) | bits


def _inside_sorted(negative_distances, low_threshold, high_threshold, right):
    """``(keys (Q,), columns (Q,))``: the entries of ``negative_distances (A, N)`` (float32) inside their
    row's widest interval (below its largest ``high_threshold``, with ``right`` above its smallest
    ``low_threshold``), as ``_row_keys`` sorted ascending (by row, then value), and their columns."""
    position = flat_between(negative_distances, low_threshold.amin(1, keepdim=True) if right else None,
                            high_threshold.amax(1, keepdim=True))  # (Q,), never a (Q, 2) tensor
    row, column = position // negative_distances.shape[1], position % negative_distances.shape[1]
    # stable: equal distances keep their column order, whatever else is listed (the same on any process)
    keys, order = _sorted_stably(_row_keys(row, negative_distances.flatten()[position]))
    return keys, column[order]


def _sorted_stably(keys):
    """``(sorted keys, order)`` of int64 ``keys (Q,)``, equal keys in their order. On the CPU numpy's SIMD
    sort, about four times faster than torch's stable sort there (6 million keys, measured), and a stable sort
    only when two keys are equal."""
    if keys.device.type != "cpu":
        return keys.sort(stable=True)
    order = np.argsort(keys.numpy())
    ordered = keys.numpy()[order]
    if (ordered[1:] == ordered[:-1]).any():  # ties, in whatever order the fast sort left them
        order = np.argsort(keys.numpy(), kind="stable")
        ordered = keys.numpy()[order]
    return torch.from_numpy(ordered), torch.from_numpy(order).long()


def _sort_rows(matrix):
    """``(values, columns)`` of each row of ``matrix (A, W)`` sorted ascending. On the CPU through numpy's
    view of the same memory (no copy): its SIMD sort is several times faster than torch's CPU sort on rows
    this short (0.3 ms against 2 ms at 250 x 250, measured)."""
    if not numpy_can_view(matrix):
        return matrix.sort(dim=1, stable=True)
    columns = torch.from_numpy(matrix.numpy().argsort(axis=1))  # each row's order a function of the row alone
    return matrix.gather(1, columns), columns
