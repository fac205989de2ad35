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

Held-out classes: ``--train-classes 0-4`` (``run_method(..., train_classes="0-4")``) trains on those
classes only, scores the usual metrics on them and adds one-shot accuracy (5-way 1-shot episodes) and
verification ROC-AUC on the test images of the other classes, which the model never saw; the
results go to ``results/train-classes-0-4/`` and ``images/train-classes-0-4/``, beside two reference
rows scored the same way (``held_out_baselines``: raw pixels and the untrained network).

Omniglot (one-shot learning on alphabets never seen in training)::

    python experiments.py --dataset omniglot       # train the recipe (OMNIGLOT_RECIPE), save weights/omniglot_siamese.pt
    python experiments.py --dataset omniglot --one-shot-runs PATH [--weights FILE]   # Lake's 20 runs
"""

import argparse
import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import (BalancedBatchSampler, BatchRandomAffine, InMemoryDataset, OmniglotAlphabets, OneShotRuns,
                      SiameseMNIST, TripletMNIST, load_dataset)
from losses import ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss
from metrics import (AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, best_threshold, evaluate_embeddings,
                     extract_embeddings, few_shot_accuracy, one_shot_run_errors, verification_roc_auc)
from networks import ClassificationNet, EmbeddingNet, ShiftAveragedEmbedding, SiameseNet, SiameseNetwork, TripletNet
from trainer import fit
from autoencoders import run_experiment  # noqa: F401  (the autoencoder experiments' API)
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
               images_dir="images", results_dir="results", progress=True, channels_last=False,
               train_classes=None):
    """Train one method on ``dataset``, evaluate and plot its embeddings, and record the result.

    Takes the dataset name, the method (see ``METHODS``), for ``online-triplet`` the selector
    name, the embedding size, the number of epochs (``quick`` forces one epoch on small subsets)
    and a seed; ``splits`` may hand in preloaded ``(train, test)`` datasets; ``channels_last``
    trains in channels-last memory format (faster on CPUs, see ``trainer.fit``). Writes
    ``images/<dataset>_<method>[_<dim>d]_{train,test}.png`` and merges the result row into
    ``results/<dataset>.json`` and ``.md`` (skipped when the directory is None; a quick run writes
    under ``images/quick/`` and ``results/quick/`` instead).
    ``train_classes`` (e.g. ``"0-4"``, see ``parse_classes``): train and score on those classes only,
    add the one-shot accuracy and ROC-AUC of the other classes' test images (``evaluate_held_out``) and
    write under ``images/train-classes-<tag>/`` and ``results/train-classes-<tag>/``.
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
    held_out = None
    if train_classes is not None:
        (train_set, test_set), held_out, classes_tag = held_out_splits(train_set, test_set, train_classes)
        images_dir = None if images_dir is None else os.path.join(images_dir, f"train-classes-{classes_tag}")
        results_dir = None if results_dir is None else os.path.join(results_dir, f"train-classes-{classes_tag}")
    torch.manual_seed(seed)
    model, loss_fn, train_loader, val_loader, metrics, learning_rate, weight_decay = build_training(
        method, train_set, test_set, selector, embedding_dim, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, STEP_SIZE, gamma=GAMMA)
    label = method_label(method, selector)
    print(f"== {dataset}: {label}, {embedding_dim}-D, {epochs} epochs", flush=True)
    history = fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, epochs,
                  metrics=metrics, device=device, progress=progress, log_interval=50,
                  channels_last=channels_last)

    train_embeddings, train_labels = extract_embeddings(DataLoader(train_set, batch_size=EVALUATION_BATCH), model)
    test_embeddings, test_labels = extract_embeddings(DataLoader(test_set, batch_size=EVALUATION_BATCH), model)
    row = {"dataset": dataset, "method": label, "embedding_dim": embedding_dim, "epochs": epochs,
           "seed": seed, "quick": quick}
    row.update(evaluate_embeddings(train_embeddings, train_labels, test_embeddings, test_labels, seed=seed))
    if method == "softmax":
        row["classifier_accuracy"] = history["val_accuracy"][-1] / 100
    row["seconds_per_epoch"] = sum(history["seconds"]) / len(history["seconds"])
    row["channels_last"] = channels_last
    row["final_train_loss"] = history["train_loss"][-1]
    row["final_val_loss"] = history["val_loss"][-1]
    if held_out is not None:
        row["train_classes"] = classes_tag
        row.update(evaluate_held_out(model, held_out, seed))

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
    columns = COLUMNS + [column for column in HELD_OUT_COLUMNS if any(column[0] in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_methods(dataset, methods=METHODS, selectors=("random-hard",), embedding_dim=2, epochs=20,
                seed=0, quick=False, root="data", download=False, device=None,
                images_dir="images", results_dir="results", progress=True, channels_last=False,
                train_classes=None):
    """Run several methods on one dataset (the data is loaded once), write the comparison figures
    and return the result rows. ``train_classes``: see ``run_method``."""
    splits = load_splits(dataset, root, download, quick)
    rows = []
    for method in methods:
        for selector in (selectors if method == "online-triplet" else [None]):
            rows.append(run_method(dataset, method, selector=selector, embedding_dim=embedding_dim,
                                   epochs=epochs, seed=seed, quick=quick, device=device, splits=splits,
                                   images_dir=images_dir, results_dir=results_dir, progress=progress,
                                   channels_last=channels_last, train_classes=train_classes))
    if train_classes is not None:  # what the held-out scores mean needs these two references
        baselines_dir = results_dir
        if quick and results_dir is not None:  # where run_method put a quick run's table
            baselines_dir = os.path.join(results_dir, "quick")
        rows += held_out_baselines(dataset, *splits, train_classes, embedding_dim, seed, baselines_dir)
    if images_dir is not None:
        comparison_dir = os.path.join(images_dir, "quick") if quick else images_dir
        if train_classes is not None:  # where run_method put the plots
            comparison_dir = os.path.join(comparison_dir, "train-classes-" + rows[0]["train_classes"])
        offline_online = [("siamese", "online-contrastive")]
        offline_online += [("triplet", method_label("online-triplet", s)) for s in selectors]
        plot_comparison(dataset, offline_online, embedding_dim, comparison_dir)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["autoencoders"]:  # python experiments.py autoencoders --dataset ... (autoencoders.main)
        import autoencoders
        return autoencoders.main(argv[1:])
    parser = argparse.ArgumentParser(description="Train and evaluate siamese/triplet embeddings.")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASETS + ("omniglot",))
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated subset of {', '.join(METHODS)}, or 'all'")
    parser.add_argument("--selectors", default="random-hard",
                        help=f"online-triplet selectors, comma-separated subset of "
                             f"{', '.join(SELECTORS)}, or 'all'")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 20 (MNIST-like), the recipe's (omniglot)")
    parser.add_argument("--embedding-dim", type=int, default=None,
                        help="default: 2 (MNIST-like), the recipe's (omniglot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data", help="where to look for (and download) the data")
    parser.add_argument("--download", action="store_true",
                        help="download with torchvision when the data is not found locally")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small subsets, one epoch")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    parser.add_argument("--channels-last", action="store_true",
                        help="train in channels-last memory format (faster convolutions on CPUs)")
    parser.add_argument("--train-classes", default=None,
                        help="train on these classes only (e.g. 0-4 or 0,1,2,3,4) and measure one-shot "
                             "accuracy and verification on the others")
    parser.add_argument("--omniglot-root", default=None,
                        help="folder holding images_background_small1/2 (.zip or extracted); default "
                             "../shared/data/omniglot next to the repository")
    parser.add_argument("--one-shot-runs", default=None,
                        help="omniglot: score saved weights on Lake's one-shot runs (folder or .zip of run01..run20)")
    parser.add_argument("--weights", default=None, help=f"omniglot weights file (default {OMNIGLOT_WEIGHTS})")
    args = parser.parse_args(argv)
    if args.dataset == "omniglot":
        return omniglot_main(args)
    args.epochs = 20 if args.epochs is None else args.epochs
    args.embedding_dim = 2 if args.embedding_dim is None else args.embedding_dim

    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    selectors = tuple(SELECTORS) if args.selectors == "all" else tuple(args.selectors.split(","))
    for method in methods:
        _check_choice(method, METHODS, "method")
    for selector in selectors:
        _check_choice(selector, tuple(SELECTORS), "selector")
    started = time.perf_counter()
    rows = run_methods(args.dataset, methods, selectors, args.embedding_dim, args.epochs, args.seed,
                       args.quick, args.root, args.download, args.device,
                       progress=not args.no_progress, channels_last=args.channels_last,
                       train_classes=args.train_classes)
    print()
    print(results_table(rows))
    where = "quick/" if args.quick else ""
    if args.train_classes is not None:
        where += "train-classes-" + rows[0]["train_classes"] + "/"
    print(f"Total {time.perf_counter() - started:.0f} s. Results in results/{where}{args.dataset}.md, "
          f"plots in images/{where}.")
    return rows


