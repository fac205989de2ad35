"""The pair and triplet selectors for online mining inside a batch, and the helpers every module shares.

Every selector looks at a batch of embeddings ``(B, D)`` with their labels ``(B,)`` and returns
index tensors into that batch: pairs ``(P, 2)`` or triplets ``(T, 3)`` of ``(anchor, positive,
negative)``, as ``torch.long`` on the embeddings' device (``get_pairs`` / ``get_triplets``). All the work
happens on the rows' squared distances ``row_distances(embeddings)`` with boolean masks; nothing loops
over pairs or triplets in Python, and the cubic cases are built in chunks so memory stays bounded.

Mining by rows. Each library selector also mines only some anchors' rows of a batch of N (``select_pairs``
/ ``select_triplets`` with a ``mining_rows.Rows``, from those rows' ``(A, N)`` distances): what a process
of several does with its share of a gathered global batch (``losses``), and ``get_*`` is the call for all
rows. What is guaranteed: the selections of processes mining disjoint rows that cover the batch,
concatenated in row order, are exactly one process's ``get_*`` (tests/test_sharded_mining.py). The
deterministic selectors decide each anchor from its own row, and the hard-negative pair selector pools
every process's closest candidates (``Rows.concatenate``) before its choice over the whole batch; the
random ones draw per anchor from a stream keyed by (one key per call from their generator, the anchor's
index in the batch, the positive's slot) (``random_streams``), and the balanced pair selector by rank
among the batch's negative pairs, so the same anchors get the same draws however the rows are split,
provided every process's generator is seeded alike. Distances are equal bitwise across splits because
``row_distances`` computes each row in the same matmul call whatever rows are asked for. For the same
reasons a process walks its own block in parts of rows on the CPU (``mining_rows.row_parts``), with the
same selection as in one piece.

Conventions shared by all selectors:

* a positive pair ``(a, p)`` has ``labels[a] == labels[p]`` and ``a != p``; a negative ``n`` of
  anchor ``a`` has ``labels[n] != labels[a]``;
* pair selectors return unordered pairs ``(i, j)`` with ``i < j``;
* triplet selectors use every *ordered* anchor-positive pair ``(a, p)``;
* with ``D`` the squared distances, a triplet has a non-zero loss when ``D[a, n] < D[a, p] + margin``
  (the loss is ``relu((D[a, p] + margin) - D[a, n])``, computed so that this test is exact), and the
  hardest negative of ``a`` is its closest one;
* nothing qualifying gives an empty ``(0, 2)`` / ``(0, 3)`` tensor, never a stand-in triplet.

The squared Euclidean distances are ``distances.py``'s (``pdist``, ``row_distances``, ... are imported here
too, so ``utils.pdist`` and the other old paths still work); ``as_distance`` turns them into the distance a
selector or loss compares.

``check_int``, ``check_flag`` and ``check_choice`` are the argument checks every module of the library uses, and
``atomic_write`` the way every module writes a file (checkpoints, model files, galleries, results); ``groups_of_classes`` maps
per-item group ids to per-class ones for the group-by-group samplers (datasets, metrics).
"""

import contextlib
import functools
import math
import numbers
import os
import secrets

import torch

# The distances are imported here too, so that utils.pdist and the other old paths still work.
from distances import (ROW_TILE, BlockBuffer, _check_embeddings, float32_distances, paired_squared_distances, pdist,
                       row_distances, squared_distances)
import mining_rows
from mining_rows import (batch_pair_counts, checked_rows, classes_of, distinct_draws, is_negative_pair,
                         negative_pairs_of_rank, negatives_after, padded_columns, pair_counts,
                         pair_positions, pairs_at, positive_pairs_of, positives_of, distances_to_negatives, row_parts,
                         smallest_admitted, smallest_stable, uniform_admissible)
from random_streams import AnchorStreams, draw_key

# Largest number of (anchor, positive, negative) slots the all-triplets selector fills per chunk;
# it bounds the work tensors beside the output (a few hundred MB at B = 1024).
CHUNK_ELEMENTS = 1 << 22


