"""Tests for trainer.py: batch conventions, scheduler order, history, NaN handling, atomic
checkpoints, exact resume, device choice and argument checks. Tiny synthetic data only."""

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import trainer
from losses import OnlineTripletLoss
from metrics import AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, Metric
from networks import AutoencoderOutput
from trainer import find_generators, fit, resolve_device, run_epoch, train_epoch
from utils import RandomNegativeTripletSelector

REPOSITORY = Path(__file__).resolve().parent.parent


def make_classification_data(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def make_loader(n=32, batch_size=8, shuffle=False, seed=0):
    x, y = make_classification_data(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_classifier(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 2),
                         nn.LogSoftmax(dim=1))


def make_training(seed=0, lr=0.1, step_size=2, gamma=0.5, dropout=0.0):
    model = make_classifier(seed, dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    return model, optimizer, scheduler


def quiet_fit(*args, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("log_interval", 10_000)
    return fit(*args, **kwargs)


class RecordingMetric(Metric):
    """Stores what the trainer passes to a metric."""

    def __init__(self, name="Recorded"):
        self.calls = []
        self._name = name

    def __call__(self, outputs, target, loss):
        self.calls.append((outputs, target, loss))
        return self.value()

    def reset(self):
        pass

    def value(self):
        return float(len(self.calls))

    def name(self):
        return self._name


# ---------------------------------------------------------------- batch conventions

def test_tensor_data_tensor_target_and_metric_protocol():
    seen_by_loss = []

    def loss_fn(*args):
        seen_by_loss.append(args)
        return F.nll_loss(*args)

    model, optimizer, _ = make_training()
    metric = RecordingMetric()
    quiet_fit(make_loader(), None, model, loss_fn, optimizer, None, 1, metrics=[metric])
    assert len(seen_by_loss) == 4
    scores, labels = seen_by_loss[0]
    assert scores.shape == (8, 2) and labels.shape == (8,)
    outputs, target, loss = metric.calls[0]
    # a single model output is wrapped in a tuple; the target arrives as a tuple
    assert isinstance(outputs, tuple) and len(outputs) == 1 and outputs[0].shape == (8, 2)
    assert isinstance(target, tuple) and len(target) == 1 and torch.equal(target[0], labels)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, x1, x2):
        return self.linear(x1), self.linear(x2)


class PairDataset(Dataset):
    """((x_i, x_{i+1}), same) items, like SiameseMNIST."""

    def __init__(self):
        self.x, self.y = make_classification_data(16)

    def __len__(self):
        return 15

    def __getitem__(self, index):
        return (self.x[index], self.x[index + 1]), int(self.y[index] == self.y[index + 1])


def test_tuple_data_calls_model_with_every_tensor_and_tuple_outputs_reach_the_loss():
    seen = []

    def contrastive(output1, output2, target):
        seen.append((output1.shape, output2.shape, target.shape))
        distances = (output1 - output2).pow(2).sum(1)
        return (target * distances + (1 - target) * F.relu(1 - distances)).mean()

    model = PairNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(PairDataset(), batch_size=5)
    history = quiet_fit(loader, loader, model, contrastive, optimizer, None, 1)
    assert seen[0] == (torch.Size([5, 3]), torch.Size([5, 3]), torch.Size([5]))
    assert len(seen) == 6  # 3 train + 3 val batches
    assert history["val_loss"][0] is not None


class TripletDataset(Dataset):
    """((anchor, positive, negative), []) items, like TripletMNIST."""

    def __init__(self):
        self.x, _ = make_classification_data(12)

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return (self.x[index], self.x[index + 1], self.x[index + 2]), []


class TripletNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, anchor, positive, negative):
        return self.linear(anchor), self.linear(positive), self.linear(negative)


def test_empty_target_is_not_passed_to_the_loss_and_metrics_get_none():
    seen = []

    def triplet_loss(anchor, positive, negative):
        seen.append(3)
        return F.relu((anchor - positive).pow(2).sum(1) - (anchor - negative).pow(2).sum(1)
                      + 1.0).mean()

    model = TripletNetLike()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TripletDataset(), batch_size=4)
    metric = RecordingMetric()
    quiet_fit(loader, None, model, triplet_loss, optimizer, None, 1, metrics=[metric])
    assert len(seen) == 3
    outputs, target, _ = metric.calls[0]
    assert len(outputs) == 3 and target is None