def omniglot_main(args):
    """The command line's ``--dataset omniglot``: score saved weights on one-shot runs, or train and evaluate."""
    weights = OMNIGLOT_WEIGHTS if args.weights is None else args.weights
    if args.one_shot_runs is not None:
        return run_one_shot_runs(args.one_shot_runs, weights, args.device or "cpu")
    recipe = {}
    if args.methods != "all":
        recipe["method"] = args.methods
    if args.selectors != "random-hard":
        recipe["selector"] = args.selectors
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    if args.embedding_dim is not None:
        recipe["embedding_dim"] = args.embedding_dim
    result = run_omniglot(args.omniglot_root, weights, quick=args.quick, seed=args.seed, device=args.device,
                          progress=not args.no_progress, **recipe)
    print()
    print(omniglot_table(result["evaluation"], result["evaluation_shift_averaged"]))
    saved = "" if args.quick else f"; weights in {weights}"
    print(f"Training {result['seconds']:.0f} s. Results in results/{'quick/' if args.quick else ''}omniglot.md{saved}.")
    return result


# ----------------------------------------------------------------------------- held-out classes
# Train on some classes only and measure one-shot learning on the others (``--train-classes``).

HELD_OUT_EPISODES = 1000
HELD_OUT_COLUMNS = [("train_classes", "train classes", "{}"),
                    ("held_out_one_shot", "held-out 1-shot acc", "{:.3f}"),
                    ("held_out_one_shot_ci95", "+-", "{:.3f}"),
                    ("held_out_roc_auc", "held-out ROC-AUC", "{:.3f}")]


