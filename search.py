"""Use a trained model on your own images: index a folder, then query, verify, classify and evaluate.

This module owns what is done with a model file (``model_file.save_model``) and its gallery on images
outside the training pipeline, and the command line for all of it (the gallery file itself is
``gallery.py``'s):

- ``index_folder``: embeds every image of a folder (class sub-folders, a two-level group/class folder, a
  CSV of ``path,label`` lines, or a flat folder of unlabelled images) into a gallery file (.npz);
- ``query``: the k nearest gallery images of each query image;
- ``verify``: distance, similarity ``1 / (1 + distance)`` and the same/different verdict of two images;
- ``classify``: the k-nearest-neighbour label of each query image (majority vote);
- ``evaluate``: the embedding-quality metrics of a labelled gallery (and the verification accuracy at the
  model file's threshold);
- ``serve``: a local web page on the model and gallery (``search_page.py``), searching with
  ``gallery_search`` (the gallery's k-NN search, as ``query`` searches);
- ``calibrate``: the distance threshold at which the nearest gallery label reaches a precision, on a labelled
  folder whose classes the gallery may lack, stored in the gallery file (``open_set.py`` owns the decision);
  ``query`` and ``classify`` with ``precision`` then answer ``unknown`` beyond it;
- ``nearest_neighbours``: exact k-NN search in chunks of the gallery (memory bounded whatever its size),
  or through faiss's exact ``IndexFlatL2``;
- ``load_gallery``: reads and checks a gallery file (both owned by ``gallery.py``, importable from here);
- ``evaluate_recall``: recall@k of the gallery's approximate index against exact search.

query, classify, serve and ``evaluate --recall`` search through the gallery's approximate index
(``approximate_index.py``: faiss HNSW or IVF, built by ``index --ann``) when it has one, exactly otherwise or
with ``--exact``.

Command line (the subcommand names are fixed: the documentation uses them)::

    python search.py index MODEL FOLDER --out gallery.npz [--batch-size 256] [--skip-bad-images] [--no-progress]
        [--ann hnsw|ivf [--hnsw-m 32] [--ef-construction 40] [--ivf-lists N]]
    python search.py query MODEL GALLERY IMAGE... [--k 5] [--grid out.png] [--json] [--faiss] [--precision P]
        [--exact | --ef-search N | --nprobe N]
    python search.py verify MODEL IMAGE1 IMAGE2
    python search.py classify MODEL GALLERY IMAGE... [--k 5] [--json] [--faiss] [--precision P]
        [--exact | --ef-search N | --nprobe N]
    python search.py evaluate MODEL GALLERY [--recall [K] [--queries 1000] [--seed 0] [--ef-search N | --nprobe N]]
    python search.py calibrate MODEL GALLERY FOLDER --precision 0.95 [--precision 0.99] [--plot curve.png]
    python search.py serve MODEL GALLERY [--port 8000] [--host 127.0.0.1] [--k 5] [--faiss]
        [--exact | --ef-search N | --nprobe N]

The gallery file (``gallery.py``: ``index_folder``, ``load_gallery``) is written by ``index``.
A gallery only answers queries of the model that indexed it: any other model is refused.

Distances are Euclidean. ``k`` larger than the gallery (or, for classify, than its labelled part) is an
error, not silently clamped, so a result always holds exactly k neighbours.
"""

import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

import cli
import open_set
from approximate_index import (ANN_KINDS, build_index, check_search_options, has_index, index_path, load_index,
                               recall_at_k, search_index)
from distances import squared_distances
from gallery import (GALLERY_FORMAT, GALLERY_KEYS, UNLABELLED, check_image_files, embed_files,  # noqa: F401
                     index_folder, label_name, list_folder, load_gallery, load_model_file, model_and_gallery,
                     neighbour_items)
from image_folders import read_image
from metrics import (knn_accuracy, nmi_score, retrieval_metrics, smallest_k, verification_accuracy,
                     verification_roc_auc)
from networks import SiameseNetwork
from search_page import DEFAULT_HOST, DEFAULT_PORT, SearchPage, make_server, serve
from utils import check_int
DEFAULT_CHUNK_SIZE = 65536
# Queries are taken in blocks so that one block of distances holds at most this many entries (64 MB of
# float32), whatever the number of queries.
MAX_BLOCK_ENTRIES = 1 << 24
EVALUATE_K = 5
RECALL_K = 10
RECALL_QUERIES = 1000  # gallery items sampled as queries by evaluate_recall, unless fewer
GRID_TITLE_WIDTH = 20  # characters of a cell's title
GRID_THUMBNAIL = 96  # side in pixels of each picture in the --grid figure


# ---------------------------------------------------------------- exact search

