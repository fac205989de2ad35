"""The MNIST / Fashion-MNIST study: train embeddings with each approach, plot them, measure them.

Methods (the classic study's, with its hyper-parameters as defaults):

- ``softmax``: a classifier (``ClassificationNet``, NLL loss); embeddings from its penultimate layer;
- ``siamese``: ``SiameseMNIST`` pairs + ``ContrastiveLoss``;
- ``triplet``: ``TripletMNIST`` triplets + ``TripletLoss``;
- ``online-contrastive``: ``BalancedBatchSampler`` batches + ``OnlineContrastiveLoss`` with hard negative pairs;
- ``online-triplet``: the same batches + ``OnlineTripletLoss`` with a selector: ``all``, ``hardest``,
  ``random-hard`` (default), ``semi-hard`` or ``batch-hard``;
- ``multi-similarity``: the same batches + ``MultiSimilarityLoss`` (Wang et al. 2019), on unit-norm embeddings
  (its recipe, ``methods.RECIPES``). The three online methods may also mine a cross-batch memory of recent
  embeddings (``--memory M``, ``methods.Recipe``).

Every trained embedding is measured on the test set with one set of metrics that is comparable
between approaches (``metrics.evaluate_embeddings``: Precision@1, R-Precision, MAP@R, k-NN accuracy
with the train set as gallery, NMI of k-means clusters, pair verification ROC-AUC), plotted and
tabulated. A run's settings are one ``StudySettings``; where its outputs go, ``StudySettings.outputs``
(``results.output_dirs``): the committed study (a dataset of ``DATASETS`` with the study's epochs,
learning-rate step, network and precision; any recipe) writes ``results/`` and ``images/``, any other run
(``--quick``, ``--epochs 1``, ...) ``runs/<dataset>/<settings tag>/``, a folder of your own images
``runs/<folder name>/``. (How each method is put together: ``methods.py``; held-out classes: ``held_out.py``;
the result tables and which one a row goes to: ``study_table.py``.)

Python: ``run_method("fashion-mnist", "online-triplet", selector="semi-hard", epochs=20)`` returns
the result row; ``run_methods(...)`` runs several and writes the table. Command line::

    python experiments.py --dataset fashion-mnist --methods all --epochs 20
    python experiments.py --dataset fashion-mnist --methods online-triplet --selectors all,batch-hard
    python experiments.py --quick          # a smoke run: small subsets, one epoch (runs/fashion-mnist/quick/)
    python experiments.py --methods multi-similarity --embedding-dim 64 --memory 4096   # with a cross-batch memory
    torchrun --nproc-per-node 4 experiments.py --methods online-triplet --amp bf16   # 4 processes (GPUs)

Under torchrun every process trains its share of the one-process global batch (``build_method``) and rank 0
alone evaluates and writes (``run_method``), so N processes give one process's results up to float rounding.

Held-out classes: ``--train-classes 0-4`` (``run_method(..., train_classes="0-4")``) trains on those classes only,
scores the usual metrics on them and adds one-shot accuracy (5-way 1-shot episodes) and verification ROC-AUC on
the test images of the other classes, which the model never saw; the results go to ``results/train-classes-0-4/``
and ``images/train-classes-0-4/``, beside two reference rows scored the same way (``held_out_baselines``: raw
pixels and the untrained network).

Omniglot and the autoencoder sweep have their own command lines (``python omniglot.py``, ``python
autoencoders.py``); old names here (``experiments.run_omniglot``, ...) resolve for one release (``utils.MOVED_NAMES``).
"""

import os
import sys
import time
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader

import cli
from checkpoints import CHECKPOINT_NAME, read_model_weights
from distributed import broadcast_from_main, close_distributed, is_main_process
from held_out import HELD_OUT_BASELINES, PixelEmbedding, evaluate_held_out, held_out_splits
from image_folders import load_folder_splits
from known_datasets import load_dataset
from methods import (BALANCED_BATCH, CLASSIC, EVALUATION_BATCH, GAMMA, LATER_RECIPE_FIELDS, MARGIN, MEMORY_WARMUP,
                     METHODS, SELECTORS, STEP_SIZE, STUDY_NETWORKS, Recipe, build_training, check_memory, data_workers,
                     image_shape, method_label, method_recipe, recipe_label, recipe_tag)
from metrics import evaluate_embeddings, extract_embeddings, verification_threshold
from model_file import save_model
from networks import EmbeddingNet
from results import (RUNS_ROOT, image_path, image_stem, output_dirs, plot_embeddings, save_side_by_side,
                     settings_tag)
from runs import data_identity, open_run, record_finished_row, upgrade_run_settings
from study_table import held_out_dir, record_result, results_stem, results_table
from trainer import device_name, fit, flush_denormal_everywhere, setup_distributed
from utils import DISTANCES, check_choice, check_int, moved_attribute

DATASETS = ("mnist", "fashion-mnist")  # by name; any folder of images or CSV of path,label lines by its path

RUN_DIR = output_dirs(DATASETS[0]).checkpoints  # the committed study's run folders (checkpoints, finished rows)

# --quick: a smoke run on small subsets of the data, one epoch.
QUICK_SIZES = (2000, 1000)  # train, test items
QUICK_EPOCHS = 1


