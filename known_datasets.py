"""The datasets known by name: MNIST, Fashion-MNIST, CIFAR-10 and ImageNet, found on disk (or downloaded
by torchvision) and read into the datasets of ``datasets.py``.

- KNOWN_DATASETS: one table (KnownDataset) from which every list of dataset names is derived
  (IDX_DATASETS, NORMALIZATION, CLASS_NAMES, TORCHVISION_CLASS_NAMES); SYSTEM_DATA_DIRS: where an
  operating system package installs the IDX files.
- read_idx: reads one IDX file (the MNIST file format, gzipped or plain) into a tensor, checking it;
  idx_file_names / find_idx_files: the split's two files in a folder.
- IDXImageDataset: a torchvision-MNIST-compatible dataset built from a folder holding the IDX files.
- load_dataset("mnist" | "fashion-mnist", root, train, ...): looks for the files in `root`, then in the
  operating system's dataset folders (SYSTEM_DATA_DIRS), then (download=True) lets torchvision
  download them into `root`; optionally returns an InMemoryDataset (canonical_dataset_name,
  dataset_search_paths: the spellings and the folders searched).
- read_cifar10 / load_cifar10, load_imagenet (at IMAGENET_SIZE), load_image_splits: the raw pixels in
  [0, 1] of any known dataset (``unnormalized``), for the autoencoder experiments.

Folders of your own images are ``image_folders.py``'s; this module imports ``datasets.py`` only.
"""

import gzip
import math
import os
import pickle
import struct
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from datasets import InMemoryDataset
from utils import check_choice



class KnownDataset(NamedTuple):
    """What the library knows of a dataset it can load by name.

    ``display``: its usual spelling; ``format``: ``"idx"`` (MNIST's four IDX files, ``load_dataset``),
    ``"cifar"`` (CIFAR's python-pickle batches, ``load_cifar10``) or ``"folder"`` (one folder of images
    per class under ``train/`` and ``val/``, ``load_imagenet``); ``files``: the folder or files it is
    read from; ``torchvision_class``: the torchvision.datasets class that downloads it (None: no
    download); ``normalization``: ``(mean, std)`` of its training pixels scaled to [0, 1] (a number
    each for grey images, one per channel for colour), the constants for transforms.Normalize;
    ``classes``: class names by class id (None: read from the files).
    """

    display: str
    format: str
    files: tuple
    torchvision_class: Optional[str]
    normalization: tuple
    classes: Optional[list]


KNOWN_DATASETS = {
    "mnist": KnownDataset("MNIST", "idx", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                          "MNIST", (0.1307, 0.3081), [str(digit) for digit in range(10)]),
    "fashion-mnist": KnownDataset("Fashion-MNIST", "idx", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                                  "FashionMNIST", (0.2860, 0.3530),
                                  ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                   "Sneaker", "Bag", "Ankle boot"]),
    "cifar10": KnownDataset("CIFAR-10", "cifar", ("cifar-10-batches-py",), "CIFAR10",
                            ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]),
    "imagenet": KnownDataset("ImageNet", "folder", ("train", "val"), None,
                             ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), None),
}

# Derived views of the table, by format and by field (the names older code and notebooks import).
IDX_DATASETS = tuple(name for name, known in KNOWN_DATASETS.items() if known.format == "idx")
NORMALIZATION = {name: KNOWN_DATASETS[name].normalization for name in IDX_DATASETS}
CLASS_NAMES = {name: known.classes for name, known in KNOWN_DATASETS.items() if known.classes is not None}
TORCHVISION_CLASS_NAMES = {name: known.torchvision_class for name, known in KNOWN_DATASETS.items()
                           if known.torchvision_class is not None}

# Folders where an operating system package installs the four IDX files (Debian's and Ubuntu's
# dataset-fashion-mnist installs the .gz files in /usr/share/datasets/fashion-mnist). load_dataset
# reads this dict at call time, so adding a folder to it is enough to have it searched.
SYSTEM_DATA_DIRS = {
    "mnist": ["/usr/share/datasets/mnist"],
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
}


