"""Tests for omniglot.py: its readers (zip, folder, torchvision layout, Lake's one-shot runs) on fixtures
written in the exact formats, N-way K-shot episodes within its alphabets; then the
study (training in quick mode, saved weights, Lake's one-shot runs), its command line ``python
omniglot.py`` (one line and exit status 2 for a user's mistake), where a run writes (a trial never the
committed results or weights), and the old import paths of the Omniglot names."""

import ast
import hashlib
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import datasets
import experiments
import metrics
import omniglot as omniglot_module  # (``omniglot`` is the fixture of the alphabets below)
import omniglot_data
from datasets import BalancedBatchSampler, BatchRandomAffine, SiameseMNIST, TripletMNIST
from episodes import n_way_k_shot_accuracy
from launch import command_lines
from networks import ShiftAveragedEmbedding, SiameseNetwork
from omniglot import OmniglotAlphabets, OneShotRuns, one_shot_run_errors
from omniglot_fixtures import ALPHABETS, DRAWERS, SIZE, write_alphabets, write_runs, zip_folder

N_CLASSES = sum(ALPHABETS.values())


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """{'folder', 'zip', 'records'}: the alphabets written under a top folder, and zipped with it."""
    base = tmp_path_factory.mktemp("omniglot")
    folder = base / "extracted"
    records = write_alphabets(folder)
    return {"folder": folder, "zip": zip_folder(folder, base / "images_background_small1.zip"), "records": records}


# ------------------------------------------------------------------------------- OmniglotAlphabets

@pytest.mark.parametrize("source", ["zip", "folder"])
def test_alphabets_read_every_image_with_its_labels(omniglot, source):
    dataset = OmniglotAlphabets(omniglot[source])
    records = omniglot["records"]
    assert len(dataset) == len(records) == N_CLASSES * DRAWERS
    assert dataset.data.shape == (len(records), 1, SIZE, SIZE) and dataset.data.dtype == torch.float32
    assert dataset.classes == ["Alpha/character01", "Alpha/character02", "Alpha/character03",
                               "Beta/character01", "Beta/character02"]
    assert dataset.alphabet_names == ["Alpha", "Beta"]
    assert dataset.files == [f"images_background_small1/{r[0]}" for r in records]
    assert dataset.subset == "images_background_small1"
    for k, (_, alphabet, character, drawer, mask) in enumerate(records):
        assert dataset.classes[int(dataset.targets[k])] == f"{alphabet}/character{character:02d}"
        assert dataset.alphabet_names[int(dataset.alphabets[k])] == alphabet
        assert int(dataset.characters[k]) == character and int(dataset.drawers[k]) == drawer
        assert torch.equal(dataset.data[k, 0], torch.from_numpy(mask).float())  # ink 1, background 0
    assert dataset.class_alphabets.tolist() == [0, 0, 0, 1, 1]
    assert dataset.train and dataset.transform is None and dataset.augmentation is None
    image, target = dataset[5]
    assert torch.equal(image, dataset.data[5]) and target == int(dataset.targets[5])


def test_zip_and_folder_give_the_same_dataset(omniglot):
    from_zip, from_folder = OmniglotAlphabets(omniglot["zip"]), OmniglotAlphabets(omniglot["folder"])
    assert torch.equal(from_zip.data, from_folder.data) and torch.equal(from_zip.targets, from_folder.targets)
    assert from_zip.files == from_folder.files


def test_invert_false_keeps_black_ink_on_white(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], invert=False)
    assert torch.equal(dataset.data, 1 - OmniglotAlphabets(omniglot["zip"]).data)


def test_alphabet_selection_and_its_errors(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], alphabets=["Beta"])
    assert dataset.classes == ["Beta/character01", "Beta/character02"]
    assert dataset.targets.tolist() == [0] * DRAWERS + [1] * DRAWERS
    assert dataset.alphabet_names == ["Beta"] and dataset.alphabets.tolist() == [0] * (2 * DRAWERS)
    with pytest.raises(ValueError, match=r"unknown alphabets \['Gamma'\].*\['Alpha', 'Beta'\]"):
        OmniglotAlphabets(omniglot["zip"], alphabets=["Gamma"])
    with pytest.raises(TypeError, match="list of names"):
        OmniglotAlphabets(omniglot["zip"], alphabets="Beta")


@pytest.mark.parametrize("image_size", [8, 28, 105])
def test_resizing(omniglot, image_size):
    full = OmniglotAlphabets(omniglot["zip"])
    dataset = OmniglotAlphabets(omniglot["zip"], image_size=image_size)
    assert dataset.data.shape == (len(full), 1, image_size, image_size) and dataset.image_size == image_size
    assert dataset.data.min() >= 0 and dataset.data.max() <= 1
    # antialiased resizing keeps the ink's share of the image
    ink = full.data.mean(dim=(1, 2, 3))
    assert torch.allclose(dataset.data.mean(dim=(1, 2, 3)), ink, atol=0.25 * float(ink.mean()))


