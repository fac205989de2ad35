"""Tests for trainer.py: batch conventions, scheduler order, history, NaN handling, device choice, argument
checks, flush-to-zero, the collapse guard, mixed precision and compilation. Tiny synthetic data only.
Checkpoints and exact resume: test_checkpoints.py; several processes: test_distributed.py.

The collapse guard. A deliberately collapsing run: OnlineContrastiveLoss with a margin of 1e-4 pulls every
positive pair together and pushes negatives only until they are 1e-4 apart, so every item ends near one
point (the spread falls from 2.1 to 3e-4 in 10 epochs). A healthy run: the same data with margin 1, which
keeps the classes apart (the spread stays between 1.9 and 4.5).

Mixed precision. bfloat16 and float16 autocast run on CPUs too, so everything is tested here: the model
computes in half precision inside ``MixedPrecision.autocast()`` while every distance, and so every
selector's choice and every loss, stays in float32 (the same triplets and the same loss as on the float32
copy of the embeddings); a bf16 run trains like a float32 one; fp16's gradient scaler is saved in
checkpoints and a resumed run equals an uninterrupted one bit for bit; a compiled model trains like the
eager one and checkpoints the same weights; experiments.py takes ``--amp`` and ``--compile``.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import experiments
import trainer
import utils
from checkpoints import CHECKPOINT_NAME
from datasets import BalancedBatchSampler
from fixtures import write_idx_fixture
from losses import OnlineContrastiveLoss, OnlineTripletLoss
from metrics import (AccumulatedAccuracyMetric, ActiveFractionMetric, AverageNonzeroTripletsMetric,
                     EmbeddingSpreadMetric, Metric, batch_spread)
from networks import AutoencoderOutput
from trainer import (COLLAPSE_RATIO, EmbeddingCollapseWarning, MixedPrecision, fit, resolve_device, run_epoch,
                     train_epoch)
from utils import (AllTripletSelector, HardNegativePairSelector, paired_squared_distances, pdist,
                   squared_distances)

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


# ---------------------------------------------------------------- NaN handling

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


# ---------------------------------------------------------------- set_epoch

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


# ---------------------------------------------------------------- the collapse guard

@given(st.integers(2, 12), st.integers(1, 5), st.integers(0, 10_000))
def test_batch_spread_is_the_root_mean_square_distance_between_two_distinct_items(n, dim, seed):
    embeddings = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    squared = [float((embeddings[i] - embeddings[j]).pow(2).sum()) for i in range(n) for j in range(n) if i != j]
    assert float(batch_spread(embeddings)) == pytest.approx(math.sqrt(sum(squared) / len(squared)), rel=1e-9)


def test_a_collapsed_batch_has_zero_spread():
    assert float(batch_spread(torch.ones(5, 3))) == 0.0


def test_the_active_fraction_counts_the_triplets_with_a_loss():
    generator = torch.Generator().manual_seed(0)
    embeddings, labels = torch.randn(12, 2, generator=generator), torch.arange(3).repeat_interleave(4)
    loss = OnlineTripletLoss(1.0, AllTripletSelector())
    metric = ActiveFractionMetric(loss)
    _, n_active = loss(embeddings, labels)
    metric(None, None, None)
    triplets = AllTripletSelector().get_triplets(embeddings, labels)
    a, p, n = triplets.unbind(1)
    d = lambda i, j: (embeddings[i] - embeddings[j]).pow(2).sum(1)  # noqa: E731
    brute = int(((d(a, p) + 1.0 - d(a, n)) > 0).sum())
    assert loss.last_selection.selected == len(triplets) and n_active == brute
    assert metric.value() == pytest.approx(brute / len(triplets))
    with pytest.raises(TypeError, match="last_selection"):
        ActiveFractionMetric(nn.MSELoss())


def guard_data(seed=0, per_class=16):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    centres = torch.randn(4, 8, generator=generator) * 3
    return TensorDataset(centres[labels] + torch.randn(len(labels), 8, generator=generator), labels)


def guard_run(margin, epochs=10, lr=0.5, per_class=16, initial_scale=1.0, **options):
    dataset = guard_data(per_class=per_class)
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.mul_(initial_scale), model.bias.mul_(initial_scale)
    loader = DataLoader(dataset, batch_sampler=BalancedBatchSampler(dataset.tensors[1], 4, 8, seed=0))
    options = {"progress": False, **options}
    return fit(loader, None, model, OnlineContrastiveLoss(margin, HardNegativePairSelector()),
               torch.optim.SGD(model.parameters(), lr=lr), None, epochs, device="cpu", log_interval=10_000,
               **options)


def test_the_guard_warns_once_when_the_embeddings_collapse():
    with pytest.warns(EmbeddingCollapseWarning) as caught:
        history = guard_run(margin=1e-4)
    assert len([w for w in caught if w.category is EmbeddingCollapseWarning]) == 1  # once, though it stays collapsed
    message = str(caught[0].message)
    assert "collapsed" in message and "spread" in message
    assert "batch_norm=True" in message and "easy_selector" in message  # what made the study's selectors train
    assert history["train_spread"][-1] < COLLAPSE_RATIO * history["train_spread_at_start"][0]
    assert all(0 <= value <= 1 for value in history["train_active_fraction"])


def test_a_collapse_within_the_first_epoch_is_caught_at_its_end():
    with pytest.warns(EmbeddingCollapseWarning, match="in epoch 1"):
        history = guard_run(margin=1e-4, epochs=1, per_class=160)  # 20 batches: the collapse happens inside epoch 1
    assert history["train_spread"][0] < COLLAPSE_RATIO * history["train_spread_at_start"][0]


def test_a_run_that_grows_its_embeddings_then_collapses_them_is_caught(tmp_path):
    # it starts near one point (weights scaled by 1e-3), spreads the classes apart with margin 1, then
    # shrinks everything with margin 1e-4: the collapsed spread is a small share of its peak, not of its start
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingCollapseWarning)
        grown = guard_run(margin=1.0, epochs=3, initial_scale=1e-3, checkpoint_dir=tmp_path)
    assert grown["train_spread"][-1] > 100 * grown["train_spread_at_start"][0]
    with pytest.warns(EmbeddingCollapseWarning, match="it reached before") as caught:
        history = guard_run(margin=1e-4, epochs=13, initial_scale=1e-3, checkpoint_dir=tmp_path, resume=True)
    start, spreads = history["train_spread_at_start"][0], history["train_spread"]
    assert COLLAPSE_RATIO * start < spreads[-1] < COLLAPSE_RATIO * max(spreads)  # below the peak's 1%, not the start's
    assert len([w for w in caught if w.category is EmbeddingCollapseWarning]) == 1


def test_the_guard_is_silent_on_a_healthy_run_and_reports_its_spread():
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingCollapseWarning)
        history = guard_run(margin=1.0)
    assert history["train_spread"][-1] > 0.5 * history["train_spread"][0]
    assert {"train_spread", "val_spread", "train_active_fraction", "val_active_fraction"} <= history.keys()


def test_the_log_lines_and_the_progress_bar_show_the_spread(capsys):
    guard_run(margin=1.0, epochs=1)
    assert "spread" in capsys.readouterr().out
    guard_run(margin=1.0, epochs=1, progress=True)
    assert "spread=" in capsys.readouterr().err


def test_collapse_guard_false_adds_nothing_and_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingCollapseWarning)
        history = guard_run(margin=1e-4, collapse_guard=False)
    assert not any("spread" in key or "active" in key for key in history)


def test_a_checkpoint_from_before_the_guard_resumes_with_nan_for_its_epochs(tmp_path):
    guard_run(margin=1.0, epochs=2, collapse_guard=False, checkpoint_dir=tmp_path)
    history = guard_run(margin=1.0, epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert history["epoch"] == [1, 2, 3]
    assert all(math.isnan(value) for value in history["train_spread"][:2]) and history["train_spread"][2] > 0
    assert math.isnan(history["train_spread_at_start"][0]) and history["train_spread_at_start"][2] > 0
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["history"].keys() == history.keys()


def test_the_callers_own_spread_metric_replaces_the_guards_and_another_of_its_name_is_refused():
    class Spread(EmbeddingSpreadMetric):
        pass

    history = guard_run(margin=1.0, epochs=1, metrics=[Spread()])
    assert "train_spread" in history

    class NamedSpread(ActiveFractionMetric):
        def name(self):
            return "Spread"

    dataset = guard_data()
    loss = OnlineContrastiveLoss(1.0, HardNegativePairSelector())
    with pytest.raises(ValueError, match="collapse_guard=False"):
        fit(DataLoader(dataset, batch_size=16), None, nn.Linear(8, 2), loss, torch.optim.SGD(
            nn.Linear(8, 2).parameters(), lr=0.1), None, 1, device="cpu", metrics=[NamedSpread(loss)])


# ---------------------------------------------------------------- mixed precision and compilation

SEEDS = range(5)


def half_embeddings(seed, n_classes=4, per_class=6, dim=8):
    """Embeddings ``(B, D)`` made by a linear layer under bfloat16 autocast, and labels ``(B,)``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_classes * per_class, 16, generator=generator)
    layer = nn.Linear(16, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(dim, 16, generator=generator) / 4)
    with MixedPrecision("bf16", "cpu").autocast():
        embeddings = layer(inputs)
    return embeddings, torch.arange(n_classes).repeat_interleave(per_class)


