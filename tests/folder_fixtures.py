"""Folders of small images written with PIL (fixed seeds) for the tests of image_folders.py and of the
dataset splits in datasets.py."""

import os

import numpy as np
from PIL import Image


def save(path, image, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **options)
    return str(path)


def noise(seed, size, mode="RGB"):
    """A random PIL image of ``size`` (width, height) in ``mode`` (RGB or L)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def class_folder(root, counts, size=(8, 8), mode="RGB", ext="png"):
    """root/<class>/<k>.<ext> for each class name -> number of images in ``counts``; returns root."""
    seed = 0
    for name, count in counts.items():
        for k in range(count):
            seed += 1
            save(os.path.join(root, name, f"{k}.{ext}"), noise(seed, size, mode))
    return str(root)