def check_int(value, name, minimum=0):
    """``value`` as an int (Python or numpy integer, not bool) of at least ``minimum`` (None: any); raises
    TypeError or ValueError naming the argument ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(value, name, minimum=None, strict=False, finite=False):
    """``value`` as a float (a real number, not bool) of at least ``minimum`` (above it with ``strict``; None:
    any finite or infinite value, not NaN), and not infinite with ``finite``; raises TypeError or ValueError
    naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if minimum is None:
        if math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value}")
    elif not (value > minimum if strict else value >= minimum):  # also rejects NaN
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_flag(value, name):
    """``value`` if it is True or False; raises TypeError naming the argument ``name`` otherwise (1,
    "yes" and None are refused, not read as truth values)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value, choices, name):
    """``value`` if it is one of ``choices``; raises ValueError naming the argument ``name`` and
    listing the choices otherwise."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write ``path`` all at once or not at all: yields a file opened with ``mode`` ("wb" or "w") on a new
    temporary name in the same folder (folders created), which replaces ``path`` (``os.replace``, after an
    fsync) when the block ends without an error, and is removed when it raises. An interrupted run never
    leaves a truncated file behind, and the file gets the usual permissions."""
    check_choice(mode, ("wb", "w"), "mode")
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, mode.replace("w", "x")) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise



# Names that moved to another module, kept for one release: ``old module -> {name: new module}``. The old
# module's ``__getattr__`` is ``moved_attribute``'s, so ``from datasets import read_image`` still works and
# warns (DeprecationWarning) with the new place; the next release removes the entry. The one table of them.
MOVED_NAMES = {
    "experiments": {**dict.fromkeys((
        "OMNIGLOT_ROOT", "OMNIGLOT_BACKGROUND", "OMNIGLOT_EVALUATION", "OMNIGLOT_WEIGHTS", "OMNIGLOT_METHODS",
        "OMNIGLOT_RECIPE", "CONTRASTIVE_MARGIN", "OMNIGLOT_EPISODES", "OMNIGLOT_TEST_SHIFT", "OMNIGLOT_QUICK",
        "load_omniglot", "train_omniglot", "omniglot_pairs", "drawer_halves", "evaluate_omniglot", "omniglot_table",
        "save_omniglot_model", "load_omniglot_model", "run_omniglot", "run_one_shot_runs", "omniglot_main",
        "OmniglotAlphabets", "OneShotRuns", "one_shot_run_errors"), "omniglot"),
        "run_experiment": "autoencoders",
        **dict.fromkeys(("write_json", "write_text", "merge_results", "markdown_table", "save_figure", "plot_embeddings"),
                        "results"),
        **dict.fromkeys(("RUN_SETTINGS", "RUN_ROW"), "runs"),
        **dict.fromkeys(("HERMANS", "FEW_PER_CLASS", "RECIPES", "CLASSIC_RECIPES", "LEARNING_RATE", "DEFAULT_LEARNING_RATE",
                         "BATCH_SIZE", "WEIGHT_DECAY", "STREAMING_WORKERS", "build_method", "build_embedding_net"),
                        "methods"),
        **dict.fromkeys(("parse_classes", "HELD_OUT_EPISODES"), "held_out"),
        "class_subset": "datasets", "few_shot_accuracy": "episodes",
        **dict.fromkeys(("COLUMNS", "RESULT_KEY"), "study_table")},
    "datasets": {
        **dict.fromkeys(("OMNIGLOT_IMAGE_SIZE", "OmniglotAlphabets", "OneShotRun", "OneShotRuns"), "omniglot_data"),
        **dict.fromkeys((
            "KnownDataset", "KNOWN_DATASETS", "IDX_DATASETS", "NORMALIZATION", "CLASS_NAMES", "TORCHVISION_CLASS_NAMES",
            "SYSTEM_DATA_DIRS", "read_idx", "idx_file_names", "find_idx_files", "IDXImageDataset",
            "canonical_dataset_name", "dataset_search_paths", "load_dataset", "unnormalized", "read_cifar10",
            "load_cifar10", "IMAGENET_SIZE", "load_imagenet", "load_image_splits"), "known_datasets"),
        **dict.fromkeys((
            "IMAGE_EXTENSIONS", "DEFAULT_MAX_MEMORY_BYTES", "ImageList", "read_image", "folder_entries", "list_images",
            "load_image_folder", "ImageFileDataset", "channel_statistics", "normalized", "export_image_folder",
            "load_folder_splits"), "image_folders"),
        "share_bounds": "distributed"},
    "metrics": {"one_shot_run_errors": "omniglot_data",
                **dict.fromkeys(("sample_episodes", "episode_accuracies", "few_shot_accuracy", "n_way_k_shot_accuracy"),
                                "episodes")},
    "networks": dict.fromkeys(("MODEL_FORMAT", "MODEL_VERSION", "MODEL_KEYS", "model_fingerprint", "save_model",
                               "load_model", "embed_images"), "model_file"),
    "trainer": {**dict.fromkeys((
        "PROCESS_GROUP_TIMEOUT", "TIMEOUT_VARIABLE", "process_group_timeout", "rank_and_world_size", "is_main_process",
        "barrier", "broadcast_from_main", "close_distributed"), "distributed"),
        **dict.fromkeys(("CHECKPOINT_NAME", "CHECKPOINT_KEYS", "GUARD_KEYS", "GENERATOR_SEARCH_DEPTH",
                         "GENERATOR_SEARCH_MAX_ITEMS", "find_generators"), "checkpoints")},
}


def moved_attribute(module, name):
    """``module.<name>`` for a name that moved (``MOVED_NAMES``): the object from its new module, with a
    DeprecationWarning naming it; AttributeError as usual for any other name. Each old module's
    ``__getattr__`` (PEP 562) calls this."""
    new_module = MOVED_NAMES.get(module, {}).get(name)
    if new_module is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"{module}.{name} moved to {new_module}.{name}; import it from there (the old name goes in the "
                  "next release)", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new_module), name)


def groups_of_classes(class_of, n_classes, groups):
    """The group of each class, for samplers that draw classes group by group (e.g. Omniglot's
    characters alphabet by alphabet).

    Takes class_of (N,) the class position (0 .. n_classes - 1) of each item and groups (N,) any
    integer group id per item (tensor, numpy array or list). Returns (n_classes,) long group
    positions 0, 1, ... on class_of's device. Raises ValueError unless groups holds one integer per
    item and every class lies inside one group.
    """
    groups = torch.as_tensor(groups).to(class_of.device)
    if groups.shape != class_of.shape or groups.is_floating_point() or groups.is_complex():
        raise ValueError(f"groups must hold one integer group id per item ({len(class_of)}), got "
                         f"{groups.dtype} of shape {tuple(groups.shape)}")
    _, groups = torch.unique(groups, return_inverse=True)
    group_of_class = torch.zeros(n_classes, dtype=torch.long, device=class_of.device).scatter_(0, class_of, groups)
    if (group_of_class[class_of] != groups).any():
        raise ValueError("every class must lie inside one group (e.g. a character inside one alphabet)")
    return group_of_class


# The distances a loss and its selector can compare: squared Euclidean (the classic form) or plain.
DISTANCES = ("squared", "euclidean")


def as_distance(squared, distance):
    """Squared Euclidean distances (any shape) as the chosen ``distance``: themselves (``"squared"``)
    or their square roots (``"euclidean"``). The roots are exact, and where a squared distance is 0
    its root is 0 with a zero gradient (not sqrt's infinite one), so coinciding embeddings give finite
    gradients. Monotonic, so it never changes which of two items is closer."""
    if check_choice(distance, DISTANCES, "distance") == "squared":
        return squared
    tiny = torch.finfo(squared.dtype).tiny
    return torch.where(squared > 0, squared.clamp_min(tiny).sqrt(), torch.zeros_like(squared))


# --------------------------------------------------------------------------------------------
# argument checks


def _as_labels(labels, embeddings):
    """Checks ``labels`` against ``embeddings (B, D)`` and returns them as a ``(B,)`` tensor on the
    embeddings' device."""
    _check_embeddings(embeddings)
    labels = torch.as_tensor(labels).to(embeddings.device)
    if labels.numel() == 0:
        labels = labels.long()  # torch.as_tensor([]) is float
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) != len(embeddings):
        raise ValueError(f"got {len(labels)} labels for {len(embeddings)} embeddings; "
                         "pass one label per embedding")
    return labels