def test_the_model_runs_in_bfloat16_and_the_distances_in_float32():
    embeddings, _ = half_embeddings(0)
    assert embeddings.dtype == torch.bfloat16  # autocast is on
    exact = embeddings.float()
    with MixedPrecision("bf16", "cpu").autocast():
        matrix, queries, paired = pdist(embeddings), squared_distances(embeddings, embeddings), \
            paired_squared_distances(embeddings, embeddings.flip(0))
    assert matrix.dtype == queries.dtype == paired.dtype == torch.float32
    assert torch.equal(matrix, pdist(exact))
    assert torch.equal(queries, squared_distances(exact, exact))
    assert torch.equal(paired, paired_squared_distances(exact, exact.flip(0)))
    double = torch.randn(5, 3, dtype=torch.float64)
    with MixedPrecision("bf16", "cpu").autocast():
        assert pdist(double).dtype == torch.float64  # float64 is left alone


@pytest.mark.parametrize("selector", sorted(experiments.SELECTORS))
def test_every_selector_mines_under_autocast_what_it_mines_in_float32(selector):
    for seed in SEEDS:
        embeddings, labels = half_embeddings(seed)
        exact = embeddings.detach().float().requires_grad_()
        half = embeddings.detach().requires_grad_()
        losses = [OnlineTripletLoss(1.0, experiments.SELECTORS[selector](1.0, torch.Generator().manual_seed(seed)))
                  for _ in range(2)]
        with MixedPrecision("bf16", "cpu").autocast():
            under_autocast = losses[0].triplet_selector.get_triplets(half, labels)
        assert torch.equal(under_autocast, losses[1].triplet_selector.get_triplets(exact, labels))
        for loss in losses:  # the same generators again, for the losses' own draws
            loss.triplet_selector = experiments.SELECTORS[selector](1.0, torch.Generator().manual_seed(seed))
        with MixedPrecision("bf16", "cpu").autocast():
            (loss_half, count_half) = losses[0](half, labels)
        loss_exact, count_exact = losses[1](exact, labels)
        assert loss_half.dtype == torch.float32 and count_half == count_exact
        assert torch.equal(loss_half, loss_exact)
        loss_half.backward()
        loss_exact.backward()
        assert half.grad.dtype == torch.bfloat16  # the gradient reaches the half-precision embeddings
        torch.testing.assert_close(half.grad.float(), exact.grad.to(torch.bfloat16).float())


