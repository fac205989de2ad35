"""Folders of your own images: reading, listing, normalising, splitting into the study's sets, exporting,
and the identity of a folder's data.

A folder is one sub-folder of images per class, two levels like Omniglot (group/class/image), or a CSV
file of path,label lines.

- read_image: one image file as a (channels, size, size) float tensor in [0, 1] (any PIL format, 16-bit
  grey, transparency composited on white); IMAGE_EXTENSIONS: the files counted as images.
- folder_entries / list_images (an ImageList of paths, labels, classes, groups): what a folder holds.
- folder_identity: the resolved path and a fingerprint of the listed files, labels and sizes (no image
  decoded), which tells two folders of one name, or a changed folder, apart.
- load_image_folder: the images in memory (InMemoryDataset) or, when too large, an ImageFileDataset
  that reads each file when fetched.
- channel_statistics / normalized: per-channel mean and std of the training images, and standardising by
  them (here, not in datasets.py, because they read an ImageFileDataset's files or compose its transform).
- load_folder_splits: (train, val, held_out) as the study trains on them, with the generic splits of
  datasets.py (split_per_class, held_out_class_split).
- export_image_folder: a known dataset written as such a folder of PNG files.

This module imports ``datasets.py`` (and ``known_datasets.py`` for the export); neither imports it.
"""

import csv
import hashlib
import json
import os
import re
import struct
import warnings
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from datasets import (InMemoryDataset, _as_tensor, _carry_image_attributes, _per_channel, _take,
                      held_out_class_split, split_per_class)
from known_datasets import load_dataset
from utils import check_choice, check_int


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")
DEFAULT_MAX_MEMORY_BYTES = 4 * 2 ** 30  # above this, load_image_folder streams the images from disk

# Layouts list_images accepts, quoted by its errors
_LAYOUTS = ("one sub-folder of images per class (root/<class>/<image>), two levels like Omniglot "
            "(root/<group>/<class>/<image>), or a CSV file of path,label lines")
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # more than 8 bits per pixel, one channel
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
# Errors PIL raises for files that are not images, are truncated or are corrupt
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, MemoryError,
                 Image.DecompressionBombError)
_MAX_NAMED = 5  # how many paths a warning lists


class ImageList(NamedTuple):
    """The images ``list_images`` found: ``paths`` (list of N str), ``labels`` ((N,) long class ids into
    ``classes``), ``classes`` (list of class names), ``groups`` ((N,) long ids into ``group_names``, or
    None) and ``group_names`` (list of str, or None) for the two-level layout."""
    paths: list
    labels: torch.Tensor
    classes: list
    groups: Optional[torch.Tensor] = None
    group_names: Optional[list] = None


def _cannot_read(path, error):
    return ValueError(f"cannot read image {path}: {str(error) or type(error).__name__}; "
                      "remove it or pass --skip-bad-images")


def read_image(path, image_size, channels):
    """One image file (anything PIL reads: PNG, JPEG, BMP, WebP, GIF's first frame, TIFF, PGM, ...) as a
    ``(channels, image_size, image_size)`` float32 tensor in [0, 1].

    ``channels`` 1 converts to grey ('L'), 3 to 'RGB'; images with transparency (RGBA, LA, PA, or a
    palette / colour key marked transparent) are composited on white first. 16-bit and 32-bit grey
    images ('I;16', 'I') are scaled by 1/65535, float ('F') images are clipped to [0, 1]. The image is
    resized (bilinear, antialiased) to an image_size x image_size square, which does not keep its
    aspect ratio. Raises ValueError naming ``path`` when the file cannot be read, is truncated or is
    corrupt (PIL's ImageFile.LOAD_TRUNCATED_IMAGES must stay False for truncated files to fail).
    """
    image_size = check_int(image_size, "image_size", minimum=1)
    check_choice(channels, (1, 3), "channels")
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so that truncated and corrupt files fail here
            pixels = _converted_pixels(image, image_size, channels)
    except _IMAGE_ERRORS as error:
        raise _cannot_read(path, error) from error
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _converted_pixels(image, image_size, channels):
    """(image_size, image_size, channels) float32 array in [0, 1] of a loaded PIL image."""
    size = (image_size, image_size)
    if image.mode in _HIGH_DEPTH_MODES:
        # converting to 'L' would clip 16-bit values at 255 instead of scaling them
        values = np.asarray(image, dtype=np.float32)
        values = values.clip(0, 1) if image.mode == "F" else values.clip(0, 65535) / 65535
        grey = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(grey, dtype=np.float32).clip(0, 1)[:, :, None]
        return np.repeat(pixels, channels, axis=2) if channels == 3 else np.ascontiguousarray(pixels)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)  # PIL widens the filter when shrinking
    pixels = np.asarray(image, dtype=np.float32) / 255
    return pixels[:, :, None] if channels == 1 else pixels


