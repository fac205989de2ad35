"""Tests for checkpoints.py: what a checkpoint holds, atomic writes, exact resume (global RNGs, private
generators, samplers), the errors of a resume that cannot be exact, corrupt files, and older formats: the
upgrade of a version-1 checkpoint and a checkpoint written by the library before the format had a version
(tests/old_formats/checkpoint/, written by tests/old_formats/write_checkpoint.py), resumed by today's fit.
Tiny synthetic data only."""

import importlib.util
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import checkpoints
from checkpoints import CHECKPOINT_NAME, find_generators
from metrics import AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric
from test_trainer import make_classification_data, make_loader, make_training, quiet_fit

OLD_FORMATS = Path(__file__).resolve().parent / "old_formats"


def _old_run():
    """tests/old_formats/write_checkpoint.py as a module: the run that wrote the committed old checkpoint."""
    spec = importlib.util.spec_from_file_location("write_checkpoint", OLD_FORMATS / "write_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- contents and atomic writes

def test_checkpoint_contents_and_no_temp_files(tmp_path):
    model, optimizer, scheduler = make_training()
    checkpoint_dir = tmp_path / "new" / "dir"
    history = quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 2,
                        checkpoint_dir=str(checkpoint_dir), metrics=[AccumulatedAccuracyMetric()])
    assert os.listdir(checkpoint_dir) == ["checkpoint.pt"]
    checkpoint = torch.load(checkpoint_dir / "checkpoint.pt", weights_only=True)
    assert set(checkpoint) == {"format_version", "epoch", "model", "optimizer", "scheduler", "history", "rng",
                               "generators", "grad_scaler", "loss_state"}
    assert checkpoint["format_version"] == checkpoints.FORMAT_VERSION == 3
    assert checkpoint["loss_state"] is None  # NLLLoss holds no state
    assert checkpoint["generators"] == {}  # the loader draws from the global RNG only
    assert checkpoint["grad_scaler"] is None  # float32 training scales no loss
    assert checkpoint["epoch"] == 2
    assert checkpoint["history"] == history
    assert checkpoint["scheduler"]["last_epoch"] == 2
    assert set(checkpoint["rng"]) == {"torch", "cuda", "numpy", "python"}
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, checkpoint["model"][name])


def test_a_failing_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    real_save = torch.save
    saves = []

    def save_then_fail_on_second_call(obj, file, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            file.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, file, *args, **kwargs)

    model, optimizer, scheduler = make_training()
    quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 1,
              checkpoint_dir=tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    saves.append(1)
    monkeypatch.setattr(torch, "save", save_then_fail_on_second_call)
    with pytest.raises(OSError, match="disk full"):
        quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 3,
                  checkpoint_dir=tmp_path, resume=True)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# ---------------------------------------------------------------- resume

class NoisyDataset(Dataset):
    """Adds numpy and python-random noise on every access, so replaying it needs their RNGs."""

    def __init__(self):
        self.x, self.y = make_classification_data(40)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index] + 0.1 * np.random.randn() + 0.1 * random.random(), self.y[index]