def load_splits(dataset, root="data", download=False, quick=False):
    """``(train, test)`` ``InMemoryDataset`` s of ``dataset`` ("mnist" or "fashion-mnist"),
    normalised as usual; with ``quick``, the first ``QUICK_SIZES`` items of each."""
    splits = [load_dataset(dataset, root=root, train=train, download=download, in_memory=True)
              for train in (True, False)]
    if quick:
        splits = [split.subset(slice(0, size)) for split, size in zip(splits, QUICK_SIZES)]
    return tuple(splits)


STUDY_EPOCHS = 20  # the committed study's (and run_method's default) number of epochs
# The committed study's values of the settings that name another run's output folder (StudySettings.tag), in order.
STUDY_TAG_DEFAULTS = {"quick": False, "epochs": STUDY_EPOCHS, "lr_step": STEP_SIZE, "network": "embedding-net",
                      "pretrained": None, "amp": None}
AUTO = type("Auto", (), {"__repr__": lambda self: "AUTO"})()  # an output folder where StudySettings.outputs says


class StudySettings(NamedTuple):
    """One run of the study as asked for, built once (``settings_from_args`` from the command line, or from
    the keyword arguments of ``run_methods`` / ``run_method``, which are these fields) and handed whole to
    every step.

    ``dataset``: a name of ``DATASETS``, or the path of a folder of your own images or a CSV
    (``image_folders.load_folder_splits``, ``folder`` its keyword arguments). ``methods`` / ``selectors``:
    what runs. ``epochs`` (None: ``STUDY_EPOCHS``); ``quick``: small subsets and ``QUICK_EPOCHS``; ``lr_step``:
    the learning rate falls tenfold every this many epochs. ``recipe``: None for each method's study recipe,
    ``"classic"`` or a ``Recipe`` (``methods.method_recipe``). ``network`` / ``pretrained``:
    ``build_embedding_net``; ``amp``, ``compile``, ``channels_last``, ``device``, ``progress``: how
    ``trainer.fit`` trains. ``train_classes``: train on these classes only, score the others as unseen
    (``held_out``). ``root`` / ``download``: where the known datasets are. ``fresh``: start every run folder
    over. ``model_file``: save the trained network there (one method, ``save_trained_model``, ``command``
    recorded in it). Outputs go where ``outputs()`` says, unless ``results_dir``, ``images_dir`` or
    ``run_dir`` (the folder of the run folders) name a folder, or None (not written); ``out_dir``: the
    folder under which runs that are not the committed study write (default ``results.RUNS_ROOT``; given,
    the study's too)."""

    dataset: str = "fashion-mnist"
    methods: tuple = METHODS
    selectors: tuple = ("random-hard",)
    embedding_dim: int = 2
    epochs: Optional[int] = None
    seed: int = 0
    quick: bool = False
    root: str = "data"
    download: bool = False
    device: object = None
    progress: bool = True
    channels_last: bool = False
    train_classes: object = None
    fresh: bool = False
    network: str = "embedding-net"
    pretrained: Optional[str] = None
    folder: Optional[dict] = None
    model_file: Optional[str] = None
    command: Optional[str] = None
    amp: Optional[str] = None
    compile: bool = False
    recipe: object = None
    lr_step: int = STEP_SIZE
    run_dir: object = AUTO
    images_dir: object = AUTO
    results_dir: object = AUTO
    out_dir: Optional[str] = None

    @property
    def name(self):
        """The name the outputs go by (``dataset_name``)."""
        return dataset_name(self.dataset)

    @property
    def known(self):
        """Whether the dataset is one of ``DATASETS`` (else a folder of your own images)."""
        return isinstance(self.dataset, str) and self.dataset in DATASETS

    @property
    def n_epochs(self):
        """The epochs the run trains (``epochs`` checked; ``QUICK_EPOCHS`` for a quick run)."""
        if self.quick:
            return QUICK_EPOCHS
        return STUDY_EPOCHS if self.epochs is None else check_int(self.epochs, "epochs", 1)

    def checked(self):
        """These settings, after checking the dataset, the method and selector names, the epochs, the
        learning-rate step and a recipe's memory (ValueError or FileNotFoundError naming what to change), before
        any data loads."""
        for method in self.methods:
            check_choice(method, METHODS, "method")
            if isinstance(self.recipe, Recipe):
                check_memory(method, self.recipe.memory, self.recipe.memory_warmup)
        for selector in self.selectors:
            check_choice(selector, tuple(SELECTORS), "selector")
        check_int(self.lr_step, "lr_step", 1)
        _ = self.name, self.n_epochs  # each raises for an unknown dataset, a missing path or a bad epoch count
        return self

    def tag(self):
        """The settings that set a run of a known dataset apart from the committed study, as a folder name
        (``results.settings_tag`` against ``STUDY_TAG_DEFAULTS``): ``""`` for the study's, else e.g. ``"quick"``
        (whatever its epochs), ``"epochs-1"``, ``"epochs-5_lr-step-3"``, ``"network-resnet18"``, ``"amp-bf16"``.
        (The recipe, size, seed and held-out classes are in the row's key and file names.)"""
        pretrained = None if self.pretrained is None else os.path.basename(str(self.pretrained))
        return settings_tag({"quick": self.quick, "epochs": STUDY_EPOCHS if self.quick else self.n_epochs,
                             "lr_step": self.lr_step, "network": self.network, "pretrained": pretrained,
                             "amp": self.amp}, STUDY_TAG_DEFAULTS)

    def outputs(self):
        """Where this run writes, a ``results.OutputDirs``: ``output_dirs(name, tag, committed=...)``, committed
        for a known dataset with the study's settings (``tag() == ""``) and no ``out_dir``; a folder of your own
        images writes everything under ``<out_dir or runs>/<folder name>/``. ``results_dir``, ``images_dir``
        and ``run_dir`` replace their folder when they are not ``AUTO``."""
        committed = self.known and not self.tag() and self.out_dir is None
        dirs = output_dirs(self.name, self.tag() if self.known else "", committed=committed,
                           root=RUNS_ROOT if self.out_dir is None else self.out_dir)
        given = {"results": self.results_dir, "images": self.images_dir, "checkpoints": self.run_dir}
        return dirs._replace(**{field: value for field, value in given.items() if value is not AUTO})

    def row_settings(self, label):
        """The settings of the method ``label``'s run as its result row records them (``method_settings``)."""
        return method_settings(self.name, label, self.embedding_dim, self.n_epochs, self.seed, self.quick,
                               self.channels_last, self.train_classes, self.network, self.pretrained, self.amp,
                               self.compile, self.recipe, self.lr_step)

    def for_rank(self):
        """The settings this process runs with: unchanged on the main process, with nothing to write (no
        results, plots, model file or progress bars) on the other ranks of a torchrun group."""
        if is_main_process():
            return self
        return self._replace(images_dir=None, results_dir=None, model_file=None, progress=False)


