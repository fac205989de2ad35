"""results.py: the atomic writers, Markdown tables, merging rows into a results file (under a lock, so that
several processes merging at once lose no row), the figures, and output_dirs, the one rule for where a run's
outputs go."""

import json
import os
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import results
from known_datasets import CLASS_NAMES

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_png(path):
    with open(path, "rb") as file:
        return file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_json_and_text_create_their_folders_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "rows.json"
    assert results.write_json(str(path), [{"x": 1}]) == str(path)
    assert json.loads(path.read_text()) == [{"x": 1}]
    assert results.write_text(str(tmp_path / "a" / "t.md"), "text\n") == str(tmp_path / "a" / "t.md")
    assert (tmp_path / "a" / "t.md").read_text() == "text\n"
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "t.md"] and os.listdir(tmp_path / "a" / "b") == ["rows.json"]


def test_markdown_table_leaves_missing_and_none_cells_empty():
    columns = [("name", "name", "{}"), ("score", "score", "{:.2f}")]
    assert results.markdown_table([{"name": "a", "score": 0.5}, {"name": "b", "score": None}, {}], columns) == (
        "| name | score |\n|---|---|\n| a | 0.50 |\n| b |  |\n|  |  |\n")


def table(rows):
    return "".join(f"{row['k']}={row['v']}\n" for row in rows)


def test_merge_results_replaces_the_row_with_the_same_key_and_keeps_the_others(tmp_path):
    stem = str(tmp_path / "out" / "t")
    results.merge_results(stem, [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}], ("k",), lambda r: r["k"], table, "# T\n")
    rows = results.merge_results(stem, [{"k": 1, "v": "c"}, {"k": 0, "v": "d"}], ("k",), lambda r: r["k"], table,
                                 "# T\n")
    assert rows == [{"k": 0, "v": "d"}, {"k": 1, "v": "c"}, {"k": 2, "v": "b"}]
    assert json.loads((tmp_path / "out" / "t.json").read_text()) == rows
    assert (tmp_path / "out" / "t.md").read_text() == "# T\n0=d\n1=c\n2=b\n"


def test_merge_results_keys_with_defaults_match_rows_that_lack_a_field(tmp_path):
    stem = str(tmp_path / "t")
    key = {"k": None, "epochs": 20}
    results.merge_results(stem, [{"k": 1, "v": "old"}], key, lambda r: r["v"], table)  # written before "epochs"
    rows = results.merge_results(stem, [{"k": 1, "epochs": 20, "v": "new"}], key, lambda r: r["v"], table)
    assert rows == [{"k": 1, "epochs": 20, "v": "new"}]  # the same settings: replaced
    rows = results.merge_results(stem, [{"k": 1, "epochs": 1, "v": "trial"}], key, lambda r: r["v"], table)
    assert [row["v"] for row in rows] == ["new", "trial"]  # other settings: a row of its own


MERGER = """
import sys
sys.path.insert(0, {repository!r})
import results
stem, process, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for k in range(count):
    results.merge_results(stem, [{{"process": process, "k": k}}], ("process", "k"),
                          lambda row: (row["process"], row["k"]), lambda rows: str(len(rows)))
"""