# ---------------------------------------------------------------------------------------------------
# Loading MNIST-like data from IDX files

# IDX type byte -> numpy dtype; IDX stores multi-byte numbers big-endian
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path):
    """Read one IDX file (the MNIST file format), gzipped or plain, into a tensor.

    Args:
        path: str or os.PathLike of the file. Gzip is recognised by the file's content, not its name.
    Returns:
        a tensor of the shape in the file's header ((N, H, W) for images, (N,) for labels) and the
        dtype of its type byte (uint8, int8, int16, int32, float32 or float64), in native byte order.
    Raises FileNotFoundError if there is no such file, and ValueError if the file is not IDX (wrong
    magic number or type byte, no dimensions), is truncated, has bytes after the data, or is a damaged
    gzip file.
    """
    with open(path, "rb") as file:
        raw = file.read()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic; an IDX file always starts with two zero bytes
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is a damaged gzip file ({error}); download it again") from error
    if len(raw) < 4:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number; "
                         "download it again")
    type_byte, n_dims = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_byte not in _IDX_DTYPES or n_dims == 0:
        magic = int.from_bytes(raw[:4], "big")
        raise ValueError(f"{path} is not an IDX file: magic number 0x{magic:08x}, expected 0x0000TTDD with type "
                         "TT in 08, 09, 0b, 0c, 0d, 0e and DD >= 1 dimensions; check that it is an MNIST-format file")
    header_size = 4 + 4 * n_dims
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated: its header announces {n_dims} dimensions but the file ends "
                         f"after {len(raw)} bytes; download it again")
    shape = struct.unpack(f">{n_dims}I", raw[4:header_size])
    dtype = _IDX_DTYPES[type_byte]
    n_items = math.prod(shape)
    expected_bytes, data_bytes = n_items * dtype.itemsize, len(raw) - header_size
    if data_bytes < expected_bytes:
        raise ValueError(f"{path} is truncated: shape {shape} of {dtype.name} needs {expected_bytes} data bytes, "
                         f"the file has {data_bytes}; download it again")
    if data_bytes > expected_bytes:
        raise ValueError(f"{path} has {data_bytes - expected_bytes} bytes after the {expected_bytes} that shape "
                         f"{shape} of {dtype.name} needs, so its header is wrong; download it again")
    values = np.frombuffer(raw, dtype=dtype, count=n_items, offset=header_size).reshape(shape)
    # astype copies into native byte order, and the copy is writable (torch warns on read-only buffers)
    return torch.from_numpy(values.astype(dtype.newbyteorder("=")))


def idx_file_names(train, name="mnist"):
    """(images, labels) IDX file names of the train (True) or test (False) split of dataset ``name``
    (KNOWN_DATASETS; the same for MNIST and Fashion-MNIST), without '.gz'."""
    files = KNOWN_DATASETS[name].files
    return files[:2] if train else files[2:]


def find_idx_files(folder, train):
    """(images path, labels path) of the split's two IDX files in `folder`, or None if one is missing.

    Each file may be plain or end in '.gz'; when both exist the plain one is used (torchvision's
    download leaves both, and the plain one needs no decompression).
    """
    found = []
    for name in idx_file_names(train):
        path = next((p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
                     if os.path.isfile(p)), None)
        if path is None:
            return None
        found.append(path)
    return tuple(found)