def run_method(dataset, method, *, selector="random-hard", splits=None, held_out=None, run_dir=None, **options):
    """Train one method on ``dataset``, evaluate and plot its embeddings, and record the result.

    Takes the dataset and the method (see ``METHODS``; ``selector``: the selector name of ``online-triplet``);
    ``options``: any field of ``StudySettings`` (embedding_dim, epochs, seed, quick, recipe, lr_step, ...).
    ``splits`` may hand in preloaded ``(train, test)`` datasets; ``held_out`` a ready dataset of classes never
    trained on, scored like held-out classes (a folder's ``--held-out-classes``). Writes the plots
    ``<images>/<dataset>_<method>[_<dim>d]_{train,test}.png`` (``image_path``; another recipe's in
    ``recipe_images_dir``) and merges the row into ``<results>/<stem>.json`` and ``.md`` (``record_result``),
    where ``StudySettings.outputs`` says; with ``train_classes``, both under ``train-classes-<tag>/``.

    ``run_dir``: this method's own run folder (see ``method_run_dir`` and ``runs``): a checkpoint after every
    epoch and the finished row; run again with the same settings and data, a finished method is read back
    (and ``model_file`` written from its checkpoint), an interrupted one resumes from its last epoch and gives
    the row an uninterrupted run gives (up to the timings); ``fresh=True`` deletes the folder first; other
    settings or data are refused with a message. Under torchrun every rank trains its share
    (``build_method``); rank 0 alone evaluates, plots and writes, and every rank returns rank 0's row.
    Returns the row: a dict of the evaluation metrics, seconds per epoch, epochs and settings.
    """
    settings = StudySettings(dataset, **options)
    return _run_one(settings, method, selector, splits, held_out, run_dir)


def _run_one(settings, method, selector, splits=None, held_out=None, run_dir=None):
    """``run_method`` of ``settings`` (a ``StudySettings``)."""
    settings = settings.checked()
    name = settings.name
    device, _, _ = setup_distributed(settings.device)
    writer, settings = is_main_process(), settings.for_rank()
    check_choice(method, METHODS, "method")
    if method == "online-triplet":
        check_choice(selector, tuple(SELECTORS), "selector")
    label = method_label(method, selector)
    recipe = method_recipe(label, settings.recipe)
    row_settings, dirs = settings.row_settings(label), settings.outputs()
    finished = broadcast_from_main(_open_method_run(settings, run_dir, row_settings) if writer else None)
    if finished is not None:
        if writer:
            print(f"== {name}: {label}, {settings.embedding_dim}-D: finished before, row read from {run_dir}",
                  flush=True)
            _read_back(settings, finished, method, selector, run_dir, splits)
        return finished
    if splits is None:
        splits, held_out = _load_data(settings)
    train_set, test_set = splits
    classes_tag, results_dir, images_dir = None, dirs.results, dirs.images
    if settings.train_classes is not None:
        (train_set, test_set), held_out, classes_tag = held_out_splits(train_set, test_set, settings.train_classes)
        images_dir, results_dir = held_out_dir(images_dir, classes_tag), held_out_dir(results_dir, classes_tag)
    images_dir = recipe_images_dir(images_dir, label, recipe)
    if int(torch.bincount(torch.as_tensor(test_set.targets)).max()) < 2:  # checked now, not after training
        raise ValueError("every class has at most one validation image, so retrieval and verification cannot be "
                         "measured; raise --val-fraction (e.g. 0.25) or add images")
    model, history = _train(settings, method, selector, recipe, (train_set, test_set), run_dir, device)
    row = None
    if writer:
        row = finish_run(dict(row_settings, train_classes=classes_tag), method, model, history, (train_set, test_set),
                         held_out, images_dir, results_dir, run_dir, _model_file(settings, dirs, label),
                         settings.command)
    return broadcast_from_main(row)