def test_bad_image_size(omniglot):
    for image_size in (0, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            OmniglotAlphabets(omniglot["zip"], image_size=image_size)


def test_zip_without_top_folder(omniglot, tmp_path):
    archive = zip_folder(omniglot["folder"] / "images_background_small1", tmp_path / "flat.zip",
                         add_directory_entries=False)
    dataset = OmniglotAlphabets(archive)
    assert dataset.subset == "" and len(dataset) == len(omniglot["records"])
    assert torch.equal(dataset.data, OmniglotAlphabets(omniglot["zip"]).data)


def test_torchvision_layout_needs_a_subset_when_it_holds_two(tmp_path):
    root = tmp_path / "data"
    background = write_alphabets(root, top="omniglot-py/images_background")
    write_alphabets(root, top="omniglot-py/images_evaluation", alphabets={"Gamma": 2})
    (root / "omniglot-py" / "images_background.zip").write_bytes(b"not read")  # torchvision leaves its zips
    with pytest.raises(ValueError, match="subset="):
        OmniglotAlphabets(root)
    dataset = OmniglotAlphabets(root, subset="images_background")
    assert len(dataset) == len(background) and dataset.subset == "omniglot-py/images_background"
    evaluation = OmniglotAlphabets(root, subset="images_evaluation")
    assert evaluation.classes == ["Gamma/character01", "Gamma/character02"]
    with pytest.raises(FileNotFoundError, match="images_nowhere"):
        OmniglotAlphabets(root, subset="images_nowhere")


def test_missing_or_wrong_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniglotAlphabets(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a .zip"):
        OmniglotAlphabets(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no Omniglot images"):
        OmniglotAlphabets(tmp_path)


def test_works_with_the_pair_and_triplet_wrappers_and_the_balanced_sampler(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], image_size=16)
    pairs = SiameseMNIST(dataset)
    (first, second), target = pairs[3]
    assert first.shape == second.shape == (1, 16, 16) and target in (0, 1)
    test_pairs = SiameseMNIST(dataset, train=False)
    same = dataset.targets[test_pairs.test_pairs[:, 0]] == dataset.targets[test_pairs.test_pairs[:, 1]]
    assert torch.equal(same.long(), test_pairs.test_pairs[:, 2])
    (anchor, positive, negative), _ = TripletMNIST(dataset)[0]
    assert anchor.shape == (1, 16, 16)
    loader = DataLoader(dataset, batch_sampler=BalancedBatchSampler(dataset.targets, 3, 2, seed=0))
    images, labels = next(iter(loader))
    assert images.shape == (6, 1, 16, 16) and len(labels.unique()) == 3
    batch, _ = next(iter(DataLoader(pairs, batch_size=8)))
    assert batch[0].shape == (8, 1, 16, 16)


def test_augmentation_is_batched_and_reaches_the_wrappers(omniglot):
    def dataset(seed):
        return OmniglotAlphabets(omniglot["zip"], augment=BatchRandomAffine(generator=torch.Generator().manual_seed(seed)))
    batched = dataset(0).__getitems__(list(range(6)))
    one_by_one = dataset(0)
    single = [one_by_one[k] for k in range(6)]
    for (image, target), (alone, alone_target) in zip(batched, single):
        assert torch.allclose(image, alone, atol=1e-6) and target == alone_target
    plain = OmniglotAlphabets(omniglot["zip"])
    assert not all(torch.equal(image, plain.data[k]) for k, (image, _) in enumerate(batched))
    # the wrappers apply `.transform` per image: the augmentation
    augmented = dataset(1)
    assert isinstance(augmented.transform, BatchRandomAffine)
    (first, _), _ = SiameseMNIST(augmented)[0]
    assert first.shape == (1, SIZE, SIZE)


def test_augmentation_then_user_transform(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"], augment=True, transform=lambda image: image * 0 + 7,
                                target_transform=lambda target: target + 100)
    samples = dataset.__getitems__([0, 5])
    assert all(torch.all(image == 7) for image, _ in samples)
    assert [target for _, target in samples] == [100, 101]
    assert torch.all(dataset[0][0] == 7)
    with pytest.raises(TypeError, match="augment"):
        OmniglotAlphabets(omniglot["zip"], augment="strong")


def test_quarter_turns_add_rotated_classes(omniglot):
    plain = OmniglotAlphabets(omniglot["zip"])
    turned = OmniglotAlphabets(omniglot["zip"], quarter_turns=(0, 1, 2, 3))
    n = len(plain)
    assert len(turned) == 4 * n and len(turned.classes) == 4 * N_CLASSES
    assert turned.classes[:N_CLASSES] == plain.classes
    assert turned.classes[N_CLASSES] == "Alpha/character01@90" and turned.classes[-1] == "Beta/character02@270"
    for k in range(4):
        block = slice(k * n, (k + 1) * n)
        assert torch.equal(turned.data[block], torch.rot90(plain.data, k, dims=(2, 3)))
        assert torch.equal(turned.targets[block], plain.targets + k * N_CLASSES)
        assert torch.equal(turned.alphabets[block], plain.alphabets) and torch.equal(turned.drawers[block], plain.drawers)
        assert torch.all(turned.turns[block] == k)
    assert torch.equal(turned.class_alphabets, plain.class_alphabets.repeat(4))
    only_turned = OmniglotAlphabets(omniglot["zip"], quarter_turns=(2,))
    assert torch.equal(only_turned.data, torch.rot90(plain.data, 2, dims=(2, 3)))
    assert only_turned.classes[0] == "Alpha/character01@180"
    for bad in [(), (4,), (0, 0), 1, (True,)]:
        with pytest.raises(ValueError, match="quarter_turns"):
            OmniglotAlphabets(omniglot["zip"], quarter_turns=bad)


def test_mirror_adds_mirrored_classes_after_the_turned_ones(omniglot):
    turned = OmniglotAlphabets(omniglot["zip"], quarter_turns=(0, 1))
    mirrored = OmniglotAlphabets(omniglot["zip"], quarter_turns=(0, 1), mirror=True)
    n, n_classes = len(turned), len(turned.classes)
    assert len(mirrored) == 2 * n and len(mirrored.classes) == 2 * n_classes
    assert mirrored.classes[:n_classes] == turned.classes
    assert mirrored.classes[n_classes] == "Alpha/character01~mirrored"
    assert mirrored.classes[-1] == "Beta/character02@90~mirrored"
    assert torch.equal(mirrored.data[:n], turned.data)
    for i in range(0, n, 7):  # column j of a mirrored image is column S - 1 - j of the original
        assert torch.equal(mirrored.data[n + i][..., 0], turned.data[i][..., -1])
        assert torch.equal(mirrored.data[n + i], turned.data[i][..., torch.arange(turned.image_size - 1, -1, -1)])
    assert torch.equal(mirrored.targets, torch.cat([turned.targets, turned.targets + n_classes]))
    for name in ("alphabets", "drawers", "turns", "characters"):
        assert torch.equal(getattr(mirrored, name), getattr(turned, name).repeat(2))
    assert torch.equal(mirrored.class_alphabets, turned.class_alphabets.repeat(2))
    assert mirrored.mirrored.tolist() == [False] * n + [True] * n and not turned.mirrored.any()
    assert len(mirrored.files) == 2 * n
    with pytest.raises(TypeError, match="mirror must be True or False"):
        OmniglotAlphabets(omniglot["zip"], mirror=1)


def test_alphabet_names_in(omniglot):
    assert OmniglotAlphabets.alphabet_names_in(omniglot["zip"]) == ["Alpha", "Beta"]
    assert OmniglotAlphabets.alphabet_names_in(omniglot["folder"]) == ["Alpha", "Beta"]


# ------------------------------------------------------------------------------- OneShotRuns

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    answers = write_runs(base / "all_runs")
    return {"folder": base / "all_runs", "zip": zip_folder(base, base / "all_runs.zip"), "answers": answers}


@pytest.mark.parametrize("source", ["folder", "zip"])
def test_one_shot_runs_reader(runs, source):
    benchmark = OneShotRuns(runs[source])
    assert len(benchmark) == 2 and benchmark.names == ["run01", "run02"]
    for run in benchmark:
        assert run.training_images.shape == run.test_images.shape == (20, 1, SIZE, SIZE)
        assert run.answers.tolist() == runs["answers"][run.name]
        assert run.training_files == [f"{run.name}/training/class{k:02d}.png" for k in range(1, 21)]
        assert run.test_files == [f"{run.name}/test/item{k:02d}.png" for k in range(1, 21)]
        # the test item shows its class's character: the ink differs only by the drawer pixel
        differences = (run.test_images - run.training_images[run.answers]).abs().sum(dim=(1, 2, 3))
        assert torch.all(differences == 2)
        assert float(run.training_images.max()) == 1.0 and float(run.training_images[:, :, 0, 0].max()) == 0.0
    assert torch.equal(benchmark[1].answers, torch.tensor(runs["answers"]["run02"]))


def test_one_shot_runs_resize(runs):
    benchmark = OneShotRuns(runs["zip"], image_size=28)
    assert benchmark[0].training_images.shape == (20, 1, 28, 28)


def test_one_shot_run_errors_scores_nearest_training_image(runs):
    benchmark = OneShotRuns(runs["folder"])

    class Flatten(nn.Module):
        def get_embedding(self, x):
            return x.flatten(1)

    result = one_shot_run_errors(Flatten(), benchmark)
    assert result == {"names": ["run01", "run02"], "errors": [0.0, 0.0], "mean_error": 0.0}

    class Constant(nn.Module):  # every distance ties: each item goes to training image 0
        def get_embedding(self, x):
            return torch.zeros(len(x), 3)

    result = one_shot_run_errors(Constant(), benchmark)
    expected = [sum(answer != 0 for answer in runs["answers"][name]) / 20 for name in ("run01", "run02")]
    assert result["errors"] == pytest.approx(expected) and result["mean_error"] == pytest.approx(sum(expected) / 2)
    with pytest.raises(TypeError, match="get_embedding"):
        one_shot_run_errors(object(), benchmark)


def _copy_runs(runs, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(runs["folder"], target)
    return target


def test_one_shot_runs_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="class_labels.txt"):
        OneShotRuns(tmp_path)
    broken = _copy_runs(runs, tmp_path)
    labels = broken / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="gives no class for"):
        OneShotRuns(broken)
    labels.write_text("\n".join(lines[:-1] + ["run01/test/item01.png run01/training/class99.png"]) + "\n")
    with pytest.raises(ValueError, match="class99.png, which is not in run01"):
        OneShotRuns(broken)
    labels.write_text("run01/test/item01.png\n")
    with pytest.raises(ValueError, match="every line"):
        OneShotRuns(broken)
    labels.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="twice"):
        OneShotRuns(broken)


