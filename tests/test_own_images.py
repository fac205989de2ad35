"""Training on a folder of your own images through the study's runner and command line: the splits,
held-out classes, the networks, the saved model file, and the errors for folders that cannot train."""

import json
import os

import pytest
import torch
from PIL import Image

import experiments
from model_file import embed_images, load_model

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 210), "grey": (128, 128, 128),
           "yellow": (220, 200, 20), "purple": (140, 40, 160)}


def write_folder(root, per_class=20, size=20, classes=COLOURS, seed=0):
    """One sub-folder per class of noisy images of the class's colour (PNG and JPEG, mixed sizes)."""
    generator = torch.Generator().manual_seed(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            side = size + (k % 3) * 4  # mixed sizes: resized to --image-size
            noise = torch.randint(-40, 40, (side, side, 3), generator=generator)
            pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{k}.{'png' if k % 2 else 'jpg'}")
    return root


def run(tmp_path, monkeypatch, *arguments):
    monkeypatch.chdir(tmp_path)
    return experiments.main(["--dataset", str(tmp_path / "shapes"), "--image-size", "20", "--epochs", "2",
                             "--no-progress", "--embedding-dim", "4", *arguments])


def test_a_folder_trains_with_held_out_classes_and_saves_one_model_file(tmp_path, monkeypatch):
    write_folder(tmp_path / "shapes")
    rows = run(tmp_path, monkeypatch, "--methods", "online-triplet", "--held-out-classes", "yellow,purple",
               "--save-model", str(tmp_path / "model.pt"))
    (row,) = rows
    assert row["dataset"] == "shapes" and row["method"] == "online-triplet/random-hard" and row["epochs"] == 2
    assert row["held_out_n_way"] == 2 and 0 <= row["held_out_one_shot"] <= 1
    outputs = tmp_path / "runs" / "shapes"  # a folder of your own images writes everything under runs/<its name>/
    table = (outputs / "results" / "shapes.md").read_text()
    assert "| online-triplet/random-hard | 4 |" in table and "held-out 1-shot acc" in table
    assert (outputs / "images" / "shapes_online-triplet-random-hard_4d_test.png").is_file()
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "runs", "shapes"]
    assert sorted(os.listdir(outputs)) == ["checkpoints", "images", "results"]  # no default model: --save-model

    model, info = load_model(tmp_path / "model.pt")
    assert info["class_names"] == ["blue", "green", "grey", "red"]  # the trained classes, not the held-out ones
    assert (info["image_size"], info["channels"], info["embedding_dim"]) == (20, 3, 4)
    assert 0 < info["threshold"] <= 1 and len(info["normalization"]["mean"]) == 3
    assert info["metrics"]["map_at_r"] == row["map_at_r"] and "--save-model" in info["command"]
    # the model file alone reproduces the run's embeddings: same normalisation, same weights
    from image_folders import load_folder_splits
    train, val, held_out = load_folder_splits(tmp_path / "shapes", image_size=20, held_out_classes="yellow,purple",
                                              progress=False)
    raw_train, _, _ = load_folder_splits(tmp_path / "shapes", image_size=20, held_out_classes="yellow,purple",
                                         progress=False)
    assert info["normalization"] == {"mean": list(train.mean), "std": list(train.std)}
    pixels = raw_train.data * torch.tensor(train.std).view(1, 3, 1, 1) + torch.tensor(train.mean).view(1, 3, 1, 1)
    assert torch.allclose(embed_images(model, pixels, normalization=info["normalization"]),
                          model.get_embedding(train.data).detach(), atol=1e-5)


def test_every_method_and_the_resnet_run_on_a_folder(tmp_path, monkeypatch):
    write_folder(tmp_path / "shapes", per_class=20, size=32, classes=dict(list(COLOURS.items())[:3]))
    monkeypatch.chdir(tmp_path)
    rows = experiments.main(["--dataset", str(tmp_path / "shapes"), "--epochs", "1", "--no-progress",
                             "--image-size", "32", "--methods", "softmax,siamese,online-contrastive"])
    assert [row["method"] for row in rows] == ["softmax", "siamese", "online-contrastive"]
    (row,) = experiments.main(["--dataset", str(tmp_path / "shapes"), "--epochs", "1", "--no-progress",
                               "--image-size", "32", "--methods", "online-contrastive", "--network", "resnet18",
                               "--embedding-dim", "8", "--save-model", str(tmp_path / "resnet.pt")])
    assert row["network"] == "resnet18"
    model, info = load_model(tmp_path / "resnet.pt")
    assert info["architecture"] == "resnet18" and info["embedding_dim"] == 8