def _train(settings, method, selector, recipe, splits, run_dir, device):
    """Build the method's training (``build_training``, seeded) and fit it, resuming from ``run_dir``'s
    checkpoint when there is one. Returns ``(model, history)``."""
    torch.manual_seed(settings.seed)
    model, loss_fn, train_loader, val_loader, metrics, learning_rate, weight_decay = build_training(
        method, *splits, selector, settings.embedding_dim, settings.seed, settings.network, settings.pretrained,
        recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.lr_step, gamma=GAMMA)
    resuming = run_dir is not None and os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME))
    if is_main_process():
        print(f"== {settings.name}: {method_label(method, selector)}, {settings.embedding_dim}-D, "
              f"{settings.n_epochs} epochs" + (f", resuming from {run_dir}" if resuming else ""), flush=True)
    history = fit(train_loader, val_loader, model, loss_fn, optimizer, scheduler, settings.n_epochs,
                  metrics=metrics, device=device, progress=settings.progress, log_interval=50,
                  channels_last=settings.channels_last, checkpoint_dir=run_dir, resume=run_dir is not None,
                  amp=settings.amp, compile=settings.compile)
    return model, history


def _load_data(settings):
    """``((train, test), held_out)`` of the settings' dataset: a known one (``load_splits``; held_out None)
    or a folder of your own images (``load_folder_splits`` with ``settings.folder``)."""
    if settings.known:
        return load_splits(settings.dataset, settings.root, settings.download, settings.quick), None
    train, test, held_out = load_folder_splits(settings.dataset, seed=settings.seed, progress=settings.progress,
                                               **(settings.folder or {}))
    return (train, test), held_out


def _open_method_run(settings, run_dir, row_settings):
    """``runs.open_run`` of a method's run folder (None: no folder, nothing finished) with its settings in
    the current format and the identity of its data."""
    if run_dir is None:
        return None
    current = dict(upgrade_run_settings(row_settings), data=data_identity(settings.dataset, settings.known,
                                                                          settings.folder))
    return open_run(run_dir, current, settings.fresh)


def _model_file(settings, dirs, label):
    """The model file a method's run saves: ``model_file`` when given; for a folder of your own images whose
    results are written, ``<outputs>/models/<dataset>_<method>[_<dim>d][_seed<seed>].pt``; else None."""
    if settings.model_file is not None or settings.known or dirs.models is None or dirs.results is None:
        return settings.model_file
    return os.path.join(dirs.models, image_stem(settings.name, label, settings.embedding_dim, settings.seed) + ".pt")


def _read_back(settings, row, method, selector, run_dir, splits=None):
    """A finished run read back from ``run_dir``: record its ``row`` where the results go and, when a
    ``model_file`` is asked for, save the model from the run folder's checkpoint (ValueError when it has none)."""
    dirs = settings.outputs()
    if dirs.results is not None:
        record_result(row, held_out_dir(dirs.results, row.get("train_classes")))
    if settings.model_file is None:
        return
    checkpoint = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.isfile(checkpoint):
        raise ValueError(f"{run_dir} holds the finished row of {row['method']} but not its checkpoint "
                         f"({CHECKPOINT_NAME}), so there is no model to save to {settings.model_file}; run "
                         "with --fresh to train it again")
    train_set, test_set = splits if splits is not None else _load_data(settings)[0]
    if settings.train_classes is not None:
        (train_set, test_set), _, _ = held_out_splits(train_set, test_set, settings.train_classes)
    model = build_training(method, train_set, test_set, selector, settings.embedding_dim, settings.seed,
                           settings.network, settings.pretrained, method_recipe(row["method"], settings.recipe))[0]
    model.load_state_dict(read_model_weights(checkpoint))
    validation = extract_embeddings(DataLoader(test_set, batch_size=EVALUATION_BATCH,
                                               num_workers=data_workers(test_set)), model)
    save_trained_model(settings.model_file, model, settings.network, train_set, validation, row, settings.seed,
                       settings.command)


def method_settings(name, label, embedding_dim, epochs, seed, quick=False, channels_last=False, train_classes=None,
                    network="embedding-net", pretrained=None, amp=None, compile=False, recipe=None,
                    lr_step=STEP_SIZE):
    """The settings of one method's run (see ``run_method`` for each), the start of its result row and what
    its run folder must match to resume. The network, mixed precision, recipe (``method_recipe(label,
    recipe)``) and learning-rate step are recorded only when not the classic ones, and of a recipe the fields
    added later (``methods.LATER_RECIPE_FIELDS``) only when not their default, so that earlier run folders still
    resume (``finish_run`` adds the classic step to the row, ``Recipe`` the defaults of the later fields)."""
    settings = {"dataset": name, "method": label, "embedding_dim": embedding_dim, "epochs": epochs,
                "seed": seed, "quick": quick, "channels_last": channels_last, "train_classes": train_classes}
    if network != "embedding-net" or pretrained is not None:
        settings.update(network=network, pretrained=pretrained)
    if amp is not None or compile:
        settings.update(amp=amp, compile=compile)
    recipe = method_recipe(label, recipe)
    if recipe != CLASSIC:
        settings.update({field: value for field, value in recipe._asdict().items()
                         if field not in LATER_RECIPE_FIELDS or value != getattr(CLASSIC, field)})
    if lr_step != STEP_SIZE:
        settings["lr_step"] = lr_step
    return settings


