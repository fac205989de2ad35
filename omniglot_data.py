"""Reading Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015): 1623 handwritten characters of 50 alphabets,
each drawn once by 20 people, as 105 x 105 1-bit PNG files ``Alphabet/characterNN/<id>_<drawer>.png`` in .zip
files or folders. This module owns ``OmniglotAlphabets`` (the characters of chosen alphabets as an
``InMemoryDataset``, one class per character, with each image's alphabet and drawer; resized, turned, mirrored
and augmented with ``datasets.BatchRandomAffine``) and ``OneShotRuns`` (Lake's one-shot classification
benchmark, run01 .. run20, 20-way 1-shot each), scored by ``one_shot_run_errors``. The Omniglot study (its
recipe, training, evaluation, command line) is ``omniglot.py``, which also exports these names.
"""

import io
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from datasets import BatchRandomAffine, InMemoryDataset
from distances import squared_distances
from utils import check_flag, check_int



OMNIGLOT_IMAGE_SIZE = 105


class _FileTree:
    """Read-only view of a folder or a .zip file: `names` (relative paths with '/' separators, files only,
    sorted) and `read(name) -> bytes`. A zip is read in place, never extracted. Use as a context manager."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self._zip = None
        if os.path.isdir(self.root):
            names = []
            for folder, subfolders, files in os.walk(self.root):
                subfolders.sort()
                relative = os.path.relpath(folder, self.root)
                prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
                names += [prefix + name for name in files]
        elif os.path.isfile(self.root):
            if not zipfile.is_zipfile(self.root):
                raise ValueError(f"{self.root} is neither a folder nor a .zip file")
            self._zip = zipfile.ZipFile(self.root)
            names = [info.filename for info in self._zip.infolist() if not info.is_dir()]
        else:
            raise FileNotFoundError(f"{self.root} does not exist: pass a folder or a .zip file")
        # macOS archives carry __MACOSX/ copies and ._ resource files that are not images
        self.names = sorted(name for name in names
                            if not name.startswith("__MACOSX/") and not name.rsplit("/", 1)[-1].startswith("."))

    def read(self, name):
        if self._zip is not None:
            return self._zip.read(name)
        with open(os.path.join(self.root, *name.split("/")), "rb") as file:
            return file.read()

    def close(self):
        if self._zip is not None:
            self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _decode_images(tree, names, image_size, invert, what):
    """(N, 1, S, S) float tensor in [0, 1] of the PNG files `names` of `tree`: ink 1 on 0 when `invert`
    (the raw files draw black ink on white), resized to image_size (antialiased) when given."""
    arrays = []
    for name in names:
        with Image.open(io.BytesIO(tree.read(name))) as image:
            arrays.append(np.array(image.convert("L"), dtype=np.uint8))  # a writable copy for torch
    sizes = sorted({array.shape for array in arrays})
    if len(sizes) > 1 and image_size is None:
        raise ValueError(f"{what} holds images of several sizes {sizes}; pass image_size= to resize them all")
    if image_size is None:
        image_size = sizes[0][0] if sizes else OMNIGLOT_IMAGE_SIZE
    images = torch.empty(len(arrays), 1, image_size, image_size)
    chunk = 1024  # bounds the float copy at full resolution
    for start in range(0, len(arrays), chunk):
        pixels = [torch.from_numpy(array) for array in arrays[start:start + chunk]]
        for size in {tuple(p.shape) for p in pixels}:
            positions = [k for k, p in enumerate(pixels) if tuple(p.shape) == size]
            block = torch.stack([pixels[k] for k in positions]).unsqueeze(1).float().div_(255)
            if invert:
                block = 1 - block
            if size != (image_size, image_size):
                block = F.interpolate(block, size=(image_size, image_size), mode="bilinear", antialias=True,
                                      align_corners=False).clamp_(0, 1)
            images[[start + k for k in positions]] = block
    return images


def _last_number(text, default):
    match = re.search(r"(\d+)$", text)
    return int(match.group(1)) if match else default


def _check_image_size(image_size):
    if image_size is None:
        return
    try:
        check_int(image_size, "image_size", 1)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be a positive int (e.g. 28 or 105) or None (keep the files' size), "
                         f"got {image_size!r}") from None


def _check_options(image_size, mirror, alphabets, quarter_turns):
    """OmniglotAlphabets' argument checks; returns quarter_turns as a tuple."""
    _check_image_size(image_size)
    check_flag(mirror, "mirror")
    if isinstance(alphabets, str):
        raise TypeError(f"alphabets must be a list of names, e.g. [{alphabets!r}], not a string")
    quarter_turns = tuple(quarter_turns) if isinstance(quarter_turns, (tuple, list)) else None
    if (not quarter_turns or len(set(quarter_turns)) != len(quarter_turns)
            or not all(turn in (0, 1, 2, 3) and not isinstance(turn, bool) for turn in quarter_turns)):
        raise ValueError("quarter_turns must be a tuple of distinct ints among 0, 1, 2, 3 (rotations by "
                         "k * 90 degrees), e.g. (0,) or (0, 1, 2, 3)")
    return quarter_turns