# ------------------------------------------------------------------------------- episodes on Omniglot's alphabets

def test_n_way_k_shot_accuracy_on_omniglot_alphabets(omniglot):
    dataset = OmniglotAlphabets(omniglot["zip"])

    class Flatten(nn.Module):
        def get_embedding(self, x):
            return x.flatten(1)

    # a drawer changes one pixel, a character moves a 5x5 block: pixels are a perfect embedding here
    result = n_way_k_shot_accuracy(Flatten(), dataset, n_way=3, k_shot=1, n_episodes=50, groups=dataset.alphabets,
                                   n_query=3)
    assert result["accuracy"] == 1.0


# ------------------------------------------------------------------------------- the study and its command line

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
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28, quarter_turns=(0, 1),
                                                 augment={"degrees": 5.0})
    assert train_set.alphabet_names == ["Alpha", "Beta"] and len(train_set.classes) == 10
    assert train_set.augmentation.degrees == 5.0 and eval_set.augmentation is None and not eval_set.train
    assert eval_set.alphabet_names == ["Delta", "Gamma"]
    with pytest.raises(ValueError, match="no alphabet that"):
        omniglot_module.load_omniglot(omniglot_root, evaluation="images_background_small1")
    with pytest.raises(FileNotFoundError, match="--omniglot-root"):
        omniglot_module.load_omniglot(omniglot_root / "nowhere")