def finish_run(row, method, model, history, splits, held_out=None, images_dir="images", results_dir="results",
               run_dir=None, model_file=None, command=None):
    """After training a method's ``model`` (``trainer.fit``'s ``history``) on ``splits`` ``(train, test)``:
    score its embeddings into ``row`` (its ``method_settings``; the recipe in words added), plot them under
    ``images_dir``, save the model file, record the row under ``results_dir`` (``record_result``; a directory
    of None: skipped) and, last, in the run folder. ``held_out``: see ``run_method``. Returns the row."""
    train_set, test_set = splits
    name, label, embedding_dim, seed = row["dataset"], row["method"], row["embedding_dim"], row["seed"]
    network = row.get("network", "embedding-net")
    embedded = _embed_splits(model, train_set, test_set)
    row["recipe"] = recipe_label(Recipe(**{field: row[field] for field in Recipe._fields if field in row}))
    row.setdefault("lr_step", STEP_SIZE)
    row.update(_scores(method, model, history, embedded, held_out, seed))
    if row.get("train_classes", "") is None:
        del row["train_classes"]
    if images_dir is not None:
        for split, (embeddings, labels) in embedded.items():
            plot_embeddings(embeddings, labels, train_set.classes,
                            f"{name} {label} ({split}, {embedding_dim}-D)",
                            image_path(name, label, split, embedding_dim, images_dir, seed))
    if model_file is not None:
        save_trained_model(model_file, model, network, train_set, embedded["test"], row, seed, command)
    if results_dir is not None:
        record_result(row, results_dir)
    if run_dir is not None:  # last, so a finished row means every output above was written
        record_finished_row(run_dir, row)
    return row


def _scores(method, model, history, embedded, held_out, seed):
    """A trained method's scores for its row: ``evaluate_embeddings`` of the test embeddings against the
    train ones, the classifier's accuracy (softmax), the mean epoch time, the device and thread count, the
    final losses and, with a ``held_out`` dataset, ``evaluate_held_out``."""
    scores = evaluate_embeddings(*embedded["train"], *embedded["test"], seed=seed)
    if method == "softmax":
        scores["classifier_accuracy"] = history["val_accuracy"][-1] / 100
    scores["seconds_per_epoch"] = sum(history["seconds"]) / len(history["seconds"])
    scores["device"] = device_name(next(model.parameters()).device)
    scores["threads"] = torch.get_num_threads()  # the numbers move with it (float sums in another order)
    scores["final_train_loss"] = history["train_loss"][-1]
    scores["final_val_loss"] = history["val_loss"][-1]
    if held_out is not None:
        scores.update(evaluate_held_out(model, held_out, seed))
    return scores


def dataset_name(dataset):
    """The name a dataset's outputs go by: a name of ``DATASETS`` itself, or for your own images the
    folder's (or CSV file's) name, e.g. ``flowers`` for ``data/flowers/``. Raises ValueError for a name
    that is neither, and FileNotFoundError for a path that does not exist."""
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset must be a name ({', '.join(DATASETS)}) or a folder path, got "
                        f"{type(dataset).__name__}")
    if dataset in DATASETS:
        return dataset
    path = os.fspath(dataset)
    if not os.path.exists(path):
        if os.sep not in path and "." not in path:
            raise ValueError(f"unknown dataset {path!r}; choose one of {', '.join(DATASETS)}, or give the path "
                             "of a folder of images (one sub-folder per class) or of a CSV of path,label lines")
        raise FileNotFoundError(f"dataset folder {path!r} does not exist")
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def save_trained_model(path, model, network, train_set, validation, row, seed=0, command=None):
    """Save the embedding network of a trained ``model`` (the net inside a ``ClassificationNet`` /
    ``SiameseNet`` / ``TripletNet``, or the model itself) as one model file (``model_file.save_model``) with
    what using it needs: image size, channels, the training images' normalisation, class names, the
    verification threshold chosen on the validation embeddings ``(embeddings, labels)``
    (``metrics.verification_threshold``), the ``command`` (default: this process's command line) and the
    row's metrics. Returns the path."""
    embedding_net = getattr(model, "embedding_net", model)
    channels, image_size = image_shape(train_set)
    threshold, accuracy = verification_threshold(*validation, seed=seed)
    normalization = ({"mean": list(train_set.mean), "std": list(train_set.std)} if hasattr(train_set, "mean")
                     else None)
    metrics = {key: value for key, value in row.items() if isinstance(value, (int, float)) and key != "seed"}
    metrics["validation_verification_accuracy"] = accuracy
    return save_model(path, embedding_net, network, embedding_net.config(), image_size=image_size, channels=channels,
                      normalization=normalization, class_names=list(train_set.classes), threshold=threshold,
                      command=command or " ".join(sys.argv), metrics=metrics)