def test_tuple_target_is_spread_into_separate_loss_arguments():
    seen = []

    def loss_fn(scores, labels, weights):
        seen.append((labels.shape, weights.shape))
        return (F.nll_loss(scores, labels, reduction="none") * weights).mean()

    x, y = make_classification_data(12)
    batches = [(x[i:i + 4], (y[i:i + 4], torch.ones(4))) for i in range(0, 12, 4)]
    model, optimizer, _ = make_training()
    metric = AccumulatedAccuracyMetric()
    history = quiet_fit(batches, None, model, loss_fn, optimizer, None, 1, metrics=[metric])
    assert seen == [(torch.Size([4]), torch.Size([4]))] * 3
    assert 0.0 <= history["train_accuracy"][0] <= 100.0


def test_tuple_loss_output_minimises_the_first_element_and_feeds_metrics():
    def loss_with_count(scores, labels):
        loss = F.nll_loss(scores, labels)
        return loss, 3 if labels[0] == 0 else torch.tensor(5)

    x, y = make_classification_data(16)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    model, optimizer, _ = make_training()
    reference_model, reference_optimizer, _ = make_training()
    history = quiet_fit(batches, batches, model, loss_with_count, optimizer, None, 1,
                        metrics=[AverageNonzeroTripletsMetric()])
    for data, target in batches:
        reference_optimizer.zero_grad()
        F.nll_loss(reference_model(data), target).backward()
        reference_optimizer.step()
    for parameter, reference in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(parameter, reference)
    counts = [3 if target[0] == 0 else 5 for _, target in batches]
    assert history["train_average_nonzero_triplets"] == [pytest.approx(np.mean(counts))]
    assert history["val_average_nonzero_triplets"] == [pytest.approx(np.mean(counts))]


