"""Everything Omniglot: one-shot learning of handwritten characters from alphabets never seen in training.

Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015) holds 1623 handwritten characters of 50 alphabets,
each drawn once by 20 people, as 105 x 105 1-bit PNG files ``Alphabet/characterNN/<id>_<drawer>.png``.
This module owns:

- reading it from its .zip files or folders: ``OmniglotAlphabets`` (characters of chosen alphabets as an
  ``InMemoryDataset``, one class per character, with each image's alphabet and drawer; resized, turned,
  mirrored and augmented with ``datasets.BatchRandomAffine``) and ``OneShotRuns`` (Lake's one-shot
  classification benchmark, run01 .. run20, 20-way 1-shot each), scored by ``one_shot_run_errors``;
- the study: the recipe (``OMNIGLOT_RECIPE``), ``load_omniglot`` (background alphabets for training,
  the evaluation alphabets the background lacks for testing), ``train_omniglot`` (a ``SiameseNetwork``
  trained by the method ``methods.build_method`` builds, as for Fashion-MNIST),
  ``evaluate_omniglot`` (one-shot episodes within one alphabet, the harder protocol, and across
  alphabets, plus pair verification), ``run_omniglot`` and ``run_one_shot_runs``;
- the command line, ``python omniglot.py [--quick] [--one-shot-runs PATH] ...`` (``main``; a user's
  mistake is one line and exit status 2, ``cli.run``). Only the study (the recipe, seed 0) writes the
  committed ``results/omniglot.*`` and ``weights/omniglot_siamese.pt``: a quick run writes under
  ``runs/omniglot/quick/``, any other settings under ``runs/omniglot/<settings tag>/`` (``omniglot_outputs``).

The general pieces come from the rest of the library (episodes: ``episodes.few_shot_accuracy`` with
``groups=`` the alphabet of each image; batches: ``datasets.BalancedBatchSampler``); the old import
paths (``datasets.OmniglotAlphabets``, ``metrics.one_shot_run_errors``, ``experiments.run_omniglot``,
...) still resolve to the objects here.
"""

import io
import os
import re
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

import cli
from datasets import BatchRandomAffine, InMemoryDataset, SiameseMNIST
from episodes import few_shot_accuracy
from methods import EVALUATION_BATCH, MEMORY_WARMUP, build_method, check_memory
from metrics import best_threshold, extract_embeddings, verification_roc_auc
from model_file import load_model, save_model
from networks import ShiftAveragedEmbedding, SiameseNetwork
from results import RUNS_ROOT, markdown_table, output_dirs, settings_tag, write_json, write_text
from trainer import fit, flush_denormal_everywhere, resolve_device
from utils import check_choice, check_flag, check_int, squared_distances

# ---------------------------------------------------------------------------------------------------
# Reading Omniglot and Lake's one-shot runs

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


# ---------------------------------------------------------------------------------------------------
# One-shot learning on characters of alphabets never seen in training: a SiameseNetwork trained on
# the background alphabets of images_background_small1, evaluated by N-way K-shot episodes and pair
# verification on the alphabets of images_background_small2 that small1 lacks.