def method_run_dir(run_dir, dataset, label, embedding_dim=2, seed=0, quick=False, train_classes=None, recipe=None):
    """The folder of one method's run under ``run_dir``, e.g.
    ``checkpoints/fashion-mnist/online-triplet-random-hard_2d_seed0`` (``fashion-mnist-quick`` for quick
    runs, ``.../train-classes-0-4/...`` for held-out runs, ``..._seed0_bn-soft-margin`` for a ``recipe``
    other than the study's, see ``method_recipe``)."""
    folder = os.path.join(run_dir, dataset + ("-quick" if quick else ""))
    if train_classes is not None:
        folder = held_out_dir(folder, train_classes)
    tag = recipe_tag(label, recipe)
    return os.path.join(folder, f"{label.replace('/', '-')}_{embedding_dim}d_seed{seed}" + (tag and "_" + tag))


def _embed_splits(model, train_set, test_set):
    """{'train': (embeddings (N, D), labels (N,)), 'test': (...)} of a trained model."""
    return {split: extract_embeddings(DataLoader(data, batch_size=EVALUATION_BATCH, num_workers=data_workers(data)),
                                      model)
            for split, data in (("train", train_set), ("test", test_set))}


def recipe_images_dir(images_dir, label, recipe=None):
    """Where the plots of the method called ``label`` trained with ``recipe`` (see ``method_recipe``) go:
    ``images_dir`` itself for the study's recipe, so that the study's plots stay those of its recipes,
    ``<images_dir>/recipes/<recipe_tag>`` for another; None stays None."""
    tag = recipe_tag(label, recipe)
    return os.path.join(images_dir, "recipes", tag) if tag and images_dir is not None else images_dir


def plot_comparison(dataset, pairs, embedding_dim=2, images_dir="images", seed=0, recipe=None):
    """Side-by-side figures of random (offline) against online mining, from the rows' saved test
    plots of the methods trained with ``recipe`` (each method's plots in its ``recipe_images_dir``): one
    PNG per pair, e.g. ``images/fashion-mnist_siamese_vs_online-contrastive.png``, beside the online
    method's plots. Returns the paths written (pairs without both plots are skipped)."""
    written = []
    for left, right in pairs:
        paths = [image_path(dataset, label, "test", embedding_dim, recipe_images_dir(images_dir, label, recipe), seed)
                 for label in (left, right)]
        if all(os.path.exists(path) for path in paths):
            written.append(save_side_by_side(paths, comparison_path(dataset, left, right, embedding_dim, images_dir,
                                                                    seed, recipe)))
    return written


def comparison_path(dataset, left, right, embedding_dim=2, images_dir="images", seed=0, recipe=None):
    """Where ``plot_comparison`` saves the figure of method ``left`` beside ``right`` (their ``seed``'s runs
    with ``recipe``): in ``right``'s ``recipe_images_dir``."""
    stem = image_stem(dataset, left, embedding_dim, seed)
    return os.path.join(recipe_images_dir(images_dir, right, recipe), f"{stem}_vs_{right.replace('/', '-')}.png")


def run_methods(dataset, methods=METHODS, selectors=("random-hard",), embedding_dim=2, epochs=None, seed=0,
                quick=False, root="data", download=False, device=None, **options):
    """Run several methods on one dataset (the data is loaded once), write the comparison figures and
    return the result rows: ``run_study`` of the ``StudySettings`` these arguments and ``options`` (any other
    field of it) make. ``run_dir`` here is the folder of every method's run folder (``method_run_dir``;
    default: where ``StudySettings.outputs`` says; None: no run folders)."""
    return run_study(StudySettings(dataset, tuple(methods), tuple(selectors), embedding_dim, epochs, seed, quick,
                                   root, download, device, **options))


def run_study(settings):
    """Run the methods of ``settings`` (a ``StudySettings``) on its dataset, the data loaded once: each method in
    its own run folder (``method_run_dir``), so that the same call after an interruption skips the finished
    methods and resumes the interrupted one; with ``train_classes``, the two reference rows
    (``held_out_baselines``) after them; then the figures of random beside online mining
    (``plot_comparison``). Under torchrun every rank runs this with the same settings: each trains its share
    of every global batch, and rank 0 alone writes the results, plots and run folders. Returns the rows."""
    settings = settings.checked()
    device, _, _ = setup_distributed(settings.device)
    settings = settings._replace(device=device).for_rank()
    n_runs = sum(len(settings.selectors) if method == "online-triplet" else 1 for method in settings.methods)
    if settings.model_file is not None and n_runs != 1:
        raise ValueError(f"--save-model saves one trained model, but {n_runs} methods run; choose one "
                         "(e.g. --methods online-triplet --selectors random-hard)")
    splits, held_out = _load_data(settings)
    dirs, rows = settings.outputs(), []
    for method in settings.methods:
        for selector in (settings.selectors if method == "online-triplet" else [None]):
            label = method_label(method, selector)
            method_dir = None if dirs.checkpoints is None else method_run_dir(
                dirs.checkpoints, settings.name, label, settings.embedding_dim, settings.seed, settings.quick,
                settings.train_classes, settings.recipe)
            rows.append(_run_one(settings, method, selector, splits, held_out, method_dir))
    if settings.train_classes is not None:  # what the held-out scores mean needs these two references
        rows += held_out_baselines(settings.name, *splits, settings.train_classes, settings.embedding_dim,
                                   settings.seed, dirs.results)
    if dirs.images is not None:
        offline_online = [("siamese", "online-contrastive")]
        offline_online += [("triplet", method_label("online-triplet", s)) for s in settings.selectors]
        plot_comparison(settings.name, offline_online, settings.embedding_dim,
                        held_out_dir(dirs.images, rows[0].get("train_classes")), settings.seed, settings.recipe)
    return rows