class IDXImageDataset(Dataset):
    """An MNIST-like dataset read from IDX files, interchangeable with torchvision.datasets.MNIST.

    Args:
        root: folder holding the split's two IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`
            or `t10k-...` for the test split), each plain or '.gz'.
        train: True for the train files, False for the t10k (test) files.
        transform: optional callable applied to each PIL 'L' image.
        target_transform: optional callable applied to each int target.
        classes: class names, class id k being classes[k]; defaults to '0', '1', ... up to the largest label.

    Attributes as in torchvision: `.data` (N, H, W) uint8 tensor, `.targets` (N,) long tensor, `.classes`,
    `.class_to_idx`, `.train`, `.transform`, `.target_transform`, `.root`; also `.images_file` and
    `.labels_file`, the paths read. Items are (transform(PIL 'L' image), target_transform(int target)).
    Raises FileNotFoundError when a file is missing, ValueError when the files are malformed or disagree.
    """

    def __init__(self, root, train=True, transform=None, target_transform=None, classes=None):
        self.root = os.fspath(root)
        self.train = bool(train)
        self.transform = transform
        self.target_transform = target_transform
        files = find_idx_files(self.root, self.train)
        if files is None:
            wanted = " and ".join(f"{name}[.gz]" for name in idx_file_names(self.train))
            raise FileNotFoundError(f"{self.root} does not hold {wanted}; put the IDX files there or use "
                                    "load_dataset, which also searches other places and can download them")
        self.images_file, self.labels_file = files
        images, labels = read_idx(self.images_file), read_idx(self.labels_file)
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"{self.images_file} holds {images.dtype} of shape {tuple(images.shape)}, expected "
                             "uint8 images (N, H, W); check that this is an images file")
        if labels.dtype != torch.uint8 or labels.ndim != 1:
            raise ValueError(f"{self.labels_file} holds {labels.dtype} of shape {tuple(labels.shape)}, expected "
                             "uint8 labels (N,); check that this is a labels file")
        if len(images) != len(labels):
            raise ValueError(f"{self.images_file} has {len(images)} images but {self.labels_file} has "
                             f"{len(labels)} labels; the two files must come from the same split")
        self.data, self.targets = images, labels.long()
        n_classes = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = [str(k) for k in range(n_classes)] if classes is None else list(classes)
        if n_classes > len(self.classes):
            raise ValueError(f"{self.labels_file} has label {n_classes - 1} but only {len(self.classes)} class "
                             "names were given; pass one name per class id")

    @property
    def class_to_idx(self):
        return {name: k for k, name in enumerate(self.classes)}

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index].numpy())  # (H, W) uint8 -> mode 'L', as torchvision's MNIST
        target = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self):
        split = "train" if self.train else "test"
        return f"{type(self).__name__}({len(self)} {split} images from {self.root})"