def _check_margin(margin):
    return check_real(margin, "margin", 0)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _empty_triplets(device):
    return torch.empty((0, 3), dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------
# pair selectors


class PairSelector:
    """Base class. ``get_pairs(embeddings (B, D), labels (B,))`` returns
    ``(positive_pairs (P, 2), negative_pairs (N, 2))`` of unordered index pairs ``i < j``.

    The library's selectors also have ``select_pairs(distances (A, N), labels (N,), rows)``: the pairs
    whose first member is in ``rows`` (a ``Rows``), from those rows' distances (``row_distances``; None
    where not needed). The union over processes of their ``select_pairs`` is one process's ``get_pairs``;
    the online losses call it with each rank's rows."""

    def get_pairs(self, embeddings, labels):
        labels = _as_labels(labels, embeddings)
        distances = row_distances(embeddings.detach()) if getattr(self, "needs_distances", False) else None
        return self.select_pairs(distances, labels)

    def select_pairs(self, distances, labels, rows=None):
        raise NotImplementedError


class AllPositivePairSelector(PairSelector):
    """Every positive pair; every negative pair, or with ``balance=True`` (default) a uniformly
    random subset of them as large as the positives (fewer if there are not that many), in ``(i, j)``
    order.

    ``generator``: optional ``torch.Generator`` for the balancing draw: one key per call (random_streams),
    from which the subset is drawn by rank among all negative pairs of the batch (``(i, j)`` order), the same
    on every process (given generators seeded alike); each keeps the pairs of its rows, found from their
    ranks without listing the negative pairs (``mining_rows.negative_pairs_of_rank``), or for a small block of
    rows (at most ``mining_rows.SMALL_BLOCK`` entries) taken from the list of its rows' pairs, which costs
    less there.
    """

    needs_distances = False

    def __init__(self, balance=True, generator=None):
        self.balance = bool(balance)
        self.generator = _check_generator(generator)

    def select_pairs(self, distances, labels, rows=None):
        labels, rows, anchors = checked_rows(distances, labels, rows, needs_distances=False)
        # every pair wanted, or a small block: its pairs from two masks
        if not self.balance or len(anchors) * len(labels) <= mining_rows.SMALL_BLOCK:
            return self._listed_pairs(labels, rows)
        classes = classes_of(labels)
        n_positive, n_negative = pair_counts(classes, len(labels), rows.n_anchors)
        chosen = distinct_draws(draw_key(self.generator), min(n_positive, n_negative), n_negative, labels.device)
        return positive_pairs_of(classes, anchors), negative_pairs_of_rank(classes, chosen, rows)

    def _listed_pairs(self, labels, rows):
        """``select_pairs`` from the list of the rows' pairs (``mining_rows.pair_positions``): every negative
        pair, or with ``balance`` those at the balancing draw's ranks among the batch's negative pairs, the
        same as found from the ranks."""
        positive, negative = pair_positions(labels, rows)
        if self.balance:
            n_positive, n_negative, before = batch_pair_counts(labels, rows, positive, negative)
            chosen = distinct_draws(draw_key(self.generator), min(n_positive, n_negative), n_negative,
                                    labels.device)
            if before or len(negative) < n_negative:
                chosen = chosen[(chosen >= before) & (chosen < before + len(negative))] - before
            negative = negative[chosen]
        return pairs_at(positive, rows, len(labels)), pairs_at(negative, rows, len(labels))


class HardNegativePairSelector(PairSelector):
    """Every positive pair, and as many negative pairs as positives (fewer if there are not that
    many): the closest ones, ties broken by ``(i, j)``; both in lexicographic ``(i, j)`` order.

    Each process keeps the closest of its own rows (``smallest_admitted``: a bound from a sample, then one
    pass listing the entries below it; for a small block, one selection among its rows' negative pairs,
    ``mining_rows.pair_positions``), the processes pool those candidates (``Rows.concatenate``) and keep
    the closest of all, so that the union over processes is exactly one process's choice. ``cpu`` is accepted for
    compatibility with the classic code and ignored: selection runs on the embeddings' device.
    """

    needs_distances = True

    def __init__(self, cpu=False):
        self.cpu = cpu

    def select_pairs(self, distances, labels, rows=None):
        labels, rows, anchors = checked_rows(distances, labels, rows)
        n_items, distances = len(labels), distances.detach()
        if len(anchors) * n_items <= mining_rows.SMALL_BLOCK:  # a small block: its pairs from two masks
            positive, negative = pair_positions(labels, rows)
            n_positive, n_negative, _ = batch_pair_counts(labels, rows, positive, negative)
            k = min(n_positive, n_negative)
            closest = negative[smallest_stable(distances.flatten()[negative], k)]
            positive_pairs = pairs_at(positive, rows, n_items)
        else:
            classes = classes_of(labels)
            n_positive, n_negative = pair_counts(classes, n_items, rows.n_anchors)
            k = min(n_positive, n_negative)

            def negative_pair(block_rows, columns):  # which entries of the block are negative pairs (i, j), j > i
                return is_negative_pair(labels, block_rows + rows.start, columns)

            own_negatives = int(negatives_after(classes, anchors).sum())
            closest = smallest_admitted(distances, min(k, own_negatives), negative_pair, own_negatives)
            positive_pairs = positive_pairs_of(classes, anchors)
        if rows.concatenate is not None:  # every process's candidates, values and positions in one message
            offset = rows.start * n_items  # positions in the batch's (i, j) order, so that ties go the same way
            pooled = rows.concatenate(torch.stack([distances.flatten()[closest].double(),
                                                   (closest + offset).double()], dim=1))
            closest = pooled[smallest_stable(pooled[:, 0], k), 1].long() - offset
            closest = closest[(closest >= 0) & (closest < distances.numel())]
        return positive_pairs, pairs_at(closest, rows, n_items)


# --------------------------------------------------------------------------------------------
# triplet selectors


class TripletSelector:
    """Base class. ``get_triplets(embeddings (B, D), labels (B,))`` returns ``(T, 3)`` long
    triplets ``(anchor, positive, negative)``.

    The library's selectors also have ``select_triplets(distances (A, N), labels (N,), rows)``: the
    triplets whose anchor is in ``rows`` (a ``Rows``), from those rows' distances (``row_distances``, in
    the selector's ``distance``; None where not needed). The union over processes of their
    ``select_triplets`` is one process's ``get_triplets``, the random selectors included (their draws are
    per anchor: ``random_streams.AnchorStreams``); the online losses call it with each rank's rows."""

    needs_distances = True

    def get_triplets(self, embeddings, labels):
        labels = _as_labels(labels, embeddings)
        if len(labels) == 0:
            return _empty_triplets(labels.device)
        distances = None
        if self.needs_distances:
            distances = as_distance(row_distances(embeddings.detach()), getattr(self, "distance", "squared"))
        return self.select_triplets(distances, labels)

    def select_triplets(self, distances, labels, rows=None):
        raise NotImplementedError


class AllTripletSelector(TripletSelector):
    """Every triplet of the batch: all ordered positive pairs ``(a, p)`` times all negatives of
    ``a``, in lexicographic order. The output has ``sum_a positives(a) * negatives(a)`` rows (about
    ``B^3`` for few classes); it is written chunk by chunk into one preallocated tensor, so the peak
    memory stays close to the output's own size."""

    needs_distances = False

    def select_triplets(self, distances, labels, rows=None):
        labels, rows, anchors = checked_rows(distances, labels, rows, needs_distances=False)
        positive_columns, positive_valid = positives_of(classes_of(labels), anchors)
        negative_columns, negative_valid = padded_columns(labels[anchors, None] != labels)
        n_positive, n_negative = positive_columns.shape[1], negative_columns.shape[1]
        per_anchor = positive_valid.sum(1) * negative_valid.sum(1)
        triplets = torch.empty((int(per_anchor.sum()), 3), dtype=torch.long, device=labels.device)
        anchors_per_chunk = max(1, CHUNK_ELEMENTS // max(1, n_positive * n_negative))
        written = 0
        for start in range(0, len(anchors), anchors_per_chunk):
            chunk = slice(start, start + anchors_per_chunk)
            valid = positive_valid[chunk, :, None] & negative_valid[chunk, None, :]
            anchor = anchors[chunk, None, None]
            positive = positive_columns[chunk, :, None]
            negative = negative_columns[chunk, None, :]
            n_valid = int(per_anchor[chunk].sum())
            if n_valid == valid.numel():  # every slot is a triplet (balanced batches): write in place
                out = triplets[written:written + n_valid].view(*valid.shape, 3)
                out[..., 0], out[..., 1], out[..., 2] = anchor, positive, negative
            else:
                shape = valid.shape
                triplets[written:written + n_valid] = torch.stack(
                    [anchor.expand(shape), positive.expand(shape), negative.expand(shape)], dim=-1)[valid]
            written += n_valid
        return triplets


# Negative selection functions. Each sees, for every anchor, its distances to the whole batch with
# non-negatives set to ``inf``, and its distances to each of its positives (NaN in padding slots); it
# returns, for every (anchor, positive) slot, the column (batch index) of the chosen negative or -1 to
# skip the pair. The random ones choose uniformly among the admissible negatives with numbers from the
# anchor's own stream (mining_rows.uniform_admissible).


def hardest_negative(negative_distances, positive_distances, margin, generator=None):
    """The closest negative (the lowest index on ties), if it is closer than ``D[a, p] + margin``.

    Takes ``negative_distances (A, B)`` (``inf`` where not a negative), ``positive_distances
    (A, K)``, the margin and an unused generator; returns columns ``(A, K)`` long, -1 for none.
    """
    closest_distance, closest = negative_distances.min(dim=1, keepdim=True)
    has_hard = closest_distance < positive_distances + margin
    return torch.where(has_hard, closest, -1)


def random_hard_negative(negative_distances, positive_distances, margin, generator=None):
    """A uniformly random negative among those closer than ``D[a, p] + margin`` (a non-zero loss).

    Takes ``negative_distances (A, B)`` (``inf`` where not a negative), ``positive_distances
    (A, K)``, the margin and the random numbers: ``random_streams.AnchorStreams`` (what the selectors
    pass), a ``torch.Generator`` or None (torch's global RNG); returns columns ``(A, K)`` long or -1.
    """
    return uniform_admissible(negative_distances, positive_distances, positive_distances + margin,
                               right=False, generator=generator)


random_hard_negative.draws_random = True  # its selector draws one key per call (FunctionNegativeTripletSelector)


def semihard_negative(negative_distances, positive_distances, margin, generator=None):
    """A uniformly random semi-hard negative: farther than the positive but within the margin,
    ``D[a, p] < D[a, n] < D[a, p] + margin``.

    Takes ``negative_distances (A, B)`` (``inf`` where not a negative), ``positive_distances
    (A, K)``, the margin and the random numbers (as ``random_hard_negative``); returns columns
    ``(A, K)`` long or -1.
    """
    return uniform_admissible(negative_distances, positive_distances, positive_distances + margin,
                               right=True, generator=generator)


semihard_negative.draws_random = True


class _DistanceTripletSelector(TripletSelector):
    """What the distance-based triplet selectors share: the checks and the anchors' positives and
    negatives. Subclasses implement ``_select(distances (A, N), anchors (A,), positive_columns (A, K),
    positive_valid (A, K), labels (N,), streams) -> triplets (T, 3)`` (``streams``: the anchors'
    ``random_streams.AnchorStreams`` under ``_call_key``'s key). ``select_triplets`` calls it on parts of
    the rows (``mining_rows.row_parts``), which gives the same triplets as one call: each anchor is
    decided from its own row and its own stream.
    ``distance`` (``"squared"``, the classic default, or ``"euclidean"``) is the distance the
    hardness tests compare, which must be the loss's (``as_distance``)."""

    distance = "squared"

    def select_triplets(self, distances, labels, rows=None):
        labels, rows, anchors = checked_rows(distances, labels, rows)
        streams = AnchorStreams(self._call_key(), anchors)
        positive_columns, positive_valid = positives_of(classes_of(labels), anchors)
        if positive_columns.numel() == 0:  # no anchor, or no class with two items
            return _empty_triplets(labels.device)
        distances = distances.detach()
        return torch.cat([self._select(distances[part], anchors[part], positive_columns[part], positive_valid[part],
                                       labels, streams.part(part))
                          for part in row_parts(distances)])

    def _call_key(self):
        """The key of this call's random numbers (``random_streams``), or None for a deterministic selector."""
        return None

    def _select(self, distances, anchors, positive_columns, positive_valid, labels, streams):
        raise NotImplementedError


class FunctionNegativeTripletSelector(_DistanceTripletSelector):
    """For every ordered positive pair ``(a, p)``, at most one negative, chosen by
    ``negative_selection_fn``.

    ``negative_selection_fn(negative_distances (A, B), positive_distances (A, K), margin,
    generator) -> columns (A, K)`` sees each anchor's distances (squared, or plain with
    ``distance="euclidean"``) to the batch (``inf`` where the item is not a negative of that anchor) and
    to each of its positives (ascending batch index, padded with NaN), and returns for each (anchor,
    positive) the batch index of the chosen negative, or -1 to skip the pair. :func:`hardest_negative`,
    :func:`random_hard_negative` and :func:`semihard_negative` are the library's choices. (The classic
    code called a numpy function once per pair; this is its vectorised counterpart, called once per part
    of the anchors' rows, ``mining_rows.row_parts``: the whole block on a GPU.) A returned column
    that is not a negative of its anchor raises ``ValueError``. ``generator`` reaches the function as a
    ``random_streams.AnchorStreams``: per-anchor random numbers keyed by one draw from the generator (at
    the call's first use), so a process mining some of the anchors draws what one process mining all of
    them draws for those anchors. ``cpu`` is accepted for compatibility with the classic code and
    ignored. Returns triplets ``(T, 3)`` in ``(a, p)`` order.
    """

    def __init__(self, margin, negative_selection_fn, cpu=False, generator=None, distance="squared"):
        self.margin = _check_margin(margin)
        self.distance = check_choice(distance, DISTANCES, "distance")
        if not callable(negative_selection_fn):
            raise TypeError("negative_selection_fn must be callable as fn(negative_distances, "
                            "positive_distances, margin, generator) -> columns")
        self.negative_selection_fn = negative_selection_fn
        self.cpu = cpu
        self.generator = _check_generator(generator)

    def _call_key(self):
        # One key per call on every process, drawn even by a process without anchors, so that generators
        # seeded alike stay alike; a deterministic function without a generator draws nothing (lazily).
        if self.generator is not None or getattr(self.negative_selection_fn, "draws_random", False):
            return draw_key(self.generator)
        return functools.partial(draw_key, None)

    def _select(self, distances, anchors, positive_columns, positive_valid, labels, streams):
        positive_distances = distances.gather(1, positive_columns).masked_fill(~positive_valid, float("nan"))
        to_negatives = distances_to_negatives(distances, anchors, positive_columns, positive_valid)
        chosen = self.negative_selection_fn(to_negatives, positive_distances, self.margin, streams)
        if chosen.shape != positive_columns.shape:
            raise ValueError(f"negative_selection_fn returned shape {tuple(chosen.shape)}, "
                             f"expected {tuple(positive_columns.shape)} (anchors x positives)")
        keep = positive_valid & (chosen >= 0)
        kept_anchors = anchors[:, None].expand_as(keep)[keep]
        negatives = chosen[keep]
        inside = negatives < len(labels)
        if not (inside & (labels[kept_anchors] != labels[negatives.where(inside, 0)])).all():
            raise ValueError("negative_selection_fn chose an item that is not a negative of its "
                             "anchor; return a column whose label differs from the anchor's, or -1")
        return torch.stack([kept_anchors, positive_columns[keep], negatives], dim=1)


def HardestNegativeTripletSelector(margin, cpu=False, distance="squared"):
    """For every ordered positive pair, the negative with the largest positive loss value (the
    hardest); pairs whose hardest negative is already beyond the margin are skipped. ``distance``:
    the loss's (``"squared"`` or ``"euclidean"``), in which the margin is measured."""
    return FunctionNegativeTripletSelector(margin, hardest_negative, cpu=cpu, distance=distance)


def RandomNegativeTripletSelector(margin, cpu=False, generator=None, distance="squared"):
    """For every ordered positive pair, a random negative among those with a positive loss value
    ("random hard"); pairs without one are skipped. ``distance``: as for the hardest selector."""
    return FunctionNegativeTripletSelector(margin, random_hard_negative, cpu=cpu, generator=generator,
                                           distance=distance)


def SemihardNegativeTripletSelector(margin, cpu=False, generator=None, distance="squared"):
    """For every ordered positive pair, a random semi-hard negative, farther than the positive but
    within the margin (``D[a, p] < D[a, n] < D[a, p] + margin``); pairs without one are skipped.
    ``distance``: as for the hardest selector."""
    return FunctionNegativeTripletSelector(margin, semihard_negative, cpu=cpu, generator=generator,
                                           distance=distance)


class BatchHardTripletSelector(_DistanceTripletSelector):
    """Batch-hard mining (Hermans, Beyer and Leibe, 2017): for every anchor that has a positive and
    a negative in the batch, its farthest positive and its closest negative (the first on ties).
    Returns one triplet per such anchor, in anchor order, whatever its loss. ``distance`` only
    labels which distance the loss compares (both orders of closeness are the same)."""

    def __init__(self, distance="squared"):
        self.distance = check_choice(distance, DISTANCES, "distance")

    def _select(self, distances, anchors, positive_columns, positive_valid, labels, streams):
        farthest = distances.gather(1, positive_columns).masked_fill(~positive_valid, float("-inf")).argmax(dim=1)
        hardest_positive = positive_columns.gather(1, farthest[:, None]).squeeze(1)
        hardest_negative_ = distances_to_negatives(distances, anchors, positive_columns, positive_valid).argmin(dim=1)
        has_negative = positive_valid.sum(dim=1) + 1 < len(labels)  # its class is not the whole batch
        keep = (positive_valid.any(dim=1) & has_negative).nonzero().squeeze(1)
        return torch.stack([anchors[keep], hardest_positive[keep], hardest_negative_[keep]], dim=1)


# --------------------------------------------------------------------------------------------
# multi-similarity pair mining


def multi_similarity_pairs(similarities, labels, rows=None, epsilon=0.1):
    """The informative pairs of each anchor by Wang et al.'s multi-similarity mining (CVPR 2019).

    Takes ``similarities (A, N)``, the anchors' rows (``rows``, a ``Rows``; None: all) of a batch's
    similarity matrix (larger is closer, e.g. cosine), ``labels (N,)`` and ``epsilon >= 0`` (None: keep
    every pair). Returns ``(positives, negatives)``, ``(A, N)`` bool masks of the kept pairs ``(anchor, j)``,
    ``j`` not the anchor: a negative is kept when ``S + epsilon`` exceeds the anchor's least similar
    positive, a positive when ``S - epsilon`` is below its most similar negative; an anchor without
    positives keeps no negative, one without negatives no positive. Each anchor is decided from its own row,
    so processes mining their own rows keep what one process keeps."""
    labels, rows, anchors = checked_rows(similarities, labels, rows)
    if epsilon is not None:
        epsilon = check_real(epsilon, "epsilon", 0)
    similarities = similarities.detach()
    same = labels[anchors, None] == labels
    positives = same.clone()
    positives[torch.arange(len(anchors), device=labels.device), anchors] = False
    negatives = ~same
    if epsilon is None:
        return positives, negatives
    least_positive = torch.where(positives, similarities, math.inf).amin(dim=1, keepdim=True)
    most_negative = torch.where(negatives, similarities, -math.inf).amax(dim=1, keepdim=True)
    return (positives & (similarities - epsilon < most_negative),
            negatives & (similarities + epsilon > least_positive))