def parse_classes(spec, n_classes):
    """Sorted class ids from ``spec``: a list of ints, or a string of ids and ranges such as ``'0-4'``,
    ``'0,1,2,3,4'`` or ``'0-2,7'``. Each must be in [0, n_classes); at least one class and at least two
    others (for the held-out episodes) must remain."""
    if isinstance(spec, str):
        ids = []
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            first, dash, last = part.partition("-")
            if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
                raise ValueError(f"cannot read train classes {spec!r}: use ids and ranges such as '0-4' or '0,1,2,3,4'")
            ids += range(int(first), int(last) + 1) if dash else [int(first)]
    else:
        ids = [int(class_id) for class_id in spec]
    ids = sorted(set(ids))
    if not ids or ids[0] < 0 or ids[-1] >= n_classes:
        raise ValueError(f"train classes must be ids in 0..{n_classes - 1}, got {spec!r}")
    if n_classes - len(ids) < 2:
        raise ValueError(f"train classes {spec!r} leave {n_classes - len(ids)} held-out classes; leave at least 2")
    return ids


def class_subset(dataset, class_ids):
    """InMemoryDataset of the items of ``dataset`` whose class is in ``class_ids``, relabelled 0, 1, ...
    in the order of class_ids, with their names (and the dataset's mean and std when it has them)."""
    keep = torch.isin(dataset.targets, torch.as_tensor(class_ids))
    relabel = torch.full((int(dataset.targets.max()) + 1,), -1, dtype=torch.long)
    relabel[torch.as_tensor(class_ids)] = torch.arange(len(class_ids))
    subset = InMemoryDataset(dataset.data[keep], relabel[dataset.targets[keep]], train=dataset.train,
                             transform=dataset.transform, classes=[dataset.classes[k] for k in class_ids])
    if hasattr(dataset, "mean"):
        subset.mean, subset.std = dataset.mean, dataset.std
    return subset