def _as_matrix(values, name):
    """``values`` (tensor or numpy array) as a 2-D floating CPU tensor, without copying when possible."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
        shape = tuple(values.shape) if hasattr(values, "shape") else type(values).__name__
        raise TypeError(f"{name} must be a 2-D floating tensor or array, got {shape}")
    return values


def nearest_neighbours(queries, gallery, k, chunk_size=DEFAULT_CHUNK_SIZE, use_faiss=False):
    """The k nearest gallery vectors of every query, by Euclidean distance, searched exactly.

    Takes queries (Q, D) and gallery (G, D) (floating torch tensors or numpy arrays), k (1 <= k <= G) and
    chunk_size (gallery rows compared at once). Returns (distances (Q, k), indices (Q, k) int64) as torch
    tensors, each row in ascending distance, equal distances by the lower gallery index.

    The exact path goes through the gallery chunk_size rows at a time (``distances.squared_distances`` per
    chunk) and keeps a running top k per query: each chunk's own k best are merged with the best so far by
    a stable sort (the earlier best all have lower indices, so a stable sort keeps ties by index). Queries
    are taken in blocks so that a block of distances stays under MAX_BLOCK_ENTRIES: memory is
    O(min(Q, block) x chunk_size + Q x k) whatever G, so a million-vector gallery works. Distances are
    compared squared, as computed in the inputs' dtype, and square-rooted at the end. Values must be finite.

    ``use_faiss=True`` searches faiss's exact ``IndexFlatL2`` instead (built on each call from a float32 copy
    of the gallery): the same neighbours up to float rounding, which may reorder exact ties. Raises
    ImportError when faiss is not installed.
    """
    queries = _as_matrix(queries, "queries")
    gallery = _as_matrix(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries and gallery must have the same width D, got {queries.shape[1]} and "
                         f"{gallery.shape[1]}")
    n_gallery = gallery.shape[0]
    if n_gallery == 0:
        raise ValueError("gallery is empty; index at least one image")
    k = check_int(k, "k", 1)
    if k > n_gallery:
        raise ValueError(f"k={k} is larger than the gallery ({n_gallery} items); pass k <= {n_gallery}")
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if use_faiss:
        return _faiss_search(queries, gallery, k)
    dtype = torch.promote_types(queries.dtype, gallery.dtype)
    queries = queries.to(dtype)
    n_queries = queries.shape[0]
    block = max(1, MAX_BLOCK_ENTRIES // min(chunk_size, n_gallery))
    distances = torch.empty(n_queries, k, dtype=dtype)
    indices = torch.empty(n_queries, k, dtype=torch.long)
    for start in range(0, n_queries, block):
        rows = slice(start, start + block)
        distances[rows], indices[rows] = _search_block(queries[rows], gallery, k, chunk_size)
    return distances.sqrt_(), indices


def _search_block(queries, gallery, k, chunk_size):
    """(squared distances (B, k), indices (B, k)) of the k nearest gallery rows of queries (B, D)."""
    best_distances = queries.new_empty(queries.shape[0], 0)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, gallery.shape[0], chunk_size):
        chunk = gallery[start:start + chunk_size].to(queries.dtype)
        distances = squared_distances(queries, chunk)
        # the chunk's own k best, ordered by (distance, index) with exact ties resolved to the lower index
        chunk_best = smallest_k(distances, min(k, chunk.shape[0]))
        candidates = torch.cat([best_distances, distances.gather(1, chunk_best)], dim=1)
        candidate_indices = torch.cat([best_indices, chunk_best + start], dim=1)
        order = candidates.sort(dim=1, stable=True).indices[:, :k]
        best_distances, best_indices = candidates.gather(1, order), candidate_indices.gather(1, order)
    return best_distances, best_indices


def _faiss_search(queries, gallery, k):
    try:
        import faiss  # imported here: the exact torch path needs no faiss
    except ImportError as error:
        raise ImportError("use_faiss=True needs faiss, which is not installed: pip install faiss-cpu") from error
    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32))
    squared, indices = index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k)
    return torch.from_numpy(squared).clamp_min_(0).sqrt_(), torch.from_numpy(indices).long()


def gallery_search(gallery_path, gallery, use_faiss=False, ann_options=None):
    """The k-NN search of a gallery (its file's path and ``gallery.load_gallery``'s dict), for callers that search
    it many times (the page): ``find(queries (Q, D), k, rows=None, exact=False) -> (distances (Q, k), indices (Q,
    k) int64)``, ``rows`` (S,) increasing gallery ids searching only those (the indices then positions into rows).
    Through the gallery's approximate index (``approximate_index.search_index`` at ann_options' ef_search /
    nprobe) when it has one, exactly (``nearest_neighbours``) when it has none, or use_faiss or ann_options["exact"]
    asks, or the call passes ``exact=True`` (e.g. among a few rows, where an index filtered down to them may find
    fewer than k). The index is loaded and checked against the gallery once, here, and the options with it (a
    search of no queries), so that a stale index or an option of the other kind of index fails before any search."""
    options = _checked_search_options(gallery_path, use_faiss, ann_options)
    embeddings = gallery["embeddings"]

    def exactly(queries, k, rows=None, exact=True):
        return nearest_neighbours(queries, embeddings if rows is None else embeddings[rows], k, use_faiss=use_faiss)
    if use_faiss or options["exact"] or not has_index(gallery_path):
        return exactly
    index = load_index(gallery_path, gallery).index
    search_index(index, np.zeros((0, index.d), dtype=np.float32), 1, options["ef_search"], options["nprobe"])

    def find(queries, k, rows=None, exact=False):
        if exact:
            return exactly(queries, k, rows)
        every_item = rows is None or len(rows) == len(embeddings)  # positions are gallery ids: faiss need not filter
        return search_index(index, queries, k, options["ef_search"], options["nprobe"],
                            subset=None if every_item else rows)
    return find


def _gallery_neighbours(gallery_path, gallery, queries, k, use_faiss=False, ann_options=None, rows=None):
    """One search of ``gallery_search``'s: the k nearest neighbours of queries (Q, D) in a gallery, (distances
    (Q, k), indices (Q, k) int64)."""
    return gallery_search(gallery_path, gallery, use_faiss, ann_options)(queries, k, rows)


def _checked_search_options(gallery_path, use_faiss, ann_options):
    """ann_options checked against the gallery (``approximate_index.check_search_options``) and use_faiss."""
    options = check_search_options(ann_options, has_index(gallery_path))
    if use_faiss and (options["ef_search"] or options["nprobe"]):
        raise ValueError("use_faiss searches exactly, so ef_search and nprobe do not apply; pass one or the other")
    return options


# ---------------------------------------------------------------- subcommands

def query(model_path, gallery_path, images, k=5, batch_size=256, use_faiss=False, precision=None,
          ann_options=None):
    """The k nearest gallery images of each query image (``use_faiss``: see ``nearest_neighbours``), through the
    gallery's approximate index when it has one (ann_options: None or a dict ``{"exact": bool, "ef_search": int,
    "nprobe": int}``, see ``approximate_index.check_search_options``).

    Takes the model file, the gallery file it indexed, images (list of Q image paths) and k
    (1 <= k <= gallery size). Returns a list of Q dicts ``{"query": path as given, "neighbours": [k dicts
    {"index": position in the gallery, "path": gallery image path, "label": class name or None when
    unlabelled, "distance": float}]}`` (``gallery.neighbour_items``), nearest first (equal distances by
    gallery order). With ``precision`` (one the gallery was calibrated for: ``calibrate``) each dict also
    holds the open-set answer: ``"path"`` (the query), ``"label"`` (the nearest neighbour's label, or
    ``open_set.UNKNOWN`` when its distance is beyond the calibrated threshold), ``"distance"`` (the nearest
    distance) and ``"precision"``.
    """
    model, info, gallery = model_and_gallery(model_path, gallery_path)
    threshold = None if precision is None else open_set.threshold_at(gallery, precision, gallery_path)
    images = check_image_files(images, "query image")
    k = check_int(k, "k", 1)
    if k > len(gallery["embeddings"]):
        raise ValueError(f"k={k} is larger than the gallery {gallery_path} ({len(gallery['embeddings'])} images); "
                         f"pass --k {len(gallery['embeddings'])} or less")
    embeddings, _ = embed_files(model, info, images, batch_size)
    distances, indices = _gallery_neighbours(gallery_path, gallery, embeddings, k, use_faiss, ann_options)
    results = [{"query": path, "neighbours": neighbours}
               for path, neighbours in zip(images, neighbour_items(gallery, distances, indices))]
    if threshold is not None:  # one open-set decision for every query's nearest neighbour
        nearest = [result["neighbours"][0] for result in results]
        answers = open_set.open_set_labels(distances[:, 0], [item["label"] for item in nearest], threshold)
        for result, item, answer in zip(results, nearest, answers):
            result.update(path=result["query"], label=answer, distance=item["distance"], precision=float(precision))
    return results


def verify(model_path, image1, image2):
    """Whether two images show the same class, by the model file's verification threshold.

    Returns ``{"distance": Euclidean distance of the embeddings (float), "similarity": 1 / (1 + distance) in
    (0, 1], "threshold": the model file's threshold or None, "same": similarity >= threshold, or None when
    the model file records no threshold}``.
    """
    model, info = load_model_file(model_path)
    paths = check_image_files([image1, image2])
    embeddings, _ = embed_files(model, info, paths)
    first, second = torch.from_numpy(embeddings).double().unbind(0)
    distance = float((first - second).pow(2).sum().sqrt())
    similarity = float(SiameseNetwork.embedding_similarity(first[None], second[None]))
    threshold = info["threshold"]
    return {"distance": distance, "similarity": similarity, "threshold": threshold,
            "same": None if threshold is None else bool(similarity >= threshold)}


def classify(model_path, gallery_path, images, k=5, batch_size=256, use_faiss=False, precision=None,
             ann_options=None):
    """The k-nearest-neighbour label of each query image (``use_faiss``: see ``nearest_neighbours``;
    ``ann_options``: see ``query``).

    The k nearest labelled gallery images vote (unlabelled ones are left out); the label with most votes
    wins, a tie goes to the tied label with the smaller summed distance, then to the smaller label id.
    Takes the model file, a gallery file with labels, images (list of Q paths) and k (1 <= k <= the number
    of labelled gallery images). Returns a list of Q dicts ``{"path": path as given, "label": class name,
    "vote_share": votes of that label / k}``.

    With ``precision`` (one the gallery was calibrated for: ``calibrate``) the answer is the calibrated
    open-set decision instead of the vote: ``"label"`` is the nearest labelled image's label, or
    ``open_set.UNKNOWN`` when its distance is beyond the threshold; ``"vote_share"`` is the share of the k
    nearest carrying that label (0 for unknown), and each dict adds ``"distance"`` (the nearest distance)
    and ``"precision"``.
    """
    model, info, gallery = model_and_gallery(model_path, gallery_path)
    threshold = None if precision is None else open_set.threshold_at(gallery, precision, gallery_path)
    images = check_image_files(images, "query image")
    k = check_int(k, "k", 1)
    labelled = np.flatnonzero(gallery["labels"] != UNLABELLED)
    if len(labelled) == 0:
        raise ValueError(f"{gallery_path} is unlabelled (its folder had no class sub-folders): classify needs a "
                         "gallery indexed from a folder of class sub-folders or a CSV of path,label lines")
    if k > len(labelled):
        raise ValueError(f"k={k} is larger than the labelled part of the gallery {gallery_path} ({len(labelled)} "
                         f"images); pass --k {len(labelled)} or less")
    embeddings, _ = embed_files(model, info, images, batch_size)
    distances, indices = _gallery_neighbours(gallery_path, gallery, embeddings, k, use_faiss, ann_options,
                                             rows=labelled)
    labels = torch.from_numpy(gallery["labels"][labelled])[indices]  # (Q, k)
    if threshold is not None:
        return _open_set_answers(gallery, images, distances[:, 0], labels, threshold, precision)
    n_classes = len(gallery["class_names"])
    votes = torch.zeros(len(images), n_classes, dtype=torch.long).scatter_add_(1, labels, torch.ones_like(labels))
    summed = torch.zeros(len(images), n_classes, dtype=torch.float64).scatter_add_(1, labels, distances.double())
    top = votes == votes.max(dim=1, keepdim=True).values
    summed = torch.where(top, summed, torch.inf)
    winners = top & (summed == summed.min(dim=1, keepdim=True).values)
    chosen = winners.to(torch.uint8).argmax(dim=1)  # the first True: the smallest tied label id
    shares = votes.gather(1, chosen[:, None]).squeeze(1).double() / k
    return [{"path": path, "label": label_name(gallery, label), "vote_share": share}
            for path, label, share in zip(images, chosen.tolist(), shares.tolist())]


def _open_set_answers(gallery, images, nearest_distances, labels, threshold, precision):
    """classify's dicts for the open-set decision: nearest_distances (Q,), labels (Q, k) of the k nearest."""
    nearest = [label_name(gallery, label) for label in labels[:, 0].tolist()]
    answers = open_set.open_set_labels(nearest_distances, nearest, threshold)
    shares = (labels == labels[:, :1]).double().mean(dim=1).tolist()
    return [{"path": path, "label": answer, "vote_share": share if answer != open_set.UNKNOWN else 0.0,
             "distance": distance, "precision": float(precision)}
            for path, answer, share, distance in zip(images, answers, shares, nearest_distances.tolist())]