class AutoencoderLike(nn.Module):
    """Returns a networks.AutoencoderOutput (a NamedTuple) like Autoencoder does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.decoder = nn.Linear(4, 2), nn.Linear(2, 4)

    def forward(self, x):
        latent = self.encoder(x)
        return AutoencoderOutput(latent, self.decoder(latent), latent)


def test_a_named_tuple_output_reaches_the_loss_and_metrics_as_one_argument():
    seen = []

    def reconstruction_loss(output, labels):  # spread, the output would be 4 arguments
        seen.append(type(output))
        return F.mse_loss(output.reconstruction, output.reconstruction.detach() + 1)

    model = AutoencoderLike()
    metric = RecordingMetric()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    history = quiet_fit(make_loader(), make_loader(), model, reconstruction_loss, optimizer, None,
                        1, metrics=[metric])
    assert seen == [AutoencoderOutput] * 8
    outputs, _, _ = metric.calls[0]
    assert type(outputs) is tuple and len(outputs) == 1
    assert isinstance(outputs[0], AutoencoderOutput) and outputs[0].log_var is None
    assert history["train_loss"][0] == pytest.approx(1.0)


def test_fit_equals_a_hand_written_training_loop():
    train_loader, val_loader = make_loader(), make_loader(seed=1)
    model, optimizer, _ = make_training()
    history = quiet_fit(train_loader, val_loader, model, nn.NLLLoss(), optimizer, None, 2)

    reference_model, reference_optimizer, _ = make_training()
    expected_train, expected_val = [], []
    for _ in range(2):
        reference_model.train()
        losses = []
        for data, target in train_loader:
            reference_optimizer.zero_grad()
            loss = F.nll_loss(reference_model(data), target)
            loss.backward()
            reference_optimizer.step()
            losses.append(loss.item())
        expected_train.append(sum(losses) / len(losses))
        reference_model.eval()
        with torch.no_grad():
            losses = [F.nll_loss(reference_model(data), target).item()
                      for data, target in val_loader]
        expected_val.append(sum(losses) / len(losses))
    for parameter, reference in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(parameter, reference)
    assert history["train_loss"] == expected_train
    assert history["val_loss"] == expected_val


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.modes = []

    def forward(self, x):
        self.modes.append((self.training, torch.is_grad_enabled(), x.device))
        return F.log_softmax(self.linear(x), dim=1)


def test_training_runs_in_train_mode_and_validation_in_eval_mode_without_grad():
    model = ModeRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quiet_fit(make_loader(n=16), make_loader(n=8), model, nn.NLLLoss(), optimizer, None, 1,
              device="cpu")
    cpu = torch.device("cpu")
    assert model.modes == [(True, True, cpu)] * 2 + [(False, False, cpu)]


# ---------------------------------------------------------------- scheduler

def scheduler_warnings(caught):
    return [w for w in caught if "lr_scheduler" in str(w.message)]


def test_scheduler_steps_after_the_optimizer_without_warning_and_follows_steplr():
    model, optimizer, scheduler = make_training(lr=0.1, step_size=2, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 5)
    assert scheduler_warnings(caught) == []
    assert caught == []
    # the lr used in epoch e (0-based) is 0.1 * 0.5 ** (e // 2); after 5 epochs 0.1 * 0.5 ** 2
    assert history["lr"] == pytest.approx([0.1 * 0.5 ** (e // 2) for e in range(5)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (5 // 2))


def test_start_epoch_fast_forwards_the_scheduler_without_warning():
    model, optimizer, scheduler = make_training(lr=0.1, step_size=2, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 5,
                            start_epoch=3)
    assert scheduler_warnings(caught) == []
    assert history["epoch"] == [4, 5]
    assert history["lr"] == pytest.approx([0.1 * 0.5 ** (3 // 2), 0.1 * 0.5 ** (4 // 2)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (5 // 2))


def test_reduce_lr_on_plateau_steps_on_the_validation_loss_else_the_training_loss():
    calls = {"val": 0}

    def loss_fn(scores, labels):
        if torch.is_grad_enabled():  # training: a loss that never improves
            return scores.sum() * 0 + 1.0
        calls["val"] += 1  # validation: a loss that improves every epoch
        return scores.sum() * 0 + 1.0 / calls["val"]

    histories = {}
    for with_validation in (True, False):
        model = make_classifier()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5,
                                                               patience=0)
        loader = make_loader(batch_size=32)
        histories[with_validation] = quiet_fit(loader, loader if with_validation else None,
                                               model, loss_fn, optimizer, scheduler, 4)
    assert histories[True]["lr"] == [1.0, 1.0, 1.0, 1.0]
    # the flat training loss is a plateau from the second epoch on: halve after each epoch
    assert histories[False]["lr"] == [1.0, 1.0, 0.5, 0.25]


# ---------------------------------------------------------------- history and logging

def test_history_contents():
    model, optimizer, scheduler = make_training()
    loader = make_loader()
    history = quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, scheduler, 3,
                        metrics=[AccumulatedAccuracyMetric(), RecordingMetric("My Metric  2")])
    assert list(history) == ["epoch", "train_loss", "val_loss", "lr", "seconds",
                             "train_accuracy", "val_accuracy", "train_my_metric__2",
                             "val_my_metric__2", "train_spread", "val_spread", "train_spread_at_start",
                             "val_spread_at_start"]  # the collapse guard's last
    assert history["epoch"] == [1, 2, 3]
    assert history["val_loss"] == [None] * 3
    assert history["val_accuracy"] == [None] * 3
    assert all(isinstance(value, float) and value > 0 for value in history["train_loss"])
    assert all(isinstance(value, float) and value >= 0 for value in history["seconds"])
    assert all(0 <= value <= 100 for value in history["train_accuracy"])
    assert history["train_my_metric__2"] == [4.0, 8.0, 12.0]  # calls so far: never reset


def test_zero_epochs_returns_empty_history_and_leaves_the_model_alone():
    model, optimizer, _ = make_training()
    before = [p.clone() for p in model.parameters()]
    history = quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, None, 0,
                        metrics=[AccumulatedAccuracyMetric()])
    assert history == {"epoch": [], "train_loss": [], "val_loss": [], "lr": [], "seconds": [],
                       "train_accuracy": [], "val_accuracy": [], "train_spread": [], "val_spread": [],
                       "train_spread_at_start": [], "val_spread_at_start": []}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_progress_false_prints_every_log_interval_and_per_epoch(capsys):
    model, optimizer, _ = make_training()
    fit(make_loader(), make_loader(), model, nn.NLLLoss(), optimizer, None, 2, log_interval=2,
        metrics=[AccumulatedAccuracyMetric()], progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * (2 + 2 + 1)
    assert lines[0].startswith("train epoch 1/2 [batch 2/4]: loss ")
    assert "accuracy" in lines[0]
    assert lines[2].startswith("val epoch 1/2 [batch 2/4]")
    assert lines[4].startswith("Epoch 1/2: train loss ") and "val loss" in lines[4]


def test_progress_bar_goes_to_stderr_and_prints_nothing(capsys):
    model, optimizer, _ = make_training()
    fit(make_loader(), make_loader(), model, nn.NLLLoss(), optimizer, None, 1,
        metrics=[AccumulatedAccuracyMetric()])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "epoch 1/1 train" in captured.err and "accuracy" in captured.err
    assert "epoch 1/1 val" in captured.err


# ---------------------------------------------------------------- NaN handling and checkpoints

class NonFiniteAfter:
    """NLL loss that turns into `bad_value` from call number `good_calls + 1` on."""

    def __init__(self, good_calls, bad_value=float("nan")):
        self.good_calls = good_calls
        self.bad_value = bad_value
        self.calls = 0

    def __call__(self, scores, labels):
        self.calls += 1
        loss = F.nll_loss(scores, labels)
        return loss * self.bad_value if self.calls > self.good_calls else loss


@pytest.mark.parametrize("good_calls, bad_value, message", [
    (8, float("nan"), r"train loss is nan at epoch 2/3, batch 1"),
    (10, float("inf"), r"train loss is inf at epoch 2/3, batch 3"),
    (13, float("nan"), r"val loss is nan at epoch 2/3, batch 2"),
])
def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, good_calls,
                                                                        bad_value, message):
    model, optimizer, scheduler = make_training()
    loader = make_loader()  # 4 batches: each epoch makes 4 train + 4 val loss calls
    with pytest.raises(FloatingPointError, match=message):
        quiet_fit(loader, loader, model, NonFiniteAfter(good_calls, bad_value), optimizer,
                  scheduler, 3, checkpoint_dir=tmp_path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    checkpoint_bytes = (tmp_path / "checkpoint.pt").read_bytes()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    if good_calls == 8:  # nothing stepped in epoch 2: the weights are the checkpointed ones
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, checkpoint["model"][name])
    for parameter in model.parameters():
        assert torch.isfinite(parameter).all()

    # A second failing run over the same directory leaves the file byte for byte intact.
    with pytest.raises(FloatingPointError):
        quiet_fit(loader, loader, model, NonFiniteAfter(0), optimizer, scheduler, 3,
                  checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint_bytes
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_checkpoint_contents_and_no_temp_files(tmp_path):
    model, optimizer, scheduler = make_training()
    checkpoint_dir = tmp_path / "new" / "dir"
    history = quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 2,
                        checkpoint_dir=str(checkpoint_dir), metrics=[AccumulatedAccuracyMetric()])
    assert os.listdir(checkpoint_dir) == ["checkpoint.pt"]
    checkpoint = torch.load(checkpoint_dir / "checkpoint.pt", weights_only=True)
    assert set(checkpoint) == {"epoch", "model", "optimizer", "scheduler", "history", "rng",
                               "generators", "grad_scaler"}
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


def build_private_generator_run(seed=0):
    """A triplet run whose every random draw but dropout comes from a torch.Generator of its own:
    the train DataLoader's (shuffle order and base seed), the validation RandomSampler's, and the
    triplet selector's (which negative is mined)."""
    torch.manual_seed(seed)
    x = torch.randn(48, 4)
    labels = torch.arange(48) % 4
    train_loader = DataLoader(TensorDataset(x, labels), batch_size=12, shuffle=True,
                              generator=torch.Generator().manual_seed(1))
    val_set = TensorDataset(x[:24] + 0.1, labels[:24])
    val_loader = DataLoader(val_set, batch_size=8, sampler=RandomSampler(
        val_set, generator=torch.Generator().manual_seed(2)))
    selector = RandomNegativeTripletSelector(1.0, generator=torch.Generator().manual_seed(3))
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train_loader, val_loader, model, OnlineTripletLoss(1.0, selector), optimizer


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
    holder.many = [torch.Generator()] * (trainer.GENERATOR_SEARCH_MAX_ITEMS + 1)
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
    # they were saved) still resumes, but the fresh generators then replay other draws.
    del checkpoint["generators"]
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