def test_omniglot_quick_command(omniglot_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    result = omniglot_module.main(["--quick", "--no-progress", "--omniglot-root", str(omniglot_root), "--weights",
                                   str(weights)])
    assert result["recipe"]["epochs"] == 1 and result["quick"]
    tasks = [row["task"] for row in result["evaluation"]["episodes"]]
    assert tasks == ["20-way 1-shot, within alphabet", "5-way 1-shot, within alphabet", "20-way 1-shot, across alphabets"]
    assert result["evaluation"]["episodes"][0]["alphabets"] == ["Gamma"]
    assert all(row["n_episodes"] == 100 for row in result["evaluation"]["episodes"])
    assert result["evaluation"]["verification"]["validation_drawers"] == [1, 2, 3]
    table = (tmp_path / "runs" / "omniglot" / "quick" / "results" / "omniglot.md").read_text()  # results.output_dirs
    assert "| 20-way 1-shot, within alphabet | Gamma | 100 |" in table
    assert "| 20-way 1-shot, within alphabet, shift-averaged (+-2 px) | Gamma | 100 |" in table
    assert result["evaluation_shift_averaged"]["test_shift"] == 2
    assert not weights.exists()  # a quick run saves no weights
    assert "Results in runs/omniglot/quick/results/omniglot.md." in capsys.readouterr().out
    assert not (tmp_path / "results").exists()  # not the checkout's results/


def test_train_save_load_and_one_shot_runs_command(omniglot_root, tmp_path, capsys):
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model, history = omniglot_module.train_omniglot(train_set, method="siamese", epochs=1, embedding_dim=8, channels=8,
                                             progress=False)
    assert len(history["train_loss"]) == 1 and not model.training
    path = omniglot_module.save_omniglot_model(model, str(tmp_path / "saved" / "model.pt"), command="test")
    loaded = omniglot_module.load_omniglot_model(path)
    assert isinstance(loaded, SiameseNetwork) and loaded.config() == model.config()
    images = eval_set.data[:4]
    assert torch.equal(loaded.forward_one(images), model.forward_one(images))
    runs = write_runs(tmp_path / "runs", n_runs=3, size=28)
    capsys.readouterr()
    result = omniglot_module.main(["--one-shot-runs", str(tmp_path / "runs"), "--weights", path])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:3] == [f"{name}: error {100 * error:.1f}%" for name, error in zip(result["names"], result["errors"])]
    assert result["names"] == sorted(runs)
    assert re.fullmatch(r"mean error: \d+\.\d%", lines[-1])
    assert lines[-1] == f"mean error: {100 * result['mean_error']:.1f}%"
    with pytest.raises(FileNotFoundError, match="--weights"):
        omniglot_module.load_omniglot_model(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("method", ["online-contrastive", "online-triplet"])
def test_online_methods_train_the_siamese_network(omniglot_root, method):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model, history = omniglot_module.train_omniglot(train_set, method=method, epochs=1, embedding_dim=8, channels=8,
                                             batch_classes=5, batch_samples=3, progress=False)
    assert len(history["train_loss"]) == 1 and isinstance(model, SiameseNetwork)
    with pytest.raises(ValueError, match="unknown Omniglot method"):
        omniglot_module.train_omniglot(train_set, method="softmax")


@pytest.mark.parametrize("method", ["online-triplet", "multi-similarity"])
def test_the_online_methods_train_with_a_cross_batch_memory(omniglot_root, method, monkeypatch):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    losses, fit = [], omniglot_module.fit

    def recording_fit(train_loader, val_loader, model, loss_fn, *args, **kwargs):
        losses.append(loss_fn)
        return fit(train_loader, val_loader, model, loss_fn, *args, **kwargs)

    monkeypatch.setattr(omniglot_module, "fit", recording_fit)
    omniglot_module.train_omniglot(train_set, method=method, epochs=1, embedding_dim=8, channels=8, batch_classes=5,
                                   batch_samples=3, memory=40, memory_warmup=1, progress=False)
    memory = losses[0].memory
    assert (memory.size, memory.embedding_dim, memory.warmup) == (40, 8, 1)
    assert int(memory.steps) >= 2 and int(memory.filled) == min(40, 15 * int(memory.steps))  # 5 x 3 per batch
    omniglot_module.train_omniglot(train_set, method=method, epochs=0, embedding_dim=8, channels=8, progress=False)
    assert losses[1].memory is None  # the recipe's: none


def test_the_omniglot_command_line_takes_a_memory_for_its_online_methods(tmp_path):
    args = omniglot_module._parser().parse_args(["--memory", "64", "--memory-warmup", "0"])
    recipe = omniglot_module._recipe_of(args)
    assert recipe == {"memory": 64, "memory_warmup": 0}
    results_dir, _ = omniglot_module.omniglot_outputs(omniglot_module.omniglot_settings(**recipe),
                                                      runs_dir=str(tmp_path))
    assert "memory-64_memory-warmup-0" in results_dir  # a trial's own folder, never the committed results
    for wrong, message in ((["--methods", "siamese", "--memory", "64"], "siamese mines no batch"),
                           (["--memory-warmup", "5"], r"give its size too \(--memory M\)"),
                           (["--memory", "0"], "--memory: expected a whole number of at least 1"),
                           (["--memory", "8", "--memory-warmup", "-1"], "--memory-warmup: expected a whole number")):
        with pytest.raises(ValueError, match=message):  # before any data is looked for
            omniglot_module.main(["--quick", "--omniglot-root", str(tmp_path / "nowhere"), *wrong])


def test_the_omniglot_recipe_can_train_unit_norm_embeddings_in_a_trial_folder_of_its_own(omniglot_root, tmp_path):
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model, _ = omniglot_module.train_omniglot(train_set, method="multi-similarity", normalize=True, epochs=1,
                                              embedding_dim=8, channels=8, batch_classes=5, batch_samples=3,
                                              progress=False)
    embeddings = model.get_embedding(eval_set.data[:7].float())
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(7))
    assert model.config()["normalize"] is True
    plain, _ = omniglot_module.train_omniglot(train_set, epochs=0, embedding_dim=8, channels=8, progress=False)
    assert plain.config()["normalize"] is False  # the recipe's
    recipe = omniglot_module._recipe_of(omniglot_module._parser().parse_args(["--normalize"]))
    assert recipe == {"normalize": True}
    results_dir, _ = omniglot_module.omniglot_outputs(omniglot_module.omniglot_settings(**recipe),
                                                      runs_dir=str(tmp_path))
    assert results_dir == os.path.join(str(tmp_path), "omniglot", "normalize", "results")  # a trial's own folder
    assert omniglot_module._recipe_of(omniglot_module._parser().parse_args([])) == {}
    with pytest.raises(TypeError, match="normalize must be"):
        omniglot_module.train_omniglot(train_set, normalize="yes", epochs=0, progress=False)


