"""The study's result tables: which settings tell two result rows apart (``RESULT_KEY``), which table a
row belongs in (``results_stem``: ``<dataset>.md`` for a method trained with the study's recipe,
``<dataset>-recipes.md`` for any other), the columns (``COLUMNS``, with the held-out columns when a row has
them) and the one writer of a study row (``record_result``, through ``results.merge_results``). The study's
runner (``experiments.py``) and the notebooks use these; the rows themselves are made there.
"""

import os

from held_out import HELD_OUT_COLUMNS
from methods import METHODS, SELECTORS, STEP_SIZE, method_label, method_recipe, recipe_label
from results import markdown_table, merge_results, safe_name

COLUMNS = [("method", "method", "{}"), ("embedding_dim", "dim", "{}"), ("recipe", "recipe", "{}"),
           ("seed", "seed", "{}"),
           ("precision_at_1", "P@1", "{:.3f}"), ("r_precision", "R-Prec", "{:.3f}"),
           ("map_at_r", "MAP@R", "{:.3f}"), ("knn_accuracy", "kNN acc", "{:.3f}"),
           ("nmi", "NMI", "{:.3f}"), ("roc_auc", "ROC-AUC", "{:.3f}"),
           ("classifier_accuracy", "clf acc", "{:.3f}"),
           ("seconds_per_epoch", "s/epoch", "{:.1f}"), ("device", "device", "{}"), ("threads", "threads", "{}"),
           ("epochs", "epochs", "{}"), ("lr_step", "lr step", "{}")]


# What tells two result rows apart: every setting that defines a row (a row without one has its default here).
RESULT_KEY = {"method": None, "embedding_dim": None, "recipe": "classic", "seed": 0, "epochs": None,
              "lr_step": STEP_SIZE, "network": "embedding-net", "pretrained": None, "amp": None, "quick": False,
              "train_classes": None}


def results_stem(row):
    """Where a result row is tabulated: ``<dataset>`` for a method trained with the study's recipe
    (``method_recipe``), ``<dataset>-recipes`` for any other recipe (the classic "before" rows, trials)."""
    study = recipe_label(method_recipe(row["method"])) if row["method"] in study_labels() else "classic"
    return row["dataset"] + ("" if row.get("recipe", "classic") == study else "-recipes")


def record_result(row, results_dir="results"):
    """Merge ``row`` into ``results/<stem>.json`` (``results_stem``; one row per ``RESULT_KEY``: method, embedding
    size, recipe, seed, epochs, learning-rate step, network, precision, ...; a new run replaces only the row of
    the same settings) and rewrite ``results/<stem>.md``. Returns the rows."""
    order = {label: position for position, label in enumerate(study_labels())}
    row = {**row, "recipe": row.get("recipe", "classic"), "seed": row.get("seed", 0)}  # before recipes: classic
    return merge_results(os.path.join(results_dir, results_stem(row)), [row], RESULT_KEY,
                         lambda r: (r["embedding_dim"], order.get(r["method"], len(order)), r["method"],
                                    r.get("recipe", "classic"), r.get("seed", 0),
                                    str([r.get(key, default) for key, default in RESULT_KEY.items()])),
                         results_table)


def study_labels():
    """Every row name of the study (``method_label`` of each method and selector), in the tables' order."""
    return [method_label(method, selector) for method in METHODS
            for selector in (SELECTORS if method == "online-triplet" else [None])]


def results_table(rows):
    """Markdown table of result rows (one line per method and embedding size)."""
    columns = COLUMNS + [column for column in HELD_OUT_COLUMNS if any(column[0] in row for row in rows)]
    return markdown_table(rows, columns)


def held_out_dir(folder, classes_tag):
    """``folder/train-classes-<classes_tag>`` (made safe for a file name); None and no tag leave it as it is."""
    if folder is None or classes_tag is None:
        return folder
    return os.path.join(folder, "train-classes-" + safe_name(classes_tag))