# The command line's on/off switches: flag -> help.
SWITCHES = {
    "--download": "download with torchvision when the data is not found locally",
    "--quick": "smoke run: small subsets, one epoch",
    "--no-progress": "log lines instead of progress bars",
    "--channels-last": "train in channels-last memory format (faster convolutions on CPUs)",
    "--fresh": "start every method over instead of resuming or reusing finished ones",
}


def _parser():
    """The argument parser of ``main``."""
    parser = cli.ArgumentParser(prog="experiments.py", description="Train and evaluate siamese/triplet embeddings.")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help=f"{', '.join(DATASETS)}, or the path of a folder of your own images (one sub-folder "
                             "per class, or group/class/) or of a CSV of path,label lines")
    parser.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(METHODS)}, or 'all'")
    parser.add_argument("--selectors", default="random-hard",
                        help=f"online-triplet selectors, comma-separated subset of {', '.join(SELECTORS)}, or 'all'")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {STUDY_EPOCHS}")
    parser.add_argument("--embedding-dim", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-step", type=cli.whole_number(), default=STEP_SIZE,
                        help=f"the learning rate falls tenfold every this many epochs (default {STEP_SIZE}, "
                             "the classic)")
    parser.add_argument("--root", default="data", help="where to look for (and download) the data")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    for flag, text in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--train-classes", default=None,
                        help="train on these classes only (e.g. 0-4 or 0,1,2,3,4) and measure one-shot "
                             "accuracy and verification on the others")
    parser.add_argument("--out-dir", default=None,
                        help=f"where runs other than the committed study write (default {RUNS_ROOT}/: "
                             f"{RUNS_ROOT}/<dataset>/<settings>/, {RUNS_ROOT}/<folder name>/ for your own images); "
                             "given, the study's runs write there too")
    parser.add_argument("--run-dir", default=None,
                        help="the folder of every method's checkpoints, so that the same command resumes after an "
                             f"interruption (default: {RUN_DIR}/ for the study, else checkpoints/ in its output "
                             "folder)")
    _add_folder_options(parser.add_argument_group("your own images (--dataset PATH)"))
    parser.add_argument("--network", default="embedding-net", choices=STUDY_NETWORKS,
                        help="the classic EmbeddingNet, or a ResNet-18 backbone with an embedding head")
    parser.add_argument("--pretrained", default=None,
                        help="resnet18: ImageNet weights from this file, or 'imagenet' for torchvision's cache")
    parser.add_argument("--amp", default=None, choices=("bf16", "fp16"),
                        help="mixed precision training (bfloat16, or float16 with loss scaling); distances and "
                             "mining stay in float32")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile(model)")
    _add_recipe_options(parser.add_argument_group(
        "recipes", "by default each method trains with its recipe in the study (methods.RECIPES); any option "
                   "below except --classic gives every method the one recipe it describes, the classic settings "
                   "changed by the options given"))
    parser.add_argument("--save-model", default=None, metavar="FILE",
                        help="save the trained model as one file (one method only), for search.py; a finished "
                             "run saves it from its checkpoint")
    return parser


def _add_folder_options(own):
    """The options of a folder of your own images (``image_folders.load_folder_splits``)."""
    own.add_argument("--image-size", type=int, default=None,
                     help="resize every image to this square size (default: the images' own, when all agree)")
    own.add_argument("--channels", type=int, choices=(1, 3), default=None,
                     help="1 (grey) or 3 (RGB); default: 3 when any image is in colour")
    own.add_argument("--held-out-classes", default=None,
                     help="classes set aside and measured as unseen: a fraction (0.2) or names/indices (cat,dog)")
    own.add_argument("--val-fraction", type=float, default=0.1, help="validation share of each class")
    own.add_argument("--skip-bad-images", action="store_true",
                     help="leave out unreadable images (and report how many) instead of stopping")


def _add_recipe_options(recipe):
    """The options that describe one ``Recipe`` for every method (``_recipe_of``)."""
    recipe.add_argument("--classic", action="store_true",
                        help="each method's settings before the study's recipes (the classic study's)")
    recipe.add_argument("--margin", type=float, default=None, help=f"the losses' margin (classic: {MARGIN})")
    recipe.add_argument("--distance", default=None, choices=DISTANCES,
                        help="squared Euclidean distances (the classic) or plain ones, in every contrastive and "
                             "triplet loss and selector")
    recipe.add_argument("--soft-margin", action="store_true",
                        help="triplet losses: softplus instead of the hinge (Hermans et al.; use with --margin 0)")
    recipe.add_argument("--batch-norm", action="store_true",
                        help="end the classic network with a BatchNorm, which keeps the embeddings from collapsing")
    recipe.add_argument("--normalize", action="store_true",
                        help="give the classic network unit-norm (L2) embeddings: cosine geometry, as multi-similarity "
                             "trains")
    recipe.add_argument("--easy-selector", default=None, choices=tuple(SELECTORS),
                        help="online-triplet: add the loss of this (easier) selector's triplets to the selector's")
    recipe.add_argument("--batch-samples", type=cli.whole_number(), default=None,
                        help=f"online methods: images per class in a balanced batch (classic: {BALANCED_BATCH[1]}, "
                             f"of {BALANCED_BATCH[0]} classes)")
    recipe.add_argument("--memory", type=cli.whole_number(), default=None, metavar="M",
                        help="online methods: mine a cross-batch memory of the last M embeddings too (classic: none)")
    recipe.add_argument("--memory-warmup", type=cli.whole_number(0), default=None, metavar="N",
                        help=f"training steps before the memory is mined (default {MEMORY_WARMUP})")


