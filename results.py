"""Where results are written, and how: the atomic writers, the Markdown tables, merging rows into a
results file, and the figures.

Every results table of the library (the study's ``results/<dataset>.md``, Omniglot's, the autoencoder
sweep's) is written by ``merge_results``: rows merged into ``<stem>.json`` by their key, then ``<stem>.md``
rewritten from them, both atomically (``utils.atomic_write``). Figures are bare matplotlib Figures (no
pyplot, so a notebook's own plots are untouched) saved by ``save_figure``.
"""

import json
import os

import torch

from utils import atomic_write


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
    ``<stem>.md`` as ``header + table(rows)``. Both files are written atomically. Returns the rows."""
    rows = []
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as file:
            rows = json.load(file)
    fresh = {tuple(row.get(key) for key in key_fields) for row in new_rows}
    rows = [row for row in rows if tuple(row.get(key) for key in key_fields) not in fresh] + list(new_rows)
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


def _project_2d(embeddings):
    """The embeddings themselves when 2-D, else their projection on the top two principal axes."""
    if embeddings.shape[1] <= 2:
        return embeddings
    centred = embeddings - embeddings.mean(dim=0)
    _, _, directions = torch.pca_lowrank(centred, q=2, center=False)
    return centred @ directions[:, :2]


def plot_embeddings(embeddings, labels, class_names, title, path):
    """Scatter plot of ``embeddings (N, D)`` coloured by ``labels (N,)`` (on any device) with a legend of
    class names (a principal-component projection above 2-D), saved to ``path``."""
    # A bare Figure, not pyplot: no backend switch, so a notebook's own plots keep working.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    embeddings, labels = embeddings.detach().float().cpu(), labels.cpu()  # from whichever device they were made on
    points = _project_2d(embeddings).numpy()
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
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * len(paths), width))
    for axis, path, title in zip(figure.subplots(1, len(paths), squeeze=False)[0], paths, titles):
        axis.imshow(mpimg.imread(path))
        axis.set_title(title)
        axis.axis("off")
    show_figure(figure)
