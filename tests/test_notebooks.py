"""The two walk-through notebooks of the MNIST-format study.

``Experiments_FashionMNIST.ipynb`` is committed executed, showing the study's saved rows and plots
(``ST_TRAIN=0``): its tables must be the rows of ``results/fashion-mnist.json`` and its figures the
saved ones. ``Experiments_MNIST.ipynb`` is committed without outputs (they need the MNIST download).
Both read their parameters from the environment, and a quick run of each executes end to end
(nbclient, on a copy in memory: the committed files stay as they are) on the IDX fixture in a
temporary folder. The quick run trains through the lines each section shows, so its rows must be
those ``experiments.run_methods`` gives with the study's wiring (``build_training``).

The two quick runs execute concurrently, each kernel on one thread: on a 2-core machine that takes
about a third of the time of running them one after the other with two threads each.
"""

import json
import os
import sys

import pytest
import torch

import experiments
from fixtures import write_idx_fixture
from notebook_helpers import (REPO, check_committed_clean, check_committed_executed, code_cells, file_digest,
                              kernel_environment, kernel_manager, outputs_of, parameter_values, read_notebook,
                              run_notebooks)

NOTEBOOKS = {"mnist": "Experiments_MNIST.ipynb", "fashion-mnist": "Experiments_FashionMNIST.ipynb"}
# What each notebook trains, in the order of its sections; the final table must name them all.
LABELS = ["softmax", "siamese", "triplet", "online-contrastive", "online-triplet/random-hard",
          "online-triplet/semi-hard", "online-triplet/batch-hard"]
COMPARISONS = [("siamese", "online-contrastive"), ("triplet", "online-triplet/random-hard"),
               ("triplet", "online-triplet/semi-hard"), ("triplet", "online-triplet/batch-hard")]
PARAMETER_VARIABLES = ["ST_DATASET", "ST_EPOCHS", "ST_QUICK", "ST_TRAIN", "ST_DATA_ROOT", "ST_DOWNLOAD"]
NAMES = ("DATASET", "EPOCHS", "QUICK", "TRAIN", "DATA_ROOT", "DOWNLOAD")


def parameters(dataset, monkeypatch, environment):
    """The variables the first code cell defines when the ST_ variables are those of `environment`."""
    return parameter_values(NOTEBOOKS[dataset], monkeypatch, PARAMETER_VARIABLES, environment, NAMES)


def test_the_mnist_notebook_is_committed_clean_and_says_why():
    check_committed_clean(NOTEBOOKS["mnist"], PARAMETER_VARIABLES)
    assert "committed without outputs" in read_notebook(NOTEBOOKS["mnist"]).cells[0].source


def saved_rows():
    with open(os.path.join(REPO, "results", "fashion-mnist.json")) as file:
        rows = {row["method"]: row for row in json.load(file) if (row["embedding_dim"], row["seed"]) == (2, 0)}
    return [rows[label] for label in LABELS]


def test_the_fashion_mnist_notebook_is_committed_with_the_saved_results():
    notebook = check_committed_executed(NOTEBOOKS["fashion-mnist"], PARAMETER_VARIABLES)
    assert "saved results" in notebook.cells[0].source
    cells = code_cells(notebook)
    rows = saved_rows()
    sections = [cell for cell in cells if "train(\"" in cell.source and "def train" not in cell.source]
    assert len(sections) == len(LABELS)
    for cell, label, row in zip(sections, LABELS, rows):
        assert f'train("{label}"' in cell.source
        assert outputs_of(cell, "text/markdown") == [experiments.results_table([row])], label
        assert len(outputs_of(cell, "image/png")) == 2, label  # train and test embeddings
    assert outputs_of(cells[-1], "text/markdown") == [experiments.results_table(rows)]
    comparison_cell = next(cell for cell in cells if "plot_comparison" in cell.source)
    assert len(outputs_of(comparison_cell, "image/png")) == len(COMPARISONS)


def test_parameters_default_to_the_full_study(monkeypatch):
    for dataset, train in (("mnist", True), ("fashion-mnist", False)):
        assert parameters(dataset, monkeypatch, {}) == {"DATASET": dataset, "EPOCHS": 20, "QUICK": False,
                                                        "TRAIN": train, "DATA_ROOT": "data", "DOWNLOAD": True}


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_parameters_follow_the_environment(dataset, monkeypatch):
    environment = {"ST_DATASET": "mnist", "ST_EPOCHS": "3", "ST_QUICK": "1", "ST_DATA_ROOT": "/somewhere",
                   "ST_DOWNLOAD": "0"}
    assert parameters(dataset, monkeypatch, environment) == {"DATASET": "mnist", "EPOCHS": 3, "QUICK": True,
                                                             "TRAIN": True, "DATA_ROOT": "/somewhere",
                                                             "DOWNLOAD": False}
    assert parameters(dataset, monkeypatch, {"ST_QUICK": " Yes ", "ST_DOWNLOAD": "false"})["QUICK"] is True
    assert parameters(dataset, monkeypatch, {"ST_DOWNLOAD": "off"})["DOWNLOAD"] is False
    assert parameters(dataset, monkeypatch, {"ST_TRAIN": "0"})["TRAIN"] is False


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_parameters_reject_an_unclear_flag(dataset, monkeypatch):
    with pytest.raises(ValueError, match="ST_QUICK"):
        parameters(dataset, monkeypatch, {"ST_QUICK": "maybe"})