class EpochSeededBatchSampler:
    """Batch sampler whose order depends only on the epoch given to set_epoch."""

    def __init__(self, n, batch_size):
        self.n, self.batch_size = n, batch_size
        self.epoch = 0
        self.epochs_set = []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __len__(self):
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 + self.epoch))
        return iter(order.view(-1, self.batch_size).tolist())


def test_set_epoch_is_called_before_every_epoch_and_resume_replays_the_batches(tmp_path):
    x, y = make_classification_data(32)

    def run(n_epochs, resume):
        sampler = EpochSeededBatchSampler(32, 8)
        loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler)
        model, optimizer, scheduler = make_training()
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, scheduler, n_epochs,
                  checkpoint_dir=tmp_path / str(resume), resume=resume)
        return model, sampler

    straight, straight_sampler = run(3, resume=False)
    assert straight_sampler.epochs_set == [0, 1, 2]
    run(1, resume=True)
    resumed, resumed_sampler = run(3, resume=True)
    assert resumed_sampler.epochs_set == [1, 2]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_set_epoch_reaches_a_plain_sampler_too():
    class EpochSampler(torch.utils.data.SequentialSampler):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    x, y = make_classification_data(16)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=8, sampler=EpochSampler(dataset))
    model, optimizer, _ = make_training()
    quiet_fit(loader, loader, model, nn.NLLLoss(), optimizer, None, 2)
    assert EpochSampler.epochs == [0, 0, 1, 1]  # train and val loader before each epoch


