"""fit's collapse guard: the embeddings' spread and the share of active pairs or triplets in the history
and the progress bar, and one clear warning when the embeddings collapse, none when they do not.

A deliberately collapsing run: OnlineContrastiveLoss with a margin of 1e-4 pulls every positive pair
together and pushes negatives only until they are 1e-4 apart, so every item ends near one point (the
spread falls from 2.1 to 3e-4 in 10 epochs). A healthy run: the same data with margin 1, which keeps the
classes apart (the spread stays between 1.9 and 4.5).
"""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datasets import BalancedBatchSampler
from losses import OnlineContrastiveLoss, OnlineTripletLoss
from metrics import ActiveFractionMetric, EmbeddingSpreadMetric, batch_spread
from trainer import CHECKPOINT_NAME, COLLAPSE_RATIO, EmbeddingCollapseWarning, fit
from utils import AllTripletSelector, HardNegativePairSelector


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


def data(seed=0, per_class=16):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    centres = torch.randn(4, 8, generator=generator) * 3
    return TensorDataset(centres[labels] + torch.randn(len(labels), 8, generator=generator), labels)


def train(margin, epochs=10, lr=0.5, per_class=16, initial_scale=1.0, **options):
    dataset = data(per_class=per_class)
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
        history = train(margin=1e-4)
    assert len([w for w in caught if w.category is EmbeddingCollapseWarning]) == 1  # once, though it stays collapsed
    message = str(caught[0].message)
    assert "collapsed" in message and "spread" in message
    assert "batch_norm=True" in message and "easy_selector" in message  # what made the study's selectors train
    assert history["train_spread"][-1] < COLLAPSE_RATIO * history["train_spread_at_start"][0]
    assert all(0 <= value <= 1 for value in history["train_active_fraction"])


def test_a_collapse_within_the_first_epoch_is_caught_at_its_end():
    with pytest.warns(EmbeddingCollapseWarning, match="in epoch 1"):
        history = train(margin=1e-4, epochs=1, per_class=160)  # 20 batches: the collapse happens inside epoch 1
    assert history["train_spread"][0] < COLLAPSE_RATIO * history["train_spread_at_start"][0]


def test_a_run_that_grows_its_embeddings_then_collapses_them_is_caught(tmp_path):
    # it starts near one point (weights scaled by 1e-3), spreads the classes apart with margin 1, then
    # shrinks everything with margin 1e-4: the collapsed spread is a small share of its peak, not of its start
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingCollapseWarning)
        grown = train(margin=1.0, epochs=3, initial_scale=1e-3, checkpoint_dir=tmp_path)
    assert grown["train_spread"][-1] > 100 * grown["train_spread_at_start"][0]
    with pytest.warns(EmbeddingCollapseWarning, match="it reached before") as caught:
        history = train(margin=1e-4, epochs=13, initial_scale=1e-3, checkpoint_dir=tmp_path, resume=True)
    start, spreads = history["train_spread_at_start"][0], history["train_spread"]
    assert COLLAPSE_RATIO * start < spreads[-1] < COLLAPSE_RATIO * max(spreads)  # below the peak's 1%, not the start's
    assert len([w for w in caught if w.category is EmbeddingCollapseWarning]) == 1


def test_the_guard_is_silent_on_a_healthy_run_and_reports_its_spread():
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingCollapseWarning)
        history = train(margin=1.0)
    assert history["train_spread"][-1] > 0.5 * history["train_spread"][0]
    assert {"train_spread", "val_spread", "train_active_fraction", "val_active_fraction"} <= history.keys()


def test_the_log_lines_and_the_progress_bar_show_the_spread(capsys):
    train(margin=1.0, epochs=1)
    assert "spread" in capsys.readouterr().out
    train(margin=1.0, epochs=1, progress=True)
    assert "spread=" in capsys.readouterr().err


def test_collapse_guard_false_adds_nothing_and_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingCollapseWarning)
        history = train(margin=1e-4, collapse_guard=False)
    assert not any("spread" in key or "active" in key for key in history)


def test_a_checkpoint_from_before_the_guard_resumes_with_nan_for_its_epochs(tmp_path):
    train(margin=1.0, epochs=2, collapse_guard=False, checkpoint_dir=tmp_path)
    history = train(margin=1.0, epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert history["epoch"] == [1, 2, 3]
    assert all(math.isnan(value) for value in history["train_spread"][:2]) and history["train_spread"][2] > 0
    assert math.isnan(history["train_spread_at_start"][0]) and history["train_spread_at_start"][2] > 0
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["history"].keys() == history.keys()


def test_the_callers_own_spread_metric_replaces_the_guards_and_another_of_its_name_is_refused():
    class Spread(EmbeddingSpreadMetric):
        pass

    history = train(margin=1.0, epochs=1, metrics=[Spread()])
    assert "train_spread" in history

    class NamedSpread(ActiveFractionMetric):
        def name(self):
            return "Spread"

    dataset = data()
    loss = OnlineContrastiveLoss(1.0, HardNegativePairSelector())
    with pytest.raises(ValueError, match="collapse_guard=False"):
        fit(DataLoader(dataset, batch_size=16), None, nn.Linear(8, 2), loss, torch.optim.SGD(
            nn.Linear(8, 2).parameters(), lr=0.1), None, 1, device="cpu", metrics=[NamedSpread(loss)])
