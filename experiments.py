"""The MNIST / Fashion-MNIST study: train embeddings with each approach, plot them, measure them.

Methods (the classic study's, with its hyper-parameters as defaults):

- ``softmax``: a classifier (``ClassificationNet``, NLL loss); embeddings from its penultimate layer;
- ``siamese``: ``SiameseMNIST`` pairs + ``ContrastiveLoss``;
- ``triplet``: ``TripletMNIST`` triplets + ``TripletLoss``;
- ``online-contrastive``: ``BalancedBatchSampler`` batches + ``OnlineContrastiveLoss`` with hard
  negative pairs;
- ``online-triplet``: ``BalancedBatchSampler`` batches + ``OnlineTripletLoss`` with a selector:
  ``all``, ``hardest``, ``random-hard`` (default), ``semi-hard`` or ``batch-hard``.

Every trained embedding is measured on the test set with one set of metrics that is comparable
between approaches (``metrics.evaluate_embeddings``: Precision@1, R-Precision, MAP@R, k-NN accuracy
with the train set as gallery, NMI of k-means clusters, pair verification ROC-AUC), plotted to
``images/`` and tabulated in ``results/<dataset>.md`` and ``.json``.

Python: ``run_method("fashion-mnist", "online-triplet", selector="semi-hard", epochs=20)`` returns
the result row; ``run_methods(...)`` runs several and writes the table. Command line::

    python experiments.py --dataset fashion-mnist --methods all --epochs 20
    python experiments.py --dataset fashion-mnist --methods online-triplet --selectors all,batch-hard
    python experiments.py --quick          # a smoke run: small subsets, one epoch
"""

import argparse
import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import BalancedBatchSampler, InMemoryDataset, SiameseMNIST, TripletMNIST, load_dataset
from losses import ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss
from metrics import (AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, evaluate_embeddings,
                     extract_embeddings)
from networks import ClassificationNet, EmbeddingNet, SiameseNet, TripletNet
from trainer import fit
from utils import (AllTripletSelector, BatchHardTripletSelector, HardestNegativeTripletSelector,
                   HardNegativePairSelector, RandomNegativeTripletSelector,
                   SemihardNegativeTripletSelector)

METHODS = ("softmax", "siamese", "triplet", "online-contrastive", "online-triplet")
SELECTORS = {
    "all": lambda margin, generator: AllTripletSelector(),
    "hardest": lambda margin, generator: HardestNegativeTripletSelector(margin),
    "random-hard": lambda margin, generator: RandomNegativeTripletSelector(margin, generator=generator),
    "semi-hard": lambda margin, generator: SemihardNegativeTripletSelector(margin, generator=generator),
    "batch-hard": lambda margin, generator: BatchHardTripletSelector(),
}
DATASETS = ("mnist", "fashion-mnist")

# The classic study's settings.
MARGIN = 1.0
LEARNING_RATE = {"softmax": 1e-2}  # every other method: 1e-3
DEFAULT_LEARNING_RATE = 1e-3
BATCH_SIZE = {"softmax": 256, "siamese": 128, "triplet": 128}
BALANCED_BATCH = (10, 25)  # classes x samples per class, for the online methods
WEIGHT_DECAY = {"online-triplet": 1e-4}
STEP_SIZE, GAMMA = 8, 0.1
EVALUATION_BATCH = 1000

# --quick: a smoke run on small subsets of the data, one epoch.
QUICK_SIZES = (2000, 1000)  # train, test items
QUICK_EPOCHS = 1


def method_label(method, selector=None):
    """Row name of a method: ``online-triplet`` carries its selector, e.g. ``online-triplet/semi-hard``."""
    return f"{method}/{selector}" if method == "online-triplet" else method


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def load_splits(dataset, root="data", download=False, quick=False):
    """``(train, test)`` ``InMemoryDataset`` s of ``dataset`` ("mnist" or "fashion-mnist"),
    normalised as usual; with ``quick``, the first ``QUICK_SIZES`` items of each."""
    splits = [load_dataset(dataset, root=root, train=train, download=download, in_memory=True)
              for train in (True, False)]
    if quick:
        splits = [_subset(split, size) for split, size in zip(splits, QUICK_SIZES)]
    return tuple(splits)