def test_the_omniglot_command_line_sets_the_width_of_the_network(omniglot_root, tmp_path):
    recipe = omniglot_module._recipe_of(omniglot_module._parser().parse_args(["--channels", "12", "--epochs", "0"]))
    assert recipe == {"channels": 12, "epochs": 0}
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model, _ = omniglot_module.train_omniglot(train_set, embedding_dim=8, progress=False, **recipe)
    assert model.config()["channels"] == 12
    results_dir, _ = omniglot_module.omniglot_outputs(omniglot_module.omniglot_settings(**recipe),
                                                      runs_dir=str(tmp_path))
    assert results_dir == os.path.join(str(tmp_path), "omniglot", "channels-12_epochs-0", "results")
    with pytest.raises(ValueError, match="--channels: expected a whole number of at least 1"):
        omniglot_module.main(["--quick", "--omniglot-root", str(tmp_path / "nowhere"), "--channels", "0"])


def test_the_omniglot_command_line_sets_the_shape_of_the_online_batches(tmp_path):
    parse = omniglot_module._parser().parse_args
    recipe = omniglot_module._recipe_of(parse(["--batch-classes", "64", "--batch-samples", "5"]))
    assert recipe == {"batch_classes": 64, "batch_samples": 5}  # train_omniglot's own settings
    results_dir, _ = omniglot_module.omniglot_outputs(omniglot_module.omniglot_settings(**recipe),
                                                      runs_dir=str(tmp_path))
    assert results_dir == os.path.join(str(tmp_path), "omniglot", "batch-classes-64_batch-samples-5", "results")
    assert omniglot_module._recipe_of(parse(["--methods", "online-contrastive", "--batch-samples", "4"])) == \
        {"method": "online-contrastive", "batch_samples": 4}
    with pytest.raises(ValueError, match="siamese trains on batches of random pairs"):
        omniglot_module._recipe_of(parse(["--methods", "siamese", "--batch-samples", "4"]))