def _image_header(path):
    """((width, height), mode) of an image file, from its header only (PIL opens lazily)."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except _IMAGE_ERRORS as error:
        raise _cannot_read(path, error) from error


def _is_image_file(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def folder_entries(folder):
    """(sorted sub-folder names, sorted image file names) of ``folder``, hidden ones left out."""
    folders, images = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file() and _is_image_file(entry.name):
                images.append(entry.name)
    return sorted(folders), sorted(images)


def _left_out(folder):
    warnings.warn(f"{folder} holds no images; it is left out", stacklevel=4)  # list_images' caller


def _check_two_classes(classes, where):
    if len(classes) < 2:
        found = f"found 1 ({classes[0]!r})" if classes else "found none"
        raise ValueError(f"metric learning needs at least 2 classes; {found} in {where}")


def list_images(root):
    """The image files under ``root`` and their classes, as an ``ImageList``.

    ``root`` is one of:
    - a folder in torchvision's ImageFolder layout: one sub-folder per class, its images inside;
    - a folder of two levels like Omniglot's (``group/class/image``): each leaf folder is a class named
      "group/class" and the upper level is kept as ``groups`` / ``group_names``;
    - a CSV file of ``path,label`` lines (paths relative to the CSV's folder unless absolute; an
      optional header line ``path,label``; labels are class names).
    Classes are sorted by name (group, then class; CSV labels numerically when they are all integers),
    files within a class by name. Images are recognised by their extension (IMAGE_EXTENSIONS, any case);
    other files and hidden files or folders (".name") are ignored.

    Raises FileNotFoundError when ``root`` does not exist; ValueError when a folder holds no class
    sub-folders or no images, mixes images and sub-folders on one level, or yields fewer than 2 classes,
    and when a CSV line is malformed or names a missing file. Warns about each class folder (or group
    folder) that holds no images: it is left out.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{root} does not exist; pass a folder of images ({_LAYOUTS})")
    if os.path.isfile(root):
        if not root.lower().endswith(".csv"):
            raise ValueError(f"{root} is a file but not a .csv file; pass a folder or a CSV file ({_LAYOUTS})")
        return _list_csv(root)
    leaves, two_levels = _class_folders(root)
    return _leaves_listing(leaves, two_levels, root)