def main(argv=None):
    """The command line (see the module docstring): ``argv`` (default ``sys.argv[1:]``) -> the result rows.
    First turns flush-to-zero on for the whole process (``trainer.flush_denormal_everywhere``). A user's
    mistake raises ValueError or OSError (``python experiments.py`` prints it as one line, ``cli.run``)."""
    flush_denormal_everywhere()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["autoencoders"]:
        raise ValueError("the autoencoder sweep has its own command line now: python autoencoders.py "
                         + " ".join(argv[1:] or ["--help"]))
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset == "omniglot":
        raise ValueError("Omniglot has its own command line now: python omniglot.py ... (the same options, "
                         "without --dataset; python omniglot.py --help lists them)")
    settings = settings_from_args(args, parser, argv)
    started = time.perf_counter()
    try:
        rows = run_study(settings)
    finally:
        writer = is_main_process()
        close_distributed()
    if writer:
        print()
        print(results_table(rows))
        _print_outputs(settings, rows, time.perf_counter() - started)
    return rows


def settings_from_args(args, parser, argv=()):
    """The ``StudySettings`` of the parsed command line ``args`` (of ``_parser``; ``argv``: the arguments, for
    the command recorded in a model file)."""
    folder = {"image_size": args.image_size, "channels": args.channels, "held_out_classes": args.held_out_classes,
              "val_fraction": args.val_fraction, "skip_bad_images": args.skip_bad_images}
    return StudySettings(
        args.dataset, METHODS if args.methods == "all" else tuple(args.methods.split(",")),
        tuple(SELECTORS) if args.selectors == "all" else tuple(args.selectors.split(",")), args.embedding_dim,
        args.epochs, args.seed, args.quick, args.root, args.download, args.device, progress=not args.no_progress,
        channels_last=args.channels_last, train_classes=args.train_classes, fresh=args.fresh, network=args.network,
        pretrained=args.pretrained, folder=folder, model_file=args.save_model,
        command=" ".join(["python experiments.py", *argv]), amp=args.amp, compile=args.compile,
        recipe=_recipe_of(args, parser), lr_step=args.lr_step, run_dir=AUTO if args.run_dir is None else args.run_dir,
        out_dir=args.out_dir)


def _print_outputs(settings, rows, seconds):
    """Say where the run's outputs are: its tables, plots, output folder and the model files it wrote."""
    dirs = settings.outputs()
    results_dir, images_dir = (held_out_dir(folder, rows[0].get("train_classes")) for folder in (dirs.results,
                                                                                                   dirs.images))
    tables = ", ".join(sorted({os.path.join(results_dir, results_stem(row) + ".md") for row in rows}))
    print(f"Total {seconds:.0f} s. Results in {tables}, plots in {os.path.join(images_dir, '')}.")
    if dirs.folder != ".":
        print(f"Every output of this run is under {os.path.join(dirs.folder, '')} (not the committed results/ and "
              "images/).")
    models = [_model_file(settings, dirs, row["method"]) for row in rows if row["method"] not in HELD_OUT_BASELINES]
    for path in sorted({path for path in models if path is not None and os.path.isfile(path)}):
        print(f"Model saved to {path}.")


def _recipe_of(args, parser):
    """The ``recipe`` of the settings the command line asks for: one ``Recipe`` for every method when an
    option describes one, ``"classic"`` for ``--classic``, else None (each method's study recipe)."""
    given = {"margin": args.margin, "soft": args.soft_margin or None, "distance": args.distance,
             "batch_norm": args.batch_norm or None, "normalize": args.normalize or None,
             "easy_selector": args.easy_selector, "batch_samples": args.batch_samples, "memory": args.memory,
             "memory_warmup": args.memory_warmup}
    given = {field: value for field, value in given.items() if value is not None}
    if given and args.classic:
        parser.error("--classic takes each method's classic settings; leave out the recipe options with it")
    return CLASSIC._replace(**given) if given else "classic" if args.classic else None


def held_out_baselines(dataset, train_set, test_set, train_classes, embedding_dim=2, seed=0,
                       results_dir="results"):
    """Reference rows for a held-out-class run, scored exactly as ``run_method`` scores a trained model:
    'pixels' (the normalised images as vectors, ``PixelEmbedding``) and 'untrained network' (the
    ``EmbeddingNet`` every method starts from: same ``embedding_dim`` and seed, no training). A trained
    embedding should beat both on its own classes; on the held-out ones it may not (results/README.md, "Classes
    never trained on"). Takes the full ``(train_set, test_set)`` and the ``train_classes`` spec; records the rows
    under ``results_dir/train-classes-<tag>/`` (skipped when None) and returns them."""
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
            record_result(row, held_out_dir(results_dir, classes_tag))
        rows.append(row)
    return rows


def __getattr__(name):
    """Names that moved to another module still resolve here for one release (``utils.MOVED_NAMES``)."""
    return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(cli.run(main, "experiments.py"))