def run_resume_scenario(tmp_path, split_epochs, total_epochs=4, resume_argument=True):
    """Train `total_epochs` either straight (split_epochs=None) or as split_epochs, then a fresh
    model/optimizer/scheduler/loader resumed from the checkpoint. Uses global-RNG shuffling,
    dropout, and numpy/python randomness in the dataset."""
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    metrics = [AccumulatedAccuracyMetric()]

    def build(seed):
        model, optimizer, scheduler = make_training(seed=seed, dropout=0.3)
        loader = DataLoader(NoisyDataset(), batch_size=8, shuffle=True)
        return loader, model, optimizer, scheduler

    loader, model, optimizer, scheduler = build(seed=0)
    checkpoint_dir = tmp_path / "checkpoints"
    if split_epochs is None:
        history = quiet_fit(loader, make_loader(), model, nn.NLLLoss(), optimizer, scheduler,
                            total_epochs, metrics=metrics)
        return model, optimizer, history
    quiet_fit(loader, make_loader(), model, nn.NLLLoss(), optimizer, scheduler, split_epochs,
              metrics=metrics, checkpoint_dir=checkpoint_dir)
    # Disturb every RNG and start from different weights: the checkpoint must restore them all.
    torch.rand(17)
    np.random.rand(5)
    random.random()
    loader, model, optimizer, scheduler = build(seed=99)
    if resume_argument is True:
        history = quiet_fit(loader, make_loader(), model, nn.NLLLoss(), optimizer, scheduler,
                            total_epochs, metrics=metrics, checkpoint_dir=checkpoint_dir,
                            resume=True)
    else:
        target = checkpoint_dir if resume_argument == "dir" else checkpoint_dir / "checkpoint.pt"
        history = quiet_fit(loader, make_loader(), model, nn.NLLLoss(), optimizer, scheduler,
                            total_epochs, metrics=metrics, resume=target)
    return model, optimizer, history


def assert_same_run(first, second):
    (model_a, optimizer_a, history_a), (model_b, optimizer_b, history_b) = first, second
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(optimizer_a.state[a]["momentum_buffer"],
                           optimizer_b.state[b]["momentum_buffer"])
    assert optimizer_a.param_groups[0]["lr"] == optimizer_b.param_groups[0]["lr"]
    for key in history_a:
        if key != "seconds":
            assert history_a[key] == history_b[key], key
    assert len(history_b["seconds"]) == len(history_a["seconds"])


@pytest.mark.parametrize("split_epochs", [1, 3])
def test_resume_equals_an_uninterrupted_run(tmp_path, split_epochs):
    straight = run_resume_scenario(tmp_path / "a", None)
    resumed = run_resume_scenario(tmp_path / "b", split_epochs)
    assert resumed[2]["epoch"] == [1, 2, 3, 4]
    assert_same_run(straight, resumed)


@pytest.mark.parametrize("resume_argument", ["file", "dir"])
def test_resume_from_an_explicit_path(tmp_path, resume_argument):
    straight = run_resume_scenario(tmp_path / "a", None)
    resumed = run_resume_scenario(tmp_path / "b", 2, resume_argument=resume_argument)
    assert_same_run(straight, resumed)


def test_an_interrupted_run_differs_without_resume(tmp_path):
    # Guards the test above: a plain restart from the same weights does not replay the run.
    straight = run_resume_scenario(tmp_path / "a", None)
    torch.manual_seed(5)
    model, optimizer, scheduler = make_training(seed=0, dropout=0.3)
    loader = DataLoader(NoisyDataset(), batch_size=8, shuffle=True)
    quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, scheduler, 4)
    assert not all(torch.equal(a, b) for a, b in zip(straight[0].parameters(), model.parameters()))


def build_private_generator_run():
    """A triplet run whose every random draw but dropout comes from a torch.Generator of its own:
    the train DataLoader's (shuffle order and base seed), the validation RandomSampler's, and the
    triplet selector's (which negative is mined); the run of the old-format fixture, without its scheduler."""
    return _old_run().build()


def fit_private_generator_run(n_epochs, checkpoint_dir=None, resume=False):
    train_loader, val_loader, model, loss_fn, optimizer = build_private_generator_run()
    history = quiet_fit(train_loader, val_loader, model, loss_fn, optimizer, None, n_epochs,
                        metrics=[AverageNonzeroTripletsMetric()], checkpoint_dir=checkpoint_dir,
                        resume=resume)
    return model, history


def assert_same_weights_and_history(first, second):
    (model_a, history_a), (model_b, history_b) = first, second
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[name], state_b[name]) for name in state_a)
    assert {key: value for key, value in history_a.items() if key != "seconds"} == {
        key: value for key, value in history_b.items() if key != "seconds"}


