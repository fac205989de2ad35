"""Where results are written, and how: the one rule for where a run's outputs go, the atomic writers,
the Markdown tables, merging rows into a results file, and the figures.

``output_dirs`` decides where a run writes: the committed study's runs into the checkout's ``results/``,
``images/`` and ``checkpoints/``; every other run (a quick run, other settings, a folder of your own images)
into its own folder under ``runs/`` (ignored by git), so that a trial never replaces a committed row or
figure. That folder is named by ``settings_tag``, the one rule for the name of a run's settings (what it
changed from the study's, e.g. ``quick``, ``epochs-1_lr-step-3``).
Every results table of the library (the study's ``results/<dataset>.md``, Omniglot's, the autoencoder
sweep's) is written by ``merge_results``: rows merged into ``<stem>.json`` by their key, then ``<stem>.md``
rewritten from them, both atomically (``utils.atomic_write``) and under a lock file (``<stem>.lock``), so
that processes finishing together lose no row. Figures are bare matplotlib Figures (no pyplot, so a
notebook's own plots are untouched) saved by ``save_figure``.
"""

import hashlib
import json
import os
import re
from typing import NamedTuple, Optional

from filelock import FileLock

from projections import project_2d
from utils import atomic_write

RUNS_ROOT = "runs"  # where the runs that are not the committed study write (.gitignore holds it)


class OutputDirs(NamedTuple):
    """Where one run writes (see ``output_dirs``): ``folder``, the folder holding all of its outputs (``"."``,
    the checkout, for the committed study); ``results``, its tables (``<stem>.md`` and ``.json``);
    ``images``, its figures; ``checkpoints``, the folder of its run folders (checkpoints and finished rows);
    ``models``, where its model files go by default (None for the committed study: no model file unless
    one is asked for by path)."""

    folder: str
    results: str
    images: str
    checkpoints: str
    models: Optional[str]


def output_dirs(name, tag="", *, committed=True, root=RUNS_ROOT):
    """The one rule for where a run's outputs go. ``name``: what the run is of (a dataset's name, a folder
    of your own images' name, ``"autoencoders-fashion-mnist"``, ...); ``tag``: a short name of the settings
    that set the run apart (``""`` for none; made safe for a file name by ``safe_name``); ``committed``:
    whether the run is one of the committed studies, whose outputs are the checkout's.

    Committed: ``results/<tag>``, ``images/<tag>``, ``checkpoints`` (each run folder below it names its
    run), no default model folder. Otherwise everything under ``<root>/<name>/<tag>/``: ``results/``,
    ``images/``, ``checkpoints/``, ``models/``. Returns an ``OutputDirs``; creates nothing."""
    tag = safe_name(tag)
    if committed:
        return OutputDirs(".", os.path.join("results", tag) if tag else "results",
                          os.path.join("images", tag) if tag else "images", "checkpoints", None)
    folder = os.path.join(root, safe_name(name), tag) if tag else os.path.join(root, safe_name(name))
    return OutputDirs(folder, *(os.path.join(folder, part) for part in ("results", "images", "checkpoints", "models")))


def settings_tag(settings, defaults):
    """The one rule for the name of a run's settings: ``""`` when every value of ``settings`` (a dict, name ->
    value; a name left out keeps its default) equals its value in ``defaults`` (name -> the study's value),
    else the changed settings in the order of ``defaults``, joined by ``_``, each ``name-value`` with the
    name's ``_`` as ``-`` (``{"epochs": 1, "lr_step": 3}`` -> ``"epochs-1_lr-step-3"``): a True boolean is
    the bare name (``"quick"``); a dict whose default is a dict names its changed entries the same way after
    a dot (``augment.elastic-0.1``; an entry left out: ``-None``); any other value that is not a short plain
    word or number (a tuple, a path) a short hash of its JSON (``"hidden-dims-1a2b3c4d"``). Made safe for a
    file name (``safe_name``). A name not in ``defaults`` raises ValueError naming it."""
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; the settings are {sorted(defaults)}")
    parts = [_setting_part(name.replace("_", "-"), settings.get(name, default), default)
             for name, default in defaults.items() if settings.get(name, default) != default]
    return safe_name("_".join(parts))


