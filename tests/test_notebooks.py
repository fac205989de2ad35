"""The two walk-through notebooks: committed clean, parameters read from the environment, and a
quick run of each executes end to end (nbclient) on the IDX fixture in a temporary folder.

The two quick runs execute concurrently, each kernel on one thread: on a 2-core machine that takes
about a third of the time of running them one after the other with two threads each.
"""

import json
import os
import sys

import pytest

from fixtures import write_idx_fixture
from notebook_helpers import (check_committed_clean, code_cells, kernel_environment, kernel_manager,
                              outputs_of, parameter_values, read_notebook, run_notebooks)

NOTEBOOKS = {"mnist": "Experiments_MNIST.ipynb", "fashion-mnist": "Experiments_FashionMNIST.ipynb"}
# What each notebook trains, in the order of its sections; the final table must name them all.
LABELS = ["softmax", "siamese", "triplet", "online-contrastive", "online-triplet/random-hard",
          "online-triplet/semi-hard"]
COMPARISONS = ["siamese_vs_online-contrastive", "triplet_vs_online-triplet-random-hard",
               "triplet_vs_online-triplet-semi-hard"]
PARAMETER_VARIABLES = ["ST_DATASET", "ST_EPOCHS", "ST_QUICK", "ST_DATA_ROOT", "ST_DOWNLOAD"]


def parameters(dataset, monkeypatch, environment):
    """The variables the first code cell defines when the ST_ variables are those of `environment`."""
    return parameter_values(NOTEBOOKS[dataset], monkeypatch, PARAMETER_VARIABLES, environment,
                            ("DATASET", "EPOCHS", "QUICK", "DATA_ROOT", "DOWNLOAD"))


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_notebook_is_committed_clean(dataset):
    check_committed_clean(NOTEBOOKS[dataset], PARAMETER_VARIABLES)


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_parameters_default_to_a_full_run(dataset, monkeypatch):
    assert parameters(dataset, monkeypatch, {}) == {"DATASET": dataset, "EPOCHS": 20, "QUICK": False, "DATA_ROOT": "data",
                                       "DOWNLOAD": True}


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_parameters_follow_the_environment(dataset, monkeypatch):
    environment = {"ST_DATASET": "mnist", "ST_EPOCHS": "3", "ST_QUICK": "1", "ST_DATA_ROOT": "/somewhere",
                   "ST_DOWNLOAD": "0"}
    assert parameters(dataset, monkeypatch, environment) == {"DATASET": "mnist", "EPOCHS": 3, "QUICK": True,
                                                "DATA_ROOT": "/somewhere", "DOWNLOAD": False}
    assert parameters(dataset, monkeypatch, {"ST_QUICK": " Yes ", "ST_DOWNLOAD": "false"})["QUICK"] is True
    assert parameters(dataset, monkeypatch, {"ST_DOWNLOAD": "off"})["DOWNLOAD"] is False


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
    for a quick run of each notebook on the IDX fixture."""
    tmp_path = tmp_path_factory.mktemp("notebooks")
    data_root = tmp_path / "data"
    write_idx_fixture(data_root, train_per_class=25, test_per_class=25)  # the least 10 x 25 batches allow
    environment = kernel_environment(tmp_path, ST_QUICK="1", ST_DATA_ROOT=str(data_root), ST_DOWNLOAD="0")
    works = {dataset: tmp_path / dataset for dataset in NOTEBOOKS}
    for work in works.values():
        work.mkdir()
    outcomes = run_notebooks([(read_notebook(NOTEBOOKS[dataset]), works[dataset], environment)
                              for dataset in NOTEBOOKS], tmp_path)
    return {dataset: (outcome, works[dataset]) for dataset, outcome in zip(NOTEBOOKS, outcomes)}


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_quick_run_executes_end_to_end(dataset, quick_runs):
    notebook, work = quick_runs[dataset]
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
    for comparison in COMPARISONS:
        assert f"{dataset}_{comparison}.png" in images
    with open(work / "results" / "quick" / f"{dataset}.json") as file:
        rows = json.load(file)
    assert [row["method"] for row in rows] == LABELS
    assert all(row["quick"] and row["epochs"] == 1 for row in rows)
