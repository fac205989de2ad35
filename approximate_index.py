"""Approximate nearest-neighbour indexes of a gallery (faiss HNSW or IVF), built, saved beside the gallery file,
checked to belong to it, loaded and searched; and the recall of an approximate search against the exact one.

- ``new_index``: a faiss ``IndexHNSWFlat`` or ``IndexIVFFlat`` (its coarse quantizer trained by k-means on a
  seeded sample) of (N, D) embeddings, added a chunk at a time;
- ``build_index``: the index of a gallery file, written atomically to ``index_path(gallery_path)``
  (``gallery.npz`` -> ``gallery.npz.ann``) with what it was built from;
- ``load_index``: that file read back, refused when it was built from other embeddings (a re-indexed gallery);
- ``search_index``: the k nearest neighbours through the index, at a chosen efSearch (HNSW) or nprobe (IVF),
  in the form of ``search.nearest_neighbours``;
- ``recall_at_k``: the share of the exact k nearest neighbours that an approximate search found.

The index file is a numpy .npz (read with allow_pickle=False) holding ``format``
("siamese-triplet-approximate-index"), ``kind`` ("hnsw" or "ivf"), ``index`` (faiss's serialised index as
uint8 bytes, with its default efSearch or nprobe), ``settings`` (JSON of the build parameters) and what the
index was built from: the gallery's model ``fingerprint``, ``n_items`` and ``embeddings_sha256`` (SHA-256 of
the gallery's float32 embeddings). faiss is optional (``pip install faiss-cpu``): it is imported only here,
when an index is built, loaded or searched.
"""

import hashlib
import json
import os
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from gallery import load_gallery
from utils import atomic_write, check_choice, check_int

ANN_KINDS = ("hnsw", "ivf")
INDEX_FORMAT = "siamese-triplet-approximate-index"
INDEX_SUFFIX = ".ann"
ADD_CHUNK = 65536  # embeddings handed to faiss at once: bounds the float32 copy made for it
HNSW_M = 32  # graph neighbours per node
HNSW_EF_CONSTRUCTION = 40  # faiss's default build-time beam
HNSW_EF_SEARCH = 64  # search-time beam unless chosen (faiss's own default of 16 loses recall)
IVF_NPROBE = 16  # lists visited per query unless chosen
# k-means wants at least this many training points per list (faiss warns below 39); the default list count
# keeps to it, and the training sample is at most IVF_TRAIN_PER_LIST points per list.
IVF_MIN_POINTS_PER_LIST = 39
IVF_TRAIN_PER_LIST = 64
SEARCH_OPTIONS = ("exact", "ef_search", "nprobe")


class LoadedIndex(NamedTuple):
    """An index file read back: ``index`` (the faiss index), ``kind`` ("hnsw" / "ivf"), ``settings`` (dict of
    its build parameters) and ``path``."""
    index: object
    kind: str
    settings: dict
    path: str


def _faiss(what):
    try:
        import faiss  # imported here: faiss is optional and only approximate search needs it
    except ImportError as error:
        raise ImportError(f"{what} needs faiss, which is not installed: pip install faiss-cpu") from error
    return faiss


def index_path(gallery_path):
    """The path of the approximate index of the gallery file ``gallery_path``: beside it, ``<gallery>.ann``."""
    return os.fspath(gallery_path) + INDEX_SUFFIX