def test_find_generators_reaches_loaders_samplers_and_the_selector_by_attribute_path():
    train_loader, val_loader, _, loss_fn, _ = build_private_generator_run()
    found = find_generators({"train_loader": train_loader, "val_loader": val_loader,
                             "loss_fn": loss_fn})
    # The train loader's generator is also its RandomSampler's: found once, on the shortest path.
    assert list(found) == ["train_loader.generator", "val_loader.sampler.generator",
                           "loss_fn.triplet_selector.generator"]
    assert found["train_loader.generator"] is train_loader.sampler.generator
    assert found["loss_fn.triplet_selector.generator"] is loss_fn.triplet_selector.generator

    class Holder:
        pass

    holder = Holder()
    holder.itself, holder.default = holder, torch.default_generator  # a cycle; the global RNG
    holder.items = [{"deep": torch.Generator()}]
    holder.many = [torch.Generator()] * (checkpoints.GENERATOR_SEARCH_MAX_ITEMS + 1)
    assert list(find_generators({"root": holder})) == ["root.items.0.deep"]


def test_resume_replays_runs_that_draw_from_private_generators(tmp_path):
    straight = fit_private_generator_run(4)
    assert all(count > 0 for count in straight[1]["train_average_nonzero_triplets"])
    fit_private_generator_run(2, checkpoint_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert sorted(checkpoint["generators"]) == [
        "loss_fn.triplet_selector.generator", "train_loader.generator",
        "val_loader.sampler.generator"]
    torch.rand(3)  # disturb the global RNG: the checkpoint restores it
    resumed = fit_private_generator_run(4, checkpoint_dir=tmp_path, resume=True)
    assert resumed[1]["epoch"] == [1, 2, 3, 4]
    assert_same_weights_and_history(straight, resumed)

    # Guards the equality above: a checkpoint without the generator states (as written before
    # they were saved: format version 1, which had no version number) still resumes, but the fresh
    # generators then replay other draws.
    del checkpoint["generators"], checkpoint["format_version"]
    torch.save(checkpoint, tmp_path / "old.pt")
    restarted_generators = fit_private_generator_run(4, resume=tmp_path / "old.pt")
    assert restarted_generators[1]["epoch"] == [1, 2, 3, 4]
    assert not all(torch.equal(a, b) for a, b in zip(straight[0].parameters(),
                                                     restarted_generators[0].parameters()))


def test_resuming_with_private_generators_elsewhere_says_the_run_was_built_differently(tmp_path):
    fit_private_generator_run(1, checkpoint_dir=tmp_path)
    train_loader, val_loader, model, loss_fn, optimizer = build_private_generator_run()
    plain_train_loader = DataLoader(train_loader.dataset, batch_size=12, shuffle=True)
    before = [parameter.clone() for parameter in model.parameters()]
    with pytest.raises(ValueError, match="built differently") as caught:
        quiet_fit(plain_train_loader, val_loader, model, loss_fn, optimizer, None, 2,
                  metrics=[AverageNonzeroTripletsMetric()], checkpoint_dir=tmp_path, resume=True)
    assert "train_loader.generator" in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    plain_dir = tmp_path / "plain"
    quiet_fit(plain_train_loader, val_loader, model, loss_fn, optimizer, None, 1,
              metrics=[AverageNonzeroTripletsMetric()], checkpoint_dir=plain_dir)
    with pytest.raises(ValueError, match="built differently"):
        quiet_fit(train_loader, val_loader, model, loss_fn, optimizer, None, 2,
                  metrics=[AverageNonzeroTripletsMetric()], checkpoint_dir=plain_dir, resume=True)


def test_resume_true_without_a_checkpoint_starts_from_scratch(tmp_path):
    model_a, optimizer_a, scheduler_a = make_training()
    model_b, optimizer_b, scheduler_b = make_training()
    torch.manual_seed(0)
    history_a = quiet_fit(make_loader(), None, model_a, nn.NLLLoss(), optimizer_a, scheduler_a, 2)
    torch.manual_seed(0)
    history_b = quiet_fit(make_loader(), None, model_b, nn.NLLLoss(), optimizer_b, scheduler_b, 2,
                          checkpoint_dir=tmp_path, resume=True)
    assert history_a["train_loss"] == history_b["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_resume_of_a_finished_run_returns_its_history_without_training(tmp_path):
    model, optimizer, scheduler = make_training()
    history = quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 2,
                        checkpoint_dir=tmp_path)
    fresh_model, fresh_optimizer, fresh_scheduler = make_training(seed=7)
    resumed = quiet_fit(make_loader(), None, fresh_model, nn.NLLLoss(), fresh_optimizer,
                        fresh_scheduler, 2, checkpoint_dir=tmp_path, resume=True)
    assert resumed == history
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


def test_resume_errors(tmp_path):
    model, optimizer, scheduler = make_training()
    loader = make_loader()
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1,
                  resume=tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="resume must be a path"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, resume=1)

    quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, scheduler, 1, checkpoint_dir=tmp_path,
              metrics=[AccumulatedAccuracyMetric()])
    with pytest.raises(ValueError, match="same metrics"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, scheduler, 2,
                  checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="scheduler"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 2, checkpoint_dir=tmp_path,
                  resume=True, metrics=[AccumulatedAccuracyMetric()])

    not_a_checkpoint = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_a_checkpoint)
    with pytest.raises(ValueError, match="not a checkpoint written by trainer.fit"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, resume=not_a_checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_checkpoint_names_the_file_and_leaves_the_run_alone(tmp_path, damage):
    model, optimizer, scheduler = make_training()
    quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 1,
              checkpoint_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    written = path.read_bytes()
    damaged = {"truncated": written[:len(written) // 2],
               "garbage": b"this is not a checkpoint at all\n" * 10, "empty": b""}[damage]
    path.write_bytes(damaged)
    fresh_model, fresh_optimizer, fresh_scheduler = make_training(seed=7)
    before = [parameter.clone() for parameter in fresh_model.parameters()]
    for resume in (True, path):
        with pytest.raises(ValueError) as caught:
            quiet_fit(make_loader(), None, fresh_model, nn.NLLLoss(), fresh_optimizer,
                      fresh_scheduler, 2, checkpoint_dir=tmp_path, resume=resume)
        message = str(caught.value)
        assert str(path) in message
        assert "not a readable checkpoint written by trainer.fit" in message
        assert "resume=False" in message
    assert all(torch.equal(a, b) for a, b in zip(before, fresh_model.parameters()))
    assert path.read_bytes() == damaged


# ---------------------------------------------------------------- format versions and older files

def _assert_same_history(first, second):
    """Every entry of two histories equal, the times apart."""
    assert first.keys() == second.keys() and first["epoch"] == second["epoch"]
    for key in first:
        if key != "seconds":
            assert first[key] == second[key], key


def test_a_checkpoint_written_before_format_versions_resumes_as_the_run_would_have_continued(tmp_path):
    old_file = OLD_FORMATS / "checkpoint" / CHECKPOINT_NAME
    old = torch.load(old_file, weights_only=True)
    assert "format_version" not in old and old["epoch"] == 1  # format version 1, after 1 epoch
    run = _old_run()
    seen_resumed, seen_current, seen_straight = [], [], []
    resumed_model, resumed = run.train(2, checkpoint_dir=tmp_path / "resumed", resume=old_file, seen=seen_resumed)
    assert resumed["epoch"] == [1, 2]
    assert {key: values[:1] for key, values in resumed.items()} == old["history"]  # epoch 1: the old run's own
    written = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=True)
    assert written["format_version"] == checkpoints.FORMAT_VERSION and written["epoch"] == 2

    # the same state in today's format (one upgrade) resumes to the same weights and history, bit for bit
    current = checkpoints.upgrade_checkpoint(old, old["history"].keys())
    assert current["generators"].keys() == old["generators"].keys()  # the old file's states, restored
    torch.save(current, tmp_path / "current.pt")
    current_model, current_history = run.train(2, resume=tmp_path / "current.pt", seen=seen_current)
    assert seen_resumed == seen_current
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.state_dict().values(),
                                                 current_model.state_dict().values()))
    _assert_same_history(resumed, current_history)

    # and it continues with the batches today's fit draws when it runs the same run from scratch: the same
    # batches of epoch 2, in the same order (the loaders' generators restored). The weights are not compared
    # with that run: the committed epoch 1 was mined by the old random-hard selector, whose draws came from
    # one generator sequence; today's draw per anchor (random_streams), so the same state mines other triplets.
    straight_model, straight = run.train(2, seen=seen_straight)
    assert seen_resumed == seen_straight[len(seen_straight) - len(seen_resumed):]
    assert resumed.keys() == straight.keys() and resumed["epoch"] == straight["epoch"]


