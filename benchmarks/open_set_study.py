"""Study: open-set matching at a calibrated precision, on classes the gallery lacks.

Each case indexes a gallery of some classes with ``search.index_folder``, takes queries of the gallery's
classes (images not in it) and of classes it lacks, splits the queries in two halves with a fixed seed,
calibrates on one (``search.calibrate``) and answers the other (``search.classify --precision``), then scores
the answers (``open_set.open_set_scores``): the precision measured beside the one asked, the recall and the
share of unseen-class queries answered "unknown".

- ``fashion-mnist MODEL``: MODEL trained on classes 0-7 (``experiments.py --train-classes 0-7 --save-model``);
  the test images are exported as a folder (``image_folders.export_image_folder``); the gallery is half of
  each of classes 0-7 (seeded), the queries are their other half and every test image of classes 8-9.
- ``omniglot [--model weights/omniglot_siamese.pt]``: the alphabets of images_background_small2 that the model
  was not trained on (its ``train_alphabets``); the gallery is drawers 1-10 of the first half of each
  alphabet's characters, the queries drawers 11-20 of every character (half of them unseen). The images are
  the files as they are (black ink on white): the model file inverts them as it was trained (its ``invert``).

Prints one Markdown row per split. One split took 40 s (Fashion-MNIST, most of it writing the 70,000 PNG
files) and 45 s (Omniglot) on one CPU thread; ten splits 95 s and 51 s.

Usage:
    python benchmarks/open_set_study.py fashion-mnist runs/open-set/fashion-mnist-0-7.pt [--splits 1] [--plot PNG]
    python benchmarks/open_set_study.py omniglot [--precision 0.95] [--splits 1] [--plot PNG]
"""

import argparse
import os
import sys
import tempfile
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import open_set  # noqa: E402
import search  # noqa: E402
from image_folders import export_image_folder, list_images  # noqa: E402
from model_file import load_model  # noqa: E402
from omniglot import OMNIGLOT_EVALUATION, OMNIGLOT_ROOT, OMNIGLOT_WEIGHTS  # noqa: E402
from results import markdown_table  # noqa: E402

SEED = 0  # the gallery's draw of Fashion-MNIST's images; the query halvings use seeds 0 .. --splits - 1
FASHION_SEEN = 8  # classes 0-7 trained on and in the gallery; 8-9 unseen
COLUMNS = [("case", "case", "{}"), ("split", "split seed", "{}"), ("gallery", "gallery images (classes)", "{}"),
           ("queries", "calibration / measured queries (unseen)", "{}"), ("asked", "precision asked", "{:g}"),
           ("threshold", "threshold", "{:.4f}"), ("calibration_precision", "precision on calibration half", "{:.4f}"),
           ("precision", "precision measured", "{:.4f}"), ("sd", "+- binomial sd", "{:.4f}"),
           ("recall", "recall", "{:.4f}"), ("unseen_rejected", "unseen rejected", "{:.4f}")]


def _write_csv(path, rows):
    with open(path, "w", encoding="utf-8") as file:
        file.write("path,label\n" + "".join(f"{image},{label}\n" for image, label in rows))
    return path


def run_case(name, model, gallery_rows, query_rows, work, precision, splits=1, plot=None):
    """Index gallery_rows, then for each of ``splits`` seeded halvings of query_rows (lists of (path, class
    name); seeds 0, 1, ...) calibrate on one half and measure on the other; ``plot`` saves the first split's
    calibration curve there. Returns one row (a dict of COLUMNS) per split."""
    gallery = search.index_folder(model, _write_csv(os.path.join(work, "gallery.csv"), gallery_rows),
                                  os.path.join(work, "gallery.npz"), progress=False)
    return [_run_split(name, model, gallery, gallery_rows, query_rows, work, precision, seed,
                       plot if seed == 0 else None) for seed in range(splits)]