def _class_folders(root):
    """``(leaves, two_levels)`` of the folder ``root``: ``leaves`` lists, in sorted order, ``(group or None,
    class folder name, folder path, sorted image names)`` of each class folder; ``two_levels`` says
    whether it is the group/class layout. Raises ValueError for a folder in neither layout (see
    ``list_images``); warns about each group folder holding no class folders."""
    folders, images = folder_entries(root)
    if images and folders:
        raise ValueError(f"{root} mixes images (e.g. {images[0]}) and class folders (e.g. {folders[0]}); "
                         f"expected {_LAYOUTS}")
    if not folders:
        holds = "holds images but no class sub-folders" if images else "holds no class sub-folders"
        raise ValueError(f"{root} {holds}; expected {_LAYOUTS}")
    contents = {name: folder_entries(os.path.join(root, name)) for name in folders}
    for name, (sub_folders, sub_images) in contents.items():
        if sub_folders and sub_images:
            raise ValueError(f"{os.path.join(root, name)} mixes images and sub-folders; expected {_LAYOUTS}")
    with_images = [name for name in folders if contents[name][1]]
    with_folders = [name for name in folders if contents[name][0]]
    if with_images and with_folders:
        raise ValueError(f"{root} mixes class folders of images (e.g. {with_images[0]}) and folders of "
                         f"folders (e.g. {with_folders[0]}); expected {_LAYOUTS}")
    if not with_images and not with_folders:
        raise ValueError(f"{root} holds no images in its sub-folders; expected {_LAYOUTS}")
    if not with_folders:
        return [(None, name, os.path.join(root, name), contents[name][1]) for name in folders], False
    leaves = []
    for name in folders:
        folder = os.path.join(root, name)
        for leaf in contents[name][0]:
            leaf_folder = os.path.join(folder, leaf)
            deeper, leaf_images = folder_entries(leaf_folder)
            if deeper:
                raise ValueError(f"{leaf_folder} holds sub-folders ({deeper[0]}, ...); in the two-level layout "
                                 "every image lies two levels down (root/<group>/<class>/<image>)")
            leaves.append((name, leaf, leaf_folder, leaf_images))
        if not contents[name][0]:
            _left_out(folder)
    return leaves, True


def _leaves_listing(leaves, two_levels, root):
    """The ``ImageList`` of ``_class_folders``' leaves; warns about (and leaves out) each class folder
    holding no images, and raises ValueError when fewer than 2 classes remain."""
    paths, labels, groups, classes, group_names = [], [], [], [], []
    for group, name, folder, names in leaves:
        if not names:
            _left_out(folder)
            continue
        if group is not None and (not group_names or group_names[-1] != group):
            group_names.append(group)
        classes.append(name if group is None else f"{group}/{name}")
        paths.extend(os.path.join(folder, file) for file in names)
        labels.extend([len(classes) - 1] * len(names))
        groups.extend([len(group_names) - 1] * len(names))
    _check_two_classes(classes, root)
    labels = torch.tensor(labels, dtype=torch.long)
    if not two_levels:
        return ImageList(paths, labels, classes)
    return ImageList(paths, labels, classes, torch.tensor(groups, dtype=torch.long), group_names)


def _list_csv(csv_path):
    folder = os.path.dirname(csv_path)
    paths, names = [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        for row in reader:
            line = reader.line_num
            fields = [field.strip() for field in row]
            if not fields or fields == [""]:
                continue  # blank line
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise ValueError(f"{csv_path} line {line}: expected 'path,label', got {','.join(row)!r}")
            if not paths and [field.lower() for field in fields] == ["path", "label"]:
                continue  # header
            path = os.path.normpath(os.path.join(folder, fields[0]))  # an absolute path stays as it is
            if not os.path.isfile(path):
                raise ValueError(f"{csv_path} line {line}: image file {path} does not exist; fix the path "
                                 "(relative paths start from the CSV's folder) or remove the line")
            paths.append(path)
            names.append(fields[1])
    if not paths:
        raise ValueError(f"{csv_path} lists no images; expected path,label lines")
    numeric = all(re.fullmatch(r"[+-]?\d+", name) for name in names)
    classes = sorted(set(names), key=(lambda name: (int(name), name)) if numeric else None)
    _check_two_classes(classes, csv_path)
    index = {name: k for k, name in enumerate(classes)}
    return ImageList(paths, torch.tensor([index[name] for name in names], dtype=torch.long), classes)


def folder_identity(path):
    """The identity of the data under ``path`` (any layout ``list_images`` accepts), from its listing alone:
    no image is decoded, so it takes about as long as listing the files (a stat per file).

    Returns ``{"path": os.path.realpath(path), "fingerprint": sha256 hex digest, "images": N, "classes": K}``.
    The fingerprint hashes the sorted list of ``(relative path, class name, file size in bytes)`` of every
    listed image, paths relative to the folder (to a CSV file's folder for a CSV, "/"-separated): a copy of
    the folder elsewhere has the same fingerprint under another ``path``, while adding, removing,
    relabelling (moving to another class) or rewriting an image to another size changes it. A file
    rewritten with the same size and new content keeps it (that would need reading every byte).

    ``list_images`` has no options that change which files are listed; the choices made after listing
    (held-out classes, validation fraction, seed, image size, skipping unreadable files, which is known only
    by decoding) belong to a run's settings, recorded beside this identity. Raises as ``list_images`` does;
    its warnings about empty folders are left to loading the folder.
    """
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        listing = list_images(path)
    base = (os.path.dirname(path) or os.curdir) if os.path.isfile(path) else path
    prefix = os.path.join(base, "")  # a folder's files all start with it: cheaper than relpath
    entries = []
    for file, label in zip(listing.paths, listing.labels.tolist()):
        relative = file[len(prefix):] if file.startswith(prefix) else os.path.relpath(file, base)
        entries.append((relative.replace(os.sep, "/"), listing.classes[label], os.path.getsize(file)))
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"path": os.path.realpath(path), "fingerprint": digest, "images": len(entries),
            "classes": len(listing.classes)}


