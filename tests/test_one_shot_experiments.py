"""The one-shot studies: experiments.py's held-out classes (--train-classes) on the IDX fixture, and
omniglot.py's study and commands (training in quick mode, saved weights, Lake's one-shot runs, through
``python omniglot.py`` and ``python experiments.py --dataset omniglot``) on small Omniglot-format fixtures;
the old import paths of the Omniglot names."""

import os
import re
import subprocess
import sys

import pytest
import torch

import datasets
import experiments
import metrics
import omniglot
from datasets import InMemoryDataset
from fixtures import write_idx_fixture
from metrics import n_way_k_shot_accuracy
from networks import ShiftAveragedEmbedding, SiameseNetwork
from omniglot_fixtures import write_alphabets, write_runs, zip_folder


@pytest.mark.parametrize("spec, expected", [("0-4", [0, 1, 2, 3, 4]), ("0,1,2,3,4", [0, 1, 2, 3, 4]),
                                            ("7, 0-2", [0, 1, 2, 7]), ("3", [3]), ([5, 1, 1], [1, 5])])
def test_parse_classes(spec, expected):
    assert experiments.parse_classes(spec, 10) == expected


@pytest.mark.parametrize("spec, message", [("0-10", "ids in 0..9"), ("a-b", "cannot read"), ("", "ids in 0..9"),
                                           ("0-8", "leave at least 2"), ("-1", "cannot read")])
def test_parse_classes_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        experiments.parse_classes(spec, 10)


def test_class_subset_relabels_in_the_given_order():
    dataset = InMemoryDataset(torch.arange(12.0).view(12, 1, 1, 1), torch.arange(12) % 4,
                              classes=["a", "b", "c", "d"])
    subset = experiments.class_subset(dataset, [3, 1])
    assert subset.classes == ["d", "b"]
    assert subset.targets.tolist() == [1, 0, 1, 0, 1, 0]
    assert subset.data.flatten().tolist() == [1, 3, 5, 7, 9, 11]