class OmniglotAlphabets(InMemoryDataset):
    """Omniglot characters held in memory: one class per (alphabet, character).

    Args:
        root: a .zip file or a folder holding Lake et al.'s layout Alphabet/characterNN/<id>_<drawer>.png,
            under any top folders: images_background_small1.zip (with its top folder), an extracted copy of
            it, or the root torchvision's Omniglot downloads into (root/omniglot-py/images_background/...).
            A zip is read in place.
        alphabets: names of the alphabets to keep (e.g. ['Greek', 'Latin']); None keeps all.
        image_size: side S of the square images after resizing (antialiased bilinear), e.g. 28 or 56;
            None keeps the files' 105 x 105.
        invert: True makes ink 1 and background 0 (like MNIST); False keeps the files' polarity (ink 0).
        transform: optional callable applied to each (1, S, S) image tensor (after the augmentation).
        target_transform: optional callable applied to each int target.
        augment: True distorts the images with a BatchRandomAffine (background-filled) at every access;
            a BatchRandomAffine instance to choose its ranges; False for none. For training sets only.
        train: the `.train` flag the pair/triplet wrappers read (train mode draws fresh partners).
        subset: when the root holds several collections of alphabets (torchvision's images_background and
            images_evaluation), the folder name of the one to read, e.g. 'images_background'.
        quarter_turns: which rotations by k * 90 degrees (counter-clockwise) of every character to include,
            each as a class of its own (named 'Alphabet/characterNN@90' etc.): (0,) is the characters as
            drawn, (0, 1, 2, 3) quadruples the classes, a common way to train on more characters.
        mirror: True adds the left-right mirror image of every (turned) character as a class of its own
            (named '...~mirrored'), doubling the classes again; a mirrored character is as valid a
            character as a turned one.
    Attributes (N images, C classes): `.data` (N, 1, S, S) float in [0, 1], `.targets` (N,) long class ids,
    `.classes` (C,) names 'Alphabet/characterNN', `.alphabet_names` (sorted), `.alphabets` (N,) long index
    into alphabet_names, `.characters` (N,) long character number (NN of characterNN), `.drawers` (N,) long
    drawer number (-1 when the file name has none), `.class_alphabets` (C,) long, `.files` (N,) paths read,
    `.augmentation` (the BatchRandomAffine or None), `.transform` (what the wrappers apply per image:
    augmentation then transform), `.turns` (N,) long quarter turns of each image, `.mirrored` (N,) bool.
    Items are (image (1, S, S), target int). Classes are numbered in (mirrored, quarter turn, alphabet,
    character) order; images in (class, file name) order. A batch fetched through __getitems__
    (DataLoader) is augmented in one batched call. Works with SiameseMNIST, TripletMNIST and
    BalancedBatchSampler like any InMemoryDataset.
    Raises FileNotFoundError when the root holds no Omniglot images, ValueError for unknown alphabets or an
    ambiguous root.
    """

    def __init__(self, root, alphabets=None, image_size=None, invert=True, transform=None, target_transform=None,
                 augment=False, train=True, subset=None, quarter_turns=(0,), mirror=False):
        quarter_turns = _check_options(image_size, mirror, alphabets, quarter_turns)
        self.root = os.fspath(root)
        with _FileTree(self.root) as tree:
            prefix, files = self._find_files(tree.names, subset)
            available = sorted({name.split("/")[-3] for name in files})
            if alphabets is not None:
                unknown = sorted(set(alphabets) - set(available))
                if unknown:
                    raise ValueError(f"unknown alphabets {unknown} in {self.root}; it holds {available}")
                files = [name for name in files if name.split("/")[-3] in set(alphabets)]
            files.sort(key=lambda name: name.split("/")[-3:])
            images = _decode_images(tree, files, image_size, invert, self.root)
        self.subset = prefix
        parts = [name.split("/")[-3:] for name in files]
        class_names = [f"{alphabet}/{character}" for alphabet, character, _ in parts]
        self.alphabet_names = sorted({alphabet for alphabet, _, _ in parts})
        classes = sorted(set(class_names), key=lambda name: name.split("/"))
        class_index = {name: k for k, name in enumerate(classes)}
        alphabet_index = {name: k for k, name in enumerate(self.alphabet_names)}
        targets = torch.tensor([class_index[name] for name in class_names], dtype=torch.long)
        alphabets = torch.tensor([alphabet_index[alphabet] for alphabet, _, _ in parts], dtype=torch.long)
        characters = torch.tensor([_last_number(character, -1) for _, character, _ in parts], dtype=torch.long)
        drawers = torch.tensor([_last_number(os.path.splitext(file)[0], -1) for _, _, file in parts], dtype=torch.long)
        class_alphabets = torch.tensor([alphabet_index[name.split("/")[0]] for name in classes], dtype=torch.long)
        n_turns, n_classes = len(quarter_turns), len(classes)
        images = torch.cat([torch.rot90(images, turn, dims=(2, 3)) for turn in quarter_turns])
        targets = torch.cat([targets + k * n_classes for k in range(n_turns)])
        classes = [name + (f"@{90 * turn}" if turn else "") for turn in quarter_turns for name in classes]
        n_copies = n_turns * (2 if mirror else 1)
        if mirror:
            images = torch.cat([images, images.flip(-1)])
            targets = torch.cat([targets, targets + len(classes)])
            classes = classes + [name + "~mirrored" for name in classes]
        super().__init__(images, targets, train=train, transform=None, target_transform=target_transform,
                         classes=classes)
        self.files = files * n_copies
        self.alphabets, self.characters, self.drawers = (alphabets.repeat(n_copies), characters.repeat(n_copies),
                                                         drawers.repeat(n_copies))
        self.turns = (torch.tensor(quarter_turns, dtype=torch.long).repeat_interleave(len(files))
                      .repeat(n_copies // n_turns))
        self.mirrored = torch.arange(n_copies).repeat_interleave(len(files)) >= n_turns
        self.class_alphabets = class_alphabets.repeat(n_copies)
        self.mirror = mirror
        self.quarter_turns = quarter_turns
        self.image_size = images.shape[-1]
        self.invert = bool(invert)
        self._set_transforms(augment, transform)

    def _set_transforms(self, augment, transform):
        """``augmentation`` (True: a default ``BatchRandomAffine`` filling with the background) and the
        ``transform`` applied to batches: the augmentation, then the user's ``transform``."""
        if augment is True:
            augment = BatchRandomAffine(fill=0.0 if self.invert else 1.0)
        if augment is not False and augment is not None and not callable(augment):
            raise TypeError(f"augment must be True, False or a BatchRandomAffine, got {type(augment).__name__}")
        self.augmentation = augment or None
        self.user_transform = transform
        if self.augmentation is None:
            self.transform = transform
        else:
            self.transform = (self.augmentation if transform is None
                              else transforms.Compose([self.augmentation, transform]))

    @staticmethod
    def alphabet_names_in(root, subset=None):
        """Sorted names of the alphabets in `root` (as OmniglotAlphabets takes it), without decoding images."""
        with _FileTree(root) as tree:
            _, files = OmniglotAlphabets._find_files(tree.names, subset)
        return sorted({name.split("/")[-3] for name in files})

    @staticmethod
    def _find_files(names, subset):
        """(collection prefix, PNG paths) of the one collection of alphabets in `names`."""
        collections = {}
        for name in names:
            parts = name.split("/")
            if len(parts) >= 3 and name.lower().endswith(".png"):
                collections.setdefault("/".join(parts[:-3]), []).append(name)
        if subset is not None:
            collections = {prefix: files for prefix, files in collections.items()
                           if prefix == subset or prefix.endswith("/" + subset)}
        if not collections:
            wanted = f" in a folder named {subset!r}" if subset is not None else ""
            raise FileNotFoundError(f"no Omniglot images (Alphabet/characterNN/<id>_<drawer>.png){wanted} found")
        if len(collections) > 1:
            listing = ", ".join(repr(prefix) for prefix in sorted(collections))
            raise ValueError(f"found several collections of alphabets ({listing}); pass subset= with the folder "
                             "name of the one to read, e.g. subset='images_background'")
        return next(iter(collections.items()))

    def __getitems__(self, indices):
        """List of (image, target) samples for a batch of indices: one gather, one augmentation call."""
        if self.augmentation is None:
            return super().__getitems__(indices)
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.augmentation(self.data[index])
        samples = []
        for image, target in zip(images, self.targets[index].tolist()):
            if self.user_transform is not None:
                image = self.user_transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            samples.append((image, target))
        return samples

    def __repr__(self):
        return (f"{type(self).__name__}({len(self)} images, {len(self.classes)} characters of "
                f"{len(self.alphabet_names)} alphabets, {self.image_size} px, from {self.root})")


class OneShotRun:
    """One run of Lake et al.'s one-shot classification benchmark.

    Attributes: `name` ('run01'), `training_images` (T, 1, S, S) one image per candidate class,
    `test_images` (Q, 1, S, S), `answers` (Q,) long: the position in training_images of each test item's
    class, `training_files` and `test_files` (the paths, relative to the folder holding the runs).
    """

    def __init__(self, name, training_images, test_images, answers, training_files, test_files):
        self.name = name
        self.training_images, self.test_images, self.answers = training_images, test_images, answers
        self.training_files, self.test_files = training_files, test_files

    def __repr__(self):
        return f"OneShotRun({self.name}: {len(self.test_images)} test items, {len(self.training_images)} classes)"


class OneShotRuns:
    """Reader for Lake et al.'s one-shot classification benchmark (20 runs of 20-way 1-shot).

    Args:
        root: a folder or .zip holding run01 .. run20 (under any top folders); each run has
            training/class01.png .. class20.png, test/item01.png .. item20.png and class_labels.txt with one
            line per test item: `runNN/test/itemYY.png runNN/training/classZZ.png` (paths relative to the
            folder holding the runs).
        image_size: side of the images after resizing (None keeps the files' size); use the model's.
        invert: True makes ink 1 on a 0 background, as OmniglotAlphabets does.
    A sequence of OneShotRun (len, indexing, iteration), in run-name order; `.names` lists them.
    one_shot_run_errors scores a model on them.
    Raises FileNotFoundError when no run is found and ValueError when class_labels.txt names a missing
    file, misses a test item or is malformed.
    """

    def __init__(self, root, image_size=None, invert=True):
        _check_image_size(image_size)
        self.root = os.fspath(root)
        self.image_size, self.invert = image_size, bool(invert)
        with _FileTree(self.root) as tree:
            label_files = [name for name in tree.names if re.fullmatch(r"(.*/)?run\d+/class_labels\.txt", name)]
            prefixes = sorted({name[:-len("class_labels.txt")].rstrip("/").rpartition("/")[0] for name in label_files})
            if not label_files:
                raise FileNotFoundError(f"{self.root} holds no runNN/class_labels.txt: expected Lake's one-shot "
                                        "classification layout (run01 .. run20 with training/, test/, class_labels.txt)")
            if len(prefixes) > 1:
                raise ValueError(f"{self.root} holds runs in several folders {prefixes}; pass one of them")
            base = prefixes[0] + "/" if prefixes[0] else ""
            self.runs = [self._read_run(tree, base, name) for name in label_files]
        self.names = [run.name for run in self.runs]

    def _read_run(self, tree, base, label_file):
        run = label_file.split("/")[-2]
        in_run = base + run + "/"
        training = [name[len(base):] for name in tree.names
                    if name.startswith(in_run + "training/") and name.lower().endswith(".png")]
        test = [name[len(base):] for name in tree.names
                if name.startswith(in_run + "test/") and name.lower().endswith(".png")]
        lines = [line.split() for line in tree.read(label_file).decode("utf-8").splitlines() if line.strip()]
        if any(len(line) != 2 for line in lines):
            raise ValueError(f"{label_file}: every line must be 'runNN/test/itemYY.png runNN/training/classZZ.png'")
        answer_of = {}
        for test_file, training_file in lines:
            test_file, training_file = test_file.replace("\\", "/"), training_file.replace("\\", "/")
            for path, listing in ((test_file, test), (training_file, training)):
                if path not in listing:
                    raise ValueError(f"{label_file} names {path}, which is not in {run}")
            if test_file in answer_of:
                raise ValueError(f"{label_file} lists {test_file} twice")
            answer_of[test_file] = training.index(training_file)
        missing = [path for path in test if path not in answer_of]
        if missing:
            raise ValueError(f"{label_file} gives no class for {missing}")
        images = _decode_images(tree, [base + path for path in training + test], self.image_size,
                                self.invert, run)
        return OneShotRun(run, images[:len(training)], images[len(training):],
                          torch.tensor([answer_of[path] for path in test], dtype=torch.long), training, test)

    def __len__(self):
        return len(self.runs)

    def __getitem__(self, index):
        return self.runs[index]

    def __iter__(self):
        return iter(self.runs)

    def __repr__(self):
        return f"OneShotRuns({len(self)} runs from {self.root})"


def one_shot_run_errors(model, runs, device=None):
    """Error of `model` on Lake et al.'s one-shot classification runs (OneShotRuns).

    In each run every test item is assigned to the training image nearest in embedding distance
    (model.get_embedding, eval mode, no gradients); the run's error is the fraction assigned to the
    wrong one. Returns {'names': [run names], 'errors': [per-run errors in [0, 1]], 'mean_error':
    their mean}.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_embedding", None)):
        raise TypeError("one_shot_run_errors needs an nn.Module with a get_embedding method")
    if device is None:
        first_parameter = next(model.parameters(), None)
        device = first_parameter.device if first_parameter is not None else torch.device("cpu")
    names, errors = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for run in runs:
                n_training = len(run.training_images)
                images = torch.cat([run.training_images, run.test_images]).to(device)
                embeddings = model.get_embedding(images)
                # as one batched episode, the very computation metrics' episode scoring does
                distances = squared_distances(embeddings[None, n_training:], embeddings[None, :n_training])[0]
                wrong = distances.argmin(1) != run.answers.to(device)
                names.append(run.name)
                errors.append(float(wrong.double().mean()))
    finally:
        model.train(was_training)
    if not errors:
        raise ValueError("one_shot_run_errors got no runs")
    return {"names": names, "errors": errors, "mean_error": sum(errors) / len(errors)}