def test_folders_that_cannot_train_say_what_to_do(tmp_path, monkeypatch):
    write_folder(tmp_path / "shapes", per_class=6, classes=dict(list(COLOURS.items())[:3]))
    for extra in (tmp_path / "shapes" / "red").iterdir():  # one image left in "red"
        if extra.name != "0.jpg":
            extra.unlink()
    with pytest.raises(ValueError, match=r"class 'red' has 1 training image.*--held-out-classes"):
        run(tmp_path, monkeypatch, "--methods", "online-triplet", "--val-fraction", "0.34")
    with pytest.raises(ValueError, match="saves one trained model, but 2 methods run"):
        run(tmp_path, monkeypatch, "--methods", "softmax,siamese", "--save-model", "x.pt")
    with pytest.raises(ValueError, match="--pretrained needs --network resnet18"):
        run(tmp_path, monkeypatch, "--methods", "softmax", "--pretrained", "weights.pth", "--val-fraction", "0.34")
    with pytest.raises(ValueError, match="at most one validation image.*--val-fraction"):  # before any training
        run(tmp_path, monkeypatch, "--methods", "softmax")
    assert experiments.dataset_name(tmp_path / "shapes") == "shapes"
    assert experiments.dataset_name("fashion-mnist") == "fashion-mnist"


def test_a_folder_run_resumes_like_the_study(tmp_path, monkeypatch):
    write_folder(tmp_path / "shapes", per_class=20, classes=dict(list(COLOURS.items())[:3]))
    first = run(tmp_path, monkeypatch, "--methods", "online-contrastive")
    again = run(tmp_path, monkeypatch, "--methods", "online-contrastive")  # finished: read back
    assert json.loads(json.dumps(first)) == again


def test_a_folder_too_large_for_memory_is_streamed_by_workers_and_trains_the_same(tmp_path, monkeypatch):
    write_folder(tmp_path / "shapes", per_class=20, classes=dict(list(COLOURS.items())[:3]))
    monkeypatch.chdir(tmp_path)
    rows = {}
    for limit in (None, 1):  # 1 byte: nothing fits, every image is read from disk when drawn
        folder = {"image_size": 20} if limit is None else {"image_size": 20, "max_memory_bytes": limit}
        rows[limit] = experiments.run_methods(str(tmp_path / "shapes"), ["softmax", "online-contrastive"], epochs=1,
                                              progress=False, folder=folder, run_dir=None, images_dir=None,
                                              results_dir=None)
    train, _, _ = experiments.load_folder_splits(tmp_path / "shapes", image_size=20, max_memory_bytes=1,
                                                 progress=False)
    assert not hasattr(train, "data") and experiments.data_workers(train) > 0
    for in_memory, streamed in zip(rows[None], rows[1]):
        for key in ("precision_at_1", "map_at_r", "final_train_loss"):
            assert streamed[key] == pytest.approx(in_memory[key], abs=1e-4), key


