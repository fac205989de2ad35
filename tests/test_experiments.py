"""experiments.py end to end on the IDX fixture: every method trains (quick mode), its metrics are
finite and in [0, 1], its plots and result rows are written under the working directory's quick output
folder (runs/mnist/quick/, results.output_dirs), never in results/ or images/; the command line; bad names;
plots; the results table; rows keyed by every setting; where each kind of run writes."""

import json
import math
import os
import shutil

import matplotlib.image
import pytest
import torch

import cli
import experiments
import methods
import results
import runs
from fixtures import write_idx_fixture
from known_datasets import CLASS_NAMES

METRICS = ["precision_at_1", "r_precision", "map_at_r", "knn_accuracy", "nmi", "roc_auc"]
# every method once, and three of the five selectors (the command-line test runs the other two),
# in the order record_result sorts the rows
RUNS = [("softmax", None), ("siamese", None), ("triplet", None), ("online-contrastive", None),
        ("online-triplet", "all"), ("online-triplet", "random-hard"), ("online-triplet", "semi-hard")]
LABELS = [experiments.method_label(method, selector) for method, selector in RUNS]
PER_CLASS = 25  # BalancedBatchSampler's 10 x 25 batches need 25 items per class in each split
QUICK = os.path.join("runs", "mnist", "quick")  # where a quick run of mnist writes (results.output_dirs)
QUICK_RESULTS, QUICK_IMAGES = os.path.join(QUICK, "results"), os.path.join(QUICK, "images")


def stem(dataset, label, suffix=""):
    return f"{dataset}_{label.replace('/', '-')}{suffix}"


def is_png(path):
    with open(path, "rb") as file:
        return file.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(working directory, {label: row}): each of RUNS trained in quick mode on MNIST-format
    fixture files in <working directory>/data, with the working directory as cwd."""
    work = tmp_path_factory.mktemp("study")
    write_idx_fixture(work / "data", PER_CLASS, PER_CLASS)
    rows = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        for method, selector in RUNS:
            row = experiments.run_method("mnist", method, selector=selector, quick=True, root="data",
                                         progress=False)
            rows[row["method"]] = row
    return work, rows


@pytest.fixture(scope="module")
def splits(study):
    work, _ = study
    return experiments.load_splits("mnist", work / "data", quick=True)


@pytest.mark.parametrize("label", LABELS)
def test_run_method_gives_finite_metrics_in_unit_interval(study, label):
    row = study[1][label]
    assert (row["dataset"], row["method"], row["embedding_dim"], row["seed"]) == ("mnist", label, 2, 0)
    assert row["quick"] is True and row["epochs"] == 1  # quick forces one epoch over the default 20
    assert (row["device"], row["lr_step"]) == ("cpu", experiments.STEP_SIZE)
    for metric in METRICS:
        assert 0 <= row[metric] <= 1, metric
    assert ("classifier_accuracy" in row) == (label == "softmax")
    if label == "softmax":
        assert 0 <= row["classifier_accuracy"] <= 1
    assert row["seconds_per_epoch"] > 0
    for key in ("seconds_per_epoch", "final_train_loss", "final_val_loss"):
        assert math.isfinite(row[key]), key


@pytest.mark.parametrize("label", LABELS)
def test_run_method_plots_train_and_test_embeddings(study, label):
    work, _ = study
    for split in ("train", "test"):
        path = work / QUICK_IMAGES / f"{stem('mnist', label)}_{split}.png"
        assert is_png(path)
        assert matplotlib.image.imread(path).shape[:2] > (100, 100)


def test_quick_runs_write_only_under_the_quick_folders(study):
    work, _ = study
    assert not (work / "images").exists() and not (work / "results").exists()  # the committed folders
    assert sorted(os.listdir(work / "runs")) == ["mnist"] and os.listdir(work / "runs" / "mnist") == ["quick"]
    assert sorted(os.listdir(work / QUICK_RESULTS)) == ["mnist.json", "mnist.lock", "mnist.md"]


def test_results_files_hold_one_row_per_method(study):
    work, rows = study
    with open(work / QUICK_RESULTS / "mnist.json") as file:
        saved = json.load(file)
    assert [row["method"] for row in saved] == LABELS
    assert saved == [rows[label] for label in LABELS]
    with open(work / QUICK_RESULTS / "mnist.md") as file:
        assert file.read() == experiments.results_table(saved)


def copy_study(study, destination):
    """A copy of the study's data and results in `destination`, to run more methods into."""
    work, _ = study
    shutil.copytree(work / "data", destination / "data")
    shutil.copytree(work / "runs", destination / "runs")