def calibrate(model_path, gallery_path, folder, precisions, batch_size=256, plot=None):
    """Calibrate the open-set match of a gallery on a labelled folder and store it in the gallery file.

    Takes the model file, its labelled gallery file, folder (class sub-folders or a CSV of ``path,label``
    lines; classes the gallery lacks are welcome: accepting them is an error) and precisions (a number or
    sequence in (0, 1]). Each image's nearest labelled gallery image decides (``open_set.calibrate``); the
    curve and each precision's threshold replace any earlier calibration of the gallery file, other keys
    untouched; ``plot`` saves a figure of the curve there. Returns a list of P dicts, ascending by precision:
    ``{"precision", "threshold", "calibration_precision", "recall"}`` (floats: the last two are reached on
    the calibration images at that threshold), ``"n_queries"`` and ``"n_unseen"`` (images of a class the
    gallery lacks). Nothing is written when a precision cannot be reached (ValueError naming the best).
    """
    model, info, gallery = model_and_gallery(model_path, gallery_path)
    labelled = np.flatnonzero(gallery["labels"] != UNLABELLED)
    if len(labelled) == 0:
        raise ValueError(f"{gallery_path} is unlabelled (its folder had no class sub-folders): calibrate needs a "
                         "gallery indexed from a folder of class sub-folders or a CSV of path,label lines")
    paths, labels, class_names = list_folder(folder)
    if not class_names:
        raise ValueError(f"{folder} is unlabelled: calibrate needs each image's class; pass a folder of class "
                         "sub-folders or a CSV of path,label lines")
    shared = {os.path.realpath(path) for path in paths} & {os.path.realpath(path) for path in gallery["paths"]}
    if shared:
        raise ValueError(f"{len(shared)} calibration images of {folder} are in the gallery {gallery_path} (e.g. "
                         f"{sorted(shared)[0]}): calibrate on images the gallery does not hold")
    embeddings, kept = embed_files(model, info, paths, batch_size)
    distances, indices = nearest_neighbours(embeddings, gallery["embeddings"][labelled], 1)
    nearest = [label_name(gallery, label) for label in gallery["labels"][labelled][indices[:, 0].numpy()].tolist()]
    truth = [class_names[label] for label in np.asarray(labels)[kept].tolist()]
    calibration = open_set.calibrate(distances[:, 0], nearest, truth, gallery["class_names"].tolist(), precisions)
    open_set.save_calibration(gallery_path, calibration)
    curve = calibration["calibration_curve"]
    if plot:
        open_set.plot_curve(curve, calibration["calibration_precisions"], calibration["calibration_thresholds"], plot)
    n_unseen = len(truth) - int(open_set.match_outcomes(nearest, truth, gallery["class_names"].tolist())[1].sum())
    levels = zip(calibration["calibration_precisions"].tolist(), calibration["calibration_thresholds"].tolist())
    return [{"precision": precision, "threshold": threshold,
             **dict(zip(("calibration_precision", "recall"), open_set.curve_at(curve, threshold))),
             "n_queries": len(truth), "n_unseen": n_unseen} for precision, threshold in levels]


