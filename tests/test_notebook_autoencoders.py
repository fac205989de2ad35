"""The autoencoder notebook: committed clean, parameters read from the environment, and a quick run
executes end to end (nbclient, this interpreter's kernel) on the IDX fixture in a temporary folder.
Kernel and execution helpers are those of test_notebooks.py."""

import asyncio
import json
import os

import nbformat
import pytest

from fixtures import write_idx_fixture
from test_notebooks import REPO, code_cells, execute, outputs_of

NOTEBOOK = "Experiments_Autoencoders.ipynb"
PARAMETER_VARIABLES = ["ST_DATASET", "ST_ITERS", "ST_LATENT_DIMS", "ST_QUICK", "ST_DATA_ROOT", "ST_DOWNLOAD"]
PARAMETERS = ["DATASET", "ITERS", "LATENT_DIMS", "QUICK", "DATA_ROOT", "DOWNLOAD"]
SWEEPS = [(constraint, encoder) for constraint in ("pairwise", "triplet") for encoder in ("embenc", "vae")]
WEIGHTS = [0, 0.25, 0.5, 0.75, 1]


def read_notebook():
    return nbformat.read(os.path.join(REPO, NOTEBOOK), as_version=4)


def parameters(monkeypatch, environment):
    """The variables the first code cell defines when the ST_ variables are those of `environment`."""
    for variable in PARAMETER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    namespace = {}
    exec(compile(code_cells(read_notebook())[0].source, NOTEBOOK, "exec"), namespace)
    return {name: namespace[name] for name in PARAMETERS}


def test_notebook_is_committed_clean():
    notebook = read_notebook()
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.language == "python"
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    first_code = code_cells(notebook)[0]
    assert "parameters" in first_code.metadata.get("tags", [])
    for variable in PARAMETER_VARIABLES:
        assert variable in first_code.source  # documented in the cell


def test_parameters_default_to_a_full_run_and_follow_the_environment(monkeypatch):
    assert parameters(monkeypatch, {}) == {"DATASET": "fashion-mnist", "ITERS": 20000, "LATENT_DIMS": [2],
                                           "QUICK": False, "DATA_ROOT": "data", "DOWNLOAD": True}
    environment = {"ST_DATASET": "mnist", "ST_ITERS": "30", "ST_LATENT_DIMS": "2,16", "ST_QUICK": "yes",
                   "ST_DATA_ROOT": "/somewhere", "ST_DOWNLOAD": "0"}
    assert parameters(monkeypatch, environment) == {"DATASET": "mnist", "ITERS": 30, "LATENT_DIMS": [2, 16],
                                                    "QUICK": True, "DATA_ROOT": "/somewhere", "DOWNLOAD": False}
    with pytest.raises(ValueError, match="ST_QUICK"):
        parameters(monkeypatch, {"ST_QUICK": "maybe"})


def test_quick_run_executes_end_to_end(tmp_path):
    data_root, work = tmp_path / "data", tmp_path / "work"
    write_idx_fixture(data_root, train_per_class=10, test_per_class=10)
    work.mkdir()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ST_")}
    environment.update(ST_QUICK="1", ST_ITERS="3", ST_DATA_ROOT=str(data_root), ST_DOWNLOAD="0",
                       PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                       IPYTHONDIR=str(tmp_path / "ipython"),  # no user IPython profile or startup files
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with pytest.MonkeyPatch.context() as patch:  # connection files in tmp, not in a home that may be read-only
        patch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
        notebook = asyncio.run(execute(read_notebook(), work, environment))

    final = code_cells(notebook)[-1]
    table = "".join(outputs_of(final, "text/markdown"))
    assert table.startswith("| constraint |")
    for constraint, encoder in SWEEPS:
        for weight in WEIGHTS:
            assert f"\n| {constraint} | {encoder} | images | {weight:g} | 2 | " in table
    tradeoff_cell = next(cell for cell in code_cells(notebook) if "plot_tradeoff" in cell.source)
    assert len(outputs_of(tradeoff_cell, "image/png")) == 1
    reconstruction_cell = next(cell for cell in code_cells(notebook) if "reconstruction_plot" in cell.source)
    assert len(outputs_of(reconstruction_cell, "image/png")) == 2 * len(WEIGHTS)
    latent_cell = next(cell for cell in code_cells(notebook) if "latent_plot" in cell.source)
    assert len(outputs_of(latent_cell, "image/png")) == len(SWEEPS)

    # everything lands under the kernel's working directory, in the quick folders only
    assert sorted(os.listdir(work)) == ["images", "results"]
    assert os.listdir(work / "images") == ["quick"] and os.listdir(work / "results") == ["quick"]
    plots = set(os.listdir(work / "images" / "quick" / "autoencoders"))
    assert "fashion-mnist_tradeoff.png" in plots
    for constraint, encoder in SWEEPS:
        for weight in WEIGHTS:
            stem = f"fashion-mnist_{constraint}_{encoder}_images_M{weight:g}_2d"
            assert {stem + "_latent.png", stem + "_reconstructions.png"} <= plots
    with open(work / "results" / "quick" / "autoencoders-fashion-mnist.json") as file:
        rows = json.load(file)
    assert len(rows) == len(SWEEPS) * len(WEIGHTS)
    assert all(row["quick"] and row["num_iters"] == 3 for row in rows)
