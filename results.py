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