def test_held_out_run_on_the_idx_fixture(tmp_path, monkeypatch):
    write_idx_fixture(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    scored = []  # what run_method hands to evaluate_held_out: the trained model and the held-out set
    evaluate_held_out = experiments.evaluate_held_out
    monkeypatch.setattr(experiments, "evaluate_held_out",
                        lambda model, held_out, seed: scored.append((model, held_out)) or
                        evaluate_held_out(model, held_out, seed))
    row = experiments.run_method("fashion-mnist", "online-triplet", quick=True, root=str(tmp_path / "data"),
                                 train_classes="0-4", progress=False, seed=3)
    assert row["train_classes"] == "0-4" and row["held_out_n_way"] == 5
    (model, held_out), = scored
    # the held-out set is every test image of classes 5-9, and nothing the model trained on
    _, test_set = experiments.load_splits("fashion-mnist", str(tmp_path / "data"), quick=True)
    assert held_out.classes == test_set.classes[5:] and len(held_out) == int((test_set.targets >= 5).sum())
    # the row's numbers are those of the trained model's embeddings of those images
    embeddings = model.get_embedding(held_out.data).detach()
    episodes = experiments.few_shot_accuracy(embeddings, held_out.targets, 5, 1, experiments.HELD_OUT_EPISODES,
                                             seed=3)
    assert row["held_out_one_shot"] == pytest.approx(episodes["accuracy"], abs=1e-6)
    assert row["held_out_one_shot_ci95"] == pytest.approx(episodes["ci95"], abs=1e-6)
    assert row["held_out_roc_auc"] == pytest.approx(
        metrics.verification_roc_auc(embeddings, held_out.targets, seed=3), abs=1e-6)
    assert row["held_out_map_at_r"] == pytest.approx(
        metrics.retrieval_metrics(embeddings, held_out.targets)["map_at_r"], abs=1e-6)
    assert 0.2 < row["held_out_one_shot"] < 1  # above 5-way chance, not a constant
    table = (tmp_path / "results" / "quick" / "train-classes-0-4" / "fashion-mnist.md").read_text()
    assert "| held-out 1-shot acc |" in table
    assert (tmp_path / "images" / "quick" / "train-classes-0-4").is_dir()
    assert not (tmp_path / "results" / "quick" / "fashion-mnist.md").exists()  # the usual table is untouched
    plain = {"method": "x", "embedding_dim": 2}
    assert "held-out" not in experiments.results_table([plain])


def test_held_out_baselines_score_pixels_and_the_untrained_network(tmp_path):
    write_idx_fixture(tmp_path / "data")
    train_set, test_set = experiments.load_splits("fashion-mnist", str(tmp_path / "data"), quick=True)
    rows = experiments.held_out_baselines("fashion-mnist", train_set, test_set, "0-4", embedding_dim=3, seed=1,
                                          results_dir=str(tmp_path / "results"))
    pixels, untrained = rows
    assert (pixels["method"], pixels["embedding_dim"]) == ("pixels", 28 * 28)
    assert (untrained["method"], untrained["embedding_dim"], untrained["epochs"]) == ("untrained network", 3, 0)
    _, held_out, _ = experiments.held_out_splits(train_set, test_set, "0-4")
    images = torch.stack([held_out[i][0] for i in range(len(held_out))]).flatten(1)
    direct = experiments.few_shot_accuracy(images, held_out.targets, 5, 1, experiments.HELD_OUT_EPISODES, seed=1)
    assert pixels["held_out_one_shot"] == pytest.approx(direct["accuracy"])
    torch.manual_seed(1)  # the network run_method(seed=1) would start training from
    start = experiments.EmbeddingNet(3)
    assert untrained["held_out_one_shot"] == pytest.approx(
        experiments.evaluate_held_out(start, held_out, seed=1)["held_out_one_shot"])
    table = (tmp_path / "results" / "train-classes-0-4" / "fashion-mnist.md").read_text()
    assert "| pixels | 784 |" in table and "| untrained network | 3 |" in table


def test_command_line_held_out_run_adds_the_baselines(tmp_path, monkeypatch):
    write_idx_fixture(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    rows = experiments.main(["--quick", "--methods", "online-contrastive", "--train-classes", "0-4",
                             "--root", str(tmp_path / "data"), "--no-progress"])
    assert [row["method"] for row in rows] == ["online-contrastive", "pixels", "untrained network"]
    table = (tmp_path / "results" / "quick" / "train-classes-0-4" / "fashion-mnist.md").read_text()
    assert "| online-contrastive | 2 |" in table and "| pixels | 784 |" in table


def test_held_out_splits_never_train_on_held_out_classes(tmp_path):
    write_idx_fixture(tmp_path)
    train_set, test_set = experiments.load_splits("fashion-mnist", str(tmp_path), quick=True)
    (seen_train, seen_test), held_out, tag = experiments.held_out_splits(train_set, test_set, "0,1,2,3,4")
    assert tag == "0-4" and seen_train.classes == train_set.classes[:5] and held_out.classes == train_set.classes[5:]
    assert len(seen_train) == int((train_set.targets < 5).sum()) and set(seen_train.targets.tolist()) == set(range(5))
    assert len(held_out) == int((test_set.targets >= 5).sum())
    assert experiments.held_out_splits(train_set, test_set, "0,2,4")[2] == "0,2,4"


@pytest.fixture
def omniglot_root(tmp_path):
    root = tmp_path / "omniglot"
    write_alphabets(root / "small1", alphabets={"Alpha": 3, "Beta": 2}, drawers=6, size=28)
    write_alphabets(root / "small2", top="images_background_small2", alphabets={"Beta": 2, "Gamma": 20, "Delta": 5},
                    drawers=6, size=28)
    zip_folder(root / "small1", root / "images_background_small1.zip")
    zip_folder(root / "small2", root / "images_background_small2.zip")
    return root


def test_load_omniglot_evaluates_only_new_alphabets(omniglot_root):
    train_set, eval_set = omniglot.load_omniglot(omniglot_root, image_size=28, quarter_turns=(0, 1),
                                                 augment={"degrees": 5.0})
    assert train_set.alphabet_names == ["Alpha", "Beta"] and len(train_set.classes) == 10
    assert train_set.augmentation.degrees == 5.0 and eval_set.augmentation is None and not eval_set.train
    assert eval_set.alphabet_names == ["Delta", "Gamma"]
    with pytest.raises(ValueError, match="no alphabet that"):
        omniglot.load_omniglot(omniglot_root, evaluation="images_background_small1")
    with pytest.raises(FileNotFoundError, match="--omniglot-root"):
        omniglot.load_omniglot(omniglot_root / "nowhere")


def test_omniglot_quick_command(omniglot_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    result = experiments.main(["--dataset", "omniglot", "--quick", "--no-progress", "--omniglot-root",
                               str(omniglot_root), "--weights", str(weights)])
    assert result["recipe"]["epochs"] == 1 and result["quick"]
    tasks = [row["task"] for row in result["evaluation"]["episodes"]]
    assert tasks == ["20-way 1-shot, within alphabet", "5-way 1-shot, within alphabet", "20-way 1-shot, across alphabets"]
    assert result["evaluation"]["episodes"][0]["alphabets"] == ["Gamma"]
    assert all(row["n_episodes"] == 100 for row in result["evaluation"]["episodes"])
    assert result["evaluation"]["verification"]["validation_drawers"] == [1, 2, 3]
    table = (tmp_path / "results" / "quick" / "omniglot.md").read_text()
    assert "| 20-way 1-shot, within alphabet | Gamma | 100 |" in table
    assert "| 20-way 1-shot, within alphabet, shift-averaged (+-2 px) | Gamma | 100 |" in table
    assert result["evaluation_shift_averaged"]["test_shift"] == 2
    assert not weights.exists()  # a quick run saves no weights
    assert "Results in results/quick/omniglot.md" in capsys.readouterr().out


def test_train_save_load_and_one_shot_runs_command(omniglot_root, tmp_path, capsys):
    train_set, eval_set = omniglot.load_omniglot(omniglot_root, image_size=28)
    model, history = omniglot.train_omniglot(train_set, method="siamese", epochs=1, embedding_dim=8, channels=8,
                                             progress=False)
    assert len(history["train_loss"]) == 1 and not model.training
    path = omniglot.save_omniglot_model(model, str(tmp_path / "saved" / "model.pt"), command="test")
    loaded = omniglot.load_omniglot_model(path)
    assert isinstance(loaded, SiameseNetwork) and loaded.config() == model.config()
    images = eval_set.data[:4]
    assert torch.equal(loaded.forward_one(images), model.forward_one(images))
    runs = write_runs(tmp_path / "runs", n_runs=3, size=28)
    capsys.readouterr()
    result = experiments.main(["--dataset", "omniglot", "--one-shot-runs", str(tmp_path / "runs"), "--weights", path])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:3] == [f"{name}: error {100 * error:.1f}%" for name, error in zip(result["names"], result["errors"])]
    assert result["names"] == sorted(runs)
    assert re.fullmatch(r"mean error: \d+\.\d%", lines[-1])
    assert lines[-1] == f"mean error: {100 * result['mean_error']:.1f}%"
    with pytest.raises(FileNotFoundError, match="--weights"):
        omniglot.load_omniglot_model(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("method", ["online-contrastive", "online-triplet"])
def test_online_methods_train_the_siamese_network(omniglot_root, method):
    train_set, _ = omniglot.load_omniglot(omniglot_root, image_size=28)
    model, history = omniglot.train_omniglot(train_set, method=method, epochs=1, embedding_dim=8, channels=8,
                                             batch_classes=5, batch_samples=3, progress=False)
    assert len(history["train_loss"]) == 1 and isinstance(model, SiameseNetwork)
    with pytest.raises(ValueError, match="unknown Omniglot method"):
        omniglot.train_omniglot(train_set, method="softmax")


def test_alphabet_batches_group_the_sampler_by_alphabet(omniglot_root):
    train_set, _ = omniglot.load_omniglot(omniglot_root, image_size=28)  # Alpha: 3 characters, Beta: 2
    model, history = omniglot.train_omniglot(train_set, epochs=1, embedding_dim=8, channels=8, batch_classes=2,
                                             batch_samples=3, alphabet_batches=True, progress=False)
    assert len(history["train_loss"]) == 1
    with pytest.raises(ValueError, match="every group needs at least n_classes=3 classes, but one has only 2"):
        omniglot.train_omniglot(train_set, epochs=1, batch_classes=3, alphabet_batches=True, progress=False)


def test_evaluate_omniglot_with_test_shift_embeds_the_shift_average(omniglot_root):
    train_set, eval_set = omniglot.load_omniglot(omniglot_root, image_size=28)
    model = SiameseNetwork(28, 8, channels=8).eval()
    plain = omniglot.evaluate_omniglot(model, eval_set, n_episodes=50)
    shifted = omniglot.evaluate_omniglot(model, eval_set, n_episodes=50, test_shift=1)
    averaged = ShiftAveragedEmbedding(model, 1)
    direct = n_way_k_shot_accuracy(averaged, eval_set, 5, 1, 50, groups=eval_set.alphabets)
    assert shifted["episodes"][1]["accuracy"] == pytest.approx(direct["accuracy"])
    assert (plain["test_shift"], shifted["test_shift"]) == (0, 1)
    assert plain["verification"]["roc_auc"] != shifted["verification"]["roc_auc"]


def test_run_omniglot_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown Omniglot recipe settings"):
        omniglot.run_omniglot(epoch=3)


def test_train_omniglot_takes_its_defaults_from_the_recipe(omniglot_root, monkeypatch):
    train_set, _ = omniglot.load_omniglot(omniglot_root, image_size=28)
    calls = []

    def record(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, **options):
        calls.append({"loader": train_loader, "loss_fn": loss_fn, "optimizer": optimizer, "epochs": n_epochs})
        return {}

    monkeypatch.setattr(omniglot, "fit", record)  # what train_omniglot would train with, without training
    recipe = omniglot.OMNIGLOT_RECIPE
    model, _ = omniglot.train_omniglot(train_set, progress=False)
    online = calls[-1]
    assert online["epochs"] == recipe["epochs"] and online["loss_fn"].margin == recipe["margin"]
    assert online["optimizer"].defaults["lr"] == recipe["learning_rate"]
    sampler = online["loader"].batch_sampler
    assert (sampler.n_classes, sampler.n_samples) == (len(train_set.classes), recipe["batch_samples"])
    assert sampler.class_groups is None  # alphabet_batches is False in the recipe
    assert model.config()["embedding_dim"] == recipe["embedding_dim"]
    omniglot.train_omniglot(train_set, method="siamese", epochs=2, embedding_dim=8, channels=8, progress=False)
    siamese = calls[-1]
    assert siamese["epochs"] == 2 and siamese["loss_fn"].margin == omniglot.CONTRASTIVE_MARGIN
    assert siamese["loader"].batch_size == recipe["pair_batch"]
    with pytest.raises(TypeError, match=r"unknown settings \['epoch'\]"):
        omniglot.train_omniglot(train_set, epoch=1)
    assert omniglot.omniglot_settings() == recipe and omniglot.omniglot_settings() is not recipe
    assert omniglot.omniglot_settings(epochs=3, method=None) == {**recipe, "epochs": 3}


def test_old_import_paths_resolve_to_the_moved_objects():
    moved = {datasets: ["OMNIGLOT_IMAGE_SIZE", "OmniglotAlphabets", "OneShotRun", "OneShotRuns"],
             metrics: ["one_shot_run_errors"],
             experiments: ["OMNIGLOT_ROOT", "OMNIGLOT_BACKGROUND", "OMNIGLOT_EVALUATION", "OMNIGLOT_WEIGHTS",
                           "OMNIGLOT_METHODS", "OMNIGLOT_RECIPE", "CONTRASTIVE_MARGIN", "OMNIGLOT_EPISODES",
                           "OMNIGLOT_TEST_SHIFT", "OMNIGLOT_QUICK", "load_omniglot", "train_omniglot", "omniglot_pairs",
                           "drawer_halves", "evaluate_omniglot", "omniglot_table", "save_omniglot_model",
                           "load_omniglot_model", "run_omniglot", "run_one_shot_runs", "omniglot_main",
                           "OmniglotAlphabets", "OneShotRuns", "one_shot_run_errors"]}
    for module, names in moved.items():
        for name in names:
            assert getattr(module, name) is getattr(omniglot, name), f"{module.__name__}.{name}"
    from datasets import OmniglotAlphabets
    from experiments import run_omniglot
    from metrics import one_shot_run_errors
    assert (OmniglotAlphabets, run_omniglot, one_shot_run_errors) == (
        omniglot.OmniglotAlphabets, omniglot.run_omniglot, omniglot.one_shot_run_errors)
    import autoencoders
    assert experiments.run_experiment is autoencoders.run_experiment
    for module in moved:
        with pytest.raises(AttributeError, match=f"^module '{module.__name__}' has no attribute 'no_such_name'$"):
            getattr(module, "no_such_name")
    assert not hasattr(metrics, "within_alphabet") and not hasattr(datasets, "_FileTree")


def _python(code_or_arguments, cwd):
    """Run a fresh interpreter in the repository (``-c code`` or a script with arguments); its stdout."""
    arguments = ["-c", code_or_arguments] if isinstance(code_or_arguments, str) else code_or_arguments
    completed = subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_experiments_loads_neither_autoencoders_nor_omniglot():
    # (torchvision.models cannot be checked this way: `import torchvision`, which datasets needs, loads it)
    loaded = _python("import sys, experiments; "
                     "print([name for name in ('autoencoders', 'features', 'omniglot') if name in sys.modules])",
                     REPOSITORY)
    assert loaded.strip() == "[]"


def test_omniglot_command_line_is_the_experiments_one(tmp_path, capsys):
    model = SiameseNetwork(28, 8, channels=8).eval()
    weights = omniglot.save_omniglot_model(model, str(tmp_path / "model.pt"))
    write_runs(tmp_path / "runs", n_runs=2, size=28)
    arguments = ["--one-shot-runs", str(tmp_path / "runs"), "--weights", weights]
    result = omniglot.main(arguments)
    assert result == experiments.main(["--dataset", "omniglot", *arguments])
    assert omniglot.main([*arguments, "--dataset", "mnist"]) == result  # omniglot.py is always Omniglot
    printed = _python([os.path.join(REPOSITORY, "omniglot.py"), *arguments], tmp_path)
    assert printed.strip().splitlines()[-1] == f"mean error: {100 * result['mean_error']:.1f}%"


@pytest.mark.parametrize("unused", [["--margin", "2"], ["--channels-last"], ["--batch-norm", "--lr-step", "4"],
                                    ["--run-dir", "elsewhere"], ["--classic"]])
def test_the_omniglot_command_line_refuses_the_options_it_does_not_read(unused, capsys):
    with pytest.raises(SystemExit):
        omniglot.main(["--quick", "--seed", "3", *unused])  # refused before any data is looked for
    error = capsys.readouterr().err
    assert "does not read" in error and all(option in error for option in unused if option.startswith("--"))
    assert "--seed" not in error.split("does not read")[1]