class CountingBatchSampler(EpochSeededBatchSampler):
    """Records the epoch of every iteration started over it."""

    def __init__(self, n, batch_size):
        super().__init__(n, batch_size)
        self.iterated = []

    def __iter__(self):
        self.iterated.append(self.epoch)
        return super().__iter__()


@pytest.mark.parametrize("progress", [False, True])
def test_each_epoch_iterates_each_loader_once(progress):
    """A second iterator per epoch (tqdm.auto's bar builds one eagerly) would start the DataLoader
    workers twice and, with a sampler that counts its passes, train on the wrong epoch's batches."""
    x, y = make_classification_data(16)
    train_sampler, val_sampler = CountingBatchSampler(16, 8), CountingBatchSampler(16, 8)
    train_loader = DataLoader(TensorDataset(x, y), batch_sampler=train_sampler)
    val_loader = DataLoader(TensorDataset(x, y), batch_sampler=val_sampler)
    model, optimizer, _ = make_training()
    fit(train_loader, val_loader, model, nn.NLLLoss(), optimizer, None, 3, device="cpu", progress=progress)
    assert train_sampler.iterated == val_sampler.iterated == [0, 1, 2]


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


# ---------------------------------------------------------------- device

def test_resolve_device_prefers_explicit_device_then_cuda_flag_then_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    assert resolve_device(cuda=False) == torch.device("cpu")
    assert resolve_device("cpu", cuda=True) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device() == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == torch.device("cuda")
    assert resolve_device(cuda=True) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device(cuda=False) == torch.device("cpu")