def test_the_omniglot_command_line_sets_the_strength_of_the_elastic_warp(omniglot_root, tmp_path):
    parse = omniglot_module._parser().parse_args
    recipe = omniglot_module._recipe_of(parse(["--elastic", "0.1"]))
    assert recipe == {"augment": {**omniglot_module.OMNIGLOT_RECIPE["augment"], "elastic": 0.1}}
    results_dir, _ = omniglot_module.omniglot_outputs(omniglot_module.omniglot_settings(**recipe),
                                                      runs_dir=str(tmp_path))
    assert results_dir == os.path.join(str(tmp_path), "omniglot", "augment.elastic-0.1", "results")  # its own folder
    without = omniglot_module._recipe_of(parse(["--elastic", "0"]))["augment"]
    assert without == {setting: value for setting, value in omniglot_module.OMNIGLOT_RECIPE["augment"].items()
                       if setting != "elastic"}  # the affine map alone
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28, augment=recipe["augment"])
    assert train_set.augmentation.elastic == 0.1 and eval_set.augmentation is None
    for wrong, message in ((["--elastic", "-0.5"], "--elastic must be >= 0"), (["--elastic", "inf"], "--elastic must "
                           "be finite"), (["--elastic", "nan"], "--elastic must be >= 0"),
                           (["--elastic", "x"], "argument --elastic: invalid float value")):
        with pytest.raises(ValueError, match=message):  # before any data is looked for
            omniglot_module.main(["--quick", "--omniglot-root", str(tmp_path / "nowhere"), *wrong])


def test_alphabet_batches_group_the_sampler_by_alphabet(omniglot_root):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)  # Alpha: 3 characters, Beta: 2
    model, history = omniglot_module.train_omniglot(train_set, epochs=1, embedding_dim=8, channels=8, batch_classes=2,
                                             batch_samples=3, alphabet_batches=True, progress=False)
    assert len(history["train_loss"]) == 1
    with pytest.raises(ValueError, match="every group needs at least n_classes=3 classes, but one has only 2"):
        omniglot_module.train_omniglot(train_set, epochs=1, batch_classes=3, alphabet_batches=True, progress=False)


def test_evaluate_omniglot_with_test_shift_embeds_the_shift_average(omniglot_root):
    train_set, eval_set = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    model = SiameseNetwork(28, 8, channels=8).eval()
    plain = omniglot_module.evaluate_omniglot(model, eval_set, n_episodes=50)
    shifted = omniglot_module.evaluate_omniglot(model, eval_set, n_episodes=50, test_shift=1)
    averaged = ShiftAveragedEmbedding(model, 1)
    direct = n_way_k_shot_accuracy(averaged, eval_set, 5, 1, 50, groups=eval_set.alphabets)
    assert shifted["episodes"][1]["accuracy"] == pytest.approx(direct["accuracy"])
    assert (plain["test_shift"], shifted["test_shift"]) == (0, 1)
    assert plain["verification"]["roc_auc"] != shifted["verification"]["roc_auc"]


def test_run_omniglot_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown Omniglot recipe settings"):
        omniglot_module.run_omniglot(epoch=3)


def test_train_omniglot_takes_its_defaults_from_the_recipe(omniglot_root, monkeypatch):
    train_set, _ = omniglot_module.load_omniglot(omniglot_root, image_size=28)
    calls = []

    def record(train_loader, val_loader, model, loss_fn, optimizer, scheduler, n_epochs, **options):
        calls.append({"loader": train_loader, "loss_fn": loss_fn, "optimizer": optimizer, "epochs": n_epochs})
        return {}

    monkeypatch.setattr(omniglot_module, "fit", record)  # what train_omniglot would train with, without training
    recipe = omniglot_module.OMNIGLOT_RECIPE
    model, _ = omniglot_module.train_omniglot(train_set, progress=False)
    online = calls[-1]
    assert online["epochs"] == recipe["epochs"] and online["loss_fn"].margin == recipe["margin"]
    assert online["optimizer"].defaults["lr"] == recipe["learning_rate"]
    sampler = online["loader"].batch_sampler
    drawings = int(torch.bincount(train_set.targets).min())  # the fixture's 6 drawers: fewer than the recipe's 10
    assert (sampler.n_classes, sampler.n_samples) == (len(train_set.classes), min(recipe["batch_samples"], drawings))
    assert sampler.class_groups is None  # alphabet_batches is False in the recipe
    assert model.config()["embedding_dim"] == recipe["embedding_dim"]
    omniglot_module.train_omniglot(train_set, method="siamese", epochs=2, embedding_dim=8, channels=8, progress=False)
    siamese = calls[-1]
    assert siamese["epochs"] == 2 and siamese["loss_fn"].margin == omniglot_module.CONTRASTIVE_MARGIN
    assert siamese["loader"].batch_size == recipe["pair_batch"]
    with pytest.raises(TypeError, match=r"unknown settings \['epoch'\]"):
        omniglot_module.train_omniglot(train_set, epoch=1)
    assert omniglot_module.omniglot_settings() == recipe and omniglot_module.omniglot_settings() is not recipe
    assert omniglot_module.omniglot_settings(epochs=3, method=None) == {**recipe, "epochs": 3}


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
        for name in names:  # the reading of Omniglot moved on to omniglot_data, whose names omniglot exports
            home = omniglot_data if hasattr(omniglot_data, name) else omniglot_module
            assert getattr(module, name) is getattr(home, name), f"{module.__name__}.{name}"
            if hasattr(omniglot_module, name):
                assert getattr(omniglot_module, name) is getattr(home, name), name
    from datasets import OmniglotAlphabets
    from experiments import run_omniglot
    from metrics import one_shot_run_errors
    assert (OmniglotAlphabets, run_omniglot, one_shot_run_errors) == (
        omniglot_module.OmniglotAlphabets, omniglot_module.run_omniglot, omniglot_module.one_shot_run_errors)
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