def _setting_part(name, value, default):
    """``settings_tag``'s name of one changed setting ``name`` (already with ``-`` for ``_``)."""
    if value is True:
        return name
    if isinstance(value, dict) and isinstance(default, dict):
        keys = list(default) + [key for key in value if key not in default]
        return "_".join(_setting_part(f"{name}.{str(key).replace('_', '-')}", value.get(key), default.get(key))
                        for key in keys if value.get(key) != default.get(key))
    if re.fullmatch(r"[\w.+-]{1,24}", str(value)):
        return f"{name}-{value}"
    digest = hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{digest[:8]}"


def safe_name(text):
    """``text`` as one file name: every run of characters other than letters, digits, ``.``, ``-`` and
    ``_`` becomes ``_`` (``"0,2,4"`` -> ``"0_2_4"``), the one rule for names made from settings."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")


def write_json(path, value):
    """Write ``value`` as JSON to ``path`` atomically (a temporary file in the same folder, then
    os.replace), so an interrupted run never leaves half a file behind. Returns the path."""
    return write_text(path, json.dumps(value, indent=1))


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (utils.atomic_write; folders created). Returns the path."""
    with atomic_write(path, "w") as file:
        file.write(text)
    return path


def merge_results(stem, new_rows, key_fields, sort_key, table, header=""):
    """The one results writer: merge ``new_rows`` (dicts) into ``<stem>.json``, a row replacing the
    old row with the same values of ``key_fields``, sort the rows by ``sort_key(row)`` and rewrite
    ``<stem>.md`` as ``header + table(rows)``. ``key_fields``: field names (a missing field counts as
    None), or a dict of field name -> the value a row without the field has. Both files are written
    atomically, and the read-merge-write holds the lock file ``<stem>.lock`` (``filelock``), so that
    processes merging into one file at once each keep every other's rows. Returns the rows."""
    defaults = key_fields if isinstance(key_fields, dict) else dict.fromkeys(key_fields)

    def key(row):
        return tuple(row.get(field, default) for field, default in defaults.items())

    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with FileLock(stem + ".lock"):
        rows = []
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as file:
                rows = json.load(file)
        fresh = {key(row) for row in new_rows}
        rows = [row for row in rows if key(row) not in fresh] + list(new_rows)
        rows.sort(key=sort_key)
        write_json(stem + ".json", rows)
        write_text(stem + ".md", header + table(rows))
    return rows


def markdown_table(rows, columns):
    """A Markdown table of ``rows`` (dicts): ``columns`` is a list of ``(key, title, format)``; a
    missing or None value leaves its cell empty."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if row.get(key) is not None else ""
                                        for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def save_figure(figure, path):
    """Save a matplotlib Figure to ``path`` (folders created) at the library's plot resolution.
    Returns the path."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    return path


def save_side_by_side(image_paths, path):
    """Save the images at ``image_paths`` side by side, without axes, as one figure at ``path`` (``save_figure``).
    Returns the path."""
    return save_figure(side_by_side_figure(image_paths, width=8), path)