def test_processes_merging_into_one_file_at_once_lose_no_row(tmp_path):
    stem, processes, count = str(tmp_path / "shared"), 4, 40
    code = MERGER.format(repository=REPOSITORY)
    running = [subprocess.Popen([sys.executable, "-c", code, stem, str(process), str(count)],
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
               for process in range(processes)]
    assert [process.wait(timeout=600) for process in running] == [0] * processes
    saved = json.loads((tmp_path / "shared.json").read_text())
    assert sorted((row["process"], row["k"]) for row in saved) == [
        (process, k) for process in range(processes) for k in range(count)]
    assert (tmp_path / "shared.md").read_text() == str(processes * count)


def test_output_dirs_committed_runs_write_the_checkouts_folders():
    assert results.output_dirs("fashion-mnist") == results.OutputDirs(".", "results", "images", "checkpoints", None)
    assert results.output_dirs("fashion-mnist", "train-classes-0-4") == results.OutputDirs(
        ".", os.path.join("results", "train-classes-0-4"), os.path.join("images", "train-classes-0-4"),
        "checkpoints", None)


def test_output_dirs_every_other_run_writes_under_its_own_folder():
    folder = os.path.join("runs", "fashion-mnist", "epochs-1")
    assert results.output_dirs("fashion-mnist", "epochs-1", committed=False) == results.OutputDirs(
        folder, *(os.path.join(folder, part) for part in ("results", "images", "checkpoints", "models")))
    own = results.output_dirs("my flowers", committed=False, root="elsewhere")
    assert own.folder == os.path.join("elsewhere", "my_flowers") and own.models == os.path.join(own.folder, "models")
    assert results.output_dirs("x", "0,2,4", committed=False).folder == os.path.join("runs", "x", "0_2_4")


def test_safe_name_keeps_letters_digits_dots_and_dashes():
    assert results.safe_name("train-classes-0,2,4") == "train-classes-0_2_4"
    assert results.safe_name("a b/c") == "a_b_c" and results.safe_name("epochs-1_lr-step-3") == "epochs-1_lr-step-3"


def test_settings_tag_names_what_changed_in_the_order_of_the_defaults():
    defaults = {"quick": False, "epochs": 20, "lr_step": 8, "hidden_dims": (512, 256), "amp": None, "normalize": True}
    tag = results.settings_tag
    assert tag({}, defaults) == "" and tag(dict(defaults), defaults) == ""
    assert tag({"lr_step": 3, "epochs": 1}, defaults) == "epochs-1_lr-step-3"  # defaults' order, "_" as "-"
    assert tag({"quick": True}, defaults) == "quick"  # a True boolean: the bare name
    assert tag({"normalize": False, "amp": "bf16"}, defaults) == "amp-bf16_normalize-False"
    assert tag({"epochs": 20.0, "hidden_dims": (512, 256)}, defaults) == ""  # equal values are no change
    hashed = tag({"hidden_dims": (64,)}, defaults)  # not a plain word or number: a short hash of its JSON
    assert re.fullmatch(r"hidden-dims-[0-9a-f]{8}", hashed)
    assert hashed == tag({"hidden_dims": [64]}, defaults) != tag({"hidden_dims": (32,)}, defaults)
    assert re.fullmatch(r"amp-[0-9a-f]{8}", tag({"amp": "a/long path/with spaces.pt"}, defaults))
    assert tag({"amp": {"b": 1, "a": 2}}, defaults) == tag({"amp": {"a": 2, "b": 1}}, defaults)
    assert results.safe_name(tag({"amp": "x,y", "epochs": "1+2"}, defaults)) == tag({"amp": "x,y", "epochs": "1+2"},
                                                                                    defaults)  # a file name
    with pytest.raises(ValueError, match=r"unknown settings \['iters'\]"):
        tag({"iters": 3}, defaults)


def test_settings_tag_names_the_changed_entries_of_a_dict_setting():
    defaults = {"epochs": 40, "augment": {"degrees": 10.0, "scale": (0.85, 1.15), "elastic": 0.06}}
    tag = results.settings_tag
    assert tag({"augment": {"degrees": 10, "scale": (0.85, 1.15), "elastic": 0.06}}, defaults) == ""
    assert tag({"augment": {**defaults["augment"], "elastic": 0.1}}, defaults) == "augment.elastic-0.1"
    assert tag({"augment": {"degrees": 5, "scale": (0.85, 1.15)}, "epochs": 20}, defaults) == \
        "epochs-20_augment.degrees-5_augment.elastic-None"  # the defaults' order; an entry left out is None
    assert tag({"augment": {**defaults["augment"], "fill_value": 1}}, defaults) == "augment.fill-value-1"
    assert re.fullmatch(r"augment\.scale-[0-9a-f]{8}", tag({"augment": {**defaults["augment"], "scale": (1, 2)}},
                                                          defaults))
    assert tag({"augment": None}, defaults) == "augment-None"  # no dict: the value itself


def test_image_path_names_the_size_and_seed_only_when_not_the_default():
    assert results.image_path("mnist", "online-triplet/semi-hard", "test") == os.path.join(
        "images", "mnist_online-triplet-semi-hard_test.png")
    assert results.image_path("mnist", "softmax", "train", 64, "out", seed=2) == os.path.join(
        "out", "mnist_softmax_64d_seed2_train.png")


def test_save_side_by_side_sets_two_images_in_one_figure(tmp_path):
    for name in ("a", "b"):
        figure = Figure(figsize=(4, 4))
        figure.subplots().plot([0, 1], [0, 1])
        results.save_figure(figure, str(tmp_path / f"{name}.png"))
    path = results.save_side_by_side([str(tmp_path / "a.png"), str(tmp_path / "b.png")], str(tmp_path / "ab.png"))
    assert is_png(path)
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 1.5 * height


def capture_figures(monkeypatch):
    """The figures plot_embeddings saves, kept for inspection."""
    figures = []
    save = Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def distances(points):
    """(N, N) Euclidean distances, by explicit differences (exact zeros on the diagonal)."""
    return (points[:, None] - points[None]).norm(dim=-1)


def plotted_points(figure, n_classes):
    axes = figure.axes[0]
    return [torch.as_tensor(np.asarray(axes.collections[k].get_offsets()), dtype=torch.float32) for k in range(n_classes)]


def test_plot_embeddings_draws_2d_embeddings_as_they_are(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    embeddings, labels = torch.randn(300, 2, generator=generator), torch.arange(300) % 3
    path = tmp_path / "nested" / "folder" / "plot.png"
    assert results.plot_embeddings(embeddings, labels, ["a", "b", "c"], "two dims", str(path)) == str(path)
    assert is_png(path)
    axes = figures[0].axes[0]
    assert axes.get_title() == "two dims"
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["a", "b", "c"]
    for class_id, points in enumerate(plotted_points(figures[0], 3)):
        assert torch.equal(points, embeddings[labels == class_id])


def test_plot_embeddings_projects_64d_embeddings_on_their_principal_plane(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    # 64-D points that lie on a plane: the projection must keep all their distances
    flat = torch.randn(400, 2, generator=generator) * torch.tensor([3.0, 1.0])
    axes_64d, _ = torch.linalg.qr(torch.randn(64, 2, generator=generator))
    embeddings = flat @ axes_64d.T + torch.randn(64, generator=generator)
    labels = torch.arange(400) % 10
    path = tmp_path / "plot64.png"
    results.plot_embeddings(embeddings, labels, CLASS_NAMES["mnist"], "sixty-four dims", str(path))
    assert is_png(path)
    assert figures[0].axes[0].get_title() == "sixty-four dims - PCA projection"
    projected = torch.cat(plotted_points(figures[0], 10))
    original = torch.cat([flat[labels == class_id] for class_id in range(10)])
    assert torch.allclose(distances(projected), distances(original), atol=1e-4)