def test_rerun_replaces_its_row_and_another_seed_adds_one(study, tmp_path, monkeypatch):
    copy_study(study, tmp_path)
    monkeypatch.chdir(tmp_path)
    rerun = experiments.run_method("mnist", "online-contrastive", quick=True, root="data", progress=False,
                                   epochs=None, channels_last=True)
    other_seed = experiments.run_method("mnist", "online-contrastive", seed=1, quick=True, root="data", progress=False)
    with open(tmp_path / QUICK_RESULTS / "mnist.json") as file:
        saved = json.load(file)
    position = LABELS.index("online-contrastive")
    assert [old["method"] for old in saved] == LABELS[:position + 1] + LABELS[position:]
    assert saved[position] == rerun and rerun["seed"] == 0 and rerun["channels_last"]
    assert saved[position + 1] == other_seed and other_seed["seed"] == 1
    assert [old for old in saved if old["method"] != "online-contrastive"] == \
        [study[1][label] for label in LABELS if label != "online-contrastive"]
    # the other seed's plots carry its seed, beside (not over) the seed-0 plots
    for seed in (0, 1):
        path = experiments.image_path("mnist", "online-contrastive", "test", images_dir=QUICK_IMAGES, seed=seed)
        assert os.path.exists(path) and (("seed1" in path) == (seed == 1))


def test_the_learning_rate_falls_every_lr_step_epochs_and_the_row_records_it(study, tmp_path, monkeypatch):
    copy_study(study, tmp_path)
    monkeypatch.chdir(tmp_path)
    real_fit, schedulers = experiments.fit, []

    def recording_fit(*args, **kwargs):
        schedulers.append(args[5])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(experiments, "fit", recording_fit)
    rows = experiments.main(["--dataset", "mnist", "--quick", "--root", "data", "--methods", "online-contrastive",
                             "--no-progress", "--lr-step", "3", "--run-dir", "runs"])
    assert schedulers[-1].step_size == 3 and rows[0]["lr_step"] == 3
    with open(tmp_path / "runs" / "mnist-quick" / "online-contrastive_2d_seed0" / runs.RUN_SETTINGS) as file:
        assert json.load(file)["lr_step"] == 3
    # the classic step is not written into the settings, so that run folders from before the option resume
    assert "lr_step" not in experiments.method_settings("mnist", "softmax", 2, 20, 0)
    assert experiments.method_settings("mnist", "softmax", 2, 20, 0, lr_step=16)["lr_step"] == 16
    with pytest.raises(ValueError, match="lr_step"):
        experiments.run_method("mnist", "online-contrastive", quick=True, root="data", progress=False, lr_step=0)