def _subset(dataset, size):
    subset = InMemoryDataset(dataset.data[:size], dataset.targets[:size], train=dataset.train,
                             classes=dataset.classes)
    subset.mean, subset.std = dataset.mean, dataset.std
    return subset


def build_training(method, train_set, test_set, selector="random-hard", embedding_dim=2, seed=0):
    """Everything ``fit`` needs for one method: ``(model, loss_fn, train_loader, val_loader,
    metrics, learning_rate, weight_decay)``, with the classic study's settings."""
    _check_choice(method, METHODS, "method")
    n_classes = len(train_set.classes)
    in_channels, image_size = train_set.data.shape[1], train_set.data.shape[-1]
    embedding_net = EmbeddingNet(embedding_dim, in_channels=in_channels, image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    metrics = []
    if method == "softmax":
        model = ClassificationNet(embedding_net, n_classes)
        loss_fn = nn.NLLLoss()
        train_loader = DataLoader(train_set, batch_size=BATCH_SIZE[method], shuffle=True, generator=generator)
        val_loader = DataLoader(test_set, batch_size=EVALUATION_BATCH)
        metrics = [AccumulatedAccuracyMetric()]
    elif method in ("siamese", "triplet"):
        wrapper, model, loss_fn = ((SiameseMNIST, SiameseNet(embedding_net), ContrastiveLoss(MARGIN))
                                   if method == "siamese" else
                                   (TripletMNIST, TripletNet(embedding_net), TripletLoss(MARGIN)))
        train_loader = DataLoader(wrapper(train_set), batch_size=BATCH_SIZE[method], shuffle=True,
                                  generator=generator)
        val_loader = DataLoader(wrapper(test_set), batch_size=EVALUATION_BATCH)
    else:
        model = embedding_net
        if method == "online-contrastive":
            loss_fn = OnlineContrastiveLoss(MARGIN, HardNegativePairSelector())
        else:
            _check_choice(selector, tuple(SELECTORS), "selector")
            loss_fn = OnlineTripletLoss(MARGIN, SELECTORS[selector](MARGIN, generator))
            metrics = [AverageNonzeroTripletsMetric()]
        n_batch_classes = min(BALANCED_BATCH[0], n_classes)
        train_loader = DataLoader(train_set, batch_sampler=BalancedBatchSampler(
            train_set.targets, n_batch_classes, BALANCED_BATCH[1], seed=seed))
        val_loader = DataLoader(test_set, batch_sampler=BalancedBatchSampler(
            test_set.targets, n_batch_classes, BALANCED_BATCH[1], seed=seed + 1))
    return (model, loss_fn, train_loader, val_loader, metrics,
            LEARNING_RATE.get(method, DEFAULT_LEARNING_RATE), WEIGHT_DECAY.get(method, 0.0))


def run_method(dataset, method, *, selector="random-hard", embedding_dim=2, epochs=20, seed=0,
               quick=False, root="data", download=False, device=None, splits=None,
               images_dir="images", results_dir="results", progress=True):
    """Train one method on ``dataset``, evaluate and plot its embeddings, and record the result.

    Takes the dataset name, the method (see ``METHODS``), for ``online-triplet`` the selector
    name, the embedding size, the number of epochs (``quick`` forces one epoch on small subsets)
    and a seed; ``splits`` may hand in preloaded ``(train, test)`` datasets. Writes
    ``images/<dataset>_<method>[_<dim>d]_{train,test}.png`` and merges the result row into
    ``results/<dataset>.json`` and ``.md`` (skipped when the directory is None; a quick run writes
    under ``images/quick/`` and ``results/quick/`` instead).
    Returns the row: a dict of the evaluation metrics, seconds per epoch, epochs and settings.
    """
    _check_choice(dataset, DATASETS, "dataset")
    _check_choice(method, METHODS, "method")
    if method == "online-triplet":
        _check_choice(selector, tuple(SELECTORS), "selector")
    if quick:  # smoke runs never overwrite the committed plots and tables
        epochs = QUICK_EPOCHS
        images_dir = None if images_dir is None else os.path.join(images_dir, "quick")
        results_dir = None if results_dir is None else os.path.join(results_dir, "quick")
    train_set, test_set = splits if splits is not None else load_splits(dataset, root, download, quick)
    torch.manual_seed(seed)
    model, loss_fn, train_loader, val_loader, metrics, learning_rate, weight_decay = build_training(
        method, train_set, test_set, selector, embedding_dim, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, STEP_SIZE, gamma=GAMMA)
    label = method_label(method, selector)
    print(f"== {dataset}: {label}, {embedding_dim}-D, {epochs} epochs", flush=True)
    history = fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, epochs,
                  metrics=metrics, device=device, progress=progress, log_interval=50)

    train_embeddings, train_labels = extract_embeddings(DataLoader(train_set, batch_size=EVALUATION_BATCH), model)
    test_embeddings, test_labels = extract_embeddings(DataLoader(test_set, batch_size=EVALUATION_BATCH), model)
    row = {"dataset": dataset, "method": label, "embedding_dim": embedding_dim, "epochs": epochs,
           "seed": seed, "quick": quick}
    row.update(evaluate_embeddings(train_embeddings, train_labels, test_embeddings, test_labels, seed=seed))
    if method == "softmax":
        row["classifier_accuracy"] = history["val_accuracy"][-1] / 100
    row["seconds_per_epoch"] = sum(history["seconds"]) / len(history["seconds"])
    row["final_train_loss"] = history["train_loss"][-1]
    row["final_val_loss"] = history["val_loss"][-1]

    if images_dir is not None:
        for split, embeddings, labels in (("train", train_embeddings, train_labels),
                                          ("test", test_embeddings, test_labels)):
            plot_embeddings(embeddings, labels, train_set.classes,
                            f"{dataset} {label} ({split}, {embedding_dim}-D)",
                            image_path(dataset, label, split, embedding_dim, images_dir))
    if results_dir is not None:
        record_result(row, results_dir)
    return row