def default_ivf_lists(n_items):
    """The IVF list count for a gallery of ``n_items``: about 4 sqrt(N) (the low end of faiss's advice, 4 to 16
    sqrt(N): fewer lists train and assign faster), with at least IVF_MIN_POINTS_PER_LIST points per list, at
    least 1."""
    return max(1, min(round(4 * n_items ** 0.5), n_items // IVF_MIN_POINTS_PER_LIST))


def ivf_sizes(n_items, ivf_lists=None, train_size=None):
    """(ivf_lists, train_size) of an IVF index of n_items vectors, checked: ivf_lists defaults to
    ``default_ivf_lists(n_items)`` (1 <= ivf_lists <= n_items), train_size to at most IVF_TRAIN_PER_LIST points
    per list (ivf_lists <= train_size <= n_items). ValueError naming the argument otherwise."""
    ivf_lists = default_ivf_lists(n_items) if ivf_lists is None else check_int(ivf_lists, "ivf_lists", 1)
    if ivf_lists > n_items:
        raise ValueError(f"ivf_lists={ivf_lists} is larger than the gallery ({n_items} items); pass "
                         f"ivf_lists <= {n_items} (the default is {default_ivf_lists(n_items)})")
    if train_size is None:
        train_size = min(n_items, IVF_TRAIN_PER_LIST * ivf_lists)
    train_size = check_int(train_size, "train_size", ivf_lists)
    if train_size > n_items:
        raise ValueError(f"train_size={train_size} is larger than the gallery ({n_items} items); pass "
                         f"train_size <= {n_items}")
    return ivf_lists, train_size


def embeddings_digest(embeddings):
    """SHA-256 (hex str) of (N, D) embeddings as contiguous float32: what an index records it was built from."""
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def new_index(embeddings, kind, hnsw_m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ivf_lists=None,
              train_size=None, seed=0, chunk_size=ADD_CHUNK, progress=False):
    """A faiss index of ``embeddings`` (N, D) float (numpy or torch), the vectors added chunk_size rows at a time.

    kind "hnsw": ``IndexHNSWFlat`` with hnsw_m neighbours per node and build beam ef_construction, searched at
    efSearch HNSW_EF_SEARCH unless chosen. kind "ivf": ``IndexIVFFlat`` with ivf_lists lists (default
    ``default_ivf_lists(N)``; 1 <= ivf_lists <= N) whose coarse quantizer is trained by k-means (seeded with
    seed) on train_size rows drawn with numpy's generator seeded with seed (default: at most
    IVF_TRAIN_PER_LIST per list; ivf_lists <= train_size <= N), searched at nprobe min(IVF_NPROBE, ivf_lists)
    unless chosen. Memory beyond the index: one chunk as float32 (and the training sample). Returns the index.
    """
    faiss = _faiss("an approximate index")
    check_choice(kind, ANN_KINDS, "kind")
    embeddings = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise TypeError(f"embeddings must be a 2-D floating array, got {getattr(embeddings, 'shape', embeddings)}")
    n_items, dim = embeddings.shape
    if n_items == 0:
        raise ValueError("embeddings are empty; an index needs at least one vector")
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    seed = check_int(seed, "seed", 0)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, check_int(hnsw_m, "hnsw_m", 2))
        index.hnsw.efConstruction = check_int(ef_construction, "ef_construction", 1)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        ivf_lists, train_size = ivf_sizes(n_items, ivf_lists, train_size)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, ivf_lists, faiss.METRIC_L2)
        index.cp.seed = seed
        sample = np.sort(np.random.default_rng(seed).choice(n_items, train_size, replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
        index.nprobe = min(IVF_NPROBE, ivf_lists)
    with tqdm(total=n_items, desc=f"Building {kind}", unit="vec", disable=not progress, leave=False) as bar:
        for start in range(0, n_items, chunk_size):
            chunk = np.ascontiguousarray(embeddings[start:start + chunk_size], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))
    return index


def build_index(gallery_path, kind, hnsw_m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ivf_lists=None,
                train_size=None, seed=0, progress=True):
    """Build the approximate index of the gallery file ``gallery_path`` (``new_index``'s kind and parameters)
    and write it atomically to ``index_path(gallery_path)``, with the gallery's fingerprint, item count and
    embeddings' SHA-256 (see the module docstring). Returns the index file's path."""
    gallery = load_gallery(gallery_path)
    index = new_index(gallery["embeddings"], kind, hnsw_m, ef_construction, ivf_lists, train_size, seed,
                      progress=progress)
    faiss = _faiss("an approximate index")
    if kind == "hnsw":
        settings = {"hnsw_m": int(hnsw_m), "ef_construction": index.hnsw.efConstruction,
                    "ef_search": index.hnsw.efSearch}
    else:
        train_size = ivf_sizes(index.ntotal, index.nlist, train_size)[1]
        settings = {"ivf_lists": index.nlist, "train_size": train_size, "seed": int(seed), "nprobe": index.nprobe}
    path = index_path(gallery_path)
    with atomic_write(path) as file:
        np.savez(file, format=np.array(INDEX_FORMAT), kind=np.array(kind), index=faiss.serialize_index(index),
                 settings=np.array(json.dumps(settings)), fingerprint=np.array(gallery["fingerprint"]),
                 n_items=np.array(len(gallery["embeddings"]), dtype=np.int64),
                 embeddings_sha256=np.array(embeddings_digest(gallery["embeddings"])))
    return path


def has_index(gallery_path):
    """Whether an approximate index file lies beside the gallery file ``gallery_path`` (unchecked)."""
    return os.path.isfile(index_path(gallery_path))


def load_index(gallery_path, gallery=None):
    """The approximate index of the gallery file ``gallery_path`` as a ``LoadedIndex``, checked to be built from
    this gallery's embeddings (``gallery``: the gallery dict of ``gallery.load_gallery`` when already read).

    Raises FileNotFoundError when there is no index file, ValueError when the file is not an index file or was
    built from other embeddings (a stale index of a re-indexed gallery: the message says how to rebuild it),
    ImportError when faiss is not installed."""
    gallery_path = os.fspath(gallery_path)
    path = index_path(gallery_path)
    rebuild = (f"rebuild it (`python search.py index MODEL FOLDER --out {gallery_path} --ann hnsw|ivf`, or "
               f"approximate_index.build_index), delete it, or search exactly (--exact)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no approximate index at {path}; build one with `python search.py index MODEL "
                                f"FOLDER --out {gallery_path} --ann hnsw|ivf`")
    try:
        with np.load(path, allow_pickle=False) as file:
            record = {key: file[key] for key in file.files}
        kind, settings = str(record["kind"]), json.loads(str(record["settings"]))
        file_format = str(record["format"])
    except Exception as error:  # numpy, json and a missing key raise several kinds for a file of another kind
        raise ValueError(f"{path} is not an approximate index file ({type(error).__name__}); {rebuild}") from None
    if file_format != INDEX_FORMAT or kind not in ANN_KINDS:
        raise ValueError(f"{path} is not an approximate index file (format {file_format!r}, kind {kind!r}); {rebuild}")
    gallery = load_gallery(gallery_path) if gallery is None else gallery
    built_from = (str(record["fingerprint"]), int(record["n_items"]), str(record["embeddings_sha256"]))
    if built_from != (gallery["fingerprint"], len(gallery["embeddings"]), embeddings_digest(gallery["embeddings"])):
        raise ValueError(f"{path} was built from other embeddings than those now in {gallery_path} ({built_from[1]} "
                         f"items then, {len(gallery['embeddings'])} now): the gallery was indexed again; {rebuild}")
    index = _faiss(f"the approximate index {path}").deserialize_index(record["index"])
    return LoadedIndex(index, kind, settings, path)


def check_search_options(options, has_index=True):
    """``options`` (None or a dict with the keys ``exact`` (bool), ``ef_search`` and ``nprobe`` (int >= 1 or
    None)) as a full dict with those three keys. ValueError for an unknown key, for exact with a search
    parameter, and for a search parameter when the gallery has no index (has_index False)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(SEARCH_OPTIONS))
    if unknown:
        raise ValueError(f"unknown search option(s) {unknown}; choose from {', '.join(SEARCH_OPTIONS)}")
    options = {"exact": False, "ef_search": None, "nprobe": None, **options}
    if not isinstance(options["exact"], bool):
        raise TypeError(f"exact must be True or False, got {options['exact']!r}")
    chosen = [name for name in ("ef_search", "nprobe") if options[name] is not None]
    for name in chosen:
        options[name] = check_int(options[name], name, 1)
    if options["exact"] and chosen:
        raise ValueError(f"{chosen[0]} sets the approximate search, and exact search was asked for; pass one of them")
    if chosen and not has_index:
        raise ValueError(f"{chosen[0]} is set but the gallery has no approximate index; build one with "
                         "`search.py index ... --ann hnsw|ivf`, or leave it out")
    return options


def search_index(index, queries, k, ef_search=None, nprobe=None, subset=None):
    """The k nearest neighbours of queries (Q, D) (float tensor or array) through a faiss HNSW or IVF index.

    ef_search (HNSW, >= 1; faiss searches with max(ef_search, k)) or nprobe (IVF, 1 <= nprobe <= lists) override
    the index's own; the index object is not changed. subset (S,) increasing int gallery ids restricts the
    search to those items, and the indices returned are then positions into subset. Returns (distances (Q, k)
    float32, ascending, Euclidean, indices (Q, k) int64) as torch tensors, like ``search.nearest_neighbours``.
    Raises ValueError when the search found fewer than k neighbours for a query (e.g. nprobe too small for k):
    the message says which parameter to raise.
    """
    faiss = _faiss("approximate search")
    index = faiss.downcast_index(index)
    queries = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be (Q, {index.d}) for this index, got {queries.shape}")
    n_items = index.ntotal if subset is None else len(subset)
    k = check_int(k, "k", 1)
    if k > n_items:
        raise ValueError(f"k={k} is larger than the items searched ({n_items}); pass k <= {n_items}")
    selector = None if subset is None else faiss.IDSelectorBatch(np.ascontiguousarray(subset, dtype=np.int64))
    if isinstance(index, faiss.IndexHNSW):
        if nprobe is not None:
            raise ValueError("nprobe does not apply to an hnsw index; its search parameter is ef_search (--ef-search)")
        ef_search = index.hnsw.efSearch if ef_search is None else check_int(ef_search, "ef_search", 1)
        parameters, raise_name = faiss.SearchParametersHNSW(efSearch=ef_search, sel=selector), "ef_search"
    else:
        if ef_search is not None:
            raise ValueError("ef_search does not apply to an ivf index; its search parameter is nprobe (--nprobe)")
        nprobe = index.nprobe if nprobe is None else check_int(nprobe, "nprobe", 1)
        if nprobe > index.nlist:
            raise ValueError(f"nprobe={nprobe} is more than the index's {index.nlist} lists; pass nprobe <= "
                             f"{index.nlist} (= {index.nlist} searches every list, exactly)")
        parameters, raise_name = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector), "nprobe"
    squared, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=parameters)
    if (indices < 0).any():
        raise ValueError(f"the approximate search found fewer than k={k} neighbours for "
                         f"{int((indices < 0).any(axis=1).sum())} of {len(indices)} queries; raise {raise_name} "
                         "or search exactly")
    if subset is not None:
        indices = np.searchsorted(np.asarray(subset), indices)
    return torch.from_numpy(squared).clamp_min_(0).sqrt_(), torch.from_numpy(indices).long()


def recall_at_k(approximate_indices, exact_indices):
    """Recall@k of an approximate search: the mean over queries of the share of the exact k nearest neighbours
    that the approximate k hold (order ignored). Takes approximate_indices and exact_indices (Q, k) int
    (tensors or arrays, Q >= 1, each row without repeats); returns a float in [0, 1]."""
    approximate = torch.as_tensor(np.asarray(approximate_indices))
    exact = torch.as_tensor(np.asarray(exact_indices))
    if approximate.dim() != 2 or approximate.shape != exact.shape or approximate.numel() == 0:
        raise ValueError(f"approximate_indices and exact_indices must both be (Q, k) with Q, k >= 1, got "
                         f"{tuple(approximate.shape)} and {tuple(exact.shape)}")
    found = (approximate[:, :, None] == exact[:, None, :]).any(dim=1)  # (Q, k): each exact neighbour found
    return float(found.double().mean())