def test_resolve_device_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for bad in ("gpu", "", "cuda:x"):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(0)
    with pytest.raises(ValueError, match="CUDA was requested"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA was requested"):
        resolve_device(cuda=True)
    with pytest.raises(ValueError, match="MPS was requested"):
        resolve_device("mps")
    with pytest.raises(TypeError, match="cuda must be"):
        resolve_device(cuda="yes")


def test_fit_device_arguments(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = ModeRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = make_loader(n=8)
    quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, cuda=False)
    quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, device=torch.device("cpu"))
    assert {device for _, _, device in model.modes} == {torch.device("cpu")}
    with pytest.raises(ValueError, match="unknown device"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, device="gpu")
    with pytest.raises(ValueError, match="CUDA was requested"):
        quiet_fit(loader, None, model, nn.NLLLoss(), optimizer, None, 1, cuda=True)


# ---------------------------------------------------------------- classic entry points

def test_classic_positional_call():
    model, optimizer, scheduler = make_training()
    loader = make_loader()
    history = fit(loader, loader, model, nn.NLLLoss(), optimizer, scheduler, 2, False, 10_000,
                  [AccumulatedAccuracyMetric()], 0, progress=False)
    assert history["epoch"] == [1, 2]


def test_classic_train_epoch_and_test_epoch():
    model, optimizer, _ = make_training()
    metric = AccumulatedAccuracyMetric()
    loss, metrics = train_epoch(make_loader(), model, nn.NLLLoss(), optimizer, False, 10_000,
                                [metric])
    assert isinstance(loss, float) and metrics == [metric] and metric.total == 32
    assert model.training
    loss, metrics = trainer.test_epoch(make_loader(), model, nn.NLLLoss(), False, [metric])
    assert isinstance(loss, float) and metric.total == 32 and not model.training


def test_run_epoch_returns_mean_loss_and_metric_values():
    model = make_classifier()
    x, y = make_classification_data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    loss, values = run_epoch(batches, model, nn.NLLLoss(), torch.device("cpu"),
                             [AccumulatedAccuracyMetric()])
    with torch.no_grad():
        expected = (F.nll_loss(model(x[:8]), y[:8]).item() + F.nll_loss(model(x[8:]), y[8:]).item())
    assert loss == pytest.approx(expected / 2)
    accuracy = (model(x).argmax(1) == y).float().mean().item() * 100
    assert values == {"accuracy": pytest.approx(accuracy)}


# ---------------------------------------------------------------- argument errors