def side_by_side_figure(image_paths, titles=None, width=8):
    """A Figure of the saved images at ``image_paths`` in one row, each ``width`` inches square, without axes,
    under its title from ``titles`` when given."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * len(image_paths), width))
    for position, (axis, image) in enumerate(zip(figure.subplots(1, len(image_paths), squeeze=False)[0],
                                                 image_paths)):
        axis.imshow(mpimg.imread(image))
        if titles is not None:
            axis.set_title(titles[position])
        axis.axis("off")
    return figure


def image_stem(dataset, label, embedding_dim=2, seed=0):
    """The start of a plot's or model file's name for a method ``label`` of ``dataset``:
    ``<dataset>_<label with / as ->[_<dim>d][_seed<seed>]`` (2-D and seed 0 leave their part out)."""
    suffix = ("" if embedding_dim == 2 else f"_{embedding_dim}d") + ("" if seed == 0 else f"_seed{seed}")
    return f"{dataset}_{label.replace('/', '-')}{suffix}"


def image_path(dataset, label, split, embedding_dim=2, images_dir="images", seed=0):
    """Where the study saves the plot of a method's ``split`` ("train" or "test") embeddings,
    e.g. ``images/fashion-mnist_online-triplet-semi-hard_test.png``; a ``seed`` other than 0 is in the
    name (``..._semi-hard_seed1_test.png``), so that other seeds' runs keep the seed-0 plots."""
    return os.path.join(images_dir, f"{image_stem(dataset, label, embedding_dim, seed)}_{split}.png")


def plot_embeddings(embeddings, labels, class_names, title, path):
    """Scatter plot of ``embeddings (N, D)`` coloured by ``labels (N,)`` (on any device) with a legend of
    class names (a principal-component projection above 2-D), saved to ``path``."""
    # A bare Figure, not pyplot: no backend switch, so a notebook's own plots keep working.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    embeddings, labels = embeddings.detach().float().cpu(), labels.cpu()  # from whichever device they were made on
    points = project_2d(embeddings, "pca")
    figure = Figure(figsize=(8, 8))
    axes = figure.subplots()
    colours = colormaps["tab10"]
    for class_id, name in enumerate(class_names):
        chosen = (labels == class_id).numpy()
        axes.scatter(points[chosen, 0], points[chosen, 1], s=2, alpha=0.5, color=colours(class_id % 10),
                     label=name)
    axes.set_title(title + ("" if embeddings.shape[1] <= 2 else " - PCA projection"))
    axes.legend(markerscale=6, loc="best", fontsize=8)
    return save_figure(figure, path)


# ---- notebooks: display helpers -----------------------------------------------------------------------
# What the walk-through notebooks (Experiments_*.ipynb) would otherwise each write for themselves: their
# yes/no parameters from the environment, and showing a figure or a row of saved plots inline. IPython and
# matplotlib are imported when a figure is shown, so importing this module needs neither.

def env_flag(name, default):
    """The yes/no value of the environment variable ``name``: True for "1", "true", "yes", "on", False
    for "0", "false", "no", "off" (any case, spaces around ignored), ``default`` when it is unset or
    blank. Any other value raises ValueError naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no value; use 1 or 0")


def show_figure(figure):
    """Display a matplotlib Figure in the notebook as a PNG (80 dpi, tight bounding box). It is rendered
    here, so it shows whatever matplotlib backend is active (or none)."""
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    display(Image(data=buffer.getvalue()))


def show_image_grid(rows, row_names, columns, column_width=0.9, title=None):
    """Display a grid of grey images, dark on light, one row per name: ``rows[i]`` holds at most
    ``columns`` images of shape (H, W) (tensors or arrays), labelled ``row_names[i]`` on the left; each
    row is 0.9 inch high and each column ``column_width`` inches wide; ``title`` above when given."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(columns * column_width, len(row_names) * 0.9))
    axes = figure.subplots(len(row_names), columns, squeeze=False)
    for row, (images, name) in enumerate(zip(rows, row_names)):
        for axis, image in zip(axes[row], images):
            axis.imshow(image, cmap="gray_r")
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    if title is not None:
        figure.suptitle(title)
    show_figure(figure)


def show_side_by_side(paths, titles, width=4.5):
    """Display the saved images at ``paths`` (PNG files) in one row, each ``width`` inches square under
    its title from ``titles``."""
    show_figure(side_by_side_figure(paths, titles, width))