def test_the_contrastive_loss_under_autocast_is_its_float32_value():
    embeddings, labels = half_embeddings(3)
    loss = OnlineContrastiveLoss(1.0, utils.HardNegativePairSelector())
    with MixedPrecision("bf16", "cpu").autocast():
        value = loss(embeddings, labels)
    assert value.dtype == torch.float32
    assert torch.equal(value, loss(embeddings.float(), labels))


def precision_classification(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2), nn.LogSoftmax(dim=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return DataLoader(TensorDataset(x, y), batch_size=16), model, optimizer


def precision_run(epochs, **options):
    loader, model, optimizer = precision_classification()
    history = fit(loader, None, model, nn.NLLLoss(), optimizer, None, epochs, device="cpu", progress=False,
                  log_interval=10_000, **options)
    return model, optimizer, history


def test_a_bfloat16_run_trains_like_a_float32_one():
    model, _, history = precision_run(6, amp="bf16")
    reference, _, reference_history = precision_run(6)
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["train_loss"][-1] == pytest.approx(reference_history["train_loss"][-1], rel=0.1)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # weights stay float32
    for trained, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected, atol=0.05, rtol=0.05)


def test_float16_scales_the_loss_and_its_scaler_resumes_exactly(tmp_path):
    straight, straight_optimizer, straight_history = precision_run(4, amp="fp16", checkpoint_dir=tmp_path / "straight")
    precision_run(2, amp="fp16", checkpoint_dir=tmp_path / "split")
    resumed, resumed_optimizer, resumed_history = precision_run(4, amp="fp16", checkpoint_dir=tmp_path / "split",
                                                        resume=True)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert {key: value for key, value in straight_history.items() if key != "seconds"} == \
        {key: value for key, value in resumed_history.items() if key != "seconds"}
    scalers = [torch.load(tmp_path / folder / CHECKPOINT_NAME, weights_only=True)["grad_scaler"]
               for folder in ("straight", "split")]
    assert scalers[0] == scalers[1]
    # 4 batches an epoch, 4 epochs: the resumed run continued the scaler's count of good steps
    assert scalers[0]["_growth_tracker"] == 16 and scalers[0]["scale"] == 65536.0


