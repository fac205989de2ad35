"""runs.py: run folders. The settings file's format and its one upgrade function (format-1 folders written
by the old code, committed under tests/old_formats/run_folder/, still read back), the identity of a folder
of your own images, and the refusals that keep a row from being reused for other settings or other data."""

import json
import os
import shutil

import pytest
from PIL import Image

import experiments
import runs
from image_folders import folder_identity

OLD_RUN_FOLDERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "old_formats", "run_folder")
# How tests/old_formats/write_run_folder.py ran each of them (with the old code).
OLD_RUNS = {"online-contrastive": dict(method="online-contrastive"),
            "online-triplet-batch-hard": dict(method="online-triplet", selector="batch-hard", lr_step=3)}


def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")


@pytest.mark.parametrize("name", sorted(OLD_RUNS))
def test_a_format_1_run_folder_reads_its_finished_row_back(name, tmp_path, monkeypatch):
    run_dir = tmp_path / name
    shutil.copytree(os.path.join(OLD_RUN_FOLDERS, name), run_dir)
    written = {kept: (run_dir / kept).read_bytes() for kept in (runs.RUN_SETTINGS, runs.RUN_ROW)}
    monkeypatch.setattr(experiments, "fit", no_training)
    monkeypatch.setattr(experiments, "load_splits", no_training)
    row = experiments.run_method("mnist", epochs=1, images_dir=None, results_dir=None, progress=False,
                                 run_dir=str(run_dir), **OLD_RUNS[name])
    assert row == json.loads(written[runs.RUN_ROW])
    assert {kept: (run_dir / kept).read_bytes() for kept in written} == written  # read, not rewritten
    with pytest.raises(ValueError, match=r"other settings \(epochs.*--fresh"):
        experiments.run_method("mnist", epochs=2, images_dir=None, results_dir=None, progress=False,
                               run_dir=str(run_dir), **OLD_RUNS[name])


def test_the_upgrade_fills_in_what_format_1_left_out():
    with open(os.path.join(OLD_RUN_FOLDERS, "online-contrastive", runs.RUN_SETTINGS)) as file:
        old = json.load(file)
    assert "format_version" not in old and "network" not in old
    current = runs.upgrade_run_settings(old)
    assert current == {**old, "network": "embedding-net", "pretrained": None, "amp": None, "compile": False,
                       "margin": 1.0, "soft": False, "distance": "squared", "batch_norm": False, "easy_selector": None,
                       "batch_samples": 25, "lr_step": 8, "data": None, "format_version": runs.RUN_SETTINGS_VERSION}
    assert runs.upgrade_run_settings(current) == current  # the current format is left as it is
    # a recipe recorded without its batch shape (recorded only when not 25) keeps the others
    assert runs.upgrade_run_settings({**old, "batch_norm": True})["batch_norm"] is True
    with pytest.raises(ValueError, match="newer version"):
        runs.upgrade_run_settings({**current, "format_version": runs.RUN_SETTINGS_VERSION + 1})


def test_the_study_records_every_setting_in_the_current_format(tmp_path, monkeypatch):
    from fixtures import write_idx_fixture
    write_idx_fixture(tmp_path / "data", 25, 25)
    monkeypatch.chdir(tmp_path)
    experiments.run_method("mnist", "online-contrastive", quick=True, root="data", progress=False, run_dir="run",
                           images_dir=None, results_dir=None)
    settings = json.loads((tmp_path / "run" / runs.RUN_SETTINGS).read_text())
    assert settings["format_version"] == runs.RUN_SETTINGS_VERSION and settings["data"] is None
    assert (settings["network"], settings["lr_step"], settings["batch_samples"], settings["amp"]) == (
        "embedding-net", 8, 25, None)


def write_classes(root, classes, per_class=3, size=8):
    for position, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.new("RGB", (size, size), (40 * position, 10 * k, 0)).save(root / name / f"{k}.png")
    return root


def test_folder_identity_tells_two_folders_of_one_name_and_changed_data_apart(tmp_path):
    first = write_classes(tmp_path / "a" / "train", ["cat", "dog"])
    same = write_classes(tmp_path / "b" / "train", ["cat", "dog"])
    identity = folder_identity(first)
    assert set(identity) == {"path", "fingerprint", "images", "classes"}
    assert identity["path"] == os.path.realpath(first) and (identity["images"], identity["classes"]) == (6, 2)
    assert folder_identity(str(first)) == identity  # the same folder: the same identity
    other = folder_identity(same)
    assert other["fingerprint"] == identity["fingerprint"] and other["path"] != identity["path"]  # same files
    os.rename(first / "dog" / "2.png", first / "cat" / "9.png")  # relabelled
    assert folder_identity(first)["fingerprint"] != identity["fingerprint"]
    os.rename(first / "cat" / "9.png", first / "dog" / "2.png")
    assert folder_identity(first) == identity
    Image.new("RGB", (16, 16)).save(first / "dog" / "2.png")  # rewritten with another size
    assert folder_identity(first)["fingerprint"] != identity["fingerprint"]


def test_open_run_refuses_another_folder_and_changed_data_saying_what_to_do(tmp_path):
    settings = runs.upgrade_run_settings({"dataset": "train", "method": "softmax", "embedding_dim": 2, "epochs": 1,
                                          "seed": 0, "quick": False, "channels_last": False, "train_classes": None})
    first = write_classes(tmp_path / "a" / "train", ["cat", "dog"])
    data = runs.data_identity(str(first), known=False, folder_options={"image_size": 8, "max_memory_bytes": 1})
    assert data["options"] == {"image_size": 8}  # what shapes the splits, not how they are held
    run_dir = str(tmp_path / "run")
    assert runs.open_run(run_dir, {**settings, "data": data}) is None
    runs.record_finished_row(run_dir, {"method": "softmax", "precision_at_1": 0.5})
    assert runs.open_run(run_dir, {**settings, "data": data}) == {"method": "softmax", "precision_at_1": 0.5}

    second = write_classes(tmp_path / "b" / "train", ["bird", "fish", "frog"])
    elsewhere = runs.data_identity(str(second), known=False, folder_options={"image_size": 8})
    with pytest.raises(ValueError, match=r"another folder of images .*a/train.*--out-dir.*--fresh"):
        runs.open_run(run_dir, {**settings, "data": elsewhere})
    with pytest.raises(ValueError, match=r"other options.*--fresh"):
        runs.open_run(run_dir, {**settings, "data": {**data, "options": {"image_size": 16}}})
    write_classes(first, ["cow"])
    changed = runs.data_identity(str(first), known=False, folder_options={"image_size": 8})
    with pytest.raises(ValueError, match=r"images in .* changed .*6 images of 2 classes then, 9 of 3 now.*--fresh"):
        runs.open_run(run_dir, {**settings, "data": changed})
    with pytest.raises(ValueError, match=r"a run on data it did not record.*--fresh"):  # a format-1 folder
        shutil.copy(os.path.join(OLD_RUN_FOLDERS, "online-contrastive", runs.RUN_SETTINGS), run_dir)
        runs.open_run(run_dir, {**settings, "data": changed})
    assert runs.open_run(run_dir, {**settings, "data": changed}, fresh=True) is None  # --fresh starts over