def _drop_images(listing, bad, where):
    """``listing`` without the paths in ``bad``, its classes and groups renumbered; warns about each class
    left with no image (it is left out) and raises ValueError if fewer than 2 classes remain."""
    if not bad:
        return listing
    keep = [k for k, path in enumerate(listing.paths) if path not in bad]
    labels = listing.labels[keep]
    present = torch.zeros(len(listing.classes), dtype=torch.bool)
    present[labels] = True
    for class_id in (~present).nonzero().flatten().tolist():
        first = next(path for path, label in zip(listing.paths, listing.labels.tolist()) if label == class_id)
        warnings.warn(f"{os.path.dirname(first)} (class {listing.classes[class_id]!r}) holds no readable "
                      "images; it is left out", stacklevel=3)
    classes = [name for name, kept in zip(listing.classes, present.tolist()) if kept]
    _check_two_classes(classes, where)
    labels = (present.long().cumsum(0) - 1)[labels]
    groups, group_names = None, None
    if listing.groups is not None:
        kept_groups, groups = torch.unique(listing.groups[keep], return_inverse=True)
        group_names = [listing.group_names[g] for g in kept_groups.tolist()]
    return ImageList([listing.paths[k] for k in keep], labels, classes, groups, group_names)


def load_image_folder(root, image_size=None, channels=None, skip_bad_images=False, progress=True,
                      max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES):
    """The images under ``root`` (any layout ``list_images`` accepts) as a dataset of pixels in [0, 1],
    not normalised yet (see ``channel_statistics`` and ``normalized``).

    Args:
        root: a folder of class folders, a two-level group/class folder, or a CSV file of path,label lines.
        image_size: side of the square every image is resized to; None takes the images' common size,
            which needs every image square and of one size (ValueError asking for image_size otherwise).
        channels: 1 (grey) or 3 (RGB); None gives 3 when any image is in colour (PIL mode RGB, RGBA,
            P, CMYK, YCbCr, ...; palettes count as colour), else 1.
        skip_bad_images: leave out files that cannot be read (warning once with their count and the
            first few paths, listed in ``.skipped``) instead of raising ValueError naming the first one.
        progress: show tqdm progress bars while the images are read.
        max_memory_bytes: when the decoded float32 images would take more than this, an
            ``ImageFileDataset`` that reads each image from disk when it is fetched is returned instead.
    Returns an ``InMemoryDataset`` with data (N, channels, image_size, image_size) in [0, 1] (recorded
    mean 0, std 1) or an ``ImageFileDataset``; either has ``.targets`` (N,) long, ``.classes``,
    ``.paths`` (N str), ``.groups`` (N,) long and ``.group_names`` (None for one-level layouts),
    ``.image_size``, ``.channels`` and ``.skipped`` (the paths left out). Classes whose images were all
    left out are dropped with a warning. The streaming path checks every file's header when it
    reads sizes and modes, and decodes every file once when ``skip_bad_images`` is set.
    """
    listing = list_images(root)
    root = os.fspath(root)
    if image_size is not None:
        image_size = check_int(image_size, "image_size", minimum=1)
    if channels is not None:
        check_choice(channels, (1, 3), "channels")
    max_memory_bytes = check_int(max_memory_bytes, "max_memory_bytes", minimum=0)
    bad = _BadImages(skip_bad_images)
    headers = {}
    if image_size is None or channels is None:
        bar = tqdm(listing.paths, desc="Reading image sizes", disable=not progress, leave=False)
        headers = {path: header for path in bar if (header := bad.read(_image_header, path)) is not None}
        listing = _drop_images(listing, set(bad.paths), root)
    image_size, channels = _common_geometry(headers, image_size, channels, root)
    if len(listing.paths) * channels * image_size * image_size * 4 > max_memory_bytes:
        _check_files(listing.paths, image_size, channels, bad, bool(headers), progress)
        listing = _drop_images(listing, set(bad.paths), root)
        dataset = ImageFileDataset(listing.paths, listing.labels, image_size, channels, listing.classes)
    else:
        data = _read_images(listing.paths, image_size, channels, bad, progress)
        listing = _drop_images(listing, set(bad.paths), root)
        dataset = InMemoryDataset(data, listing.labels, classes=listing.classes)
        dataset.mean, dataset.std = (0.0,) * channels, (1.0,) * channels
        dataset.paths, dataset.image_size, dataset.channels = listing.paths, image_size, channels
    dataset.groups, dataset.group_names, dataset.skipped = listing.groups, listing.group_names, bad.paths
    if bad.paths:
        named = ", ".join(bad.paths[:_MAX_NAMED]) + (", ..." if len(bad.paths) > _MAX_NAMED else "")
        warnings.warn(f"skipped {len(bad.paths)} unreadable image file(s) of {root}: {named}", stacklevel=2)
    return dataset


