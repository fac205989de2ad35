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

The two are written once: ``Experiments_MNIST.ipynb`` is made from ``Experiments_FashionMNIST.ipynb`` by
``notebook_twin.py``, and the committed twin must be what it makes of the committed source. No code is
written in two of the hand-written notebooks: what they share is in ``results.py`` (its notebooks section).
"""

import json
import os
import sys

import nbformat
import numpy as np
import pytest
import torch

import cli
import experiments
import notebook_twin
import results
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


def test_train_defaults_to_the_saved_study_only_for_the_dataset_that_has_one(monkeypatch):
    """Without ST_TRAIN, a notebook shows the saved study for fashion-mnist (results/ holds it) and trains
    for mnist (nothing saved), whichever of the two files runs and whatever its DATASET default."""
    for dataset in NOTEBOOKS:
        for chosen, train in (("mnist", True), ("fashion-mnist", False)):
            assert parameters(dataset, monkeypatch, {"ST_DATASET": chosen})["TRAIN"] is train, (dataset, chosen)
            assert parameters(dataset, monkeypatch, {"ST_DATASET": chosen, "ST_QUICK": "1"})["TRAIN"] is True


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


def quick_folder(work, dataset):
    """Where a quick run of ``dataset`` writes in ``work``: its own folder (``results.output_dirs``)."""
    return work / "runs" / dataset / "quick"


def quick_rows(work, dataset):
    with open(quick_folder(work, dataset) / "results" / f"{dataset}.json") as file:
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

    # everything lands under the kernel's working directory, in the quick run's own folder only
    assert sorted(os.listdir(work)) == ["runs"]
    assert os.listdir(work / "runs") == [dataset] and os.listdir(work / "runs" / dataset) == ["quick"]
    assert sorted(os.listdir(quick_folder(work, dataset))) == ["images", "results"]
    images = set(os.listdir(quick_folder(work, dataset) / "images"))
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


def read_text(filename):
    with open(os.path.join(REPO, filename), encoding="utf-8") as file:
        return file.read()


def test_the_mnist_notebook_is_made_from_the_fashion_mnist_notebook():
    """A change made to one of the two and not the other fails here: edit Experiments_FashionMNIST.ipynb,
    then `python notebook_twin.py`."""
    assert (notebook_twin.SOURCE, notebook_twin.TWIN) == (NOTEBOOKS["fashion-mnist"], NOTEBOOKS["mnist"])
    made = notebook_twin.twin_text(read_text(notebook_twin.SOURCE))
    assert made == read_text(notebook_twin.TWIN), "Experiments_MNIST.ipynb is out of date: run python notebook_twin.py"


def test_the_twins_code_differs_only_in_the_dataset_parameter():
    source, twin = (code_cells(read_notebook(NOTEBOOKS[dataset])) for dataset in ("fashion-mnist", "mnist"))
    assert len(source) == len(twin)
    differing = [(old, new) for a, b in zip(source, twin)
                 for old, new in zip(a.source.splitlines(), b.source.splitlines()) if old != new]
    assert differing == [('DATASET = os.environ.get("ST_DATASET", "fashion-mnist")',
                          'DATASET = os.environ.get("ST_DATASET", "mnist")')]
    assert [len(a.source.splitlines()) for a in source] == [len(b.source.splitlines()) for b in twin]
    assert read_notebook(NOTEBOOKS["mnist"]).cells[0].source.startswith("# Siamese and triplet networks on MNIST\n")


def copy_source(folder, change=None):
    """The committed source notebook written into `folder`, with `change` (old, new) made in the one cell
    whose source holds `old`."""
    notebook = read_notebook(notebook_twin.SOURCE)
    if change:
        cell, = (cell for cell in notebook.cells if change[0] in cell.source)
        cell.source = cell.source.replace(*change)
    nbformat.write(notebook, folder / notebook_twin.SOURCE)


def test_the_twin_is_remade_after_a_change_to_the_source(tmp_path, capsys):
    copy_source(tmp_path)
    twin = tmp_path / notebook_twin.TWIN
    assert notebook_twin.main(["--folder", str(tmp_path), "--check"]) is False  # no twin yet
    assert not twin.exists()  # --check writes nothing
    assert notebook_twin.main(["--folder", str(tmp_path)]) is True
    assert twin.read_text(encoding="utf-8") == read_text(notebook_twin.TWIN)
    assert notebook_twin.main(["--folder", str(tmp_path), "--check"]) is True

    copy_source(tmp_path, ('StepLR(optimizer, 8, gamma=0.1)\ntrain("softmax"', 'StepLR(optimizer, 4, gamma=0.1)\ntrain("softmax"'))
    assert notebook_twin.main(["--folder", str(tmp_path), "--check"]) is False
    assert "out of date" in capsys.readouterr().out
    assert "StepLR(optimizer, 4," not in twin.read_text(encoding="utf-8")
    assert notebook_twin.main(["--folder", str(tmp_path)]) is True
    softmax = next(cell for cell in code_cells(nbformat.read(twin, as_version=4)) if 'train("softmax"' in cell.source)
    assert "StepLR(optimizer, 4, gamma=0.1)" in softmax.source
    check_committed_clean(str(twin), PARAMETER_VARIABLES)  # as the committed twin: no outputs


def test_the_generator_refuses_a_source_its_changes_no_longer_fit(tmp_path, capsys):
    """A source whose title no longer reads as TWIN_CHANGES expects is an error naming the text, and no
    twin is written (one line and exit status 2 on the command line)."""
    copy_source(tmp_path, ("# Siamese and triplet networks on Fashion-MNIST", "# Siamese and triplet nets on Fashion-MNIST"))
    with pytest.raises(ValueError, match="Siamese and triplet networks on Fashion-MNIST.* 0 times, not 1"):
        notebook_twin.twin_text((tmp_path / notebook_twin.SOURCE).read_text(encoding="utf-8"))
    assert cli.run(notebook_twin.main, "notebook_twin.py", ["--folder", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("notebook_twin.py: error: ") and "TWIN_CHANGES" in error and error.count("\n") == 1
    assert not (tmp_path / notebook_twin.TWIN).exists()
    assert cli.run(notebook_twin.main, "notebook_twin.py", ["--folder", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_no_code_is_written_in_two_notebooks():
    """The hand-written notebooks (the MNIST one is generated) share no function definition and no run of
    six code lines; the helpers they share come from results.py."""
    written = [NOTEBOOKS["fashion-mnist"], "Experiments_Omniglot.ipynb", "Experiments_Autoencoders.ipynb"]
    windows, definitions = {}, {}
    for filename in written:
        for cell in code_cells(read_notebook(filename)):
            lines = [line.strip() for line in cell.source.splitlines() if line.strip() and not line.strip().startswith("#")]
            for start in range(len(lines) - 5):
                windows.setdefault(tuple(lines[start:start + 6]), set()).add(filename)
            for line in lines:
                if line.startswith("def "):
                    definitions.setdefault(line.split("(")[0], set()).add(filename)
    assert not [window for window, where in windows.items() if len(where) > 1]
    assert not [name for name, where in definitions.items() if len(where) > 1]
    helpers = {"def env_flag", "def show_figure", "def show_image_grid", "def show_side_by_side"}
    assert not helpers & set(definitions)
    for filename in written:
        assert "from results import env_flag" in code_cells(read_notebook(filename))[0].source


def test_the_display_helpers_show_one_png_each(tmp_path, monkeypatch):
    import IPython.display
    from matplotlib.figure import Figure

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    results.show_figure(Figure(figsize=(1, 1)))
    results.show_image_grid([np.random.rand(2, 5, 5), np.random.rand(1, 5, 5)], ["a", "b"], 3, title="grid")
    Figure(figsize=(1, 1)).savefig(tmp_path / "saved.png")
    results.show_side_by_side([tmp_path / "saved.png"] * 2, ["left", "right"])
    assert len(shown) == 3
    for image in shown:
        assert isinstance(image, IPython.display.Image) and image.data.startswith(b"\x89PNG")