def _fresh_checkpoint(tmp_path):
    """A checkpoint of today's fit after 1 epoch of the old-format run (collapse guard on), and its run."""
    run = _old_run()
    run.train(1, checkpoint_dir=tmp_path)
    return torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True), run


def test_upgrade_turns_a_version_1_checkpoint_into_the_current_format(tmp_path):
    fresh, _ = _fresh_checkpoint(tmp_path)
    keys = list(fresh["history"])
    old = dict(fresh, history={key: value for key, value in fresh["history"].items()
                               if key not in checkpoints.GUARD_KEYS})
    for key in ("format_version", "generators", "grad_scaler", "loss_state"):  # what version 1 may lack
        del old[key]
    upgraded = checkpoints.upgrade_checkpoint(old, keys)
    assert upgraded.keys() == fresh.keys() and upgraded["format_version"] == checkpoints.FORMAT_VERSION
    assert upgraded["generators"] is None and upgraded["grad_scaler"] is None  # none saved: none restored
    assert upgraded["loss_state"] is None
    version_2 = dict(fresh, format_version=2)
    del version_2["loss_state"]  # written before a loss could hold state
    assert checkpoints.upgrade_checkpoint(version_2, keys) == fresh
    assert upgraded["history"].keys() == set(keys)
    for key in checkpoints.GUARD_KEYS:
        assert len(upgraded["history"][key]) == 1 and math.isnan(upgraded["history"][key][0])
    assert all(upgraded["history"][key] == fresh["history"][key] for key in keys if key not in checkpoints.GUARD_KEYS)
    assert "generators" not in old and set(old["history"]) == set(keys) - checkpoints.GUARD_KEYS  # input untouched
    # a current checkpoint comes out as it went in (a new dict)
    same = checkpoints.upgrade_checkpoint(fresh, keys)
    assert same == fresh and same is not fresh


