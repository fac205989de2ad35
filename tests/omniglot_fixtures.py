"""Small Omniglot-format data for tests, written with PIL and zipfile from the formats' definitions.

- `write_alphabets(root, ...)`: Lake et al.'s layout `Alphabet/characterNN/<id>_<drawer>.png` (1-bit PNG,
  black ink on white) under `root/<top>/`; `zip_folder` packs a folder into a .zip.
- `write_runs(root, ...)`: the one-shot classification benchmark layout, `runNN/training/classZZ.png`,
  `runNN/test/itemYY.png` and `runNN/class_labels.txt`.
Every character gets a distinct ink pattern (a filled block whose place encodes the character), and every
drawer one extra ink pixel, so a test can predict each pixel the reader must return.
"""

import os
import zipfile

import numpy as np
from PIL import Image

ALPHABETS = {"Alpha": 3, "Beta": 2}  # alphabet -> number of characters
DRAWERS = 4
SIZE = 21  # small images keep the tests fast; the readers accept any size


def ink_mask(character_code, drawer, size=SIZE):
    """(size, size) bool ink mask: a 5 x 5 block at a place given by character_code (on a grid of
    places 3 pixels apart), and one pixel in the last row per drawer."""
    mask = np.zeros((size, size), dtype=bool)
    per_row = (size - 7) // 3 + 1  # blocks stay clear of the last row
    row, col = 1 + 3 * (character_code // per_row), 1 + 3 * (character_code % per_row)
    if row + 5 > size - 1:
        raise ValueError(f"character code {character_code} does not fit a {size} x {size} image")
    mask[row:row + 5, col:col + 5] = True
    mask[size - 1, drawer] = True
    return mask


def write_png(path, mask):
    """A 1-bit PNG like Omniglot's: white (1) background, black (0) ink where mask is True."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(~mask).convert("1").save(path)


def write_alphabets(root, top="images_background_small1", alphabets=ALPHABETS, drawers=DRAWERS, size=SIZE):
    """Write the alphabets under root/top (top may be '' or nested 'a/b'); returns the expected records
    [(relative path, alphabet, character number, drawer, ink mask)] in the reader's order."""
    records = []
    code = 0
    for alphabet in sorted(alphabets):
        for character in range(1, alphabets[alphabet] + 1):
            for drawer in range(1, drawers + 1):
                mask = ink_mask(code, drawer, size)
                relative = f"{alphabet}/character{character:02d}/{code + 100:04d}_{drawer:02d}.png"
                write_png(os.path.join(root, top, relative), mask)
                records.append((relative, alphabet, character, drawer, mask))
            code += 1
    return records


def zip_folder(folder, zip_path, add_directory_entries=True):
    """Pack folder's content into zip_path with paths relative to folder (and directory entries, as
    the Omniglot zips have)."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for current, subfolders, files in sorted(os.walk(folder)):
            subfolders.sort()
            relative = os.path.relpath(current, folder).replace(os.sep, "/")
            if add_directory_entries and relative != ".":
                archive.writestr(relative + "/", b"")
            for name in sorted(files):
                archive.write(os.path.join(current, name), (name if relative == "." else f"{relative}/{name}"))
    return zip_path


def write_runs(root, n_runs=2, n_classes=20, seed=0, size=SIZE):
    """Write n_runs runs of n_classes-way one-shot classification under root (the folder holding the runs).

    Test item y of a run shows the same character as training class answer[y], drawn by another drawer;
    class_labels.txt lists the items in a shuffled order. Returns {run name: answers (list of 0-based
    training positions, in item order)}.
    """
    rng = np.random.default_rng(seed)
    answers = {}
    for run in range(1, n_runs + 1):
        name = f"run{run:02d}"
        codes = rng.permutation(25)[:n_classes] if n_classes <= 25 else np.arange(n_classes)
        answer = rng.permutation(n_classes)
        for position, code in enumerate(codes):
            write_png(os.path.join(root, name, "training", f"class{position + 1:02d}.png"), ink_mask(code % 25, 1, size))
        lines = []
        for item, position in enumerate(answer):
            write_png(os.path.join(root, name, "test", f"item{item + 1:02d}.png"), ink_mask(codes[position] % 25, 2, size))
            lines.append(f"{name}/test/item{item + 1:02d}.png {name}/training/class{position + 1:02d}.png")
        order = rng.permutation(len(lines))
        with open(os.path.join(root, name, "class_labels.txt"), "w") as file:
            file.write("\n".join(lines[k] for k in order) + "\n")
        answers[name] = answer.tolist()
    return answers