@pytest.mark.parametrize("option", ["--lr-step", "--batch-samples", "--memory"])
@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_the_parser_refuses_a_step_or_batch_shape_below_one_before_loading_data(option, value, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the argument was checked")

    monkeypatch.setattr(experiments, "load_splits", no_loading)
    arguments = ["--dataset", "mnist", "--quick", "--methods", "online-contrastive", option, value]
    assert cli.run(experiments.main, "experiments.py", arguments) == 2  # one line, exit status 2 (cli.run)
    error = capsys.readouterr().err
    assert option in error and error.startswith("experiments.py: error: ") and error.count("\n") == 1


def test_other_embedding_size_gets_its_own_row_and_plots(study, tmp_path, monkeypatch):
    copy_study(study, tmp_path)
    monkeypatch.chdir(tmp_path)
    row = experiments.run_method("mnist", "online-contrastive", embedding_dim=64, quick=True, root="data",
                                 progress=False)
    assert row["embedding_dim"] == 64 and all(0 <= row[metric] <= 1 for metric in METRICS)
    with open(tmp_path / QUICK_RESULTS / "mnist.json") as file:
        saved = json.load(file)
    assert [(old["method"], old["embedding_dim"]) for old in saved] == \
        [(label, 2) for label in LABELS] + [("online-contrastive", 64)]
    for split in ("train", "test"):
        assert is_png(tmp_path / QUICK_IMAGES / f"{stem('mnist', 'online-contrastive', '_64d')}_{split}.png")


def test_command_line_runs_the_chosen_methods_and_selectors(tmp_path, monkeypatch, capsys):
    write_idx_fixture(tmp_path / "fixture", PER_CLASS, PER_CLASS, seed=5)
    monkeypatch.chdir(tmp_path)
    rows = experiments.main(["--dataset", "fashion-mnist", "--quick", "--epochs", "7", "--root", "fixture",
                             "--methods", "online-contrastive,online-triplet",
                             "--selectors", "hardest,batch-hard", "--no-progress"])
    labels = ["online-contrastive", "online-triplet/hardest", "online-triplet/batch-hard"]
    assert [row["method"] for row in rows] == labels
    assert all(row["dataset"] == "fashion-mnist" and row["epochs"] == 1 for row in rows)
    assert all(0 <= row[metric] <= 1 for row in rows for metric in METRICS)

    printed = capsys.readouterr().out
    assert experiments.results_table(rows) in printed
    quick = os.path.join("runs", "fashion-mnist", "quick")
    assert os.path.join(quick, "results", "fashion-mnist.md") in printed
    assert f"Every output of this run is under {os.path.join(quick, '')}" in printed
    with open(tmp_path / quick / "results" / "fashion-mnist.json") as file:
        assert [row["method"] for row in json.load(file)] == labels
    # the plots of each run, and no comparison: siamese and triplet, the random sides, did not run
    assert sorted(os.listdir(tmp_path / quick / "images")) == sorted(
        f"{stem('fashion-mnist', label)}_{split}.png" for label in labels for split in ("train", "test"))
    assert sorted(os.listdir(tmp_path)) == ["fixture", "runs"]  # the run folders too: runs/.../checkpoints
    assert sorted(os.listdir(tmp_path / quick)) == ["checkpoints", "images", "results"]


def test_plot_comparison_sets_random_beside_online_mining(study, tmp_path):
    work, _ = study
    images = tmp_path / "images"
    shutil.copytree(work / QUICK_IMAGES, images)
    pairs = [("siamese", "online-contrastive"), ("triplet", "online-triplet/semi-hard"),
             ("triplet", "online-triplet/hardest")]  # the study trained no hardest selector
    written = experiments.plot_comparison("mnist", pairs, images_dir=str(images))
    assert written == [str(images / "mnist_siamese_vs_online-contrastive.png"),
                       str(images / "mnist_triplet_vs_online-triplet-semi-hard.png")]
    assert all(is_png(path) for path in written)
    height, width = matplotlib.image.imread(written[0]).shape[:2]
    assert width > 1.5 * height  # two plots side by side


def test_plot_comparison_takes_each_plot_from_its_recipes_folder(study, tmp_path):
    work, _ = study
    images = tmp_path / "images"
    shutil.copytree(work / QUICK_IMAGES, images)
    # --classic: the triplet network's classic settings are the study's, semi-hard's are not
    (images / "recipes" / "classic").mkdir(parents=True)
    shutil.move(images / "mnist_online-triplet-semi-hard_test.png", images / "recipes" / "classic")
    pairs = [("triplet", "online-triplet/semi-hard")]
    assert experiments.plot_comparison("mnist", pairs, images_dir=str(images)) == []
    written = experiments.plot_comparison("mnist", pairs, images_dir=str(images), recipe="classic")
    assert written == [str(images / "recipes" / "classic" / "mnist_triplet_vs_online-triplet-semi-hard.png")]
    assert written == [experiments.comparison_path("mnist", *pairs[0], images_dir=str(images), recipe="classic")]


def test_a_run_with_another_recipe_compares_its_own_plots_and_leaves_the_studys_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_idx_fixture(tmp_path / "data")
    experiments.main(["--dataset", "mnist", "--quick", "--no-progress", "--root", "data", "--methods",
                      "siamese,online-contrastive", "--margin", "2"])
    folder = os.path.join(QUICK_IMAGES, "recipes", "margin-2")
    assert sorted(os.listdir(folder)) == sorted(["mnist_siamese_vs_online-contrastive.png"] + [
        f"mnist_{method}_{split}.png" for method in ("siamese", "online-contrastive") for split in ("train", "test")])
    assert os.listdir(QUICK_IMAGES) == ["recipes"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "softmax,bogus"], "unknown method 'bogus'"),
    (["--methods", "online-triplet", "--selectors", "semi-hard,bogus"], "unknown selector 'bogus'"),
])
def test_command_line_rejects_unknown_names(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        experiments.main(["--quick", *argv])
    assert os.listdir(tmp_path) == []


def test_command_line_rejects_unknown_dataset(capsys):
    # a user's error: one line and exit status 2 (cli.run, as python experiments.py runs main)
    assert cli.run(experiments.main, "experiments.py", ["--quick", "--dataset", "cifar10"]) == 2
    assert "unknown dataset 'cifar10'" in capsys.readouterr().err
    assert cli.run(experiments.main, "experiments.py", ["--quick", "--dataset", "no/such/folder"]) == 2
    assert "dataset folder 'no/such/folder' does not exist" in capsys.readouterr().err


def test_run_method_rejects_unknown_names(splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        experiments.run_method("cifar10", "softmax", quick=True)
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        experiments.run_method("mnist", "bogus", quick=True, splits=splits)
    with pytest.raises(ValueError, match="unknown selector 'bogus'"):
        experiments.run_method("mnist", "online-triplet", selector="bogus", quick=True, splits=splits)
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        experiments.build_training("bogus", *splits)
    assert os.listdir(tmp_path) == []


def test_load_splits_quick_keeps_the_first_items(tmp_path):
    # 2050 train and 1010 test items, a little more than the quick sizes
    write_idx_fixture(tmp_path, train_per_class=205, test_per_class=101)
    full = experiments.load_splits("fashion-mnist", tmp_path)
    quick = experiments.load_splits("fashion-mnist", tmp_path, quick=True)
    for whole, part, size in zip(full, quick, experiments.QUICK_SIZES):
        assert len(whole) > size and len(part) == size
        assert torch.equal(part.data, whole.data[:size]) and torch.equal(part.targets, whole.targets[:size])
        assert part.classes == CLASS_NAMES["fashion-mnist"]
        assert (part.mean, part.std) == (whole.mean, whole.std)
    assert [split.train for split in quick] == [True, False]


def test_plot_comparison_skips_pairs_without_plots(tmp_path):
    assert experiments.plot_comparison("mnist", [("siamese", "online-contrastive")], images_dir=str(tmp_path)) == []
    assert os.listdir(tmp_path) == []


HEADER = ("| method | dim | recipe | seed | P@1 | R-Prec | MAP@R | kNN acc | NMI | ROC-AUC | clf acc | s/epoch | "
          "device | threads | epochs | lr step |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def test_results_table_formats_each_column():
    rows = [
        {"method": "softmax", "embedding_dim": 2, "precision_at_1": 0.98765, "r_precision": 0.5,
         "map_at_r": 0.12345, "knn_accuracy": 1.0, "nmi": 0.0, "roc_auc": 0.99996,
         "classifier_accuracy": 0.9712, "seconds_per_epoch": 12.34, "epochs": 20, "seed": 0, "recipe": "classic",
         "threads": 2, "device": "NVIDIA H200", "lr_step": 8},
        {"method": "online-triplet/semi-hard", "embedding_dim": 64, "precision_at_1": 0.25,
         "r_precision": 0.0625, "map_at_r": 0.03125, "knn_accuracy": 0.5, "nmi": 0.75, "roc_auc": 0.875,
         "classifier_accuracy": None, "seconds_per_epoch": 3.0, "epochs": 1},
    ]
    assert experiments.results_table(rows) == HEADER + (
        "| softmax | 2 | classic | 0 | 0.988 | 0.500 | 0.123 | 1.000 | 0.000 | 1.000 | 0.971 | 12.3 | NVIDIA H200 | 2 | 20 "
        "| 8 |\n"
        "| online-triplet/semi-hard | 64 |  |  | 0.250 | 0.062 | 0.031 | 0.500 | 0.750 | 0.875 |  | 3.0 |  |  | 1 |  |\n")
    assert experiments.results_table([]) == HEADER


def test_record_result_keeps_one_sorted_row_per_method_size_and_recipe(tmp_path):
    study_recipe = experiments.recipe_label(experiments.method_recipe("online-triplet/batch-hard"))
    assert study_recipe != "classic"

    def row(method, dim, value, dataset="mnist", **more):
        return {"dataset": dataset, "method": method, "embedding_dim": dim, "nmi": value, **more}

    for new in (row("online-triplet/batch-hard", 2, 0.1, recipe=study_recipe), row("softmax", 64, 0.2),
                row("triplet", 2, 0.3), row("online-triplet/all", 2, 0.4), row("softmax", 2, 0.5),
                row("triplet", 2, 0.6, recipe="classic"), row("softmax", 2, 0.7, dataset="fashion-mnist"),
                row("online-triplet/batch-hard", 2, 0.8), row("online-triplet/batch-hard", 2, 0.9, recipe="BN"),
                row("softmax", 2, 0.25, recipe="BN"), row("softmax", 2, 0.55, seed=1), row("softmax", 2, 0.5, seed=0)):
        experiments.record_result(new, str(tmp_path))
    with open(tmp_path / "mnist.json") as file:
        saved = json.load(file)
    assert [(old["method"], old["embedding_dim"], old["nmi"]) for old in saved] == [
        ("softmax", 2, 0.5), ("softmax", 2, 0.55), ("triplet", 2, 0.6), ("online-triplet/all", 2, 0.4),
        ("online-triplet/batch-hard", 2, 0.1), ("softmax", 64, 0.2)]
    with open(tmp_path / "mnist.md") as file:
        assert file.read() == experiments.results_table(saved)
    with open(tmp_path / "fashion-mnist.json") as file:
        assert [old["nmi"] for old in json.load(file)] == [0.7]
    # any other recipe than the study's (the classic one included) goes to the recipes table, one row per recipe
    with open(tmp_path / "mnist-recipes.json") as file:
        assert [(old["method"], old["recipe"], old["nmi"]) for old in json.load(file)] == [
            ("softmax", "BN", 0.25), ("online-triplet/batch-hard", "BN", 0.9),
            ("online-triplet/batch-hard", "classic", 0.8)]


def test_the_command_line_turns_flush_to_zero_on_before_any_work(monkeypatch):
    calls = []
    monkeypatch.setattr(experiments, "flush_denormal_everywhere", lambda: calls.append("flush"))
    with pytest.raises(SystemExit) as exit:
        experiments.main(["--help"])
    assert calls == ["flush"] and exit.value.code == 0  # --help still prints the help and exits 0


def test_the_command_line_takes_a_recipe_and_records_it_only_when_not_classic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_idx_fixture(tmp_path / "data")
    common = ["--dataset", "mnist", "--methods", "online-triplet", "--selectors", "batch-hard", "--quick",
              "--no-progress", "--root", "data"]
    (row,) = experiments.main(common + ["--distance", "euclidean", "--soft-margin", "--margin", "0", "--batch-norm"])
    assert (row["distance"], row["soft"], row["margin"], row["batch_norm"]) == ("euclidean", True, 0.0, True)
    assert row["recipe"] == "BN, soft margin, euclidean, margin 0" and row["final_train_loss"] > 0
    assert os.path.exists(os.path.join(QUICK_IMAGES, "recipes", "bn-soft-margin-euclidean-margin-0",
                                       "mnist_online-triplet-batch-hard_test.png"))
    (classic,) = experiments.main(common + ["--classic"])
    assert not {"distance", "soft", "margin", "batch_norm", "easy_selector"} & classic.keys()
    assert classic["recipe"] == "classic"
    (study,) = experiments.main(common)  # the study's recipe of the selector (RECIPES)
    assert study["recipe"] == experiments.recipe_label(methods.RECIPES["online-triplet/batch-hard"])
    assert (study["batch_norm"], study["easy_selector"]) == (True, "random-hard")
    with open(os.path.join(QUICK_RESULTS, "mnist.json")) as file:
        assert [saved["recipe"] for saved in json.load(file)] == [study["recipe"]]
    with open(os.path.join(QUICK_RESULTS, "mnist-recipes.json")) as file:
        assert sorted(saved["recipe"] for saved in json.load(file)) == sorted([row["recipe"], "classic"])
    assert sorted(os.listdir(os.path.join(QUICK, "checkpoints", "mnist-quick"))) == [
        "online-triplet-batch-hard_2d_seed0", "online-triplet-batch-hard_2d_seed0_bn-soft-margin-euclidean-margin-0",
        "online-triplet-batch-hard_2d_seed0_classic"]
    with pytest.raises(ValueError, match="--batch-norm"):
        experiments.main(common + ["--batch-norm", "--network", "resnet18", "--run-dir", "third"])
    with pytest.raises(ValueError, match="--normalize"):
        experiments.main(common + ["--normalize", "--network", "resnet18", "--run-dir", "fourth"])
    for wrong in (["--distance", "cosine"], ["--classic", "--margin", "2"], ["--easy-selector", "bogus"]):
        with pytest.raises(ValueError, match=wrong[0]):  # the parser's mistakes: one line, exit status 2 (cli.run)
            experiments.main(common + wrong)


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_runs_with_other_settings_than_the_studys_leave_the_committed_results_and_images_alone(tmp_path,
                                                                                               monkeypatch):
    write_idx_fixture(tmp_path / "data", PER_CLASS, PER_CLASS)
    monkeypatch.chdir(tmp_path)
    # the committed study's row and plots of online-contrastive (as results/ and images/ hold them)
    committed = {"dataset": "mnist", "method": "online-contrastive", "embedding_dim": 2, "epochs": 20, "seed": 0,
                 "recipe": "classic", "lr_step": experiments.STEP_SIZE, "precision_at_1": 0.871}
    experiments.record_result(committed, "results")
    os.mkdir("images")
    for split in ("train", "test"):
        path = experiments.image_path("mnist", "online-contrastive", split)
        with open(path, "wb") as file:
            file.write(b"the study's plot")
    before = {folder: snapshot(folder) for folder in ("results", "images")}
    common = dict(root="data", progress=False)
    rows = [experiments.run_method("mnist", "online-contrastive", epochs=1, **common),
            experiments.run_method("mnist", "online-contrastive", quick=True, **common),
            experiments.run_method("mnist", "online-contrastive", epochs=1, lr_step=3, **common)]
    rows += experiments.main(["--dataset", "mnist", "--root", "data", "--methods", "online-contrastive",
                              "--epochs", "1", "--amp", "bf16", "--no-progress"])
    assert {folder: snapshot(folder) for folder in ("results", "images")} == before
    for row, tag in zip(rows, ("epochs-1", "quick", "epochs-1_lr-step-3", "epochs-1_amp-bf16")):
        saved = json.loads((tmp_path / "runs" / "mnist" / tag / "results" / "mnist.json").read_text())
        assert saved == [json.loads(json.dumps(row))], tag
        assert (tmp_path / "runs" / "mnist" / tag / "images" / "mnist_online-contrastive_test.png").is_file()


def test_the_settings_decide_where_a_run_writes():
    study = experiments.StudySettings("fashion-mnist")
    assert study.tag() == "" and study.outputs() == results.output_dirs("fashion-mnist")
    for options, tag in ((dict(epochs=20, embedding_dim=64, seed=3, recipe="classic", train_classes="0-4"), ""),
                         (dict(epochs=1), "epochs-1"), (dict(quick=True, epochs=7), "quick"),
                         (dict(lr_step=16), "lr-step-16"), (dict(network="resnet18"), "network-resnet18"),
                         (dict(amp="fp16", epochs=5), "epochs-5_amp-fp16"),
                         (dict(quick=True, lr_step=3, pretrained=os.path.join("a", "w.pt")),
                          "quick_lr-step-3_pretrained-w.pt")):
        settings = experiments.StudySettings("mnist", **options)
        assert settings.tag() == tag, options
        assert settings.outputs() == results.output_dirs("mnist", tag, committed=not tag), options
    assert experiments.StudySettings("mnist", out_dir="scratch").outputs() == results.output_dirs(
        "mnist", committed=False, root="scratch")
    given = experiments.StudySettings("mnist", epochs=1, results_dir=None, images_dir="plots", run_dir="runs-here")
    assert given.outputs()[1:4] == (None, "plots", "runs-here")


def test_the_settings_of_a_folder_of_your_own_images_write_under_its_name(tmp_path):
    (tmp_path / "my flowers").mkdir()
    settings = experiments.StudySettings(str(tmp_path / "my flowers"), epochs=20)
    assert settings.outputs() == results.output_dirs("my_flowers", committed=False)
    assert settings.outputs().folder == os.path.join("runs", "my_flowers")


def test_result_rows_are_keyed_by_every_setting_that_defines_them(tmp_path):
    def row(**more):
        return {"dataset": "mnist", "method": "softmax", "embedding_dim": 2, "epochs": 20, "nmi": 0.5, **more}

    for new in (row(), row(epochs=1), row(lr_step=3), row(network="resnet18"), row(amp="bf16"), row(quick=True),
                row(nmi=0.6), row(lr_step=experiments.STEP_SIZE, nmi=0.7)):
        experiments.record_result(new, str(tmp_path))
    saved = json.loads((tmp_path / "mnist.json").read_text())
    assert len(saved) == 6  # the last two replaced the first: the same settings (lr_step 8 is the default)
    assert [old["nmi"] for old in saved if old.get("epochs") == 20 and "lr_step" in old
            and old["lr_step"] == experiments.STEP_SIZE] == [0.7]


def test_the_command_line_trains_multi_similarity_and_a_memory_and_writes_their_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_idx_fixture(tmp_path / "data", 2 * PER_CLASS, PER_CLASS)  # two 10 x 25 batches an epoch
    common = ["--dataset", "mnist", "--quick", "--no-progress", "--root", "data"]
    (multi_similarity,) = experiments.main(common + ["--methods", "multi-similarity"])
    (remembering,) = experiments.main(common + ["--methods", "online-triplet", "--selectors", "random-hard",
                                                "--memory", "512", "--memory-warmup", "1"])
    (classic,) = experiments.main(common + ["--methods", "multi-similarity", "--classic"])
    assert (multi_similarity["recipe"], multi_similarity["normalize"]) == ("L2", True)  # the study's recipe
    assert "memory" not in multi_similarity and classic["recipe"] == "classic" and "normalize" not in classic
    assert (remembering["recipe"], remembering["memory"], remembering["memory_warmup"]) == ("memory 512, warm-up 1",
                                                                                            512, 1)
    for row in (multi_similarity, remembering, classic):
        assert math.isfinite(row["final_train_loss"]) and 0 <= row["precision_at_1"] <= 1
    with open(os.path.join(QUICK_RESULTS, "mnist.json")) as file:
        assert [saved["method"] for saved in json.load(file)] == ["multi-similarity"]
    with open(os.path.join(QUICK_RESULTS, "mnist-recipes.json")) as file:
        assert sorted((saved["method"], saved["recipe"]) for saved in json.load(file)) == [
            ("multi-similarity", "classic"), ("online-triplet/random-hard", "memory 512, warm-up 1")]
    run_dir = os.path.join(QUICK, "checkpoints", "mnist-quick", "online-triplet-random-hard_2d_seed0_memory-512-warm-up-1")
    with open(os.path.join(run_dir, runs.RUN_SETTINGS)) as file:
        assert (json.load(file)["memory"], os.path.isfile(os.path.join(run_dir, runs.RUN_ROW))) == (512, True)
    loss_state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["loss_state"]
    assert (int(loss_state["memory.steps"]), int(loss_state["memory.filled"])) == (2, 500)  # mined in the 2nd step


def test_the_command_line_refuses_a_memory_for_a_method_that_mines_no_batch_before_loading_data(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the memory was checked")

    monkeypatch.setattr(experiments, "load_splits", no_loading)
    common = ["--dataset", "mnist", "--quick", "--no-progress"]
    with pytest.raises(ValueError, match="needs an online method .*; softmax mines no batch"):
        experiments.main(common + ["--methods", "all", "--memory", "512"])
    with pytest.raises(ValueError, match=r"--memory-warmup.*give its size too \(--memory M\)"):
        experiments.main(common + ["--methods", "online-contrastive", "--memory-warmup", "10"])
    with pytest.raises(ValueError, match="--memory-warmup: expected a whole number of at least 0"):
        experiments.main(common + ["--methods", "online-contrastive", "--memory", "8", "--memory-warmup", "-1"])