def _image_stem(dataset, label, embedding_dim):
    suffix = "" if embedding_dim == 2 else f"_{embedding_dim}d"
    return f"{dataset}_{label.replace('/', '-')}{suffix}"


def image_path(dataset, label, split, embedding_dim=2, images_dir="images"):
    """Where ``run_method`` saves the plot of a method's ``split`` ("train" or "test") embeddings,
    e.g. ``images/fashion-mnist_online-triplet-semi-hard_test.png``."""
    return os.path.join(images_dir, f"{_image_stem(dataset, label, embedding_dim)}_{split}.png")


def _project_2d(embeddings):
    """The embeddings themselves when 2-D, else their projection on the top two principal axes."""
    if embeddings.shape[1] <= 2:
        return embeddings
    centred = embeddings - embeddings.mean(dim=0)
    _, _, directions = torch.pca_lowrank(centred, q=2, center=False)
    return centred @ directions[:, :2]


def plot_embeddings(embeddings, labels, class_names, title, path):
    """Scatter plot of ``embeddings (N, D)`` coloured by ``labels (N,)`` with a legend of class
    names (a principal-component projection above 2-D), saved to ``path``."""
    # A bare Figure, not pyplot: no backend switch, so a notebook's own plots keep working.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    points = _project_2d(embeddings.float()).numpy()
    figure = Figure(figsize=(8, 8))
    axes = figure.subplots()
    colours = colormaps["tab10"]
    for class_id, name in enumerate(class_names):
        chosen = (labels == class_id).numpy()
        axes.scatter(points[chosen, 0], points[chosen, 1], s=2, alpha=0.5, color=colours(class_id % 10),
                     label=name)
    axes.set_title(title + ("" if embeddings.shape[1] <= 2 else " - PCA projection"))
    axes.legend(markerscale=6, loc="best", fontsize=8)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    return path