def test_omniglot_imports_no_command_line_only_what_builds_a_method():
    tree = ast.parse(inspect.getsource(omniglot_module))
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert {module for module, _ in imported} & {"experiments", "autoencoders"} == set()  # one direction only
    assert {name for module, name in imported if module == "methods"} == {"EVALUATION_BATCH", "MEMORY_WARMUP",
                                                                            "build_method", "check_memory"}
    assert not hasattr(omniglot_module, "OMNIGLOT_OPTIONS") and not hasattr(omniglot_module, "options_given")


def test_omniglot_command_line_scores_one_shot_runs(tmp_path, capsys):
    model = SiameseNetwork(28, 8, channels=8).eval()
    weights = omniglot_module.save_omniglot_model(model, str(tmp_path / "model.pt"))
    write_runs(tmp_path / "runs", n_runs=2, size=28)
    arguments = ["--one-shot-runs", str(tmp_path / "runs"), "--weights", weights]
    result = omniglot_module.main(arguments)
    assert result == omniglot_module.run_one_shot_runs(str(tmp_path / "runs"), weights)
    with pytest.raises(ValueError, match="unrecognized arguments: --dataset mnist"):
        omniglot_module.main([*arguments, "--dataset", "mnist"])  # omniglot.py is always Omniglot
    printed = _python([os.path.join(REPOSITORY, "omniglot.py"), *arguments], tmp_path)
    assert printed.strip().splitlines()[-1] == f"mean error: {100 * result['mean_error']:.1f}%"


@pytest.mark.parametrize("unused", [["--margin", "2"], ["--channels-last"], ["--batch-norm", "--lr-step", "4"],
                                    ["--run-dir", "elsewhere"], ["--classic"]])
def test_the_omniglot_command_line_refuses_the_options_it_does_not_read(unused):
    with pytest.raises(ValueError, match="unrecognized arguments") as refused:
        omniglot_module.main(["--quick", "--seed", "3", *unused])  # refused before any data is looked for
    error = str(refused.value)
    assert all(option in error for option in unused if option.startswith("--"))
    assert "--seed" not in error.split("unrecognized arguments")[1]


