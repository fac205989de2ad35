"""What the notebook tests share: reading a notebook, the first (parameters) cell's values under a
given environment, the committed-clean check, and running a notebook in a fresh kernel.

The kernel is always this test's own interpreter, through ipykernel's built-in kernel spec: the
kernel spec manager is given no folders to search, so no kernel registered on the machine (a user's
`python3` pointing at another Python, say) is picked up, and nothing has to be registered.
"""

import asyncio
import hashlib
import os
import re

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSOLUTE_FILE = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]+\.(?:pt|json|png|zip|md)\b")
CELL_TIMEOUT = 300  # seconds; a quick-mode cell takes a few


def read_notebook(filename):
    """The notebook `filename` (relative to the repository, or an absolute path)."""
    return nbformat.read(os.path.join(REPO, filename), as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def outputs_of(cell, mime):
    return [output["data"][mime] for output in cell.outputs if mime in output.get("data", {})]


def parameter_values(filename, monkeypatch, variables, environment, names):
    """The values of `names` that the notebook's first code cell defines when, of the environment
    `variables`, only those in the dict `environment` are set."""
    for variable in variables:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    namespace = {}
    exec(compile(code_cells(read_notebook(filename))[0].source, filename, "exec"), namespace)
    return {name: namespace[name] for name in names}


def check_committed_clean(filename, variables):
    """The notebook validates, runs on the python3 kernel, has no outputs, and its first code cell is
    tagged `parameters` and names every environment variable it reads."""
    notebook = read_notebook(filename)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.language == "python"
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
        assert "execution" not in cell.metadata, cell.source[:80]  # no times of a run either
    first_code = code_cells(notebook)[0]
    assert "parameters" in first_code.metadata.get("tags", [])
    for variable in variables:
        assert variable in first_code.source  # documented in the cell


def check_committed_executed(filename, variables):
    """The notebook validates, runs on the python3 kernel, and was executed from top to bottom as
    committed: every code cell ran once, in order, without an error output or a path of this checkout
    in its printed text; its first code cell is
    tagged `parameters` and names every environment variable it reads. Returns the notebook."""
    notebook = read_notebook(filename)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    for cell in cells:
        assert not [output for output in cell.outputs if output.output_type == "error"], cell.source[:80]
        # no absolute path of the machine it ran on: the outputs read the same from any clone
        text = "".join(output.get("text", "") for output in cell.outputs)
        assert not ABSOLUTE_FILE.search(text), (cell.source[:80], ABSOLUTE_FILE.search(text))
    assert "parameters" in cells[0].metadata.get("tags", [])
    for variable in variables:
        assert variable in cells[0].source
    return notebook


def file_digest(filename):
    """SHA-256 of a repository file, to show that a test left it as it was."""
    with open(os.path.join(REPO, filename), "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def kernel_environment(tmp_path, **settings):
    """This process's environment without any ST_ variable, plus `settings` (the notebook's ST_
    parameters), the repository on PYTHONPATH, a private IPython folder (no user profile or startup
    files) and one thread per kernel (kernels may run side by side)."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ST_")}
    environment.update(settings, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                       IPYTHONDIR=str(tmp_path / "ipython"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return environment


def kernel_manager():
    """A kernel manager that starts ipykernel on sys.executable (see the module docstring)."""
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


async def execute(notebook, cwd, environment):
    """Run every cell of `notebook` in a fresh kernel started in `cwd` with `environment`; the
    outputs are stored in `notebook`. A failing cell raises nbclient's CellExecutionError."""
    client = NotebookClient(notebook, km=kernel_manager(), timeout=CELL_TIMEOUT)
    await client.async_execute(cwd=os.fspath(cwd), env=environment, cleanup_kc=True)
    return notebook


def run_notebooks(jobs, tmp_path):
    """Execute `jobs`, a list of (notebook, working directory, environment), concurrently; returns,
    in order, each executed notebook or the exception its run raised. Kernel connection files go
    to tmp_path, not to a home folder that may be read-only."""
    async def run_all():
        return await asyncio.gather(*(execute(*job) for job in jobs), return_exceptions=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
        return asyncio.run(run_all())


def run_notebook(notebook, cwd, environment, tmp_path):
    """Execute one notebook (see run_notebooks); raises what its run raised."""
    outcome, = run_notebooks([(notebook, cwd, environment)], tmp_path)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