def test_argument_errors(tmp_path):
    model, optimizer, scheduler = make_training()
    loader = make_loader()
    loss = nn.NLLLoss()

    def call(**overrides):
        arguments = dict(train_loader=loader, val_loader=None, model=model, loss_fn=loss,
                         optimizer=optimizer, scheduler=scheduler, n_epochs=1)
        arguments.update(overrides)
        return quiet_fit(**arguments)

    cases = [
        (TypeError, "train_loader must be an iterable", dict(train_loader=5)),
        (TypeError, "one-shot iterator", dict(train_loader=iter(list(loader)))),
        (TypeError, "val_loader must be an iterable", dict(val_loader=3.0)),
        (TypeError, "model must be a torch.nn.Module", dict(model=lambda x: x)),
        (TypeError, "loss_fn must be callable", dict(loss_fn="nll")),
        (TypeError, "optimizer must be a torch.optim.Optimizer", dict(optimizer=object())),
        (TypeError, "scheduler must be", dict(scheduler=0.5)),
        (ValueError, "different optimizer",
         dict(scheduler=torch.optim.lr_scheduler.StepLR(
             torch.optim.SGD(make_classifier().parameters(), lr=0.1), 1))),
        (TypeError, "n_epochs must be an int", dict(n_epochs=2.0)),
        (TypeError, "n_epochs must be an int", dict(n_epochs=True)),
        (ValueError, "n_epochs must be >= 0", dict(n_epochs=-1)),
        (TypeError, "log_interval must be an int", dict(log_interval="10")),
        (ValueError, "log_interval must be >= 1", dict(log_interval=0)),
        (TypeError, "start_epoch must be an int", dict(start_epoch=None)),
        (ValueError, "start_epoch must be >= 0", dict(start_epoch=-2)),
        (ValueError, "n_epochs is the total number", dict(start_epoch=2)),
        (TypeError, "wrap a single metric in a list", dict(metrics=AccumulatedAccuracyMetric())),
        (TypeError, "metrics must be a list", dict(metrics="accuracy")),
        (TypeError, "every metric must be a metrics.Metric", dict(metrics=[lambda o, t, l: 0])),
        (ValueError, "distinct", dict(metrics=[AccumulatedAccuracyMetric(),
                                               AccumulatedAccuracyMetric()])),
        (ValueError, "not 'loss'", dict(metrics=[RecordingMetric("Loss")])),
        (TypeError, "progress must be", dict(progress=1)),
        (TypeError, "cuda must be", dict(cuda="no")),
        (TypeError, "device must be", dict(device=1)),
        (ValueError, "unknown device", dict(device="tpu")),
        (TypeError, "checkpoint_dir must be a path", dict(checkpoint_dir=3)),
    ]
    for error, message, overrides in cases:
        with pytest.raises(error, match=message):
            call(**overrides)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        call(checkpoint_dir=a_file)
    assert call(metrics=None)["epoch"] == [1]


def test_batch_and_loss_errors():
    model, optimizer, _ = make_training()
    x, y = make_classification_data(8)
    with pytest.raises(ValueError, match="train loader yielded no batches"):
        quiet_fit([], None, model, nn.NLLLoss(), optimizer, None, 1)
    with pytest.raises(ValueError, match="val loader yielded no batches"):
        quiet_fit([(x, y)], [], model, nn.NLLLoss(), optimizer, None, 1)
    with pytest.raises(TypeError, match=r"\(data, target\) pair"):
        quiet_fit([x], None, model, nn.NLLLoss(), optimizer, None, 1)
    with pytest.raises(TypeError, match="loss_fn must return a tensor"):
        quiet_fit([(x, y)], None, model, lambda scores, labels: 1.0, optimizer, None, 1)


def test_metric_key_naming():
    assert trainer.metric_key(AccumulatedAccuracyMetric()) == "accuracy"
    assert trainer.metric_key(AverageNonzeroTripletsMetric()) == "average_nonzero_triplets"