def test_a_folder_run_leaves_the_checkout_clean_and_says_where_its_outputs_are(tmp_path):
    """In a git checkout with the repository's .gitignore and committed results/ and images/, training on a
    folder of your own images (python experiments.py, as a new user runs it) leaves `git status` clean."""
    import shutil
    import subprocess
    import sys

    if shutil.which("git") is None:
        pytest.skip("needs git")
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = tmp_path / "checkout"
    for folder in ("results", "images"):
        (checkout / folder).mkdir(parents=True)
        (checkout / folder / "committed.txt").write_text("the study's\n")
    shutil.copy(os.path.join(repository, ".gitignore"), checkout / ".gitignore")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(checkout)]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "committed"]):
        subprocess.run(git + command, check=True, capture_output=True)
    write_folder(tmp_path / "train", classes=dict(list(COLOURS.items())[:3]))
    done = subprocess.run([sys.executable, os.path.join(repository, "experiments.py"), "--dataset",
                           str(tmp_path / "train"), "--image-size", "20", "--epochs", "1", "--no-progress",
                           "--methods", "softmax,online-contrastive"], cwd=checkout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert subprocess.run(git + ["status", "--porcelain", "--ignored=no"], capture_output=True, text=True,
                          check=True).stdout == ""
    outputs = os.path.join("runs", "train", "")
    assert f"Every output of this run is under {outputs}" in done.stdout
    assert f"Results in {os.path.join(outputs, 'results', 'train.md')}" in done.stdout
    # the model file of each method, where search.py finds it, and nothing anywhere else
    models = sorted(os.listdir(checkout / "runs" / "train" / "models"))
    assert models == ["train_online-contrastive.pt", "train_softmax.pt"]
    for model in models:
        assert f"Model saved to {os.path.join(outputs, 'models', model)}." in done.stdout
    assert sorted(os.listdir(checkout)) == [".git", ".gitignore", "images", "results", "runs"]
    assert os.listdir(checkout / "results") == os.listdir(checkout / "images") == ["committed.txt"]


def test_another_folder_of_the_same_name_never_reads_back_a_row_it_did_not_train(tmp_path, monkeypatch):
    write_folder(tmp_path / "a" / "train", classes=dict(list(COLOURS.items())[:3]))
    write_folder(tmp_path / "b" / "train", classes=dict(list(COLOURS.items())[3:]), seed=1)
    monkeypatch.chdir(tmp_path)
    common = ["--image-size", "20", "--epochs", "1", "--no-progress", "--methods", "online-contrastive"]
    (first,) = experiments.main(["--dataset", str(tmp_path / "a" / "train"), *common])
    with pytest.raises(ValueError, match=r"another folder of images .*a/train.*--out-dir"):
        experiments.main(["--dataset", str(tmp_path / "b" / "train"), *common])
    (second,) = experiments.main(["--dataset", str(tmp_path / "b" / "train"), *common, "--out-dir", "other"])
    assert second["precision_at_1"] != first["precision_at_1"] or second["final_train_loss"] != first[
        "final_train_loss"]  # trained on its own images, in its own folder
    assert os.path.isdir(tmp_path / "other" / "train" / "checkpoints")
    table = json.loads((tmp_path / "other" / "train" / "results" / "train.json").read_text())
    assert table == [json.loads(json.dumps(second))]


def test_changed_data_in_the_same_folder_is_refused_until_fresh(tmp_path, monkeypatch):
    write_folder(tmp_path / "shapes", classes=dict(list(COLOURS.items())[:3]))
    first = run(tmp_path, monkeypatch, "--methods", "online-contrastive")
    (tmp_path / "shapes" / "red" / "0.jpg").unlink()
    with pytest.raises(ValueError, match=r"images in .*shapes changed .*60 images of 3 classes then, 59 .*--fresh"):
        run(tmp_path, monkeypatch, "--methods", "online-contrastive")
    again = run(tmp_path, monkeypatch, "--methods", "online-contrastive", "--fresh")
    assert again[0]["final_train_loss"] != first[0]["final_train_loss"]  # trained anew on the 59 images


def test_save_model_on_a_finished_run_writes_the_model_of_its_checkpoint_or_says_why_not(tmp_path, monkeypatch,
                                                                                          capsys):
    write_folder(tmp_path / "shapes", classes=dict(list(COLOURS.items())[:3]))
    run(tmp_path, monkeypatch, "--methods", "online-contrastive", "--save-model", str(tmp_path / "trained.pt"))
    monkeypatch.setattr(experiments, "fit", lambda *args, **kwargs: pytest.fail("a finished run was trained again"))
    capsys.readouterr()
    (row,) = run(tmp_path, monkeypatch, "--methods", "online-contrastive", "--save-model", str(tmp_path / "later.pt"))
    assert f"Model saved to {tmp_path / 'later.pt'}." in capsys.readouterr().out
    trained, trained_info = load_model(tmp_path / "trained.pt")
    later, later_info = load_model(tmp_path / "later.pt")
    for name, weights in trained.state_dict().items():
        assert torch.equal(later.state_dict()[name], weights), name
    assert later_info["threshold"] == trained_info["threshold"] and later_info["metrics"]["map_at_r"] == row["map_at_r"]

    (run_dir,) = [folder for folder, _, files in os.walk(tmp_path / "runs") if "row.json" in files]
    os.remove(os.path.join(run_dir, "checkpoint.pt"))
    with pytest.raises(ValueError, match=r"not its checkpoint .*no model to save to .*missing.pt.*--fresh"):
        run(tmp_path, monkeypatch, "--methods", "online-contrastive", "--save-model", str(tmp_path / "missing.pt"))
    assert not (tmp_path / "missing.pt").exists() and "Model saved" not in capsys.readouterr().out