def evaluate(model_path, gallery_path):
    """Embedding-quality metrics of a labelled gallery, queried against itself (unlabelled items left out).

    Returns a dict of floats in [0, 1]: ``precision_at_1``, ``r_precision``, ``map_at_r``
    (``metrics.retrieval_metrics``), ``knn_accuracy`` (leave-one-out k-NN vote with ``knn_k`` =
    min(5, N - 1) neighbours), ``nmi`` (``metrics.nmi_score``), ``roc_auc`` (``metrics.verification_roc_auc``)
    and, when the model file has a threshold, ``verification_accuracy`` at that threshold
    (``metrics.verification_accuracy``: same/different on seeded pairs, half same-class), plus ``n_images``,
    ``n_classes`` and ``knn_k`` (ints). Raises ValueError for an unlabelled gallery or one
    with fewer than 2 classes or no class holding 2 images.
    """
    _, info, gallery = model_and_gallery(model_path, gallery_path)
    labelled = gallery["labels"] != UNLABELLED
    if not labelled.any():
        raise ValueError(f"{gallery_path} is unlabelled (its folder had no class sub-folders): evaluate needs a "
                         "gallery indexed from a folder of class sub-folders or a CSV of path,label lines")
    embeddings = torch.from_numpy(gallery["embeddings"][labelled])
    labels = torch.from_numpy(gallery["labels"][labelled])
    n_classes = len(np.unique(gallery["labels"][labelled]))
    if n_classes < 2 or len(labels) < 3:
        raise ValueError(f"{gallery_path} has {len(labels)} labelled images in {n_classes} class(es); evaluate "
                         "needs at least 2 classes and 3 images")
    knn_k = min(EVALUATE_K, len(labels) - 1)
    results = retrieval_metrics(embeddings, labels)
    results["knn_accuracy"] = knn_accuracy(embeddings, labels, embeddings, labels, k=knn_k, exclude_self=True)
    results["nmi"] = nmi_score(embeddings, labels)
    results["roc_auc"] = verification_roc_auc(embeddings, labels)
    if info["threshold"] is not None:
        results["verification_accuracy"] = verification_accuracy(embeddings, labels, info["threshold"])
    results = {name: float(value) for name, value in results.items()}
    results.update(n_images=len(labels), n_classes=n_classes, knn_k=knn_k)
    return results