OMNIGLOT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "shared", "data", "omniglot")
OMNIGLOT_BACKGROUND = "images_background_small1"  # .zip or extracted folder: 5 alphabets, 136 characters
OMNIGLOT_EVALUATION = "images_background_small2"  # its alphabets that the background lacks are evaluated
OMNIGLOT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "omniglot_siamese.pt")
OMNIGLOT_METHODS = ("siamese", "online-contrastive", "online-triplet", "multi-similarity")
# The recipe `python omniglot.py` trains (its measured accuracy: results/omniglot.md).
# Chosen by trials (20-way 1-shot within-alphabet accuracy of the plain embedding, seed 0): larger images
# help up to about 40 px (40 epochs: 28 px 77.5%, 40 px 81.4%, 48 px 80.2%), the rotated copies as extra
# classes gave about 8 points (28 px: 69.3% -> 77.5%), mirrored copies as further classes 1.4 more at equal
# compute (40 px: 82.8% in 20 epochs against 81.4% in 40 without them); random-hard triplets beat semi-hard
# ones, batch-hard (collapses with squared distances), online contrastive pairs, a softmax classifier and a
# prototypical loss (78.1%); batches drawn inside one alphabet (alphabet_batches) gave 81.0% against 81.4%.
OMNIGLOT_RECIPE = {
    "method": "online-triplet", "selector": "random-hard", "margin": 1.0,
    "image_size": 40, "embedding_dim": 64, "channels": 64,
    "quarter_turns": (0, 1, 2, 3),  # each character turned by k * 90 degrees counts as a class of its own
    "mirror": True,  # and so does each one's mirror image
    "augment": {"degrees": 10.0, "shear": 10.0, "scale": (0.85, 1.15), "translate": 0.1},
    "epochs": 20, "batch_classes": 32, "batch_samples": 5, "pair_batch": 128, "alphabet_batches": False,
    "learning_rate": 1e-3, "weight_decay": 0.0,  # Adam, cosine decay to zero over the epochs
    "memory": 0, "memory_warmup": MEMORY_WARMUP,  # no cross-batch memory (methods.Recipe)
}
# The recipe's settings that shape the data (load_omniglot) rather than the training (train_omniglot).
OMNIGLOT_DATA_SETTINGS = ("image_size", "quarter_turns", "mirror", "augment")
CONTRASTIVE_MARGIN = 2.0  # the siamese method's ContrastiveLoss margin
OMNIGLOT_EPISODES = 1000
OMNIGLOT_TEST_SHIFT = 2  # run_omniglot also reports test-time shift averaging over -2, 0, +2 px
OMNIGLOT_QUICK = {"epochs": 1, "n_episodes": 100}


def _omniglot_source(root, name):
    for candidate in (os.path.join(root, name + ".zip"), os.path.join(root, name)):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"neither {name}.zip nor a folder {name} is in {os.path.abspath(root)}; pass the "
                            "folder holding Omniglot's images_background_small1/2 (--omniglot-root)")


def load_omniglot(root=None, image_size=28, quarter_turns=(0,), augment=None, background=OMNIGLOT_BACKGROUND,
                  evaluation=OMNIGLOT_EVALUATION, mirror=False):
    """``(train_set, eval_set)`` OmniglotAlphabets: every alphabet of ``background`` (augmented with a
    BatchRandomAffine built from the ``augment`` dict, none when None; characters turned by each of
    ``quarter_turns`` x 90 degrees, and with ``mirror`` their mirror images, as extra classes) and the
    alphabets of ``evaluation`` that
    ``background`` lacks (never augmented), both resized to ``image_size``. ``root`` (default
    OMNIGLOT_ROOT, ../shared/data/omniglot next to the repository) holds both as .zip or folders."""
    root = OMNIGLOT_ROOT if root is None else root
    affine = None if augment is None else BatchRandomAffine(**augment)
    train_set = OmniglotAlphabets(_omniglot_source(root, background), image_size=image_size,
                                  quarter_turns=quarter_turns, augment=affine or False, mirror=mirror)
    evaluation_source = _omniglot_source(root, evaluation)
    new_alphabets = [name for name in OmniglotAlphabets.alphabet_names_in(evaluation_source)
                     if name not in train_set.alphabet_names]
    if not new_alphabets:
        raise ValueError(f"{evaluation_source} has no alphabet that {background} lacks: nothing to evaluate")
    eval_set = OmniglotAlphabets(evaluation_source, alphabets=new_alphabets, image_size=image_size, train=False)
    return train_set, eval_set


def omniglot_settings(**overrides):
    """OMNIGLOT_RECIPE with ``overrides`` applied, an override of None keeping the recipe's value: the one
    place the recipe's values become defaults. Returns a new dict; raises ValueError naming unknown settings."""
    unknown = sorted(set(overrides) - set(OMNIGLOT_RECIPE))
    if unknown:
        raise ValueError(f"unknown Omniglot recipe settings {unknown}; the settings are {sorted(OMNIGLOT_RECIPE)}")
    return {**OMNIGLOT_RECIPE, **{name: value for name, value in overrides.items() if value is not None}}


