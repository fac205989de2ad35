"""The gallery file: a folder of images embedded by a model file, written, read and checked to belong to
that model (``search.py index`` writes it; query, classify, evaluate, calibrate and serve read it).

- ``index_folder``: embeds every image of a folder (class sub-folders, a two-level group/class folder, a
  CSV of ``path,label`` lines, or a flat folder of unlabelled images) into a gallery file (.npz);
- ``load_gallery``: reads and checks a gallery file; ``model_and_gallery``: a model file and its gallery,
  refused when another model indexed it;
- ``embed_files``: image files embedded as the model file prescribes, a batch at a time.

The gallery file is a numpy .npz (read with allow_pickle=False) holding ``format`` ("siamese-triplet-gallery"),
``embeddings`` (N, D) float32, ``paths`` (N,) str (the image paths as listed from the folder given to index),
``labels`` (N,) int64 (ids into ``class_names``, -1 for unlabelled images), ``class_names`` (C,) str
(empty for an unlabelled folder), ``fingerprint`` (the model's weight fingerprint) and ``embedding_dim``.
Other keys (written by later steps such as calibration) are kept as they are by ``load_gallery``.
"""

import os
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from image_folders import IMAGE_EXTENSIONS, folder_entries, list_images, read_image
from model_file import embed_images, load_model
from utils import atomic_write, check_int

GALLERY_FORMAT = "siamese-triplet-gallery"
GALLERY_KEYS = ("format", "embeddings", "paths", "labels", "class_names", "fingerprint", "embedding_dim")
UNLABELLED = -1


def check_image_files(paths, what="image"):
    """``paths`` as a list of str, each checked to be a file; ValueError when empty, FileNotFoundError naming
    the first missing one (``what`` names the files in the messages)."""
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise ValueError(f"no {what} given; pass at least one image file")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file {path} does not exist; check the path")
    return paths


def embed_files(model, info, paths, batch_size=256, progress=False, skip_bad_images=False, desc="Embedding"):
    """Embeddings of image files as the model file prescribes (its image size, channels, normalisation).

    Decodes batch_size images at a time, embeds them and appends float32 rows to a preallocated array, so
    memory is one batch of pixels plus the (N, D) result. Returns (embeddings (M, D) float32 numpy array,
    kept (M,) positions into paths): M < N only with skip_bad_images, which leaves out (with one warning)
    the files read_image cannot read instead of raising its ValueError naming the file.
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    image_size, channels = info["image_size"], info["channels"]
    embeddings, kept, skipped = None, [], []
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(paths), batch_size):
            images, positions = [], []
            for position in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(read_image(paths[position], image_size, channels))
                except ValueError:
                    if not skip_bad_images:
                        raise
                    skipped.append(paths[position])
                    continue
                positions.append(position)
            bar.update(min(start + batch_size, len(paths)) - start)
            if not images:
                continue
            batch = embed_images(model, torch.stack(images), batch_size=batch_size,
                                 normalization=info["normalization"], invert=info["invert"]).float().cpu().numpy()
            if embeddings is None:  # the width is known from the first batch (a model file may not record it)
                embeddings = np.empty((len(paths), batch.shape[1]), dtype=np.float32)
            embeddings[len(kept):len(kept) + len(batch)] = batch
            kept.extend(positions)
    finally:
        bar.close()
    if skipped:
        named = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s): {named}", stacklevel=3)
    if not kept:
        raise ValueError(f"none of the {len(paths)} image files could be read; check the files")
    return embeddings[:len(kept)], np.asarray(kept, dtype=np.int64)


def load_model_file(model_path):
    """(model, info) of a model file (``model_file.load_model``) that records the image size and channels its
    images are read at; ValueError otherwise."""
    model, info = load_model(model_path)
    if info["image_size"] is None or info["channels"] is None:
        raise ValueError(f"{model_path} records no image size or channels; save it again with save_model")
    return model, info


# ---------------------------------------------------------------- the gallery file

def list_folder(folder):
    """(paths, labels (N,) int64, class names) of a folder or CSV: list_images' layouts, or a flat folder of
    images without class sub-folders (unlabelled: every label -1, no class names)."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{folder} does not exist; pass a folder of images or a CSV of path,label lines")
    if os.path.isdir(folder):
        sub_folders, images = folder_entries(folder)
        if not sub_folders:
            if not images:
                raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no class "
                                 "sub-folders; pass a folder of images")
            return [os.path.join(folder, name) for name in images], np.full(len(images), UNLABELLED), []
    listing = list_images(folder)
    return listing.paths, listing.labels.numpy(), list(listing.classes)