def test_a_checkpoint_without_amp_holds_no_scaler(tmp_path):
    precision_run(1, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["grad_scaler"] is None


@pytest.mark.parametrize("amp", ["fp8", "float16", True])
def test_an_unknown_amp_is_refused_by_name(amp):
    with pytest.raises(ValueError, match="amp"):
        precision_run(1, amp=amp)


def test_compile_must_be_true_or_false():
    with pytest.raises(TypeError, match="compile"):
        precision_run(1, compile="yes")


def test_a_compiled_model_trains_like_the_eager_one_and_checkpoints_its_plain_weights(tmp_path):
    compiled, _, history = precision_run(2, compile=True, checkpoint_dir=tmp_path)
    eager, _, eager_history = precision_run(2)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert history["train_loss"] == pytest.approx(eager_history["train_loss"], rel=1e-5)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["model"]
    assert saved.keys() == eager.state_dict().keys()  # no "_orig_mod." prefix


def test_experiments_takes_amp_and_records_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_idx_fixture(tmp_path / "data")
    rows = experiments.main(["--dataset", "mnist", "--methods", "online-triplet", "--quick", "--no-progress",
                             "--root", "data", "--amp", "bf16"])
    assert rows[0]["amp"] == "bf16" and rows[0]["compile"] is False
    assert 0 < rows[0]["final_train_loss"] < float("inf")
    assert rows[0]["precision_at_1"] > 0.2  # 10 classes: it learned something in bfloat16


class ShrinkingEmbedding(nn.Module):
    """Its first call returns the inputs themselves, every later one the inputs times ``factor``: a training
    epoch of two batches then ends with a spread of ``factor`` times the spread it started from."""

    def __init__(self, factor):
        super().__init__()
        self.factor, self.calls = factor, 0
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x * (1.0 if self.calls == 1 else self.factor) + self.weight


@pytest.mark.parametrize("share, warns", [(0.005, True), (0.05, False)])
def test_the_guard_warns_below_one_percent_of_the_start_and_not_at_five(share, warns):
    # COLLAPSE_RATIO (0.01) between the two shares, by a factor of 2 and 5: a threshold ten times lower
    # (0.001) misses the collapse at 0.5 %, ten times higher (0.1) calls 5 % one
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    batches = [(x, torch.tensor([0, 0, 1, 1]))] * 2
    model = ShrinkingEmbedding(share)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = quiet_fit(batches, None, model, lambda embeddings, target: (embeddings * 0).sum(),
                            torch.optim.SGD(model.parameters(), lr=0.1), None, 1, device="cpu")
    assert history["train_spread"][0] == pytest.approx(share * history["train_spread_at_start"][0], rel=1e-5)
    collapse_warnings = [w for w in caught if w.category is EmbeddingCollapseWarning]
    assert len(collapse_warnings) == (1 if warns else 0)
    if warns:
        assert f"{share:.2%}" in str(collapse_warnings[0].message)  # "0.50% of the ... the run started from"


@pytest.mark.parametrize("last, warns", [(0.005, True), (0.05, False)])
def test_the_guard_measures_against_the_largest_spread_of_the_run(last, warns):
    # the run started at 0.1 and reached 1.0 in epoch 2: the share is of that peak, not of the start
    history = {"epoch": [1, 2, 3], "train_spread": [0.5, 1.0, last], "train_spread_at_start": [0.1, 0.5, 1.0],
               "train_active_fraction": [0.5, 0.5, 0.5]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer._warn_if_collapsed(history) is warns
    assert len([w for w in caught if w.category is EmbeddingCollapseWarning]) == (1 if warns else 0)
    if warns:
        assert "it reached before" in str(caught[0].message) and f"{last:.2%}" in str(caught[0].message)


def test_the_moved_names_of_trainer_resolve_with_a_warning_naming_their_new_module():
    for name, module in utils.MOVED_NAMES["trainer"].items():
        with pytest.warns(DeprecationWarning, match=f"trainer.{name} moved to {module}.{name}"):
            value = getattr(trainer, name)
        assert value is getattr(__import__(module), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from trainer import fit, setup_distributed  # noqa: F401  (trainer's own names: no warning)
    with pytest.raises(AttributeError):
        trainer.no_such_name
