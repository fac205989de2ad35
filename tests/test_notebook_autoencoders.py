"""The autoencoder notebook: committed executed with the saved sweep (its tables are the rows of
results/autoencoders-fashion-mnist.json), parameters read from the environment, and a quick run executes
end to end (nbclient, this interpreter's kernel, on a copy in memory) on the IDX fixture in a temporary
folder. Kernel and execution helpers: tests/notebook_helpers.py."""

import json
import os

import pytest

from fixtures import write_idx_fixture
import autoencoders
from notebook_helpers import (REPO, check_committed_executed, code_cells, file_digest, kernel_environment, outputs_of,
                              parameter_values, read_notebook, run_notebook)

NOTEBOOK = "Experiments_Autoencoders.ipynb"
PARAMETER_VARIABLES = ["ST_DATASET", "ST_ITERS", "ST_LATENT_DIMS", "ST_QUICK", "ST_TRAIN", "ST_DATA_ROOT",
                       "ST_DOWNLOAD"]
PARAMETERS = ["DATASET", "ITERS", "LATENT_DIMS", "QUICK", "TRAIN", "DATA_ROOT", "DOWNLOAD"]
SWEEPS = [(constraint, encoder) for constraint in ("pairwise", "triplet") for encoder in ("embenc", "vae")]
WEIGHTS = [0, 0.25, 0.5, 0.75, 1]


def parameters(monkeypatch, environment):
    """The variables the first code cell defines when the ST_ variables are those of `environment`."""
    return parameter_values(NOTEBOOK, monkeypatch, PARAMETER_VARIABLES, environment, PARAMETERS)


def test_notebook_is_committed_with_the_saved_sweep():
    notebook = check_committed_executed(NOTEBOOK, PARAMETER_VARIABLES)
    assert "saved results" in notebook.cells[0].source
    with open(os.path.join(REPO, "results", "autoencoders-fashion-mnist.json")) as file:
        saved = [row for row in json.load(file) if row["latent_dim"] == 2]
    cells = code_cells(notebook)
    shown = []
    for constraint, encoder in SWEEPS:
        cell = next(cell for cell in cells if f'sweep("{constraint}", "{encoder}")' in cell.source)
        rows = [row for row in saved if (row["constraint"], row["encoder"]) == (constraint, encoder)]
        assert sorted(row["weight"] for row in rows) == WEIGHTS
        assert outputs_of(cell, "text/markdown") == [autoencoders.results_table(rows)]
        shown += rows
    assert outputs_of(cells[-1], "text/markdown") == [autoencoders.results_table(shown)]
    for source, figures in (("plot_tradeoff", 1), ("reconstruction_plot", 2 * len(WEIGHTS)), ("latent_plot", len(SWEEPS))):
        cell = next(cell for cell in cells if source in cell.source)
        assert len(outputs_of(cell, "image/png")) == figures, source


def test_parameters_default_to_a_full_run_and_follow_the_environment(monkeypatch):
    assert parameters(monkeypatch, {}) == {"DATASET": "fashion-mnist", "ITERS": 20000, "LATENT_DIMS": [2],
                                           "QUICK": False, "TRAIN": False, "DATA_ROOT": "data", "DOWNLOAD": True}
    environment = {"ST_DATASET": "mnist", "ST_ITERS": "30", "ST_LATENT_DIMS": "2,16", "ST_QUICK": "yes",
                   "ST_DATA_ROOT": "/somewhere", "ST_DOWNLOAD": "0"}
    assert parameters(monkeypatch, environment) == {"DATASET": "mnist", "ITERS": 30, "LATENT_DIMS": [2, 16],
                                                    "QUICK": True, "TRAIN": True, "DATA_ROOT": "/somewhere",
                                                    "DOWNLOAD": False}
    assert parameters(monkeypatch, {"ST_TRAIN": "1"})["TRAIN"] is True
    with pytest.raises(ValueError, match="ST_QUICK"):
        parameters(monkeypatch, {"ST_QUICK": "maybe"})


def test_quick_run_executes_end_to_end(tmp_path):
    data_root, work = tmp_path / "data", tmp_path / "work"
    write_idx_fixture(data_root, train_per_class=10, test_per_class=10)
    work.mkdir()
    environment = kernel_environment(tmp_path, ST_QUICK="1", ST_ITERS="3", ST_DATA_ROOT=str(data_root),
                                     ST_DOWNLOAD="0")
    before = file_digest(NOTEBOOK)
    notebook = run_notebook(read_notebook(NOTEBOOK), work, environment, tmp_path)
    assert file_digest(NOTEBOOK) == before  # executed on a copy in memory

    final = code_cells(notebook)[-1]
    table = "".join(outputs_of(final, "text/markdown"))
    assert table.startswith("| constraint |")
    for constraint, encoder in SWEEPS:
        for weight in WEIGHTS:
            assert f"\n| {constraint} | {encoder} | pixels | {weight:g} | 2 | " in table  # the saved sweep's features
    tradeoff_cell = next(cell for cell in code_cells(notebook) if "plot_tradeoff" in cell.source)
    assert len(outputs_of(tradeoff_cell, "image/png")) == 1
    reconstruction_cell = next(cell for cell in code_cells(notebook) if "reconstruction_plot" in cell.source)
    assert len(outputs_of(reconstruction_cell, "image/png")) == 2 * len(WEIGHTS)
    latent_cell = next(cell for cell in code_cells(notebook) if "latent_plot" in cell.source)
    assert len(outputs_of(latent_cell, "image/png")) == len(SWEEPS)

    # everything lands under the kernel's working directory, in the quick run's own folder only
    quick = work / "runs" / "autoencoders-fashion-mnist" / "quick"  # (autoencoders.sweep_outputs)
    assert sorted(os.listdir(work)) == ["runs"] and os.listdir(work / "runs") == ["autoencoders-fashion-mnist"]
    assert os.listdir(quick.parent) == ["quick"] and sorted(os.listdir(quick)) == ["images", "results"]
    plots = set(os.listdir(quick / "images"))
    assert "fashion-mnist_tradeoff.png" in plots
    for constraint, encoder in SWEEPS:
        for weight in WEIGHTS:
            stem = f"fashion-mnist_{constraint}_{encoder}_pixels_M{weight:g}_2d"
            assert {stem + "_latent.png", stem + "_reconstructions.png"} <= plots
    with open(quick / "results" / "autoencoders-fashion-mnist.json") as file:
        rows = json.load(file)
    assert len(rows) == len(SWEEPS) * len(WEIGHTS)
    assert all(row["quick"] and row["num_iters"] == 3 for row in rows)