def held_out_splits(train_set, test_set, train_classes):
    """``((seen train, seen test), held-out test, tag)`` for training on ``train_classes`` only (see
    parse_classes); ``tag`` names the class set in file names, e.g. '0-4'."""
    seen = parse_classes(train_classes, len(train_set.classes))
    unseen = [k for k in range(len(train_set.classes)) if k not in seen]
    tag = ",".join(str(k) for k in seen) if seen != list(range(seen[0], seen[-1] + 1)) else f"{seen[0]}-{seen[-1]}"
    return ((class_subset(train_set, seen), class_subset(test_set, seen)), class_subset(test_set, unseen), tag)


class PixelEmbedding(nn.Module):
    """The no-learning reference embedding: images ``(B, C, H, W)`` -> their pixels ``(B, C*H*W)``."""

    def forward(self, x):
        return x.flatten(1)

    def get_embedding(self, x):
        return self(x)


HELD_OUT_BASELINES = ("pixels", "untrained network")


def held_out_baselines(dataset, train_set, test_set, train_classes, embedding_dim=2, seed=0,
                       results_dir="results"):
    """Reference rows for a held-out-class run, scored exactly as ``run_method`` scores a trained model:
    'pixels' (the normalised images as vectors, ``PixelEmbedding``) and 'untrained network' (the
    ``EmbeddingNet`` every method starts from: same ``embedding_dim`` and seed, no training). A trained
    embedding should beat both on its own classes; on the held-out ones it may not (see the README).
    Takes the full ``(train_set, test_set)`` and the ``train_classes`` spec; records the rows under
    ``results_dir/train-classes-<tag>/`` (skipped when None) and returns them."""
    (seen_train, seen_test), held_out, classes_tag = held_out_splits(train_set, test_set, train_classes)
    in_channels, image_size = seen_train.data.shape[1], seen_train.data.shape[-1]
    rows = []
    for name in HELD_OUT_BASELINES:
        torch.manual_seed(seed)  # run_method's seed before it builds the network: the same initial weights
        model = (PixelEmbedding() if name == "pixels" else
                 EmbeddingNet(embedding_dim, in_channels=in_channels, image_size=image_size))
        embedded = [extract_embeddings(DataLoader(split, batch_size=EVALUATION_BATCH), model)
                    for split in (seen_train, seen_test)]
        dimension = embedded[0][0].shape[1]
        row = {"dataset": dataset, "method": name, "embedding_dim": dimension, "epochs": 0, "seed": seed,
               "train_classes": classes_tag}
        row.update(evaluate_embeddings(*embedded[0], *embedded[1], seed=seed))
        row.update(evaluate_held_out(model, held_out, seed))
        if results_dir is not None:
            record_result(row, os.path.join(results_dir, f"train-classes-{classes_tag}"))
        rows.append(row)
    return rows


def evaluate_held_out(model, held_out, seed=0, n_episodes=HELD_OUT_EPISODES):
    """One-shot accuracy (5-way 1-shot, or fewer ways when fewer classes are held out; 1 query per class,
    seeded episodes) with its 95% interval, and verification ROC-AUC, on held-out classes never trained on.
    Returns {'held_out_one_shot', 'held_out_one_shot_ci95', 'held_out_n_way', 'held_out_roc_auc'}."""
    embeddings, labels = extract_embeddings(DataLoader(held_out, batch_size=EVALUATION_BATCH), model)
    n_way = min(5, len(held_out.classes))
    episodes = few_shot_accuracy(embeddings, labels, n_way, 1, n_episodes, seed=seed)
    return {"held_out_one_shot": episodes["accuracy"], "held_out_one_shot_ci95": episodes["ci95"],
            "held_out_n_way": n_way, "held_out_roc_auc": verification_roc_auc(embeddings, labels, seed=seed)}


