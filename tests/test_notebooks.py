"""The two walk-through notebooks: committed clean, parameters read from the environment, and a
quick run of each executes end to end (nbclient) on the IDX fixture in a temporary folder.

The two quick runs execute concurrently, each kernel on one thread: on a 2-core machine that takes
about a third of the time of running them one after the other with two threads each.

The kernel is always this test's own interpreter, through ipykernel's built-in kernel spec: the
kernel spec manager is given no folders to search, so no kernel registered on the machine (a user's
`python3` pointing at another Python, say) is picked up, and nothing has to be registered.
"""

import asyncio
import json
import os
import sys

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from fixtures import write_idx_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = {"mnist": "Experiments_MNIST.ipynb", "fashion-mnist": "Experiments_FashionMNIST.ipynb"}
# What each notebook trains, in the order of its sections; the final table must name them all.
LABELS = ["softmax", "siamese", "triplet", "online-contrastive", "online-triplet/random-hard",
          "online-triplet/semi-hard"]
COMPARISONS = ["siamese_vs_online-contrastive", "triplet_vs_online-triplet-random-hard",
               "triplet_vs_online-triplet-semi-hard"]
PARAMETER_VARIABLES = ["ST_DATASET", "ST_EPOCHS", "ST_QUICK", "ST_DATA_ROOT", "ST_DOWNLOAD"]
CELL_TIMEOUT = 300  # seconds; a quick-mode cell takes a few


def read_notebook(dataset):
    return nbformat.read(os.path.join(REPO, NOTEBOOKS[dataset]), as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def parameters(dataset, monkeypatch, environment):
    """The variables the first code cell defines when the ST_ variables are those of `environment`."""
    for variable in PARAMETER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    namespace = {}
    exec(compile(code_cells(read_notebook(dataset))[0].source, NOTEBOOKS[dataset], "exec"), namespace)
    return {name: namespace[name] for name in ("DATASET", "EPOCHS", "QUICK", "DATA_ROOT", "DOWNLOAD")}


def kernel_manager():
    """A kernel manager that starts ipykernel on sys.executable (see the module docstring)."""
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


async def execute(notebook, cwd, environment):
    """Run every cell of `notebook` in a fresh kernel started in `cwd` with `environment`; the
    outputs are stored in `notebook`. A failing cell raises nbclient's CellExecutionError."""
    client = NotebookClient(notebook, km=kernel_manager(), timeout=CELL_TIMEOUT)
    await client.async_execute(cwd=os.fspath(cwd), env=environment, cleanup_kc=True)
    return notebook


def outputs_of(cell, mime):
    return [output["data"][mime] for output in cell.outputs if mime in output.get("data", {})]


@pytest.mark.parametrize("dataset", NOTEBOOKS)
def test_notebook_is_committed_clean(dataset):
    notebook = read_notebook(dataset)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.language == "python"
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    first_code = code_cells(notebook)[0]
    assert "parameters" in first_code.metadata.get("tags", [])
    for variable in PARAMETER_VARIABLES:
        assert variable in first_code.source  # documented in the cell


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
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ST_")}
    environment.update(ST_QUICK="1", ST_DATA_ROOT=str(data_root), ST_DOWNLOAD="0",
                       PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                       IPYTHONDIR=str(tmp_path / "ipython"),  # no user IPython profile or startup files
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    works = {dataset: tmp_path / dataset for dataset in NOTEBOOKS}
    for work in works.values():
        work.mkdir()

    async def run_all():
        return await asyncio.gather(*(execute(read_notebook(dataset), works[dataset], environment)
                                      for dataset in NOTEBOOKS), return_exceptions=True)

    with pytest.MonkeyPatch.context() as patch:  # connection files in tmp, not in a home that may be read-only
        patch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
        outcomes = asyncio.run(run_all())
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