class _BadImages:
    """The files of one ``load_image_folder`` call that could not be read, when it skips them (``skip``);
    without ``skip`` a file that cannot be read raises its ValueError."""

    def __init__(self, skip):
        self.skip, self.paths = skip, []

    def read(self, read, path):
        """``read(path)``, or None (the path recorded) when it raises ValueError and bad files are skipped."""
        try:
            return read(path)
        except ValueError:
            if not self.skip:
                raise
            self.paths.append(path)
            return None


def _common_geometry(headers, image_size, channels, root):
    """``(image_size, channels)``, each as given or, when None, inferred from ``headers`` (path ->
    ((width, height), PIL mode)): the images' common square side, and 3 when any image is in colour."""
    if image_size is None:
        sizes = {size for size, _ in headers.values()}
        if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            examples = {}
            for path, (size, _) in headers.items():
                examples.setdefault(size, path)
            shown = ", ".join(f"{path} is {w}x{h}" for (w, h), path in list(examples.items())[:3])
            raise ValueError(f"the images in {root} are not all square and of one size ({shown}); pass "
                             "image_size (--image-size) to resize them all to one square size")
        image_size = next(iter(sizes))[0]
    if channels is None:
        channels = 3 if any(mode in _COLOUR_MODES for _, mode in headers.values()) else 1
    return image_size, channels


def _check_files(paths, image_size, channels, bad, headers_read, progress):
    """Before streaming ``paths`` from disk: decode each file once when bad files are skipped (``bad``
    records them), else read each header unless ``headers_read`` (raising ValueError for the first bad one)."""
    if bad.skip:
        for path in tqdm(paths, desc="Checking images", disable=not progress, leave=False):
            bad.read(lambda p: read_image(p, image_size, channels), path)
    elif not headers_read:
        for path in tqdm(paths, desc="Checking image headers", disable=not progress, leave=False):
            _image_header(path)


def _read_images(paths, image_size, channels, bad, progress):
    """The readable images of ``paths`` in order, ``(K, channels, image_size, image_size)`` (``bad``
    records the others)."""
    data = torch.empty(len(paths), channels, image_size, image_size)
    n_good = 0
    for path in tqdm(paths, desc="Reading images", disable=not progress, leave=False):
        image = bad.read(lambda p: read_image(p, image_size, channels), path)
        if image is not None:
            data[n_good] = image
            n_good += 1
    return data if n_good == len(data) else data[:n_good].clone()  # frees the skipped rows' room


