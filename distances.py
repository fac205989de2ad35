"""Squared Euclidean distances: every distance the library computes between embeddings comes from here.

``pdist`` (the ``(B, B)`` matrix of a batch, exactly symmetric with a zero diagonal), ``row_distances``
(some rows of a batch against all of it, the selectors' and online losses' distances, written into a
``BlockBuffer``'s memory when given one), ``squared_distances`` (queries against a gallery, also batched
over episodes), ``paired_squared_distances`` (row ``i`` against row ``i``) and ``indexed_squared_distances``
(the pairs ``(first[p], second[p])`` of one batch, with a backward that writes the rows' gradients
directly), all in float32 or float64 whatever the autocast around them (``float32_distances``). None takes
a square root: ``utils.as_distance`` turns them into plain distances with finite gradients at zero.
"""

import functools

import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_embeddings(embeddings):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor of shape (B, D), got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (B, D), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating point tensor, got dtype {embeddings.dtype}; "
                        "call .float() on them first")


def float32_distances(function):
    """Decorator of the distance functions: they compute in float32 (float64 stays float64) whatever
    the caller's mixed precision. Half-precision tensor arguments are promoted to float32 (a
    differentiable cast: gradients reach the half tensors) and autocast is off inside, so the
    distances, and the selectors' threshold tests on them, are those of float32 embeddings; under
    bfloat16 autocast a matmul-based distance would otherwise keep 8 bits of mantissa and mine
    the wrong pairs."""

    @functools.wraps(function)
    def in_float32(*args, **kwargs):
        args = tuple(arg.float() if isinstance(arg, torch.Tensor) and arg.dtype in _HALF_DTYPES else arg
                     for arg in args)
        device_type = next((arg.device.type for arg in args if isinstance(arg, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device_type):
            return function(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return function(*args, **kwargs)

    return in_float32


@float32_distances
def squared_distances(queries, gallery, gallery_squared_norms=None, out=None):
    """Squared Euclidean distances between every query and every gallery item.

    Takes ``queries (Q, D)`` and ``gallery (G, D)``, or batches of them ``(E, Q, D)`` and
    ``(E, G, D)`` (e.g. few-shot episodes), and optionally the gallery's squared norms ``(G,)`` /
    ``(E, G)`` for a caller that reuses them over chunks of queries, and optionally ``out``, a ``(Q, G)``
    tensor to write the result into (no autograd). Returns ``(Q, G)`` (or
    ``(E, Q, G)``) with ``out[i, j] = |q_i - g_j|^2``, clamped at 0 (the expansion below can round
    under zero). Differentiable, with no square root. Computed as ``|q|^2 + |g|^2 - 2 q.g`` by one
    fused matmul and in-place updates: the ``(Q, G)`` matrix is the memory traffic that dominates,
    so it is written as few times as possible.
    """
    if gallery_squared_norms is None:
        gallery_squared_norms = gallery.pow(2).sum(-1)
    if out is not None:  # written into ``out`` (Q, G), without autograd
        distances = torch.addmm(gallery_squared_norms, queries, gallery.T, alpha=-2.0, out=out)
    elif queries.dim() == 2:
        distances = torch.addmm(gallery_squared_norms, queries, gallery.T, alpha=-2.0)
    else:
        distances = torch.baddbmm(gallery_squared_norms.unsqueeze(-2), queries, gallery.transpose(-2, -1),
                                  alpha=-2.0)
    # In place: neither addmm's nor clamp's backward needs the values they overwrite.
    return distances.add_(queries.pow(2).sum(-1, keepdim=True)).clamp_min_(0)


@float32_distances
def paired_squared_distances(x, y):
    """Squared Euclidean distances of matching rows: ``x (B, D)`` and ``y (B, D)`` -> ``(B,)``,
    ``|x_i - y_i|^2``. Summed from the differences, so equal rows give an exact 0 (no cancellation)
    with a zero gradient; no square root."""
    return (x - y).pow(2).sum(-1)


@float32_distances
def pdist(vectors):
    """Squared Euclidean distance matrix.

    Takes ``vectors (B, D)`` and returns ``(B, B)`` with ``out[i, j] = |v_i - v_j|^2``: exactly
    symmetric, clamped at 0 and with an exactly zero diagonal, whatever matmul kernel or thread
    count computed it. Differentiable (no square root, so no NaN gradient at zero distance). Rows
    are centred first: distances do not change, and the ``|x|^2 + |y|^2 - 2 x.y`` expansion of
    :func:`squared_distances` loses far less precision for embeddings far from the origin.
    """
    _check_embeddings(vectors)
    centred = vectors - vectors.mean(dim=0, keepdim=True)
    distances = squared_distances(centred, centred)
    # A matmul may round (i, j) and (j, i) differently (seen on a 5 x 128 batch), and the selectors'
    # exact threshold tests need one value per pair: a + b == b + a holds bitwise.
    distances = (distances + distances.T).mul_(0.5)
    distances.fill_diagonal_(0.0)
    return distances


# Rows per matmul call of ``row_distances``: tiles start at multiples of it, so a row's distances come
# from the same call whichever rows a process asks for.
ROW_TILE = 64


@float32_distances
def row_distances(vectors, start=0, stop=None, out=None):
    """Squared Euclidean distances of the rows ``start:stop`` of a batch to the whole batch: the
    selectors' and online losses' distances, on one process (all rows) or on each of several (its own).

    Takes ``vectors (N, D)`` and returns ``(stop - start, N)`` (``stop`` defaults to N) with ``out[i, j]
    = |v_{start + i} - v_j|^2``, clamped at 0 and exactly 0 at ``j = start + i``. The rows are centred by
    the batch's mean (as in ``pdist``); each entry ``|x|^2 + |y|^2 - 2 x.y`` is one matmul's dot product of
    ``[x, 1, |x|^2]`` and ``[-2 y, |y|^2, 1]``, with no passes over the block to add the norms (1.5 times
    faster than ``squared_distances``' addmm at 4096 x 4096, 64-D, on this project's CPU;
    benchmarks/bench_distances.py). Tiles of ``ROW_TILE`` rows start at multiples of ``ROW_TILE``: a given row
    comes from the same matmul call, so it has the same values however the batch is split between
    processes. Not symmetrised (``(i, j)`` and ``(j, i)`` may differ in the last bit; the selectors read a
    pair or triplet from its first member's row only). Memory: the ``(stop - start, N)`` result and one tile.
    Differentiable (then the tiles are concatenated). ``out``: a contiguous ``(stop - start, N)`` tensor of
    the vectors' dtype and device to write the result into (not differentiable), e.g. a ``BlockBuffer``'s.
    """
    _check_embeddings(vectors)
    stop = len(vectors) if stop is None else stop
    if not 0 <= start <= stop <= len(vectors):
        raise ValueError(f"need 0 <= start <= stop <= {len(vectors)} (the batch's rows), got {start}, {stop}")
    centred = vectors - vectors.mean(dim=0, keepdim=True)
    norms, ones = centred.pow(2).sum(-1, keepdim=True), centred.new_ones((len(centred), 1))
    rows_with_norms = torch.cat([centred, ones, norms], dim=1)  # (N, D + 2): [x, 1, |x|^2]
    columns_with_norms = torch.cat([-2 * centred, norms, ones], dim=1).T  # (D + 2, N): [-2 y, |y|^2, 1]
    differentiable = torch.is_grad_enabled() and vectors.requires_grad
    if out is not None:
        _check_out(out, (stop - start, len(vectors)), vectors, differentiable)
    if differentiable:
        distances = None  # the tiles are concatenated, so that autograd sees each
    elif out is None:
        distances = vectors.new_empty((stop - start, len(vectors)))
    else:
        distances = out
    tiles = []
    for first in range(start - start % ROW_TILE, stop, ROW_TILE):
        tile_rows = rows_with_norms[first:first + ROW_TILE]
        inside = slice(max(start - first, 0), min(stop - first, ROW_TILE))
        if distances is not None and inside.start == 0 and inside.stop >= len(tile_rows):  # all its rows: in place
            rows_of_tile = distances[first - start:first - start + len(tile_rows)]
            torch.mm(tile_rows, columns_with_norms, out=rows_of_tile).clamp_min_(0)
            continue
        tile = torch.mm(tile_rows, columns_with_norms).clamp_min_(0)[inside]
        if distances is None:
            tiles.append(tile)
        else:
            distances[first + inside.start - start:first + inside.stop - start] = tile
    if distances is None:
        distances = torch.cat(tiles) if tiles else vectors.new_zeros((0, len(vectors)))
    rows = torch.arange(stop - start, device=vectors.device)
    return distances.index_put_((rows, rows + start), distances.new_zeros(()))


def _check_out(out, shape, vectors, differentiable):
    if differentiable:
        raise ValueError("out= takes distances without autograd: pass vectors.detach(), or no out")
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.dtype == vectors.dtype
            and out.device == vectors.device and out.is_contiguous()):
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a contiguous {vectors.dtype} tensor of shape {shape} on {vectors.device}, "
                         f"got {got}")


class BlockBuffer:
    """The memory of a ``row_distances`` block kept from one call to the next, for a caller that computes a
    block of the same shape every step (the online losses). On the CPU a fresh block of tens of megabytes is
    mapped anew by the allocator and costs a page fault per 4 KB page at its first write (14 ms of 16 for
    writing a 2048 x 4096 float32 block here, measured), a kept one none. ``buffer(shape, like)`` returns a
    ``shape`` tensor of ``like``'s dtype on the CPU, the last one when it fits, else a new one it keeps;
    None on other devices, whose caching allocators reuse freed memory (and whose peak memory a kept block
    would raise). Only one block at a time: use it for one block per call."""

    def __init__(self):
        self._block = None

    def __call__(self, shape, like):
        if like.device.type != "cpu":
            return None
        block = self._block
        if block is None or tuple(block.shape) != tuple(shape) or block.dtype != like.dtype:
            block = self._block = like.new_empty(shape)
        return block


# Entries of the (pairs, D) differences indexed_squared_distances forms at a time on the CPU (1 MB of float32): a
# part stays in the cache from gather to sum, and no (P, D) tensor is allocated (fresh memory there costs a page
# fault per 4 KB at its first write). Other devices take all pairs at once: parts would multiply kernel launches.
PAIR_PART_ENTRIES = 1 << 18


def _pair_parts(vectors, n_pairs):
    step = max(1, PAIR_PART_ENTRIES // max(1, vectors.shape[1])) if vectors.device.type == "cpu" else max(1, n_pairs)
    return [slice(start, start + step) for start in range(0, n_pairs, step)]


class _IndexedSquaredDistances(torch.autograd.Function):
    """``|v[first] - v[second]|^2`` per pair, part by part (``_pair_parts``). The backward forms the pairs'
    differences again (nothing of size ``(P, D)`` is kept between the passes) and adds each pair's
    ``2 g (v_first - v_second)`` into row ``first`` and subtracts it from row ``second`` of one ``(N, D)``
    gradient; under ``create_graph`` in differentiable operations, so a second derivative is right too."""

    @staticmethod
    def forward(ctx, vectors, first, second):
        ctx.save_for_backward(vectors, first, second)
        distances = vectors.new_empty(len(first))
        for part in _pair_parts(vectors, len(first)):
            difference = vectors.index_select(0, first[part]).sub_(vectors.index_select(0, second[part]))
            torch.sum(difference.pow_(2), -1, out=distances[part])
        return distances

    @staticmethod
    def backward(ctx, grad):
        vectors, first, second = ctx.saved_tensors
        rows = torch.zeros_like(vectors)
        # index_put_ with accumulate: deterministic on every device (index_add_ is not on CUDA)
        if torch.is_grad_enabled():  # create_graph: differentiable operations, for a second derivative
            contribution = (vectors.index_select(0, first) - vectors.index_select(0, second)) * (2 * grad)[:, None]
            rows.index_put_((first,), contribution, accumulate=True)
            return rows.index_put_((second,), -contribution, accumulate=True), None, None
        twice = 2 * grad
        for part in _pair_parts(vectors, len(first)):
            contribution = vectors.index_select(0, first[part]).sub_(vectors.index_select(0, second[part]))
            rows.index_put_((first[part],), contribution.mul_(twice[part, None]), accumulate=True)
            rows.index_put_((second[part],), contribution.neg_(), accumulate=True)
        return rows, None, None


@float32_distances
def indexed_squared_distances(vectors, first, second):
    """Squared Euclidean distances of pairs of rows of one batch: ``vectors (N, D)``, ``first (P,)`` and
    ``second (P,)`` integer row indices -> ``(P,)``, ``|v_first[p] - v_second[p]|^2``.

    The values of ``paired_squared_distances(vectors[first], vectors[second])``, bitwise, without the two
    ``(P, D)`` copies that indexing keeps for autograd: on the CPU the pairs are taken in parts of
    ``PAIR_PART_ENTRIES`` entries, nothing of size ``(P, D)`` is formed, and the backward adds the pairs'
    gradients into one ``(N, D)`` gradient of ``vectors`` (benchmarks/bench_distances.py). Equal rows give an
    exact 0 with a zero gradient; differentiable twice. An index outside ``0..N-1``
    is index_select's IndexError (no check of the values here: it would cost a device-to-host copy)."""
    _check_embeddings(vectors)
    indices = {"first": first, "second": second}
    for name, index in indices.items():
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() or index.is_complex():
            raise TypeError(f"{name} must be a (P,) integer tensor of row indices")
    if len(first) != len(second):
        raise ValueError(f"first and second must have the same length, got {len(first)} and {len(second)}")
    return _IndexedSquaredDistances.apply(vectors, first.to(vectors.device, torch.long),
                                          second.to(vectors.device, torch.long))