def _spelling_key(name):
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def canonical_dataset_name(name):
    """'mnist' or 'fashion-mnist' for any usual spelling ('MNIST', 'fashion_mnist', 'FashionMNIST', ...).

    Raises TypeError for a non-string and ValueError, listing the valid names, for an unknown one.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string such as 'mnist' or 'fashion-mnist', got {type(name).__name__}")
    canonical = {_spelling_key(known): known for known in IDX_DATASETS}.get(_spelling_key(name))
    if canonical is None:
        raise ValueError(f"unknown dataset {name!r}; valid names are {' and '.join(map(repr, IDX_DATASETS))} "
                         "(also spelled 'MNIST', 'fashion_mnist', 'FashionMNIST')")
    return canonical


def dataset_search_paths(name, root="data"):
    """Folders load_dataset searches for `name`'s IDX files, in order (name as canonical_dataset_name gives).

    Returns [root/<torchvision class>/raw (torchvision's layout), root, root/<name>] followed by
    SYSTEM_DATA_DIRS[name].
    """
    root = os.fspath(root)
    return [os.path.join(root, TORCHVISION_CLASS_NAMES[name], "raw"), root, os.path.join(root, name),
            *SYSTEM_DATA_DIRS.get(name, [])]


def load_dataset(name, root="data", train=True, transform=None, target_transform=None, download=False,
                 in_memory=False):
    """Load MNIST or Fashion-MNIST, from local files if any, else by torchvision's download.

    Args:
        name: 'mnist' or 'fashion-mnist' ('MNIST', 'fashion_mnist', 'FashionMNIST' are accepted too).
        root: folder of the data (str or os.PathLike). Searched first, in this order:
            root/MNIST/raw or root/FashionMNIST/raw (torchvision's layout), root itself, root/<name>
            (root/mnist or root/fashion-mnist). A folder counts when it holds the split's two IDX files,
            plain or '.gz'. Then each folder of SYSTEM_DATA_DIRS[name] is searched.
        train: the train split (True) or the test split (False).
        transform: callable applied to each PIL image; None means ToTensor then Normalize with
            NORMALIZATION[name] (for raw PIL images, set `dataset.transform = None` afterwards). With
            in_memory, it is applied to each normalised (1, 28, 28) tensor instead, and None means none.
        target_transform: callable applied to each int target.
        download: when no folder holds the files, download them with torchvision.datasets.MNIST or
            FashionMNIST into root/<that class>/raw (needs internet access) and read them from there.
        in_memory: return InMemoryDataset.from_dataset(dataset, *NORMALIZATION[name]): one float tensor
            (N, 1, 28, 28), equal to what the default transform gives, with the same `.classes`.
    Returns:
        an IDXImageDataset (`.data` (N, 28, 28) uint8, `.targets` (N,) long, `.classes` from CLASS_NAMES),
        or an InMemoryDataset when in_memory.
    Raises ValueError for an unknown name or malformed files (a malformed file is reported, not skipped),
    and FileNotFoundError, naming every folder tried and how to get the data, when nothing was found.
    """
    name = canonical_dataset_name(name)
    mean, std = NORMALIZATION[name]
    searched = dataset_search_paths(name, root)
    folder = next((path for path in searched if find_idx_files(path, train) is not None), None)
    download_error = None
    if folder is None and download:
        torchvision_class = getattr(torchvision.datasets, TORCHVISION_CLASS_NAMES[name])
        try:
            torchvision_class(os.fspath(root), train=train, download=True)
            folder = searched[0]
        except (RuntimeError, OSError) as error:  # what torchvision raises when every mirror fails
            download_error = error
    if folder is None:
        message = _not_found_message(name, os.fspath(root), train, searched, download, download_error)
        raise FileNotFoundError(message) from download_error
    if in_memory:
        dataset = IDXImageDataset(folder, train, classes=CLASS_NAMES[name])
        memory = InMemoryDataset.from_dataset(dataset, mean, std)
        memory.transform, memory.target_transform = transform, target_transform
        return memory
    if transform is None:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    return IDXImageDataset(folder, train, transform, target_transform, classes=CLASS_NAMES[name])


def _not_found_message(name, root, train, searched, download, download_error):
    display = KNOWN_DATASETS[name].display
    wanted = " and ".join(f"{file}[.gz]" for file in idx_file_names(train))
    lines = [f"{display} ({'train' if train else 'test'} split) not found: looked for {wanted} in"]
    lines += [f"  {path}" for path in searched]
    download_folder = os.path.join(root, TORCHVISION_CLASS_NAMES[name], "raw")
    if download:
        lines.append(f"and downloading with torchvision.datasets.{TORCHVISION_CLASS_NAMES[name]} into "
                     f"{download_folder} failed: {str(download_error).strip()}")
    lines.append("To get the data, do one of:")
    lines.append(f"  - pass download=True with internet access (torchvision downloads into {download_folder});")
    if name == "fashion-mnist":
        lines.append("  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
                     "(installs the files in /usr/share/datasets/fashion-mnist);")
    four = ", ".join(idx_file_names(True) + idx_file_names(False))
    lines.append(f"  - put the four IDX files ({four}; each plain or .gz) in {root}.")
    return "\n".join(lines)

# ---------------------------------------------------------------------------------------------------
# Raw images in [0, 1] of the known datasets (the autoencoder experiments standardise them themselves)


def unnormalized(dataset):
    """An MNIST-like dataset (uint8 ``.data`` (N, H, W) or (N, H, W, C), ``.targets``, ``.classes``) as
    an ``InMemoryDataset`` of pixels in [0, 1], ``(N, C, H, W)``, with mean 0 and std 1 recorded."""
    return InMemoryDataset.from_dataset(dataset, mean=0.0, std=1.0)


def read_cifar10(folder, train=True):
    """The train (``data_batch_1`` .. ``5``) or test (``test_batch``) split of CIFAR-10 from ``folder``,
    the extracted python version (pickled dicts with ``data`` (N, 3072) uint8 rows, R then G then B
    planes, and ``labels``; class names from ``batches.meta`` when present).
    Returns an ``InMemoryDataset`` of images (N, 3, 32, 32) in [0, 1]."""
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    rows, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-10 file {path} is missing; the folder must hold data_batch_1 .. "
                                    "data_batch_5, test_batch and batches.meta (the python version)")
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="latin1")
        rows.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(label) for label in batch["labels"])
    classes = KNOWN_DATASETS["cifar10"].classes
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as file:
            classes = list(pickle.load(file, encoding="latin1")["label_names"])
    images = torch.from_numpy(np.concatenate(rows)).float().div_(255)
    split = InMemoryDataset(images, torch.tensor(labels, dtype=torch.long), train=train, classes=classes)
    split.mean, split.std = (0.0,) * 3, (1.0,) * 3
    return split


def load_cifar10(root="data", train=True, download=True):
    """CIFAR-10 from ``root/cifar-10-batches-py``; when that folder is missing and ``download``,
    ``torchvision.datasets.CIFAR10(root, download=True)`` fetches and extracts it there first.
    Returns an ``InMemoryDataset`` (see ``read_cifar10``). Raises FileNotFoundError saying how to get it."""
    known = KNOWN_DATASETS["cifar10"]
    folder = os.path.join(os.fspath(root), known.files[0])
    problem = ""
    if not os.path.isdir(folder) and download:
        try:
            getattr(torchvision.datasets, known.torchvision_class)(os.fspath(root), train=train, download=True)
        except (RuntimeError, OSError) as error:  # OSError covers urllib's URLError
            problem = f" Downloading it with torchvision failed: {error}."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CIFAR-10 not found: there is no {folder}.{problem} Pass download=True on a "
                                "machine with internet access, or extract the python version "
                                f"(cifar-10-python.tar.gz) into {root}.")
    return read_cifar10(folder, train)


IMAGENET_SIZE = 32  # side of ImageNet images for the convolutional, pixel and HOG paths (ResNet: 224)


def load_imagenet(root="data", train=True, image_size=IMAGENET_SIZE, batch_size=256):
    """ImageNet (or any data set in its layout) read into memory: ``root/imagenet/train`` or ``root/train``
    (``val`` for the test split), one sub-folder of images per class. Images are resized (shorter side)
    and centre-cropped to ``image_size``. Returns an ``InMemoryDataset`` (N, 3, image_size, image_size) in
    [0, 1] with the folder names as classes."""
    split = "train" if train else "val"
    candidates = [os.path.join(os.fspath(root), "imagenet", split), os.path.join(os.fspath(root), split)]
    folder = next((path for path in candidates if os.path.isdir(path)), None)
    if folder is None:
        raise FileNotFoundError(f"ImageNet {split} split not found: looked for {' and '.join(candidates)}; "
                                "put one folder of images per class under train/ and val/")
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    images = torchvision.datasets.ImageFolder(folder, transform=transform)
    data = torch.cat([batch for batch, _ in torch.utils.data.DataLoader(images, batch_size=batch_size)])
    loaded = InMemoryDataset(data, images.targets, train=train, classes=images.classes)
    loaded.mean, loaded.std = (0.0,) * 3, (1.0,) * 3
    return loaded


def load_image_splits(dataset, root="data", download=True, image_size=IMAGENET_SIZE):
    """``(train, test)`` ``InMemoryDataset`` s of raw pixels in [0, 1] of a known dataset (KNOWN_DATASETS):
    "mnist" / "fashion-mnist" (by ``load_dataset``, which also finds the system's copy, e.g.
    /usr/share/datasets/fashion-mnist), "cifar10" (``load_cifar10``) or "imagenet" (``load_imagenet`` at
    ``image_size``)."""
    check_choice(dataset, tuple(KNOWN_DATASETS), "dataset")
    known = KNOWN_DATASETS[dataset]
    if known.format == "cifar":
        return load_cifar10(root, True, download), load_cifar10(root, False, download)
    if known.format == "folder":
        return load_imagenet(root, True, image_size), load_imagenet(root, False, image_size)
    return tuple(unnormalized(load_dataset(dataset, root=root, train=train, download=download))
                 for train in (True, False))