def train_omniglot(train_set, method=None, selector=None, margin=None, embedding_dim=None, channels=None,
                   epochs=None, batch_classes=None, batch_samples=None, pair_batch=None, alphabet_batches=None,
                   learning_rate=None, weight_decay=None, memory=None, memory_warmup=None, seed=0, device=None,
                   progress=True, **data_settings):
    """Train a SiameseNetwork on ``train_set`` (an OmniglotAlphabets) with one of the library's losses.

    Every setting left None is the recipe's (OMNIGLOT_RECIPE). ``method`` (one of OMNIGLOT_METHODS) is
    put together by ``methods.build_method``, as for Fashion-MNIST: 'siamese' (SiameseMNIST pairs in
    batches of ``pair_batch``, ContrastiveLoss(CONTRASTIVE_MARGIN)), 'online-contrastive'
    (BalancedBatchSampler batches of batch_classes x batch_samples, OnlineContrastiveLoss(margin) with hard
    negative pairs) or 'online-triplet' (same batches, OnlineTripletLoss(margin) with ``selector``, see
    methods.SELECTORS) or 'multi-similarity' (same batches, MultiSimilarityLoss); ``memory`` > 0 gives the online
    methods' loss a cross-batch memory of that many embeddings, mined after ``memory_warmup`` steps
    (``methods.build_method``); ``alphabet_batches`` draws all the characters of a batch from one alphabet
    (BalancedBatchSampler's groups), so that training negatives are as alike as the within-alphabet
    test's. Adam with cosine learning-rate decay over ``epochs``. The recipe's data settings
    (OMNIGLOT_DATA_SETTINGS) are accepted and ignored, so ``train_omniglot(train_set, **OMNIGLOT_RECIPE)``
    works: they shaped ``train_set`` already. Returns ``(model in eval mode, history)``, ``history`` as
    ``fit`` returns it.
    """
    unknown = sorted(set(data_settings) - set(OMNIGLOT_DATA_SETTINGS))
    if unknown:
        raise TypeError(f"train_omniglot got unknown settings {unknown}; the data settings it accepts (and "
                        f"ignores) are {list(OMNIGLOT_DATA_SETTINGS)}")
    settings = omniglot_settings(
        method=method, selector=selector, margin=margin, embedding_dim=embedding_dim, channels=channels,
        epochs=epochs, batch_classes=batch_classes, batch_samples=batch_samples, pair_batch=pair_batch,
        alphabet_batches=alphabet_batches, learning_rate=learning_rate, weight_decay=weight_decay, memory=memory,
        memory_warmup=memory_warmup)
    method = check_choice(settings["method"], OMNIGLOT_METHODS, "Omniglot method")
    torch.manual_seed(seed)  # the network's initial weights
    model = SiameseNetwork(train_set.image_size, settings["embedding_dim"], channels=settings["channels"])
    # the classic siamese set-up keeps its own, wider margin (pairs, not triplets, are pushed apart)
    margin = CONTRASTIVE_MARGIN if method == "siamese" else settings["margin"]
    model, loss_fn, train_loader, _, metrics = build_method(
        method, model, train_set, selector=settings["selector"], margin=margin, batch_size=settings["pair_batch"],
        batch_classes=settings["batch_classes"], batch_samples=settings["batch_samples"], seed=seed,
        groups=train_set.alphabets if settings["alphabet_batches"] else None, memory=settings["memory"],
        memory_warmup=settings["memory_warmup"])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"],
                                 weight_decay=settings["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(settings["epochs"], 1))
    history = fit(train_loader, None, model, loss_fn, optimizer, scheduler, settings["epochs"], metrics=metrics,
                  device=device, progress=progress, log_interval=50)
    return model.eval(), history


def omniglot_pairs(dataset, drawers, seed=0):
    """Seeded verification pairs among the images of ``dataset`` drawn by ``drawers`` (a list of drawer
    numbers): SiameseMNIST's fixed test pairs, half same-character. Returns (first (P,), second (P,),
    same (P,) bool) indices into ``dataset``."""
    chosen = torch.isin(dataset.drawers, torch.as_tensor(drawers)).nonzero().squeeze(1)
    pairs = SiameseMNIST(InMemoryDataset(dataset.data[chosen], dataset.targets[chosen], train=False),
                         seed=seed).test_pairs
    return chosen[pairs[:, 0]], chosen[pairs[:, 1]], pairs[:, 2].bool()


def drawer_halves(dataset):
    """(first half, second half) of the sorted drawer numbers of ``dataset`` (1-10 and 11-20 for Omniglot)."""
    drawers = torch.unique(dataset.drawers).tolist()
    return drawers[:len(drawers) // 2], drawers[len(drawers) // 2:]


def evaluate_omniglot(model, eval_set, n_episodes=OMNIGLOT_EPISODES, seed=0, device=None, test_shift=0):
    """One-shot accuracy and verification of ``model`` on ``eval_set`` (alphabets it never saw).

    Episodes (1 query per class, prototype rule, seeded): 20-way 1-shot within one alphabet (alphabets
    with >= 20 characters), 5-way 1-shot within one alphabet, 20-way 1-shot across all the alphabets.
    Verification: the similarity threshold is chosen (best_threshold) on pairs of the first half of the
    drawers (1-10 of 20) and its accuracy measured on pairs of the others; ROC-AUC on pairs of all images.
    ``test_shift`` > 0: test-time augmentation, every image embedded as the mean over its copies shifted
    by -test_shift, 0, +test_shift pixels in each direction (``ShiftAveragedEmbedding``).
    Returns {'episodes': [rows with 'task', 'alphabets', 'accuracy', 'ci95', ...], 'verification': {...},
    'test_shift'}.
    """
    if test_shift:
        model = ShiftAveragedEmbedding(model, test_shift)
    embeddings, labels = extract_embeddings(DataLoader(eval_set, batch_size=EVALUATION_BATCH), model, device)
    characters = torch.bincount(eval_set.class_alphabets, minlength=len(eval_set.alphabet_names))
    rows = []
    for task, n_way, within in (("20-way 1-shot, within alphabet", 20, True),
                                ("5-way 1-shot, within alphabet", 5, True),
                                ("20-way 1-shot, across alphabets", 20, False)):
        alphabets = [name for name, count in zip(eval_set.alphabet_names, characters.tolist())
                     if count >= n_way or not within]
        # within one alphabet: episodes grouped by the alphabet of each image, the harder protocol
        row = few_shot_accuracy(embeddings, labels, n_way, 1, n_episodes, eval_set.alphabets if within else None,
                                seed=seed)
        rows.append({"task": task, "alphabets": alphabets, **row})
    similarity = SiameseNetwork.embedding_similarity
    validation_drawers, test_drawers = drawer_halves(eval_set)
    first, second, same = omniglot_pairs(eval_set, validation_drawers, seed)
    threshold, validation_accuracy = best_threshold(similarity(embeddings[first], embeddings[second]), same)
    first, second, same = omniglot_pairs(eval_set, test_drawers, seed + 1)
    test_accuracy = float(((similarity(embeddings[first], embeddings[second]) >= threshold) == same).double().mean())
    verification = {"threshold": threshold, "validation_accuracy": validation_accuracy,
                    "validation_drawers": validation_drawers, "test_drawers": test_drawers,
                    "test_accuracy": test_accuracy, "roc_auc": verification_roc_auc(embeddings, labels, seed=seed)}
    return {"episodes": rows, "verification": verification, "test_shift": test_shift}


OMNIGLOT_COLUMNS = [("task", "task", "{}"), ("alphabets", "alphabets", "{}"), ("episodes", "episodes", "{}"),
                    ("accuracy", "accuracy", "{}"), ("error", "error", "{}")]


def omniglot_table(*results):
    """Markdown table of one or more of evaluate_omniglot's results (accuracies in percent with their 95%
    intervals; results.markdown_table); the rows of a shift-averaged evaluation say so."""
    rows = []
    for result in results:
        shift = result.get("test_shift", 0)
        suffix = f", shift-averaged (+-{shift} px)" if shift else ""
        for row in result["episodes"]:
            accuracy, ci95 = 100 * row["accuracy"], 100 * row["ci95"]
            rows.append({"task": row["task"] + suffix, "alphabets": ", ".join(row["alphabets"]),
                         "episodes": row["n_episodes"], "accuracy": f"{accuracy:.1f}% +- {ci95:.1f}",
                         "error": f"{100 - accuracy:.1f}%"})
        verification = result["verification"]
        validation, test = verification["validation_drawers"], verification["test_drawers"]
        accuracy = 100 * verification["test_accuracy"]
        rows.append({"task": f"verification (threshold {verification['threshold']:.3f} from drawers "
                             f"{validation[0]}-{validation[-1]}){suffix}",
                     "alphabets": f"drawers {test[0]}-{test[-1]}", "episodes": "pairs",
                     "accuracy": f"{accuracy:.1f}% (ROC-AUC {verification['roc_auc']:.3f})",
                     "error": f"{100 - accuracy:.1f}%"})
    return markdown_table(rows, OMNIGLOT_COLUMNS)


def save_omniglot_model(model, path, **information):
    """Save the SiameseNetwork ``model`` to ``path`` as a model file (model_file.save_model: architecture
    "siamese-network", its config and weights, images inverted as ``OmniglotAlphabets`` reads them, folders
    created, written atomically). ``information``
    (plain data: command, recipe, results, ...) is kept: ``command`` as the file's command, everything else
    under its own key, and the verification threshold of ``information["evaluation"]``, when given, as the
    file's threshold. Returns the path."""
    evaluation = information.get("evaluation")
    verification = evaluation.get("verification") if isinstance(evaluation, dict) else None
    threshold = verification.get("threshold") if isinstance(verification, dict) else None
    information.setdefault("threshold", threshold)
    config = model.config()
    return save_model(path, model, "siamese-network", config, image_size=model.image_size,
                      channels=config["in_channels"], invert=True, **information)


def load_omniglot_model(path=OMNIGLOT_WEIGHTS, device="cpu"):
    """The SiameseNetwork saved by save_omniglot_model at ``path`` (a model file, or the older
    ``{"config", "state_dict", ...}`` file), in eval mode on ``device``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path}: train them with `python omniglot.py` or pass --weights")
    model, info = load_model(path, device)
    if not isinstance(model, SiameseNetwork):
        raise ValueError(f"{path} holds a {info['architecture']!r} model, not the Omniglot SiameseNetwork; pass "
                         "weights saved by save_omniglot_model")
    return model


def omniglot_outputs(settings, seed=0, n_episodes=OMNIGLOT_EPISODES, quick=False, weights=OMNIGLOT_WEIGHTS,
                     results_dir="results", runs_dir=RUNS_ROOT):
    """Where a run of ``settings`` (``omniglot_settings``' dict) writes: ``(results folder, weights path)``,
    None for either not written. The study (the recipe, seed 0, OMNIGLOT_EPISODES) writes ``results_dir``
    and ``weights``; any other run its own folder ``<runs_dir>/omniglot/<settings tag>/`` (``results.output_dirs``,
    named by ``results.settings_tag``: what changed, e.g. ``epochs-3_seed-1``), the weights too (``models/``)
    when ``weights`` is the committed file: a trial never replaces the study's files. A quick run writes under
    ``quick/`` whatever its settings (its results record them), and no weights."""
    study = {"quick": False, **OMNIGLOT_RECIPE, "seed": 0, "episodes": OMNIGLOT_EPISODES}
    tag = settings_tag({"quick": True} if quick else {**settings, "seed": seed, "episodes": n_episodes}, study)
    if not tag:
        return results_dir, weights
    folders = output_dirs("omniglot", tag, committed=False, root=runs_dir)
    committed = weights is not None and os.path.abspath(weights) == os.path.abspath(OMNIGLOT_WEIGHTS)
    return (None if results_dir is None else folders.results), (None if quick else os.path.join(
        folders.models, "omniglot_siamese.pt") if committed else weights)


def run_omniglot(root=None, weights=OMNIGLOT_WEIGHTS, results_dir="results", quick=False, seed=0, device=None,
                 progress=True, n_episodes=OMNIGLOT_EPISODES, runs_dir=RUNS_ROOT, **recipe):
    """Train the Omniglot recipe (OMNIGLOT_RECIPE, any key overridden by ``recipe``, see omniglot_settings),
    save the weights (skipped when None), evaluate on the new alphabets and write omniglot.md and .json
    (atomically, results.write_text / write_json) where ``omniglot_outputs`` says: a trial (other settings)
    under ``runs_dir``, never the committed files. ``quick``: OMNIGLOT_QUICK's epochs and episodes.
    Returns {'recipe', 'seconds', 'train_alphabets', 'evaluation' (evaluate_omniglot's result) and
    'evaluation_shift_averaged' (the same with test_shift=OMNIGLOT_TEST_SHIFT)}.
    """
    settings = omniglot_settings(**recipe)
    if quick:
        settings["epochs"], n_episodes = OMNIGLOT_QUICK["epochs"], OMNIGLOT_QUICK["n_episodes"]
    results_dir, weights = omniglot_outputs(settings, seed, n_episodes, quick, weights, results_dir, runs_dir)
    train_set, eval_set = load_omniglot(root, settings["image_size"], settings["quarter_turns"], settings["augment"],
                                        mirror=settings["mirror"])
    print(f"== omniglot: training on {len(train_set.classes)} classes of {', '.join(train_set.alphabet_names)}; "
          f"evaluating on {', '.join(eval_set.alphabet_names)}", flush=True)
    started = time.perf_counter()
    model, history = train_omniglot(train_set, seed=seed, device=device, progress=progress, **settings)
    seconds = time.perf_counter() - started
    evaluation = evaluate_omniglot(model, eval_set, n_episodes, seed)
    shift_averaged = evaluate_omniglot(model, eval_set, n_episodes, seed, test_shift=OMNIGLOT_TEST_SHIFT)
    result = {"recipe": {**settings, "seed": seed}, "seconds": seconds, "quick": quick,
              "train_alphabets": train_set.alphabet_names, "evaluation": evaluation,
              "evaluation_shift_averaged": shift_averaged}
    if weights is not None:
        save_omniglot_model(model, weights, command="python omniglot.py", **result)
    if results_dir is not None:
        write_json(os.path.join(results_dir, "omniglot.json"), result)
        write_text(os.path.join(results_dir, "omniglot.md"), omniglot_table(evaluation, shift_averaged))
    return result


def run_one_shot_runs(path, weights=OMNIGLOT_WEIGHTS, device="cpu"):
    """Score the saved model on Lake et al.'s one-shot runs at ``path`` (folder or .zip; OneShotRuns):
    prints each run's error, then ``mean error: X.X%`` as the last line. Returns one_shot_run_errors' dict."""
    model = load_omniglot_model(weights, device)
    result = one_shot_run_errors(model, OneShotRuns(path, image_size=model.image_size), device)
    for name, error in zip(result["names"], result["errors"]):
        print(f"{name}: error {100 * error:.1f}%")
    print(f"mean error: {100 * result['mean_error']:.1f}%")
    return result


# ---------------------------------------------------------------------------------------------------
# The command line: python omniglot.py [options] (cli.run: a user's mistake is one line and exit status 2)


def _parser():
    """The argument parser of ``main``: exactly the options the Omniglot study reads."""
    parser = cli.ArgumentParser(prog="omniglot.py", description="One-shot learning on Omniglot: train and evaluate "
                                "the recipe (omniglot.OMNIGLOT_RECIPE), or score saved weights on Lake's one-shot "
                                "runs.")
    parser.add_argument("--methods", default="all",
                        help=f"one of {', '.join(OMNIGLOT_METHODS)}; 'all': the recipe's ({OMNIGLOT_RECIPE['method']})")
    parser.add_argument("--selectors", default=None,
                        help=f"online-triplet's selector (default: the recipe's, {OMNIGLOT_RECIPE['selector']})")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--embedding-dim", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--memory", type=cli.whole_number(), default=None, metavar="M",
                        help="online methods: mine a cross-batch memory of the last M embeddings too (default: none)")
    parser.add_argument("--memory-warmup", type=cli.whole_number(0), default=None, metavar="N",
                        help=f"training steps before the memory is mined (default {MEMORY_WARMUP})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 100 episodes, no weights saved")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    parser.add_argument("--omniglot-root", default=None, help="folder holding images_background_small1/2 (.zip or "
                        "extracted); default ../shared/data/omniglot next to the repository")
    parser.add_argument("--one-shot-runs", default=None,
                        help="score saved weights on Lake's one-shot runs (folder or .zip of run01..run20)")
    parser.add_argument("--weights", default=None, help=f"weights file (default {OMNIGLOT_WEIGHTS})")
    return parser


def _recipe_of(args):
    """The recipe settings the parsed ``args`` override (checked before any data is read)."""
    recipe = {}
    if args.methods != "all":
        recipe["method"] = check_choice(args.methods, OMNIGLOT_METHODS, "--methods")
    if args.selectors is not None:
        recipe["selector"] = args.selectors
    if args.epochs is not None:
        recipe["epochs"] = check_int(args.epochs, "--epochs", 0)
    if args.embedding_dim is not None:
        recipe["embedding_dim"] = check_int(args.embedding_dim, "--embedding-dim", 1)
    recipe.update({name: value for name, value in (("memory", args.memory), ("memory_warmup", args.memory_warmup))
                   if value is not None})
    settings = omniglot_settings(**recipe)
    check_memory(settings["method"], settings["memory"], settings["memory_warmup"])
    return recipe


def omniglot_main(args):
    """Run the command line's parsed ``args`` (``_parser``'s): score saved weights on one-shot runs, or train
    and evaluate. Returns run_one_shot_runs' or run_omniglot's result."""
    weights = OMNIGLOT_WEIGHTS if args.weights is None else args.weights
    if args.device is not None:
        resolve_device(args.device)  # an unknown or absent device is refused before any data is read
    if args.one_shot_runs is not None:
        return run_one_shot_runs(args.one_shot_runs, weights, args.device or "cpu")
    recipe = _recipe_of(args)
    results_dir, saved = omniglot_outputs(omniglot_settings(**recipe), args.seed, quick=args.quick, weights=weights)
    result = run_omniglot(args.omniglot_root, weights, quick=args.quick, seed=args.seed, device=args.device,
                          progress=not args.no_progress, **recipe)
    print()
    print(omniglot_table(result["evaluation"], result["evaluation_shift_averaged"]))
    where = os.path.join(results_dir, "omniglot.md").replace(os.sep, "/")
    print(f"Training {result['seconds']:.0f} s. Results in {where}" + (f"; weights in {saved}." if saved else "."))
    return result


def main(argv=None):
    """``python omniglot.py [options]`` (``--help`` lists them): turns flush-to-zero on for the whole process
    (``trainer.flush_denormal_everywhere``), then ``omniglot_main``. Returns the command's result; a bad
    option raises ValueError (``cli.run`` prints it as one line)."""
    flush_denormal_everywhere()
    return omniglot_main(_parser().parse_args(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(cli.run(main, "omniglot.py"))