# -------------------------------------------------------------------------------------- Omniglot
# One-shot learning on characters of alphabets never seen in training: a SiameseNetwork trained on
# the background alphabets of images_background_small1, evaluated by N-way K-shot episodes and pair
# verification on the alphabets of images_background_small2 that small1 lacks.

OMNIGLOT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "shared", "data", "omniglot")
OMNIGLOT_BACKGROUND = "images_background_small1"  # .zip or extracted folder: 5 alphabets, 136 characters
OMNIGLOT_EVALUATION = "images_background_small2"  # its alphabets that the background lacks are evaluated
OMNIGLOT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "omniglot_siamese.pt")
OMNIGLOT_METHODS = ("siamese", "online-contrastive", "online-triplet")
# The recipe `python experiments.py --dataset omniglot` trains (its measured accuracy: results/omniglot.md).
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
}
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


def train_omniglot(train_set, method="online-triplet", selector="random-hard", margin=1.0, embedding_dim=64,
                   channels=64, epochs=40, batch_classes=32, batch_samples=5, pair_batch=128, alphabet_batches=False,
                   learning_rate=1e-3, weight_decay=0.0, seed=0, device=None, progress=True, **data_settings):
    """Train a SiameseNetwork on ``train_set`` (an OmniglotAlphabets) with one of the library's losses.

    ``method``: 'siamese' (SiameseMNIST pairs, ContrastiveLoss(CONTRASTIVE_MARGIN)), 'online-contrastive'
    (BalancedBatchSampler batches of batch_classes x batch_samples, OnlineContrastiveLoss with hard negative
    pairs) or 'online-triplet' (same batches, OnlineTripletLoss with ``selector``, see SELECTORS);
    ``alphabet_batches`` draws all the characters of a batch from one alphabet (BalancedBatchSampler's
    groups), so that training negatives are as alike as the within-alphabet test's. Adam with
    cosine learning-rate decay over ``epochs``. The recipe's data settings (image_size, quarter_turns,
    mirror, augment) are accepted and ignored, so ``train_omniglot(train_set, **OMNIGLOT_RECIPE)`` works: they shaped
    ``train_set`` already. Returns ``(model in eval mode, history)``, ``history`` as ``fit`` returns it.
    """
    _check_choice(method, OMNIGLOT_METHODS, "Omniglot method")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SiameseNetwork(train_set.image_size, embedding_dim, channels=channels)
    metrics = []
    if method == "siamese":
        loss_fn = ContrastiveLoss(CONTRASTIVE_MARGIN)
        train_loader = DataLoader(SiameseMNIST(train_set), batch_size=pair_batch, shuffle=True, generator=generator)
    else:
        if method == "online-contrastive":
            loss_fn = OnlineContrastiveLoss(margin, HardNegativePairSelector())
        else:
            _check_choice(selector, tuple(SELECTORS), "selector")
            loss_fn = OnlineTripletLoss(margin, SELECTORS[selector](margin, generator))
            metrics = [AverageNonzeroTripletsMetric()]
        train_loader = DataLoader(train_set, batch_sampler=BalancedBatchSampler(
            train_set.targets, min(batch_classes, len(train_set.classes)), batch_samples, seed=seed,
            groups=train_set.alphabets if alphabet_batches else None))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    history = fit(train_loader, None, model, loss_fn, optimizer, scheduler, epochs, metrics=metrics,
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


def omniglot_table(*results):
    """Markdown table of one or more of evaluate_omniglot's results (accuracies in percent with their 95%
    intervals); the rows of a shift-averaged evaluation say so."""
    lines = ["| task | alphabets | episodes | accuracy | error |", "|---|---|---|---|---|"]
    for result in results:
        shift = result.get("test_shift", 0)
        suffix = f", shift-averaged (+-{shift} px)" if shift else ""
        for row in result["episodes"]:
            accuracy, ci95 = 100 * row["accuracy"], 100 * row["ci95"]
            lines.append(f"| {row['task']}{suffix} | {', '.join(row['alphabets'])} | {row['n_episodes']} | "
                         f"{accuracy:.1f}% +- {ci95:.1f} | {100 - accuracy:.1f}% |")
        verification = result["verification"]
        validation, test = verification["validation_drawers"], verification["test_drawers"]
        lines.append(f"| verification (threshold {verification['threshold']:.3f} from drawers "
                     f"{validation[0]}-{validation[-1]}){suffix} | drawers {test[0]}-{test[-1]} | "
                     f"pairs | {100 * verification['test_accuracy']:.1f}% (ROC-AUC {verification['roc_auc']:.3f}) | "
                     f"{100 - 100 * verification['test_accuracy']:.1f}% |")
    return "\n".join(lines) + "\n"


def save_omniglot_model(model, path, **information):
    """Save ``model``'s config and weights (plus any JSON-able ``information``: recipe, command, results)
    to ``path`` (folders created). Returns the path."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    torch.save({"config": model.config(), "state_dict": model.state_dict(), **information}, path)
    return path


def load_omniglot_model(path=OMNIGLOT_WEIGHTS, device="cpu"):
    """The SiameseNetwork saved by save_omniglot_model at ``path``, in eval mode."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path}: train them with `python experiments.py --dataset omniglot` "
                                "or pass --weights")
    saved = torch.load(path, map_location=device, weights_only=True)
    model = SiameseNetwork(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()


def run_omniglot(root=None, weights=OMNIGLOT_WEIGHTS, results_dir="results", quick=False, seed=0, device=None,
                 progress=True, n_episodes=OMNIGLOT_EPISODES, **recipe):
    """Train the Omniglot recipe (OMNIGLOT_RECIPE, any key overridden by ``recipe``), save the weights to
    ``weights`` (skipped when None), evaluate on the new alphabets and write results/omniglot.md and .json.

    ``quick``: OMNIGLOT_QUICK's epochs and episodes, no weights saved, results under results/quick/.
    Returns {'recipe', 'seconds', 'train_alphabets', 'evaluation' (evaluate_omniglot's result) and
    'evaluation_shift_averaged' (the same with test_shift=OMNIGLOT_TEST_SHIFT)}.
    """
    settings = {**OMNIGLOT_RECIPE, **recipe}
    unknown = sorted(set(recipe) - set(OMNIGLOT_RECIPE))
    if unknown:
        raise ValueError(f"unknown Omniglot recipe settings {unknown}; the settings are {sorted(OMNIGLOT_RECIPE)}")
    if quick:
        settings["epochs"], n_episodes, weights = OMNIGLOT_QUICK["epochs"], OMNIGLOT_QUICK["n_episodes"], None
        results_dir = None if results_dir is None else os.path.join(results_dir, "quick")
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
        save_omniglot_model(model, weights, command="python experiments.py --dataset omniglot", **result)
    if results_dir is not None:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, "omniglot.json"), "w") as file:
            json.dump(result, file, indent=1)
        with open(os.path.join(results_dir, "omniglot.md"), "w") as file:
            file.write(omniglot_table(evaluation, shift_averaged))
    return result


def run_one_shot_runs(path, weights=OMNIGLOT_WEIGHTS, device="cpu"):
    """Score the saved model on Lake et al.'s one-shot runs at ``path`` (folder or .zip; datasets.OneShotRuns):
    prints each run's error, then ``mean error: X.X%`` as the last line. Returns one_shot_run_errors' dict."""
    model = load_omniglot_model(weights, device)
    result = one_shot_run_errors(model, OneShotRuns(path, image_size=model.image_size), device)
    for name, error in zip(result["names"], result["errors"]):
        print(f"{name}: error {100 * error:.1f}%")
    print(f"mean error: {100 * result['mean_error']:.1f}%")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