def evaluate_recall(model_path, gallery_path, k=RECALL_K, n_queries=None, seed=0, ann_options=None):
    """Recall@k of the gallery's approximate index against exact search, on a seeded sample of gallery items
    used as queries (each finds itself among its exact neighbours, as a query that is in the gallery does).

    Takes the model file and its gallery file (with an index: ``index --ann``), k (1 <= k <= N), n_queries
    (1 <= n_queries <= N; default min(RECALL_QUERIES, N)) drawn without replacement by numpy's generator
    seeded with seed, and ann_options (``query``'s, without exact). Returns a dict: ``kind``, ``parameter``
    ("ef_search" or "nprobe") and ``value`` (the one searched with), ``k``, ``n_queries``, ``n_items``,
    ``seed`` (ints), ``recall_at_k`` (``approximate_index.recall_at_k``) and the wall seconds of the two
    searches, ``approximate_seconds`` and ``exact_seconds`` (for information: they depend on the machine).
    """
    _, _, gallery = model_and_gallery(model_path, gallery_path)
    options = check_search_options(ann_options, has_index(gallery_path))
    if options["exact"]:
        raise ValueError("evaluate_recall compares the approximate index with exact search; leave out exact")
    loaded = load_index(gallery_path, gallery)
    embeddings = gallery["embeddings"]
    n_items = len(embeddings)
    n_queries = min(RECALL_QUERIES, n_items) if n_queries is None else check_int(n_queries, "n_queries", 1)
    if n_queries > n_items:
        raise ValueError(f"n_queries={n_queries} is more than the gallery's {n_items} items; pass n_queries <= "
                         f"{n_items}")
    k = check_int(k, "k", 1)
    if k > n_items:
        raise ValueError(f"k={k} is larger than the gallery {gallery_path} ({n_items} images); pass k <= {n_items}")
    queries = embeddings[np.sort(np.random.default_rng(check_int(seed, "seed", 0)).choice(n_items, n_queries,
                                                                                       replace=False))]
    start = time.perf_counter()
    _, approximate = search_index(loaded.index, queries, k, options["ef_search"], options["nprobe"])
    middle = time.perf_counter()
    _, exact = nearest_neighbours(queries, embeddings, k)
    end = time.perf_counter()
    parameter = "ef_search" if loaded.kind == "hnsw" else "nprobe"
    value = options[parameter] if options[parameter] is not None else loaded.settings[parameter]
    return {"kind": loaded.kind, "parameter": parameter, "value": value, "k": k, "n_queries": n_queries,
            "n_items": n_items, "seed": seed, "recall_at_k": recall_at_k(approximate, exact),
            "approximate_seconds": middle - start, "exact_seconds": end - middle}


