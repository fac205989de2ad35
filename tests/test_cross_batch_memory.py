"""Tests of cross_batch_memory.py and of the online losses mining against it: the queue against a deque,
warm-up, validation leaving it alone, the selections and losses against loops over the batch and memory
(anchors only in the batch), exact resume of a run with a memory, and the errors. Two processes:
test_distributed.py."""

import collections
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import losses
import reference
import utils
from cross_batch_memory import CrossBatchMemory
from datasets import BalancedBatchSampler
from mining_rows import Rows
from trainer import fit


def batch(n_items, dim=3, n_classes=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n_items, dim, generator=generator, dtype=dtype),
            torch.randint(n_classes, (n_items,), generator=generator))


def test_the_queue_holds_the_last_size_items_first_in_first_out():
    memory = CrossBatchMemory(7, 2)
    expected = collections.deque(maxlen=7)
    for step, n_items in enumerate([3, 3, 0, 5, 12, 1, 7, 2]):
        embeddings, labels = batch(n_items, dim=2, seed=step)
        memory.push(embeddings, labels)
        expected.extend(zip(embeddings.tolist(), labels.tolist()))
        held = int(memory.filled)
        assert held == len(expected) and int(memory.steps) == step + 1
        # slot order is the ring's: the oldest item sits at `position` once the queue is full
        order = torch.arange(held) if held < 7 else (torch.arange(7) + memory.position) % 7
        assert memory.embeddings[order].tolist() == [item[0] for item in expected]
        assert memory.labels[order].tolist() == [item[1] for item in expected]


def test_the_memory_joins_the_candidates_after_its_warm_up_without_gradient():
    memory = CrossBatchMemory(10, 3, warmup=2)
    embeddings, labels = batch(4, dtype=torch.float64)
    embeddings.requires_grad_()
    assert memory.candidates(embeddings, labels)[0] is embeddings  # empty
    memory.push(embeddings, labels)
    assert memory.candidates(embeddings, labels)[0] is embeddings  # one step seen, warm-up 2
    memory.push(embeddings * 2, labels + 1)
    candidates, candidate_labels = memory.candidates(embeddings, labels)
    assert candidates.shape == (12, 3) and candidates.dtype == torch.float64
    assert torch.equal(candidate_labels, torch.cat([labels, labels, labels + 1]))
    candidates.sum().backward()
    assert torch.equal(embeddings.grad, torch.ones(4, 3))  # the memory's rows carry no gradient
    torch.testing.assert_close(candidates[4:8], embeddings.detach().float().double())


def _memory_after(pushes, size=20, dim=3):
    memory = CrossBatchMemory(size, dim)
    for seed, n_items in enumerate(pushes):
        memory.push(*batch(n_items, dim=dim, seed=100 + seed))
    return memory


@pytest.mark.parametrize("pushes", [[8], [8, 8, 8]])
def test_triplets_mined_against_the_memory_are_the_loops_over_batch_and_memory(pushes):
    memory = _memory_after(pushes)
    embeddings, labels = batch(6, seed=1)
    candidates, candidate_labels = memory.candidates(embeddings, labels)
    distances = utils.row_distances(candidates)
    for selector, expected in [
            (utils.HardestNegativeTripletSelector(0.5),
             reference.ref_hardest_negative_triplets(distances, candidate_labels, 0.5)),
            (utils.BatchHardTripletSelector(), reference.ref_batch_hard_triplets(distances, candidate_labels))]:
        got = selector.select_triplets(distances[:6], candidate_labels, Rows(0, 6, None, 6))
        batch_anchors = sorted(t for t in map(tuple, expected) if t[0] < 6)
        assert sorted(map(tuple, got.tolist())) == batch_anchors
        if isinstance(selector, utils.FunctionNegativeTripletSelector):  # and the loss, mining in a training step
            loss, active = losses.OnlineTripletLoss(0.5, selector, memory=memory)(
                embeddings.clone().requires_grad_(), labels)
            expected_loss, expected_active = reference.ref_online_triplet_loss(candidates, batch_anchors, 0.5)
            assert loss.item() == pytest.approx(expected_loss, rel=1e-5) and active == expected_active


def test_pairs_mined_against_the_memory_have_their_first_member_in_the_batch():
    memory = _memory_after([8, 8])
    embeddings, labels = batch(6, seed=2)
    candidates, candidate_labels = memory.candidates(embeddings, labels)
    distances = utils.row_distances(candidates)
    pairs = [(i, j) for i, j in itertools.combinations(range(len(candidates)), 2) if i < 6]
    positive = [pair for pair in pairs if candidate_labels[pair[0]] == candidate_labels[pair[1]]]
    negative = sorted((pair for pair in pairs if pair not in positive),
                      key=lambda pair: (float(distances[pair]), pair))
    count = min(len(positive), len(negative))
    rows = Rows(0, 6, None, 6)
    hard_positive, hard_negative = utils.HardNegativePairSelector().select_pairs(distances[:6], candidate_labels, rows)
    assert hard_positive.tolist() == [list(pair) for pair in positive]
    assert hard_negative.tolist() == [list(pair) for pair in sorted(negative[:count])]
    selector = utils.AllPositivePairSelector(generator=torch.Generator().manual_seed(0))
    drawn_positive, drawn_negative = selector.select_pairs(None, candidate_labels, rows)
    assert drawn_positive.tolist() == [list(pair) for pair in positive] and len(drawn_negative) == count
    assert set(map(tuple, drawn_negative.tolist())) <= set(negative)