class ImageFileDataset(Dataset):
    """Images read from their files when fetched, for data sets too large to hold in memory.

    Args:
        paths: N image file paths.
        labels: (N,) integer class ids into ``classes``.
        image_size, channels: every image is read as (channels, image_size, image_size) by ``read_image``.
        classes: class names.
        transform: optional callable applied to each (C, H, W) image tensor.
    Items are (image (C, H, W) float tensor, target int); the dataset pickles, so DataLoader workers
    can read it. Attributes as ``load_image_folder``'s in-memory result: ``.targets``, ``.classes``,
    ``.paths``, ``.groups``, ``.group_names``, ``.image_size``, ``.channels``, ``.mean``, ``.std``.
    """

    def __init__(self, paths, labels, image_size, channels, classes, transform=None):
        self.paths = [os.fspath(path) for path in paths]
        self.targets = _as_tensor(labels).long()
        if self.targets.shape != (len(self.paths),):
            raise ValueError(f"labels must hold one class id per path ({len(self.paths)}), got shape "
                             f"{tuple(self.targets.shape)}")
        self.image_size = check_int(image_size, "image_size", minimum=1)
        self.channels = check_choice(channels, (1, 3), "channels")
        self.classes = list(classes)
        self.transform = transform
        self.train = True
        self.groups, self.group_names, self.skipped = None, None, []
        self.mean, self.std = (0.0,) * channels, (1.0,) * channels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = read_image(self.paths[index], self.image_size, self.channels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def subset(self, index):
        """The items at ``index`` (a (K,) index or bool tensor, or a slice) as a new ImageFileDataset with
        the same transform, classes and attributes."""
        subset = ImageFileDataset(_take(self.paths, index), self.targets[index], self.image_size, self.channels,
                                  self.classes, transform=self.transform)
        subset.train, subset.mean, subset.std = self.train, self.mean, self.std
        _carry_image_attributes(self, subset, index)
        return subset


def channel_statistics(dataset, max_images=2000, seed=0, progress=False):
    """Per-channel ``(mean tuple, std tuple)`` of a dataset's pixels, as stored (transforms not applied).

    Takes an ``InMemoryDataset`` (all of its data, summed in float64) or an ``ImageFileDataset`` (a
    sample of at most ``max_images`` images drawn with ``seed``, read from disk with a tqdm bar when
    ``progress``). The std is the population one (no correction), as ``InMemoryDataset.from_dataset``.
    """
    if isinstance(dataset, ImageFileDataset):
        max_images = check_int(max_images, "max_images", minimum=1)
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(dataset), generator=generator)[:max_images].sort().values.tolist()
        bar = tqdm(index, desc="Image statistics", disable=not progress, leave=False)
        chunks = (read_image(dataset.paths[k], dataset.image_size, dataset.channels).unsqueeze(0) for k in bar)
    elif isinstance(dataset, InMemoryDataset):
        chunks = dataset.data.split(256)  # bounds the float64 copy
    else:
        raise TypeError(f"dataset must be an InMemoryDataset or an ImageFileDataset, got {type(dataset).__name__}")
    total = squares = None
    count = 0
    for chunk in chunks:
        chunk = chunk.double()
        total = chunk.sum((0, 2, 3)) + (0 if total is None else total)
        squares = chunk.square().sum((0, 2, 3)) + (0 if squares is None else squares)
        count += chunk.numel() // chunk.shape[1]
    if count == 0:
        raise ValueError("dataset is empty; channel statistics need at least one image")
    mean = total / count
    std = (squares / count - mean.square()).clamp_(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def normalized(dataset, mean, std):
    """The dataset with every channel standardised, (x - mean) / std; ``mean`` and ``std`` are numbers or
    one per channel (e.g. ``channel_statistics`` of the training images).

    An ``InMemoryDataset`` comes back as a new one holding the normalised data; an ``ImageFileDataset``
    as a new one whose transform normalises each image (before its own transform). Either records
    ``.mean`` and ``.std`` (tuples) and keeps the other attributes. Raises ValueError when a std is not
    positive (a constant channel) or when the dataset is already normalised.
    """
    if not isinstance(dataset, (InMemoryDataset, ImageFileDataset)):
        raise TypeError(f"dataset must be an InMemoryDataset or an ImageFileDataset, got {type(dataset).__name__}")
    n_channels = dataset.data.shape[1] if isinstance(dataset, InMemoryDataset) else dataset.channels
    recorded = (getattr(dataset, "mean", None), getattr(dataset, "std", None))
    if recorded != (None, None) and (any(recorded[0]) or any(s != 1 for s in recorded[1])):
        raise ValueError(f"dataset is already normalised (mean {recorded[0]}, std {recorded[1]}); normalise the "
                         "raw images of load_image_folder instead")
    mean, std = _per_channel(mean, n_channels, "mean"), _per_channel(std, n_channels, "std")
    if not (std > 0).all():
        channel = int((~(std > 0)).nonzero()[0])
        raise ValueError(f"std must be positive in every channel, got {std.tolist()}: channel {channel} has the "
                         "same value in every image, so it cannot be standardised")
    if isinstance(dataset, ImageFileDataset):
        result = dataset.subset(slice(None))
        normalize = transforms.Normalize(mean.tolist(), std.tolist())
        result.transform = normalize if dataset.transform is None else transforms.Compose([normalize,
                                                                                           dataset.transform])
    else:
        data = (dataset.data - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        result = InMemoryDataset(data, dataset.targets, train=dataset.train, transform=dataset.transform,
                                 target_transform=dataset.target_transform, classes=dataset.classes)
        _carry_image_attributes(dataset, result, slice(None))
    result.mean, result.std = tuple(mean.tolist()), tuple(std.tolist())
    return result


def export_image_folder(dataset, folder, root="data", download=False, progress=True):
    """Write a known MNIST-like dataset (``"mnist"``, ``"fashion-mnist"``) as a folder of PNG files, one
    sub-folder per class (``folder/<class>/train-00000.png``, ``test-00000.png``, ...: both splits), the
    layout ``load_image_folder`` reads; e.g. to check that training from a folder matches the built-in
    path. Class names with a ``/`` have it replaced by ``-``. Returns the number of files written."""
    written = 0
    for train in (True, False):
        split = load_dataset(dataset, root=root, train=train, download=download)
        images = torch.as_tensor(np.asarray(split.data))
        class_folders = [os.path.join(folder, name.replace("/", "-")) for name in split.classes]
        for class_folder in class_folders:
            os.makedirs(class_folder, exist_ok=True)
        prefix = "train" if train else "test"
        for index in tqdm(range(len(images)), desc=f"writing {prefix} images", disable=not progress):
            Image.fromarray(images[index].numpy()).save(
                os.path.join(class_folders[int(split.targets[index])], f"{prefix}-{index:05d}.png"))
        written += len(images)
    return written


def load_folder_splits(root, image_size=None, channels=None, held_out_classes=None, val_fraction=0.1, seed=0,
                       skip_bad_images=False, progress=True, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES):
    """A folder of your own images (see ``load_image_folder``) as the splits the study trains on:
    ``(train, val, held_out)``.

    ``held_out_classes`` (see ``held_out_class_split``; None: none) are set aside whole, as unseen classes
    (``held_out`` is None without them); of the other classes' images, ``val_fraction`` of each class goes
    to ``val`` (``split_per_class``). All three are normalised with the per-channel mean and std of the
    ``train`` images (``channel_statistics``), recorded as their ``.mean`` and ``.std``. Seeded by ``seed``.
    Folders whose images would take more than ``max_memory_bytes`` are read from disk as they are drawn.
    """
    images = load_image_folder(root, image_size, channels, skip_bad_images=skip_bad_images, progress=progress,
                               max_memory_bytes=max_memory_bytes)
    held_out = None
    if held_out_classes is not None:
        images, held_out, _ = held_out_class_split(images, held_out_classes, seed)
    train, val = split_per_class(images, val_fraction, seed)
    mean, std = channel_statistics(train, seed=seed, progress=progress)
    return tuple(None if part is None else normalized(part, mean, std) for part in (train, val, held_out))