def _short(text, width=GRID_TITLE_WIDTH):
    """``text`` cut to ``width`` characters (its end kept, where names differ) so titles do not overlap."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def draw_grid(results, path):
    """Save a figure of query results (``query``'s list) to ``path``: one row per query, the query image first
    and then its neighbours titled with label and distance. A gallery image that can no longer be read is
    drawn as a blank cell titled "unreadable". Returns the path."""
    from matplotlib.figure import Figure  # a bare Figure, not pyplot: no backend switch

    from results import save_figure

    n_columns = 1 + max(len(result["neighbours"]) for result in results)
    figure = Figure(figsize=(1.6 * n_columns, 1.9 * len(results)))
    axes = figure.subplots(len(results), n_columns, squeeze=False)
    for row, result in zip(axes, results):
        cells = [(result["query"], "query\n" + _short(os.path.basename(result["query"])))]
        cells += [(item["path"], f"{_short(item['label'] if item['label'] is not None else '-')}\n"
                                 f"d={item['distance']:.3f}") for item in result["neighbours"]]
        for column, axis in enumerate(row):
            axis.set_axis_off()
            if column >= len(cells):
                continue
            image_path, title = cells[column]
            try:
                picture = read_image(image_path, GRID_THUMBNAIL, 3).permute(1, 2, 0).numpy()
            except (ValueError, OSError):
                picture, title = np.ones((GRID_THUMBNAIL, GRID_THUMBNAIL, 3)), f"unreadable\n{title}"
            axis.imshow(picture)
            axis.set_title(title, fontsize=7)
    return save_figure(figure, path)


# ---------------------------------------------------------------- command line

def _parser():
    parser = cli.ArgumentParser(prog="search.py", description="Use a trained model file on your own images.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed every image of a folder into a gallery file")
    index.add_argument("model", help="model file written by save_model")
    index.add_argument("folder", help="folder of class sub-folders, a flat folder of images, or a CSV path,label")
    index.add_argument("--out", required=True, help="gallery file to write (.npz)")
    index.add_argument("--batch-size", type=int, default=256)
    index.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images with a warning")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.add_argument("--ann", choices=ANN_KINDS, help="also build an approximate index (faiss) beside the gallery")
    index.add_argument("--hnsw-m", type=int, help="with --ann hnsw: graph neighbours per node (default 32)")
    index.add_argument("--ef-construction", type=int, help="with --ann hnsw: build-time beam (default 40)")
    index.add_argument("--ivf-lists", type=int, help="with --ann ivf: number of lists (default about 4 sqrt(N))")
    search = commands.add_parser("query", help="the k nearest gallery images of each image")
    search.add_argument("model")
    search.add_argument("gallery", help="gallery file written by index with this model")
    search.add_argument("images", nargs="+", metavar="IMAGE")
    search.add_argument("--k", type=int, default=5)
    search.add_argument("--grid", metavar="PNG", help="also draw the queries and their neighbours into this image")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument("--faiss", action="store_true", help="search with faiss (pip install faiss-cpu): same neighbours")
    search.add_argument("--precision", type=float, metavar="P", help="also answer the nearest label, or 'unknown' "
                        "beyond the threshold calibrated for this precision (see calibrate)")
    _add_search_options(search)
    pair = commands.add_parser("verify", help="are two images of the same class?")
    pair.add_argument("model")
    pair.add_argument("image1")
    pair.add_argument("image2")
    knn = commands.add_parser("classify", help="the k-nearest-neighbour label of each image")
    knn.add_argument("model")
    knn.add_argument("gallery")
    knn.add_argument("images", nargs="+", metavar="IMAGE")
    knn.add_argument("--k", type=int, default=5)
    knn.add_argument("--faiss", action="store_true", help="search with faiss (pip install faiss-cpu): same neighbours")
    knn.add_argument("--json", action="store_true", help="print the results as JSON")
    knn.add_argument("--precision", type=float, metavar="P", help="answer the nearest label, or 'unknown' beyond "
                     "the threshold calibrated for this precision (see calibrate), instead of the k-NN vote")
    _add_search_options(knn)
    quality = commands.add_parser("evaluate", help="metrics of a labelled gallery queried against itself")
    quality.add_argument("model")
    quality.add_argument("gallery")
    quality.add_argument("--recall", type=int, nargs="?", const=RECALL_K, metavar="K",
                         help=f"instead of the metrics, recall@K (default {RECALL_K}) of the approximate index "
                              "against exact search")
    quality.add_argument("--queries", type=int, help="with --recall: gallery items sampled as queries "
                                                     f"(default {RECALL_QUERIES} or all)")
    quality.add_argument("--seed", type=int, help="with --recall: seed of the sample (default 0)")
    _add_search_options(quality, exact=False)
    page = commands.add_parser("serve", help="a local web page: drop an image, see its neighbours and the map")
    page.add_argument("model")
    page.add_argument("gallery")
    page.add_argument("--port", type=int, default=DEFAULT_PORT)
    page.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (other machines reach a "
                                                           "non-local address: the gallery's images are shown)")
    page.add_argument("--k", type=int, default=5, help="neighbours shown per query")
    page.add_argument("--faiss", action="store_true", help="search with faiss (pip install faiss-cpu): same neighbours")
    _add_search_options(page)
    calibration = commands.add_parser("calibrate", help="the distance threshold of the nearest label's match at "
                                      "a precision, on a labelled folder; stored in the gallery file")
    calibration.add_argument("model")
    calibration.add_argument("gallery", help="labelled gallery file written by index with this model")
    calibration.add_argument("folder", help="labelled calibration images (class sub-folders or a CSV path,label), "
                             "not in the gallery; classes the gallery lacks are welcome")
    calibration.add_argument("--precision", type=float, action="append", required=True, metavar="P",
                             help="precision to reach (0 < P <= 1); repeat for several")
    calibration.add_argument("--plot", metavar="PNG", help="save the precision/recall curve to this image")
    calibration.add_argument("--batch-size", type=int, default=256)
    return parser


def _add_search_options(parser, exact=True):
    if exact:
        parser.add_argument("--exact", action="store_true", help="search exactly even if the gallery has an "
                                                                 "approximate index")
    parser.add_argument("--ef-search", type=int, help="search beam of the gallery's hnsw index (default 64)")
    parser.add_argument("--nprobe", type=int, help="lists searched in the gallery's ivf index (default 16)")


def _ann_options(arguments):
    return {"exact": getattr(arguments, "exact", False), "ef_search": arguments.ef_search,
            "nprobe": arguments.nprobe}


def _note_approximate(arguments):
    """A line on standard error when the results came through the approximate index, so none is taken as exact."""
    if not (arguments.exact or arguments.faiss) and has_index(arguments.gallery):
        print(f"(approximate search through {index_path(arguments.gallery)}; --exact searches exactly)",
              file=sys.stderr)


def _print_query(results):
    for number, result in enumerate(results):
        if number:
            print()
        print(f"query: {result['query']}")
        if "precision" in result:
            print(f"  answer: {result['label']}  distance: {result['distance']:.4f}  "
                  f"(threshold calibrated for precision {result['precision']:g})")
        for rank, item in enumerate(result["neighbours"], 1):
            label = item["label"] if item["label"] is not None else "-"
            print(f"  {rank}. {item['path']}  label: {label}  distance: {item['distance']:.4f}")


def _run_index(arguments):
    build = {name: value for name, value in (("hnsw_m", arguments.hnsw_m), ("ef_construction",
             arguments.ef_construction), ("ivf_lists", arguments.ivf_lists)) if value is not None}
    allowed = {None: (), "hnsw": ("hnsw_m", "ef_construction"), "ivf": ("ivf_lists",)}[arguments.ann]
    for name, value in build.items():
        if name not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} applies to --ann {'ivf' if name == 'ivf_lists' else 'hnsw'}")
        check_int(value, name, 2 if name == "hnsw_m" else 1)  # before the folder is embedded, not after
    out = index_folder(arguments.model, arguments.folder, arguments.out, batch_size=arguments.batch_size,
                       progress=not arguments.no_progress, skip_bad_images=arguments.skip_bad_images)
    gallery = load_gallery(out)
    n_classes = len(gallery["class_names"])
    print(f"indexed {len(gallery['embeddings'])} images ({gallery['embedding_dim']}-dimensional, "
          f"{f'{n_classes} classes' if n_classes else 'unlabelled'}) into {out}")
    if arguments.ann:
        path = build_index(out, arguments.ann, progress=not arguments.no_progress, **build)
        print(f"built the {arguments.ann} approximate index {path}")


def _run_query(arguments):
    results = query(arguments.model, arguments.gallery, arguments.images, k=arguments.k, use_faiss=arguments.faiss,
                    precision=arguments.precision, ann_options=_ann_options(arguments))
    _note_approximate(arguments)
    if arguments.json:
        print(json.dumps(results, indent=1))
    else:
        _print_query(results)
    if arguments.grid:
        draw_grid(results, arguments.grid)
        if not arguments.json:  # keeps --json output parseable as a whole
            print(f"\nwrote {arguments.grid}")


def _run_verify(arguments):
    result = verify(arguments.model, arguments.image1, arguments.image2)
    print(f"distance: {result['distance']:.4f}")
    print(f"similarity: {result['similarity']:.4f}")
    if result["threshold"] is None:
        print("threshold: none (the model file records no verification threshold, so no verdict)")
    else:
        print(f"threshold: {result['threshold']:.4f}")
        print(f"verdict: {'same' if result['same'] else 'different'}")


def _run_classify(arguments):
    results = classify(arguments.model, arguments.gallery, arguments.images, k=arguments.k, use_faiss=arguments.faiss,
                       precision=arguments.precision, ann_options=_ann_options(arguments))
    _note_approximate(arguments)
    if arguments.json:
        print(json.dumps(results, indent=1))
        return
    for result in results:
        calibrated = (f"\tdistance {result['distance']:.4f}\tprecision {result['precision']:g}"
                      if "precision" in result else "")
        print(f"{result['path']}\t{result['label']}\t{result['vote_share']:.2f}{calibrated}")


def _run_calibrate(arguments):
    levels = calibrate(arguments.model, arguments.gallery, arguments.folder, arguments.precision,
                       batch_size=arguments.batch_size, plot=arguments.plot)
    print(f"calibrated on {levels[0]['n_queries']} images of {arguments.folder} ({levels[0]['n_unseen']} of classes "
          f"the gallery lacks); accept the nearest label when its distance is <= the threshold:")
    for level in levels:
        print(f"  precision >= {level['precision']:g}: threshold {level['threshold']:.4f} (on the calibration "
              f"images: precision {level['calibration_precision']:.4f}, recall {level['recall']:.4f})")
    print(f"wrote the curve and thresholds into {arguments.gallery}")
    if arguments.plot:
        print(f"wrote {arguments.plot}")


def _run_evaluate(arguments):
    from results import markdown_table

    recall_options = [f"--{name}" for name in ("queries", "seed", "ef_search", "nprobe")
                      if getattr(arguments, name) is not None]
    if arguments.recall is not None:
        result = evaluate_recall(arguments.model, arguments.gallery, k=arguments.recall,
                                 n_queries=arguments.queries, seed=arguments.seed or 0,
                                 ann_options=_ann_options(arguments))
        columns = [("kind", "index", "{}"), ("parameter", "parameter", "{}"), ("value", "value", "{}"),
                   ("n_items", "gallery", "{}"), ("n_queries", "queries", "{}"), ("k", "k", "{}"),
                   ("recall_at_k", "recall@k", "{:.4f}"), ("approximate_seconds", "approximate s", "{:.3f}"),
                   ("exact_seconds", "exact s", "{:.3f}")]
        print(markdown_table([result], columns), end="")
        return
    if recall_options:
        raise ValueError(f"{recall_options[0].replace('_', '-')} applies with --recall")
    result = evaluate(arguments.model, arguments.gallery)
    columns = [("n_images", "images", "{}"), ("n_classes", "classes", "{}"),
               ("precision_at_1", "P@1", "{:.4f}"), ("r_precision", "R-Precision", "{:.4f}"),
               ("map_at_r", "MAP@R", "{:.4f}"), ("knn_accuracy", f"{result['knn_k']}-NN accuracy", "{:.4f}"),
               ("nmi", "NMI", "{:.4f}"), ("roc_auc", "ROC-AUC", "{:.4f}")]
    if "verification_accuracy" in result:
        columns.append(("verification_accuracy", "verification acc", "{:.4f}"))
    print(markdown_table([result], columns), end="")


def _run_serve(arguments):
    model, info, gallery = model_and_gallery(arguments.model, arguments.gallery)
    find = gallery_search(arguments.gallery, gallery, arguments.faiss, _ann_options(arguments))
    page = SearchPage(model, info, gallery, find, k=arguments.k)
    _note_approximate(arguments)
    serve(make_server(page, arguments.host, arguments.port))


def _check_faiss_for_index(arguments):
    """ValueError saying how to install faiss when the command would build or search an approximate index
    without it (the command line's form of approximate_index's ImportError)."""
    if importlib.util.find_spec("faiss") is not None:
        return
    if getattr(arguments, "ann", None):
        raise ValueError("--ann needs faiss, which is not installed: pip install faiss-cpu, or leave out --ann")
    searches = arguments.command in ("query", "classify", "serve") or getattr(arguments, "recall", None) is not None
    if searches and not (getattr(arguments, "exact", False) or getattr(arguments, "faiss", False)) \
            and has_index(arguments.gallery):
        raise ValueError(f"{arguments.gallery} has an approximate index ({index_path(arguments.gallery)}), which "
                         "needs faiss: pip install faiss-cpu, or pass --exact to search exactly")


COMMANDS = {"index": _run_index, "query": _run_query, "verify": _run_verify, "classify": _run_classify,
            "evaluate": _run_evaluate, "calibrate": _run_calibrate, "serve": _run_serve}


def main(argv=None):
    """Run one subcommand (see the module docstring; ``COMMANDS`` maps each name to the function that runs it
    and prints its result); returns the exit status 0. A user's mistake (a bad option, a missing or
    unreadable file, faiss missing for --faiss) raises ValueError or OSError, which ``cli.run`` prints as one
    line ``search.py: error: ...`` with exit status 2."""
    arguments = _parser().parse_args(argv)
    if getattr(arguments, "faiss", False) and importlib.util.find_spec("faiss") is None:
        raise ValueError("--faiss needs faiss, which is not installed: pip install faiss-cpu, or leave out --faiss")
    _check_faiss_for_index(arguments)
    COMMANDS[arguments.command](arguments)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "search.py"))