def _command_line(arguments, cwd):
    """``python omniglot.py ARGUMENTS`` in a fresh interpreter: (exit status, stdout, stderr)."""
    completed = subprocess.run([sys.executable, os.path.join(REPOSITORY, "omniglot.py"), *map(str, arguments)],
                               cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return completed.returncode, completed.stdout, completed.stderr


def test_a_user_mistake_on_the_command_line_is_one_line_and_status_2(omniglot_root, tmp_path):
    not_a_zip = tmp_path / "not-a-zip"
    not_a_zip.mkdir()
    (not_a_zip / "images_background_small1.zip").write_text("not a zip")
    model = omniglot_module.save_omniglot_model(SiameseNetwork(28, 8, channels=8).eval(), str(tmp_path / "m.pt"))
    write_runs(tmp_path / "runs", n_runs=1, size=28)
    mistakes = {("--epochs", "-3"): "--epochs must be >= 0, got -3",
                ("--epochs", "x"): "argument --epochs: invalid int value: 'x'",
                ("--embedding-dim", "0"): "--embedding-dim must be >= 1",
                ("--batch-samples", "1"): "--batch-samples: expected a whole number of at least 2",
                ("--batch-classes", "many"): "--batch-classes: expected a whole number of at least 2",
                ("--methods", "siamese", "--batch-classes", "8"): "shape the online methods' batches",
                ("--methods", "softmax"): "unknown --methods 'softmax'",
                ("--margin", "2"): "unrecognized arguments: --margin 2",
                ("--device", "nonsense", "--one-shot-runs", tmp_path / "runs", "--weights", model): "nonsense",
                ("--quick", "--no-progress", "--omniglot-root", omniglot_root, "--selectors", "bogus"):
                    "unknown selector 'bogus'",
                ("--quick", "--omniglot-root", tmp_path / "nowhere"): "images_background_small1.zip",
                ("--quick", "--omniglot-root", not_a_zip): "is neither a folder nor a .zip file",
                ("--one-shot-runs", not_a_zip / "images_background_small1.zip", "--weights", model):
                    "is neither a folder nor a .zip file",
                ("--one-shot-runs", tmp_path / "m.pt", "--weights", model): "m.pt holds no runNN/class_labels.txt",
                ("--one-shot-runs", tmp_path / "runs", "--weights", tmp_path / "none.pt"): "no weights at",
                ("--one-shot-runs", tmp_path / "runs", "--weights", not_a_zip / "images_background_small1.zip"):
                    "is not a model file"}
    outcomes = command_lines(os.path.join(REPOSITORY, "omniglot.py"), list(mistakes), tmp_path)
    for (arguments, message), (status, stdout, stderr) in zip(mistakes.items(), outcomes):
        assert status == 2 and "Traceback" not in stderr, (arguments, stderr)
        assert len(stderr.splitlines()) == 1 and stderr.startswith("omniglot.py: error: "), (arguments, stderr)
        assert message in stderr, (arguments, stderr)
    assert os.listdir(tmp_path / "not-a-zip") == ["images_background_small1.zip"]  # nothing written anywhere
    status, stdout, stderr = _command_line(["--one-shot-runs", tmp_path / "runs", "--weights", model], tmp_path)
    assert status == 0 and stdout.strip().splitlines()[-1].startswith("mean error: "), stderr


def _digests(*folders):
    """{path: sha256} of every file under the folders."""
    digests = {}
    for folder in folders:
        for current, _, files in os.walk(folder):
            for name in files:
                with open(os.path.join(current, name), "rb") as file:
                    digests[os.path.join(current, name)] = hashlib.sha256(file.read()).hexdigest()
    return digests


def test_where_a_run_writes_only_the_study_writes_the_committed_files(tmp_path):
    recipe, weights = omniglot_module.omniglot_settings(), omniglot_module.OMNIGLOT_WEIGHTS
    outputs = omniglot_module.omniglot_outputs
    assert outputs(recipe) == ("results", weights)
    quick = os.path.join("runs", "omniglot", "quick", "results")  # whatever its settings; no weights
    assert outputs(recipe, quick=True) == outputs({**recipe, "epochs": 1}, seed=2, quick=True) == (quick, None)
    trial = os.path.join("runs", "omniglot", "epochs-3")
    assert outputs({**recipe, "epochs": 3}) == (os.path.join(trial, "results"),
                                                os.path.join(trial, "models", "omniglot_siamese.pt"))
    assert outputs({**recipe, "epochs": 3}, weights=str(tmp_path / "mine.pt")) == (
        os.path.join(trial, "results"), str(tmp_path / "mine.pt"))
    assert outputs({**recipe, "epochs": 3}, weights=None, results_dir=None) == (None, None)
    assert outputs(recipe, seed=1, runs_dir="elsewhere")[0] == os.path.join("elsewhere", "omniglot", "seed-1", "results")
    assert outputs(recipe, n_episodes=50)[0] == os.path.join("runs", "omniglot", "episodes-50", "results")
    changed = outputs({**recipe, "method": "siamese", "augment": None, "quarter_turns": (0,)})[0]
    assert re.fullmatch(r"method-siamese_quarter-turns-[0-9a-f]{8}_augment-None",  # the recipe's order
                        os.path.basename(os.path.dirname(changed)))


def test_a_trial_run_leaves_the_committed_results_and_weights_alone(omniglot_root, tmp_path, monkeypatch, capsys):
    committed = tmp_path / "weights" / "omniglot_siamese.pt"
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_WEIGHTS", str(committed))  # the checkout's stays out of reach
    monkeypatch.chdir(tmp_path)
    before = _digests(os.path.join(REPOSITORY, "results"), os.path.join(REPOSITORY, "weights"))
    result = omniglot_module.main(["--epochs", "0", "--embedding-dim", "8", "--no-progress", "--omniglot-root",
                                   str(omniglot_root)])
    assert result["recipe"]["epochs"] == 0 and not result["quick"]
    folder = tmp_path / "runs" / "omniglot" / "embedding-dim-8_epochs-0"
    assert sorted(os.listdir(folder / "results")) == ["omniglot.json", "omniglot.md"]
    assert os.listdir(folder / "models") == ["omniglot_siamese.pt"]
    assert not committed.exists() and not (tmp_path / "results").exists()
    assert _digests(os.path.join(REPOSITORY, "results"), os.path.join(REPOSITORY, "weights")) == before
    weights = os.path.join("runs", "omniglot", "embedding-dim-8_epochs-0", "models", "omniglot_siamese.pt")
    assert f"Results in runs/omniglot/embedding-dim-8_epochs-0/results/omniglot.md; weights in {weights}." \
        in capsys.readouterr().out
