"""The Omniglot notebook: committed executed on the committed weights (its accuracy table is
results/omniglot.json's), parameters read from the environment, and a quick run executes end to end (on a
copy in memory) on small Omniglot-format zips written by the test (kernel and execution helpers:
tests/notebook_helpers.py)."""

import json
import os

import pytest

import omniglot
from notebook_helpers import (REPO, check_committed_executed, code_cells, file_digest, kernel_environment, outputs_of,
                              parameter_values, read_notebook, run_notebook)
from omniglot_fixtures import write_alphabets, zip_folder

NOTEBOOK = "Experiments_Omniglot.ipynb"
PARAMETER_VARIABLES = ["ST_QUICK", "ST_EPOCHS", "ST_OMNIGLOT_ROOT", "ST_TRAIN"]


def parameters(monkeypatch, environment):
    return parameter_values(NOTEBOOK, monkeypatch, PARAMETER_VARIABLES, environment,
                            ("QUICK", "EPOCHS", "OMNIGLOT_ROOT", "TRAIN"))


def test_notebook_is_committed_with_the_results_of_the_committed_weights():
    notebook = check_committed_executed(NOTEBOOK, PARAMETER_VARIABLES)
    assert "committed weights" in notebook.cells[0].source
    cells = code_cells(notebook)
    loading = "".join(output.get("text", "") for output in cells[2].outputs)
    assert f"loaded {os.path.relpath(omniglot.OMNIGLOT_WEIGHTS, REPO)}," in loading  # no path of this machine
    with open(os.path.join(REPO, "results", "omniglot.json")) as file:
        saved = json.load(file)
    table = omniglot.omniglot_table(saved["evaluation"], saved["evaluation_shift_averaged"])
    assert outputs_of(cells[-1], "text/markdown")[0] == table
    for source, figures in (("best_threshold(", 1), ("sample_episodes(", 2)):
        cell = next(cell for cell in cells if source in cell.source)
        assert len(outputs_of(cell, "image/png")) == figures, source


def test_parameters_default_and_follow_the_environment(monkeypatch):
    assert parameters(monkeypatch, {}) == {"QUICK": False, "EPOCHS": None, "OMNIGLOT_ROOT": None, "TRAIN": False}
    environment = {"ST_QUICK": "1", "ST_EPOCHS": "3", "ST_OMNIGLOT_ROOT": "/somewhere", "ST_TRAIN": "yes"}
    assert parameters(monkeypatch, environment) == {"QUICK": True, "EPOCHS": 3, "OMNIGLOT_ROOT": "/somewhere",
                                                    "TRAIN": True}
    with pytest.raises(ValueError, match="ST_TRAIN"):
        parameters(monkeypatch, {"ST_TRAIN": "maybe"})


def write_omniglot_root(root):
    """images_background_small1.zip and images_background_small2.zip like the real ones (a top folder per
    zip; the second shares one alphabet with the first), small enough for a quick run."""
    write_alphabets(root / "small1", alphabets={"Alpha": 3, "Beta": 2}, drawers=6, size=28)
    write_alphabets(root / "small2", top="images_background_small2", alphabets={"Beta": 2, "Gamma": 20, "Delta": 5},
                    drawers=6, size=28)
    zip_folder(root / "small1", root / "images_background_small1.zip")
    zip_folder(root / "small2", root / "images_background_small2.zip")


def test_quick_run_executes_end_to_end(tmp_path):
    data_root, work = tmp_path / "omniglot", tmp_path / "work"
    data_root.mkdir()
    write_omniglot_root(data_root)
    work.mkdir()
    environment = kernel_environment(tmp_path, ST_QUICK="1", ST_OMNIGLOT_ROOT=str(data_root))
    before = file_digest(NOTEBOOK)
    notebook = run_notebook(read_notebook(NOTEBOOK), work, environment, tmp_path)
    assert file_digest(NOTEBOOK) == before  # executed on a copy in memory

    cells = code_cells(notebook)
    data_cell = cells[1]
    text = "".join(output.get("text", "") for output in data_cell.outputs)
    assert "40 classes (5 characters x 4 rotations x 2 mirror images) of Alpha, Beta" in text
    assert "evaluation: 150 images, 25 characters of Delta, Gamma" in text
    assert len(outputs_of(data_cell, "image/png")) == 2
    training = "".join(output.get("text", "") for output in cells[2].outputs)
    assert "training for 1 epochs" in training
    verification_cell = next(cell for cell in cells if "best_threshold(" in cell.source)
    assert len(outputs_of(verification_cell, "image/png")) == 1
    episodes_cell = next(cell for cell in cells if "sample_episodes(" in cell.source)
    assert len(outputs_of(episodes_cell, "image/png")) == 2
    tables = "".join(outputs_of(cells[-1], "text/markdown"))
    for task in ("20-way 1-shot, within alphabet | Gamma | 100 |", "5-way 1-shot, within alphabet | Delta, Gamma | 100 |",
                 "20-way 1-shot, across alphabets", "verification", "20-way 5-shot, within alphabet",
                 "20-way 1-shot, within alphabet, shift-averaged (+-2 px) | Gamma | 100 |"):
        assert task in tables
    assert os.listdir(work) == []  # the notebook writes no file