def index_folder(model_path, folder, out, batch_size=256, progress=True, skip_bad_images=False):
    """Embed every image of ``folder`` with the model file ``model_path`` and write the gallery file ``out``.

    ``folder`` is a folder of class sub-folders (or group/class folders, or a CSV of ``path,label`` lines:
    see ``image_folders.list_images``), whose class names become the gallery's labels, or a flat folder of images
    (unlabelled, label -1). Images are decoded and embedded batch_size at a time (memory: one batch plus the
    (N, D) float32 embeddings), with a progress bar unless progress=False. skip_bad_images leaves unreadable
    files out with a warning instead of raising ValueError naming the first one. The file (see the module
    docstring for its keys) is written to a temporary file and renamed, so an interrupted run leaves none.
    Returns ``out``.
    """
    model, info = load_model_file(model_path)
    paths, labels, class_names = list_folder(folder)
    embeddings, kept = embed_files(model, info, paths, batch_size, progress, skip_bad_images, desc="Indexing")
    out = os.fspath(out)
    arrays = {
        "format": np.array(GALLERY_FORMAT),
        "embeddings": embeddings,
        "paths": np.array([paths[k] for k in kept], dtype=str),
        "labels": np.asarray(labels, dtype=np.int64)[kept],
        "class_names": np.array([str(name) for name in class_names], dtype=str),
        "fingerprint": np.array(info["fingerprint"]),
        "embedding_dim": np.array(embeddings.shape[1], dtype=np.int64),
    }
    with atomic_write(out) as file:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(file, **arrays)
    return out


def load_gallery(gallery_path):
    """Read a gallery file written by ``index_folder``: a dict of its arrays (see the module docstring), with
    ``fingerprint`` as a str and ``embedding_dim`` as an int. Raises FileNotFoundError naming a missing file
    and ValueError naming a file that is not a (complete, consistent) gallery file."""
    gallery_path = os.fspath(gallery_path)
    if not os.path.isfile(gallery_path):
        raise FileNotFoundError(f"no gallery file at {gallery_path}; write one with "
                                "`python search.py index MODEL FOLDER --out GALLERY`")
    not_a_gallery = f"{gallery_path} is not a gallery file written by `search.py index`"
    try:
        with np.load(gallery_path, allow_pickle=False) as file:
            gallery = {key: file[key] for key in file.files}
    except Exception as error:  # numpy raises several kinds for a file that is not an .npz
        raise ValueError(f"{not_a_gallery} ({type(error).__name__}: {str(error)[:200]})") from None
    missing = [key for key in GALLERY_KEYS if key not in gallery]
    if missing or str(gallery["format"]) != GALLERY_FORMAT:
        raise ValueError(f"{not_a_gallery} (keys {missing or ['format']} are missing or wrong); run index again")
    embeddings, labels = gallery["embeddings"], gallery["labels"]
    n_items = len(embeddings)
    if embeddings.ndim != 2 or embeddings.dtype != np.float32 or len(gallery["paths"]) != n_items \
            or labels.shape != (n_items,) or labels.min(initial=UNLABELLED) < UNLABELLED \
            or labels.max(initial=UNLABELLED) >= len(gallery["class_names"]):
        raise ValueError(f"{not_a_gallery} (its embeddings, paths, labels and class names do not agree); "
                         "run index again")
    gallery["fingerprint"] = str(gallery["fingerprint"])
    gallery["embedding_dim"] = int(gallery["embedding_dim"])
    return gallery


def model_and_gallery(model_path, gallery_path):
    """(model, info, gallery), checked to belong together."""
    model, info = load_model_file(model_path)
    gallery = load_gallery(gallery_path)
    model_dim = info["embedding_dim"]
    if model_dim is not None and gallery["embedding_dim"] != model_dim:
        raise ValueError(f"{gallery_path} holds {gallery['embedding_dim']}-dimensional embeddings but {model_path} "
                         f"embeds into {model_dim} dimensions: the gallery was indexed by another model; re-run "
                         f"`python search.py index {model_path} FOLDER --out {gallery_path}` with this model")
    if gallery["fingerprint"] != info["fingerprint"]:
        raise ValueError(f"{gallery_path} was indexed by another model (its fingerprint "
                         f"{gallery['fingerprint'][:12]}... differs from {model_path}'s "
                         f"{info['fingerprint'][:12]}...); "
                         f"re-run `python search.py index {model_path} FOLDER --out {gallery_path}` with this model")
    return model, info, gallery


def label_name(gallery, label):
    """The class name of label id ``label`` in ``gallery``, or None for an unlabelled item."""
    return None if label == UNLABELLED else str(gallery["class_names"][label])


def neighbour_items(gallery, distances, indices):
    """The gallery items found for Q queries: takes distances (Q, k) and indices (Q, k) into ``gallery``
    (tensors or arrays, as ``search.nearest_neighbours`` returns them). Returns Q lists of k dicts
    ``{"index": position in the gallery, "path": its image path, "label": class name or None when unlabelled,
    "distance": float}``, in the order given."""
    return [[{"index": index, "path": str(gallery["paths"][index]),
              "label": label_name(gallery, int(gallery["labels"][index])), "distance": distance}
             for distance, index in zip(row_distances, row_indices)]
            for row_distances, row_indices in zip(np.asarray(distances).tolist(), np.asarray(indices).tolist())]