def test_channels_last_trains_the_same_model_up_to_rounding():
    from networks import EmbeddingNet

    def train(channels_last):
        torch.manual_seed(0)
        images, labels = torch.randn(64, 1, 28, 28), torch.arange(64) % 4
        model = nn.Sequential(EmbeddingNet(embedding_dim=4), nn.Linear(4, 4), nn.LogSoftmax(dim=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
        history = trainer.fit(loader, loader, model, nn.NLLLoss(), optimizer, None, 2, progress=False,
                      device="cpu", channels_last=channels_last)
        return model, history

    plain, plain_history = train(False)
    fast, fast_history = train(True)
    conv = fast[0].convnet[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.parameters(), fast.parameters()):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert plain_history["train_loss"] == pytest.approx(fast_history["train_loss"], rel=1e-4)
    loader = DataLoader(TensorDataset(torch.randn(4, 1, 28, 28), torch.arange(4)), batch_size=2)
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        trainer.fit(loader, None, plain, nn.NLLLoss(), torch.optim.SGD(plain.parameters(), lr=0.1), None, 1,
            progress=False, channels_last="yes")


def _denormal_survives():
    """True when the CPU keeps denormal floats (flush-to-zero off): 1e-39 is below float32's smallest
    normal number, 1.18e-38."""
    return bool((torch.full((64,), 1e-39) * 1.0 != 0).all())


def test_flush_denormal_turns_flush_to_zero_on_for_cpu_training_and_false_leaves_it_alone():
    try:
        torch.set_flush_denormal(False)
        assert _denormal_survives()
        model, optimizer, scheduler = make_training()
        quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 1, device="cpu",
                  flush_denormal=False)
        assert _denormal_survives()
        quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, scheduler, 2, start_epoch=1,
                  device="cpu")
        assert not _denormal_survives()
        with pytest.raises(TypeError, match="flush_denormal must be True or False"):
            quiet_fit(make_loader(), None, model, nn.NLLLoss(), optimizer, None, 1, flush_denormal=1)
    finally:
        torch.set_flush_denormal(False)


# ---------------------------------------------------------------- no side effects at import

FRESH_PROCESS_PROBE = """
import json, sys
import torch

def denormal_survives():
    return bool((torch.full((64,), 1e-39) * 1.0 != 0).all())

before_import = denormal_survives()
import trainer
report = {
    "before_import": before_import,
    "after_import": denormal_survives(),
    "heavy_modules": sorted(name for name in sys.modules
                            if name.split(".")[0] == "sklearn" or name == "torchvision.models"
                            or name.startswith("torchvision.models.")),
}
x, y = torch.randn(16, 4), torch.arange(16) % 2
model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
trainer.fit([(x, y)], None, model, torch.nn.NLLLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
            None, 1, device="cpu", progress=False)
report["after_fit"] = denormal_survives()
report["flush_supported"] = torch.set_flush_denormal(False)  # True when the CPU has the mode
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_process_report():
    """What a new Python process sees around `import trainer` and a CPU fit."""
    completed = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PROBE], cwd=REPOSITORY,
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_importing_trainer_leaves_flush_to_zero_alone_and_fit_turns_it_on(fresh_process_report):
    assert fresh_process_report["before_import"] is True
    assert fresh_process_report["after_import"] is True
    if fresh_process_report["flush_supported"]:
        assert fresh_process_report["after_fit"] is False


def test_importing_trainer_loads_neither_scikit_learn_nor_torchvision_models(fresh_process_report):
    assert fresh_process_report["heavy_modules"] == []


EVERYWHERE_PROBE = """
import json
import torch
import trainer

torch.set_num_threads(2)
turned_on = trainer.flush_denormal_everywhere()
# From raw bits (exponent 0), not arithmetic, which flush-to-zero would turn into zeros; large enough
# for torch to split the product below over its threads.
denormals = torch.randint(1, 1 << 23, (1 << 22,), dtype=torch.int32).view(torch.float32)
print(json.dumps({"turned_on": turned_on, "survivors": int((denormals * 1.0 != 0).sum())}))
"""


@pytest.mark.parametrize("keep", [None, "1"])
def test_flush_denormal_everywhere_reaches_the_worker_threads_unless_opted_out(keep):
    environment = {key: value for key, value in os.environ.items() if key != trainer.KEEP_DENORMALS}
    if keep is not None:
        environment[trainer.KEEP_DENORMALS] = keep
    completed = subprocess.run([sys.executable, "-c", EVERYWHERE_PROBE], cwd=REPOSITORY, env=environment,
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    if keep is not None:
        assert report == {"turned_on": False, "survivors": 1 << 22}
    elif report["turned_on"]:  # False only on a CPU without the mode
        assert report["survivors"] == 0
