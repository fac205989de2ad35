"""Small MNIST-format data sets for tests: gzipped IDX files with 10 learnable classes.

`write_idx_fixture(root)` writes the four files `load_dataset` reads from a root folder
(`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
`t10k-labels-idx1-ubyte.gz`, directly in `root`). Each class is a bright bar at its own place
in the image, jittered by a pixel or two and drawn over noise, so one epoch of training already
separates the classes somewhat while no two images are alike. The IDX bytes are built here from
the format's definition, independently of the reader under test.
"""

import gzip
import os
import struct

import numpy as np

N_CLASSES = 10
IMAGE_SIZE = 28
# BalancedBatchSampler batches of 10 classes x 25 items need >= 25 items per class in each split.
TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 30


def idx_bytes(array):
    """The IDX encoding of a uint8 array (N,) or (N, H, W): magic 0x0000 08 <ndim>, then the
    dimensions as big-endian uint32, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def class_images(labels, rng):
    """(N, 28, 28) uint8 images for labels (N,): class k is a 4-pixel-thick bar, horizontal for
    k < 5 and vertical for k >= 5, at offset 3 + 5 * (k % 5), moved by up to 2 pixels, over noise."""
    labels = np.asarray(labels)
    images = rng.integers(0, 60, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE)).astype(np.int64)
    jitter = rng.integers(-2, 3, size=(len(labels), 2))
    for item, (label, (shift_along, shift_across)) in enumerate(zip(labels, jitter)):
        start = 3 + 5 * (label % 5) + shift_across
        span = slice(max(2 + shift_along, 0), min(26 + shift_along, IMAGE_SIZE))
        if label < 5:
            images[item, start:start + 4, span] += 180
        else:
            images[item, span, start:start + 4] += 180
    return np.clip(images, 0, 255).astype(np.uint8)


def make_split(per_class, seed):
    """(images (N, 28, 28) uint8, labels (N,) uint8), N = 10 * per_class, classes shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(N_CLASSES), per_class)).astype(np.uint8)
    return class_images(labels, rng), labels


def write_idx_fixture(root, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, seed=0):
    """Write the train and t10k IDX files (gzipped) directly in `root` (created if needed).

    Returns {"train": (images, labels), "test": (images, labels)}, the numpy arrays written.
    """
    os.makedirs(root, exist_ok=True)
    written = {}
    for split, prefix, per_class, split_seed in (("train", "train", train_per_class, seed),
                                                 ("test", "t10k", test_per_class, seed + 1)):
        images, labels = make_split(per_class, split_seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with open(os.path.join(root, f"{prefix}-{kind}-ubyte.gz"), "wb") as file:
                file.write(gzip.compress(idx_bytes(array), compresslevel=1))
        written[split] = (images, labels)
    return written