def test_the_multi_similarity_loss_with_a_memory_is_the_papers_over_batch_and_memory():
    memory = _memory_after([8, 8])
    embeddings, labels = batch(6, seed=3, dtype=torch.float64)
    loss_fn = losses.MultiSimilarityLoss(2.0, 10.0, 0.5, 0.1, memory=memory)
    candidates, candidate_labels = memory.candidates(embeddings, labels)
    expected = reference.ref_multi_similarity_loss(candidates, candidate_labels, 2.0, 10.0, 0.5, 0.1, n_anchors=6)
    loss = loss_fn(embeddings.requires_grad_(), labels)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert int(memory.filled) == 20 and torch.equal(memory.labels[(int(memory.position) - 6 + torch.arange(6)) % 20],
                                                    labels)  # the batch was pushed after


def test_the_online_losses_mine_the_memory_in_training_steps_only():
    embeddings, labels = batch(6, seed=4)
    for make in (lambda memory: losses.OnlineTripletLoss(1.0, utils.HardestNegativeTripletSelector(1.0), memory=memory),
                 lambda memory: losses.OnlineContrastiveLoss(1.0, utils.HardNegativePairSelector(), memory=memory),
                 lambda memory: losses.MultiSimilarityLoss(memory=memory)):
        memory = _memory_after([8, 8])
        state = {name: value.clone() for name, value in memory.state_dict().items()}
        with torch.no_grad():  # validation: the loss without the memory, which stays as it was
            plain = make(None)(embeddings, labels)
            assert make(memory)(embeddings, labels) == plain
        assert all(torch.equal(value, state[name]) for name, value in memory.state_dict().items())
        trained = make(memory)(embeddings.clone().requires_grad_(), labels)
        assert int(memory.steps) == 3
        assert (trained[0] if isinstance(trained, tuple) else trained) != (plain[0] if isinstance(plain, tuple) else plain)


def _train(epochs, checkpoint_dir, resume=False):
    """A small run whose loss mines a memory (warm-up of 2 steps), as fit trains it; the model and loss."""
    torch.manual_seed(0)
    inputs, labels = batch(96, dim=6, n_classes=6, seed=5)
    loader = DataLoader(TensorDataset(inputs, labels), batch_sampler=BalancedBatchSampler(labels, 3, 4, seed=7))
    model = nn.Linear(6, 3)
    loss_fn = losses.OnlineTripletLoss(1.0, utils.RandomNegativeTripletSelector(
        1.0, generator=torch.Generator().manual_seed(3)), memory=CrossBatchMemory(30, 3, warmup=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    fit(loader, None, model, loss_fn, optimizer, None, epochs, progress=False, log_interval=10_000,
        checkpoint_dir=str(checkpoint_dir), resume=resume)
    return model, loss_fn


def test_a_run_with_a_memory_resumed_after_2_epochs_ends_as_4_uninterrupted(tmp_path):
    whole_model, whole_loss = _train(4, tmp_path / "whole")
    _train(2, tmp_path / "halves")
    model, loss_fn = _train(4, tmp_path / "halves", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole_model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(loss_fn.state_dict().values(), whole_loss.state_dict().values()))
    assert int(loss_fn.memory.steps) == 4 * 8 and int(loss_fn.memory.filled) == 30
    # a loss built without the memory cannot resume this run: refused before anything changes
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="the loss was built differently"):
        fit(DataLoader(TensorDataset(*batch(12, dim=6)), batch_size=6), None, nn.Linear(6, 3),
            losses.OnlineTripletLoss(1.0, utils.RandomNegativeTripletSelector(1.0, generator=torch.Generator())),
            torch.optim.SGD(nn.Linear(6, 3).parameters(), lr=0.05), None, 5, progress=False,
            checkpoint_dir=str(tmp_path / "halves"), resume=True)


@pytest.mark.parametrize("arguments, error, message", [
    ((0, 3), ValueError, "size must be >= 1, got 0"),
    ((4, 0), ValueError, "embedding_dim must be >= 1, got 0"),
    ((4, 3, -1), ValueError, "warmup must be >= 0, got -1"),
    ((4.0, 3), TypeError, "size must be an int, got float"),
])
def test_bad_memory_arguments_are_named(arguments, error, message):
    with pytest.raises(error, match=message):
        CrossBatchMemory(*arguments)


def test_embeddings_of_another_width_and_a_memory_that_is_not_one_are_refused():
    memory = CrossBatchMemory(4, 3)
    with pytest.raises(ValueError, match="holds 3-dimensional embeddings, got shape \\(2, 5\\)"):
        memory.push(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape \\(2,\\)"):
        memory.candidates(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="memory must be a cross_batch_memory.CrossBatchMemory or None, got int"):
        losses.OnlineTripletLoss(1.0, utils.BatchHardTripletSelector(), memory=5)