def _run_split(name, model, gallery, gallery_rows, query_rows, work, precision, seed, plot):
    order = np.random.default_rng(seed).permutation(len(query_rows))
    calibration_rows = [query_rows[i] for i in order[:len(order) // 2]]
    measured_rows = [query_rows[i] for i in order[len(order) // 2:]]
    level, = search.calibrate(model, gallery, _write_csv(os.path.join(work, "calibration.csv"), calibration_rows),
                              [precision], plot=plot)
    answers = search.classify(model, gallery, [path for path, _ in measured_rows], k=1, precision=precision)
    classes = sorted({label for _, label in gallery_rows})
    scores = open_set.open_set_scores([answer["label"] for answer in answers], [label for _, label in measured_rows],
                                      classes)
    return {"case": name, "split": seed, "gallery": f"{len(gallery_rows)} ({len(classes)})",
            "queries": f"{len(calibration_rows)} / {len(measured_rows)} ({scores['n_unseen']})", "asked": precision,
            "threshold": level["threshold"], "calibration_precision": level["calibration_precision"],
            "precision": scores["precision"], "recall": scores["recall"],
            "sd": float(np.sqrt(precision * (1 - precision) / scores["n_accepted"])),
            "unseen_rejected": scores["unseen_rejected"]}


def fashion_rows(work):
    """(gallery rows, query rows) of Fashion-MNIST's test images exported under ``work``."""
    folder = os.path.join(work, "fashion-mnist")
    export_image_folder("fashion-mnist", folder, progress=False)
    listing = list_images(folder)
    test = [(path, int(label)) for path, label in zip(listing.paths, listing.labels.tolist())
            if os.path.basename(path).startswith("test-")]
    rng = np.random.default_rng(SEED)
    gallery, queries = [], []
    for label, name in enumerate(listing.classes):
        paths = [path for path, image_label in test if image_label == label]
        rows = [(paths[i], name) for i in rng.permutation(len(paths))]
        if label < FASHION_SEEN:
            gallery += rows[:len(rows) // 2]
            queries += rows[len(rows) // 2:]
        else:
            queries += rows
    return gallery, queries


def omniglot_rows(work, model):
    """(gallery rows, query rows) of the small2 alphabets the model was not trained on, written under
    ``work``."""
    trained = set(load_model(model)[1].get("train_alphabets") or [])
    gallery, queries = [], []
    with zipfile.ZipFile(os.path.join(OMNIGLOT_ROOT, OMNIGLOT_EVALUATION + ".zip")) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".png"))
        alphabets = sorted({name.split("/")[1] for name in names} - trained)
        for alphabet in alphabets:
            characters = sorted({name.split("/")[2] for name in names if name.split("/")[1] == alphabet})
            in_gallery = set(characters[:len(characters) // 2])
            for name in (name for name in names if name.split("/")[1] == alphabet):
                character, file_name = name.split("/")[2:]
                path = os.path.join(work, "omniglot", alphabet, character, file_name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with archive.open(name) as file, Image.open(file) as image:
                    image.convert("L").save(path)
                drawer = int(os.path.splitext(file_name)[0].rsplit("_", 1)[1])
                row = (path, f"{alphabet}-{character}")
                if drawer > 10:
                    queries.append(row)
                elif character in in_gallery:
                    gallery.append(row)
    return gallery, queries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=("fashion-mnist", "omniglot"))
    parser.add_argument("model", nargs="?", default=None, help="model file (omniglot: the committed weights)")
    parser.add_argument("--precision", type=float, default=0.95)
    parser.add_argument("--splits", type=int, default=1, help="halvings of the queries, seeds 0, 1, ...")
    parser.add_argument("--plot", metavar="PNG", help="save the calibration curve (search.py calibrate --plot) there")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        if arguments.case == "fashion-mnist":
            if arguments.model is None:
                parser.error("fashion-mnist needs the model file trained on classes 0-7")
            model, name = arguments.model, "Fashion-MNIST, trained on 0-7"
            gallery, queries = fashion_rows(work)
        else:
            model = arguments.model or OMNIGLOT_WEIGHTS
            name = "Omniglot, new alphabets"
            gallery, queries = omniglot_rows(work, model)
        rows = run_case(name, model, gallery, queries, work, arguments.precision, arguments.splits, arguments.plot)
    print(markdown_table(rows, COLUMNS), end="")


if __name__ == "__main__":
    main()