def test_a_version_1_checkpoint_without_generators_scaler_or_guard_keys_resumes(tmp_path):
    fresh, run = _fresh_checkpoint(tmp_path / "fresh")
    old = dict(fresh, history={key: value for key, value in fresh["history"].items()
                               if key not in checkpoints.GUARD_KEYS})
    for key in ("format_version", "generators", "grad_scaler", "loss_state"):
        del old[key]
    torch.save(old, tmp_path / "old.pt")
    _, history = run.train(2, resume=tmp_path / "old.pt")
    assert history["epoch"] == [1, 2]
    assert math.isnan(history["train_spread"][0]) and history["train_spread"][1] > 0
    assert history["train_loss"][0] == fresh["history"]["train_loss"][0]


def test_an_unknown_or_incomplete_format_is_refused_naming_the_file(tmp_path):
    fresh, run = _fresh_checkpoint(tmp_path / "fresh")
    for version in (checkpoints.FORMAT_VERSION + 1, 0, "2", True):
        torch.save(dict(fresh, format_version=version), tmp_path / "other.pt")
        with pytest.raises(ValueError, match="format_version") as caught:
            run.train(2, resume=tmp_path / "other.pt")
        assert str(tmp_path / "other.pt") in str(caught.value)
    incomplete = dict(fresh)
    del incomplete["generators"]  # a current-format file always holds them
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by trainer.fit"):
        run.train(2, resume=tmp_path / "incomplete.pt")