def test_kernel_is_this_interpreter():
    manager = kernel_manager()
    assert manager.kernel_spec.argv[0] == sys.executable


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """{dataset: (executed notebook or the exception it raised, the kernel's working directory)}
    for a quick run of each notebook on the IDX fixture, and the committed files' digests before and after."""
    tmp_path = tmp_path_factory.mktemp("notebooks")
    data_root = tmp_path / "data"
    write_idx_fixture(data_root, train_per_class=25, test_per_class=25)  # the least 10 x 25 batches allow
    environment = kernel_environment(tmp_path, ST_QUICK="1", ST_DATA_ROOT=str(data_root), ST_DOWNLOAD="0")
    works = {dataset: tmp_path / dataset for dataset in NOTEBOOKS}
    for work in works.values():
        work.mkdir()
    before = {name: file_digest(name) for name in NOTEBOOKS.values()}
    outcomes = run_notebooks([(read_notebook(NOTEBOOKS[dataset]), works[dataset], environment)
                              for dataset in NOTEBOOKS], tmp_path)
    after = {name: file_digest(name) for name in NOTEBOOKS.values()}
    return {dataset: (outcome, works[dataset]) for dataset, outcome in zip(NOTEBOOKS, outcomes)}, (before, after)


def quick_rows(work, dataset):
    with open(work / "results" / "quick" / f"{dataset}.json") as file:
        return json.load(file)


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_quick_run_executes_end_to_end(dataset, quick_runs):
    notebook, work = quick_runs[0][dataset]
    if isinstance(notebook, BaseException):
        raise notebook

    final = code_cells(notebook)[-1]
    table = "".join(outputs_of(final, "text/markdown"))
    assert table.startswith("| method |")
    for label in LABELS:
        assert f"\n| {label} | 2 | " in table
    comparison_cell = next(cell for cell in code_cells(notebook) if "plot_comparison" in cell.source)
    assert len(outputs_of(comparison_cell, "image/png")) == len(COMPARISONS)

    # everything lands under the kernel's working directory, in the quick folders only
    assert sorted(os.listdir(work)) == ["images", "results"]
    assert os.listdir(work / "images") == ["quick"] and os.listdir(work / "results") == ["quick"]
    images = set(os.listdir(work / "images" / "quick"))
    for label in LABELS:
        for split in ("train", "test"):
            assert f"{dataset}_{label.replace('/', '-')}_{split}.png" in images
    for left, right in COMPARISONS:
        assert os.path.basename(experiments.comparison_path(dataset, left, right)) in images
    rows = quick_rows(work, dataset)
    assert [row["method"] for row in rows] == LABELS
    assert all(row["quick"] and row["epochs"] == 1 for row in rows)


def test_quick_runs_leave_the_committed_notebooks_as_they_are(quick_runs):
    before, after = quick_runs[1]
    assert before == after


def test_each_section_wires_its_method_as_the_study_does(quick_runs, tmp_path):
    """The lines a section shows train what experiments.build_training builds: the same recipe, and the
    same losses and scores after the quick run's epoch (both on one thread, as the kernel runs: with more,
    float sums in another order can flip a hardest pick and move a loss by more than the tolerance)."""
    notebook, work = quick_runs[0]["mnist"]
    if isinstance(notebook, BaseException):
        raise notebook
    write_idx_fixture(tmp_path / "data", train_per_class=25, test_per_class=25)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the kernel: the same summation order, whatever this machine's thread count
    try:
        study = experiments.run_methods("mnist", experiments.METHODS, ("random-hard", "semi-hard", "batch-hard"),
                                        quick=True, root=str(tmp_path / "data"), images_dir=None,
                                        results_dir=None, run_dir=None, progress=False)
    finally:
        torch.set_num_threads(threads)
    study = {row["method"]: row for row in study}
    for row in quick_rows(work, "mnist"):
        expected = study[row["method"]]
        assert row["recipe"] == expected["recipe"], row["method"]
        for key in ("final_train_loss", "final_val_loss", "precision_at_1", "map_at_r"):
            assert row[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-3), (row["method"], key)