def plot_comparison(dataset, pairs, embedding_dim=2, images_dir="images"):
    """Side-by-side figures of random (offline) against online mining, from the rows' saved test
    plots: one PNG per pair, e.g. ``images/fashion-mnist_siamese_vs_online-contrastive.png``."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    written = []
    for left, right in pairs:
        paths = [image_path(dataset, label, "test", embedding_dim, images_dir) for label in (left, right)]
        if not all(os.path.exists(path) for path in paths):
            continue
        figure = Figure(figsize=(16, 8))
        axes = figure.subplots(1, 2)
        for axis, path in zip(axes, paths):
            axis.imshow(mpimg.imread(path))
            axis.axis("off")
        out = os.path.join(images_dir, f"{_image_stem(dataset, left, embedding_dim)}_vs_"
                                       f"{right.replace('/', '-')}.png")
        figure.savefig(out, dpi=90, bbox_inches="tight")
        written.append(out)
    return written


# -------------------------------------------------------------------------------------- results

COLUMNS = [("method", "method", "{}"), ("embedding_dim", "dim", "{}"),
           ("precision_at_1", "P@1", "{:.3f}"), ("r_precision", "R-Prec", "{:.3f}"),
           ("map_at_r", "MAP@R", "{:.3f}"), ("knn_accuracy", "kNN acc", "{:.3f}"),
           ("nmi", "NMI", "{:.3f}"), ("roc_auc", "ROC-AUC", "{:.3f}"),
           ("classifier_accuracy", "clf acc", "{:.3f}"),
           ("seconds_per_epoch", "s/epoch", "{:.1f}"), ("epochs", "epochs", "{}")]


def record_result(row, results_dir="results"):
    """Merge ``row`` into ``results/<dataset>.json`` (one row per method and embedding size; a
    new run replaces the old row) and rewrite ``results/<dataset>.md``. Returns the rows."""
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, row["dataset"])
    rows = []
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as file:
            rows = json.load(file)
    rows = [old for old in rows
            if (old["method"], old["embedding_dim"]) != (row["method"], row["embedding_dim"])]
    rows.append(row)
    order = {label: position for position, label in enumerate(_all_labels())}
    rows.sort(key=lambda r: (r["embedding_dim"], order.get(r["method"], len(order)), r["method"]))
    with open(stem + ".json", "w") as file:
        json.dump(rows, file, indent=1)
    with open(stem + ".md", "w") as file:
        file.write(results_table(rows))
    return rows


def _all_labels():
    return [method_label(method, selector) for method in METHODS
            for selector in (SELECTORS if method == "online-triplet" else [None])]


def results_table(rows):
    """Markdown table of result rows (one line per method and embedding size)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_methods(dataset, methods=METHODS, selectors=("random-hard",), embedding_dim=2, epochs=20,
                seed=0, quick=False, root="data", download=False, device=None,
                images_dir="images", results_dir="results", progress=True):
    """Run several methods on one dataset (the data is loaded once), write the comparison figures
    and return the result rows."""
    splits = load_splits(dataset, root, download, quick)
    rows = []
    for method in methods:
        for selector in (selectors if method == "online-triplet" else [None]):
            rows.append(run_method(dataset, method, selector=selector, embedding_dim=embedding_dim,
                                   epochs=epochs, seed=seed, quick=quick, device=device, splits=splits,
                                   images_dir=images_dir, results_dir=results_dir, progress=progress))
    if images_dir is not None:
        offline_online = [("siamese", "online-contrastive")]
        offline_online += [("triplet", method_label("online-triplet", s)) for s in selectors]
        plot_comparison(dataset, offline_online, embedding_dim,
                        os.path.join(images_dir, "quick") if quick else images_dir)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train and evaluate siamese/triplet embeddings.")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated subset of {', '.join(METHODS)}, or 'all'")
    parser.add_argument("--selectors", default="random-hard",
                        help=f"online-triplet selectors, comma-separated subset of "
                             f"{', '.join(SELECTORS)}, or 'all'")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--embedding-dim", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data", help="where to look for (and download) the data")
    parser.add_argument("--download", action="store_true",
                        help="download with torchvision when the data is not found locally")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small subsets, one epoch")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    args = parser.parse_args(argv)

    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    selectors = tuple(SELECTORS) if args.selectors == "all" else tuple(args.selectors.split(","))
    for method in methods:
        _check_choice(method, METHODS, "method")
    for selector in selectors:
        _check_choice(selector, tuple(SELECTORS), "selector")
    started = time.perf_counter()
    rows = run_methods(args.dataset, methods, selectors, args.embedding_dim, args.epochs, args.seed,
                       args.quick, args.root, args.download, args.device,
                       progress=not args.no_progress)
    print()
    print(results_table(rows))
    where = "quick/" if args.quick else ""
    print(f"Total {time.perf_counter() - started:.0f} s. Results in results/{where}{args.dataset}.md, "
          f"plots in images/{where}.")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
