"""Tests for distributed.py, the one module that knows about process groups, and for what is built on it:
datasets.DistributedBalancedBatchSampler and the ``gather`` option of losses.OnlineContrastiveLoss /
OnlineTripletLoss and of the mined autoencoder losses (every part of their loss, and the gradients, as one
process's on the global batch).

Without a process group every query answers as rank 0 of 1 and nothing is initialised; the sampler is
checked with num_replicas and rank given. The rest runs in one run of 2 CPU processes (gloo on 127.0.0.1,
bounded timeouts): the rank and world queries, broadcast, the gather of unequal shares and the global mean,
then a model wrapped in DistributedDataParallel, each rank fed its sampler share of a global batch, must
give, for every online loss and selector, the loss value and the (DDP-averaged) gradients of one process
computing the loss on the whole global batch with the same weights, and the same selected triplets / pairs.
fit under torchrun, a rank that dies or hangs, and the resumed job: test_fit_distributed.py.
"""
import datetime
import itertools
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import distributed
import losses
import trainer
import utils
from cross_batch_memory import CrossBatchMemory
from datasets import BalancedBatchSampler, DistributedBalancedBatchSampler
from distributed import (PROCESS_GROUP_TIMEOUT, TIMEOUT_VARIABLE, process_group_timeout, process_group_shape,
                         share_bounds)
from launch import free_port, leave_passed_worker
from networks import AutoencoderOutput
from test_losses import Recording  # a selector that keeps what it selected last

LABELS = torch.arange(10).repeat_interleave(7)  # 10 classes of 7 items
WORLD_SIZE = 2


# ---------------------------------------------------------------------------------------------------
# The sampler


@pytest.mark.parametrize("n_classes, n_samples, num_replicas", [(4, 4, 2), (3, 3, 2), (3, 2, 4), (2, 3, 6)])
@pytest.mark.parametrize("groups", [None, LABELS // 5])
def test_shares_together_are_the_single_process_batches(n_classes, n_samples, num_replicas, groups):
    single = BalancedBatchSampler(LABELS, n_classes, n_samples, seed=5, groups=groups)
    shared = [DistributedBalancedBatchSampler(LABELS, n_classes, n_samples, seed=5, num_replicas=num_replicas,
                                              rank=rank, groups=groups) for rank in range(num_replicas)]
    assert {len(sampler) for sampler in shared} == {len(single)}
    for epoch in (0, 1, 7):
        for sampler in [single] + shared:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in shared]
        for k, batch in enumerate(single):
            shares = [batches[k] for batches in per_rank]
            assert all(shares)  # no empty share
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert list(itertools.chain(*shares)) == batch  # disjoint, and in rank order the batch itself


def test_share_bounds_split_like_tensor_split():
    for batch_size, num_replicas in [(16, 2), (9, 2), (7, 3), (5, 5)]:
        expected = torch.tensor_split(torch.arange(batch_size), num_replicas)
        for rank in range(num_replicas):
            start, stop = share_bounds(batch_size, num_replicas, rank)
            assert torch.arange(start, stop).tolist() == expected[rank].tolist()


def test_distributed_sampler_defaults_and_errors():
    sampler = DistributedBalancedBatchSampler(LABELS, 2, 3, seed=1)  # no process group: one replica
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == list(BalancedBatchSampler(LABELS, 2, 3, seed=1))
    with pytest.raises(ValueError, match="needs a seed"):
        DistributedBalancedBatchSampler(LABELS, 2, 3, seed=None, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="at least one item"):
        DistributedBalancedBatchSampler(LABELS, 2, 1, seed=1, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        DistributedBalancedBatchSampler(LABELS, 2, 3, seed=1, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="num_replicas"):
        DistributedBalancedBatchSampler(LABELS, 2, 3, seed=1, num_replicas=2.0, rank=0)


# ---------------------------------------------------------------------------------------------------
# One process: no process group


def test_the_process_group_timeout_comes_from_the_environment_or_is_ten_minutes(monkeypatch):
    monkeypatch.delenv(TIMEOUT_VARIABLE, raising=False)
    assert process_group_timeout() == PROCESS_GROUP_TIMEOUT == datetime.timedelta(minutes=10)
    monkeypatch.setenv(TIMEOUT_VARIABLE, "7.5")
    assert process_group_timeout() == datetime.timedelta(seconds=7.5)
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(TIMEOUT_VARIABLE, bad)
        with pytest.raises(ValueError, match=TIMEOUT_VARIABLE):
            process_group_timeout()


def test_one_process_is_rank_0_of_1_and_initialises_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup(torch.device("cpu")) == (torch.device("cpu"), 0, 1)
    assert trainer.setup_distributed("cpu") == (torch.device("cpu"), 0, 1)
    assert not dist.is_initialized()
    assert distributed.rank_and_world_size() == (0, 1) and distributed.is_main_process()
    distributed.barrier()  # nothing to wait for
    value = {"row": [1, 2]}
    assert distributed.broadcast_from_main(value) is value
    distributed.close_distributed()  # nothing to close
    model = nn.Linear(2, 2)
    assert distributed.data_parallel(model, torch.device("cpu")) is model
    assert process_group_shape(None, None) == (1, 0) and process_group_shape(3, 2) == (3, 2)


def test_one_process_mines_its_own_batch():
    embeddings, labels, extra = torch.randn(5, 3, requires_grad=True), torch.arange(5), torch.randn(5, 2)
    gathered, gathered_labels, share, gathered_extra = distributed.global_batch(embeddings, labels, True, extra)
    assert gathered is embeddings and gathered_labels is labels and share is None and gathered_extra is extra
    for bad_embeddings, bad_labels, error, message in (
            (embeddings, labels.float(), TypeError, "labels must be integers"),
            (embeddings, labels[:, None], ValueError, r"labels must have shape \(B,\)"),
            (embeddings[:, :, None], labels, ValueError, r"embeddings must have shape \(B, D\)")):
        with pytest.raises(error, match=message):
            distributed.global_batch(bad_embeddings, bad_labels, True)
    assert distributed.owned(torch.tensor([0, 3, 4]), None).tolist() == [True, True, True]
    assert distributed.owned(torch.tensor([0, 3, 4, 5]), (3, 5, 2)).tolist() == [False, True, True, False]


def test_the_world_size_must_be_an_int(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an int"):
        distributed.setup(torch.device("cpu"))


def test_the_process_group_shape_is_checked_by_name():
    for num_replicas, rank, error, name in [(0, 0, ValueError, "num_replicas"), (2, -1, ValueError, "rank"),
                                            (2, 2, ValueError, "rank"), (True, 0, TypeError, "num_replicas"),
                                            (2, 1.0, TypeError, "rank")]:
        with pytest.raises(error, match=name):
            process_group_shape(num_replicas, rank)


def test_share_bounds_moved_from_datasets_with_a_warning():
    import datasets
    with pytest.warns(DeprecationWarning, match="datasets.share_bounds moved to distributed.share_bounds"):
        assert datasets.share_bounds is share_bounds


def test_only_a_collective_failure_on_several_processes_is_explained():
    assert distributed._collective_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed"))
    assert distributed._collective_failure(RuntimeError("Socket Timeout: timed out after 5000ms"))
    assert not distributed._collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    # one process: even a failure that reads like a collective's is the caller's own, passed unchanged
    with pytest.raises(RuntimeError, match="^gloo connection closed$"):
        with distributed.collective_failures_explained(2, "/tmp/checkpoint.pt"):
            raise RuntimeError("gloo connection closed")


class _Work:
    """The handle of an asynchronous collective that has finished after ``polls`` looks at it, and whose
    ``wait`` raises ``error`` (if not None), as a failed collective's does."""

    def __init__(self, polls, error=None):
        self.polls, self.error, self.waited = polls, error, False

    def is_completed(self):
        self.polls -= 1
        return self.polls < 0

    def wait(self):
        self.waited = True
        if self.error is not None:
            raise self.error


def test_a_collective_on_cpu_tensors_is_polled_ever_less_often_until_it_has_finished(monkeypatch):
    slept, calls, work = [], [], _Work(polls=200)
    monkeypatch.setattr(distributed.time, "sleep", slept.append)
    parts, tensor = [torch.zeros(3), torch.zeros(3)], torch.ones(3)

    def collective(*arguments, **options):
        calls.append((arguments, options))
        return work

    assert distributed.completed(collective, parts, tensor) is None
    assert len(calls) == 1 and calls[0][0][0] is parts and calls[0][0][1] is tensor
    assert calls[0][1] == {"async_op": True}
    assert work.waited and len(slept) == 200  # one sleep per look that found it unfinished
    assert slept[0] == distributed.POLL_INTERVAL
    assert all(earlier <= later for earlier, later in zip(slept, slept[1:]))
    assert slept[-1] == max(slept) == distributed.LONGEST_POLL_INTERVAL


def test_a_collective_that_failed_raises_its_error_and_other_devices_are_not_polled(monkeypatch):
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: None)
    failed = _Work(polls=3, error=RuntimeError("Connection closed by peer"))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        distributed.completed(lambda tensor, async_op: failed, torch.zeros(2))
    on_a_device = torch.zeros(2, device="meta")  # not the CPU: the collective runs as it is, its result returned
    calls = []
    assert distributed.completed(lambda tensor, **options: calls.append(options) or "queued", on_a_device) == "queued"
    assert calls == [{}]


# ---------------------------------------------------------------------------------------------------
# The losses on 2 processes


def _seeded():
    return torch.Generator().manual_seed(11)


# name -> (loss class, selector factory, margin); margins for which every selection is non-empty on the
# data below (checked in the worker). The random selectors get a generator seeded alike on every rank.
CASES = {
    "triplet-all": (losses.OnlineTripletLoss, lambda: utils.AllTripletSelector(), 1.0),
    "triplet-hardest": (losses.OnlineTripletLoss, lambda: utils.HardestNegativeTripletSelector(1.0), 1.0),
    "triplet-random-hard": (losses.OnlineTripletLoss,
                            lambda: utils.RandomNegativeTripletSelector(1.0, generator=_seeded()), 1.0),
    "triplet-semi-hard": (losses.OnlineTripletLoss,
                          lambda: utils.SemihardNegativeTripletSelector(1.0, generator=_seeded()), 1.0),
    "triplet-batch-hard": (losses.OnlineTripletLoss, lambda: utils.BatchHardTripletSelector(), 1.0),
    # the mixed objective: batch-hard plus a random-hard selection, each averaged over the global batch
    "triplet-batch-hard-plus-random-hard": (
        lambda margin, selector, gather: losses.OnlineTripletLoss(
            margin, selector, gather=gather,
            easy_selector=utils.RandomNegativeTripletSelector(margin, generator=_seeded())),
        lambda: utils.BatchHardTripletSelector(), 1.0),
    "contrastive-hard-negative": (losses.OnlineContrastiveLoss, lambda: utils.HardNegativePairSelector(), 1.5),
    "contrastive-all-positive": (losses.OnlineContrastiveLoss,
                                 lambda: utils.AllPositivePairSelector(balance=True, generator=_seeded()), 1.5),
}


def _value(output):
    """The loss tensor of an online loss's output (OnlineTripletLoss also returns a count)."""
    return output[0] if isinstance(output, tuple) else output


def _as_tuple(selection):
    return selection if isinstance(selection, tuple) else (selection,)


def _run(weights, loss_class, make_selector, margin, module, inputs, labels, gather):
    """Loss output, parameters (gradients filled) and selection of ``module(model)`` on one batch, the
    model a fresh copy of ``weights``."""
    model = nn.Linear(6, 3)
    model.load_state_dict(weights)
    selector = Recording(make_selector())
    wrapped = module(model)  # kept alive until backward: DDP's gradient averaging hooks live on it
    output = loss_class(margin, selector, gather=gather)(wrapped(inputs), labels)
    _value(output).backward()
    return output, list(model.named_parameters()), _as_tuple(selector.last)


class _TinyAutoencoder(nn.Module):
    """6 -> 3 -> 6; with ``vae`` a log-variance head too (its output as networks.AutoencoderOutput)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(6, 3), nn.Linear(3, 6)
        self.log_var = nn.Linear(6, 3) if vae else None

    def forward(self, inputs):
        mean = self.encoder(inputs)
        log_var = None if self.log_var is None else self.log_var(inputs)
        return AutoencoderOutput(latent=mean, reconstruction=self.decoder(mean), mean=mean, log_var=log_var)


# name -> (VAE?, the loss given gather); margins for which every selection is non-empty on the data below
AUTOENCODER_CASES = {
    "pairwise-euclidean": (False, lambda gather: losses.PairwiseAutoencoderLoss(
        0.5, 1.5, utils.HardNegativePairSelector(), gather=gather)),
    "triplet-kl-vae": (True, lambda gather: losses.TripletAutoencoderLoss(
        0.5, 1.0, utils.HardestNegativeTripletSelector(1.0), distance="kl", gather=gather)),
    "triplet-random-hard-bce": (False, lambda gather: losses.TripletAutoencoderLoss(
        0.7, 1.0, utils.RandomNegativeTripletSelector(1.0, generator=_seeded()), reconstruction="bce",
        gather=gather)),
}


def _run_autoencoder(vae, make_loss, module, inputs, labels, gather):
    """The loss's parts and the model's parameters (gradients filled) on one batch, from seed 0's weights."""
    torch.manual_seed(0)
    model = _TinyAutoencoder(vae)
    wrapped = module(model)
    terms = make_loss(gather).terms(wrapped(inputs), inputs, labels)
    terms["total"].backward()
    return terms, list(model.named_parameters())


def _check_autoencoder_losses(data, rank):
    inputs = torch.sigmoid(data)  # in [0, 1], for the bce reconstruction
    for n_classes, n_samples in [(4, 4), (3, 3)]:
        batch = next(iter(BalancedBatchSampler(LABELS, n_classes, n_samples, seed=3)))
        share = next(iter(DistributedBalancedBatchSampler(LABELS, n_classes, n_samples, seed=3)))
        for name, (vae, make_loss) in AUTOENCODER_CASES.items():
            context = f"{name}, {n_classes} x {n_samples}, rank {rank}"
            expected, expected_parameters = _run_autoencoder(vae, make_loss, lambda model: model, inputs[batch],
                                                             LABELS[batch], gather=False)
            assert expected["n_selected"] > 0 and expected["metric"].item() > 0, context
            got, parameters = _run_autoencoder(vae, make_loss, DistributedDataParallel, inputs[share], LABELS[share],
                                               gather=True)
            for part in ("total", "metric", "reconstruction", "kl"):
                torch.testing.assert_close(got[part], expected[part], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{context}: {part}: {m}")
            assert got["n_selected"] == expected["n_selected"], context
            scale = max(float(p.grad.abs().max()) for _, p in expected_parameters)
            for (parameter_name, parameter), (_, expected_parameter) in zip(parameters, expected_parameters):
                torch.testing.assert_close(parameter.grad, expected_parameter.grad, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{context}: gradient of {parameter_name}: {m}")


def _worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = torch.randn(len(LABELS), 6, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        weights = nn.Linear(6, 3).state_dict()
        # 4 x 4: equal shares of 8 items; 3 x 3: shares of 5 and 4 (the gather pads the shorter one)
        for n_classes, n_samples in [(4, 4), (3, 3)]:
            batch = next(iter(BalancedBatchSampler(LABELS, n_classes, n_samples, seed=3)))
            share = next(iter(DistributedBalancedBatchSampler(LABELS, n_classes, n_samples, seed=3)))
            for name, (loss_class, make_selector, margin) in CASES.items():
                context = f"{name}, {n_classes} x {n_samples}, rank {rank}"
                expected, expected_parameters, expected_selection = _run(
                    weights, loss_class, make_selector, margin, lambda model: model, data[batch], LABELS[batch],
                    gather=False)  # one process on the whole global batch
                assert _value(expected).item() > 0 and all(len(s) for s in expected_selection), context
                got, parameters, selection = _run(
                    weights, loss_class, make_selector, margin, DistributedDataParallel, data[share], LABELS[share],
                    gather=True)
                torch.testing.assert_close(_value(got), _value(expected), rtol=1e-5, atol=0,
                                           msg=lambda m: f"{context}: loss: {m}")
                if isinstance(got, tuple):
                    assert got[1] == expected[1], context  # non-zero triplets, counted over the global batch
                # the bias's exact gradient is 0 (distances ignore a shift), so its rounding is judged
                # against the largest gradient
                scale = max(float(p.grad.abs().max()) for _, p in expected_parameters)
                for (parameter_name, parameter), (_, expected_parameter) in zip(parameters, expected_parameters):
                    torch.testing.assert_close(parameter.grad, expected_parameter.grad, rtol=1e-5, atol=1e-5 * scale,
                                               msg=lambda m: f"{context}: gradient of {parameter_name}: {m}")
                # each rank selects for its own anchors; in rank order they are one process's selection, exactly
                selection = tuple(distributed.gather_uneven(part) for part in selection)
                assert all(torch.equal(a, b) for a, b in zip(selection, expected_selection)), context
        _check_gather_off_and_non_finite(data, weights, rank)
        _check_multi_similarity(data, weights, rank)
        _check_cross_batch_memory(data, weights, rank)
        _check_autoencoder_losses(data, rank)
        _check_the_process_group_queries(rank)
    finally:
        distributed.close_distributed()  # a barrier, then destroy: no rank tears down while another works
    leave_passed_worker()  # reached only when every check passed


def _check_the_process_group_queries(rank):
    """distributed.py's answers on rank ``rank`` of a group of WORLD_SIZE: the queries, broadcast, the gather
    of unequal shares in rank order (gradients back to each row's rank), the global mean, the fault message."""
    assert distributed.rank_and_world_size() == (rank, WORLD_SIZE)
    assert distributed.is_main_process() == (rank == 0)
    assert process_group_shape(None, None) == (WORLD_SIZE, rank)
    assert distributed.broadcast_from_main({"rank": rank}) == {"rank": 0}
    distributed.barrier()
    sizes = [3, 2]  # rank 0 holds rows 0-2 of the global batch, rank 1 rows 3-4
    everything = torch.arange(10.0).view(5, 2)
    start = sum(sizes[:rank])
    mine = everything[start:start + sizes[rank]].clone().requires_grad_()
    gathered, labels, share, _ = distributed.global_batch(mine, torch.arange(5)[start:start + sizes[rank]], True, None)
    assert torch.equal(gathered, everything) and torch.equal(labels, torch.arange(5))
    assert share == (start, start + sizes[rank], WORLD_SIZE)
    (gathered * torch.arange(1.0, 6.0)[:, None]).sum().backward()  # every rank's loss uses every row
    assert torch.equal(mine.grad, WORLD_SIZE * torch.arange(1.0, 6.0)[start:start + sizes[rank], None].expand(-1, 2))
    # the labels travel as bytes beside the rows: any integer dtype and value comes back exactly, float64 rows too
    extreme = torch.tensor([-(2 ** 63), 2 ** 63 - 1, -1, 2 ** 40 + 3, 0])
    for dtype, rows_dtype in ((torch.int64, torch.float32), (torch.int32, torch.float64), (torch.uint8, torch.float32)):
        labels_in = (extreme if dtype == torch.int64 else torch.tensor([250, 7, 0, 1, 9])).to(dtype)
        rows_in = everything.to(rows_dtype)[start:start + sizes[rank]]
        rows_out, labels_out, _ = distributed.global_batch(rows_in, labels_in[start:start + sizes[rank]], True)
        assert labels_out.dtype == dtype and torch.equal(labels_out, labels_in)
        assert rows_out.dtype == rows_dtype and rows_out.is_contiguous()
        assert torch.equal(rows_out, everything.to(rows_dtype))
    assert distributed.owned(torch.tensor([0, 2, 3, 4]), share).tolist() == (
        [True, True, False, False] if rank == 0 else [False, False, True, True])
    rows = distributed.rows_to_mine(share, 5)
    assert (rows.start, rows.stop) == (start, start + sizes[rank]) and rows.concatenate is distributed.gather_uneven
    assert distributed.rows_to_mine(None, 5) == (0, 5, None, None)
    assert distributed.rows_to_mine(None, 7, 5) == (0, 5, None, 5)
    assert distributed.rows_to_mine(share, 7, 5).n_anchors == 5
    pooled = distributed.gather_uneven(torch.arange(3 * (rank + 1)).view(-1, 1) + 10 * rank)  # 3 rows, then 6
    assert pooled.squeeze(1).tolist() == [0, 1, 2] + list(range(10, 16))
    terms = torch.tensor([1.0, 0.0, 2.0] if rank == 0 else [4.0, 0.0], requires_grad=True)
    mean, n_terms, n_nonzero = distributed.global_mean(terms[:sizes[rank]], share)
    assert mean.item() == pytest.approx(7.0 / 5, rel=1e-6) and (n_terms, n_nonzero) == (5, 3)
    mean.backward()  # the gradient of W * sum / S, which DDP's average turns into that of the global mean
    assert torch.equal(terms.grad, torch.full((sizes[rank],), WORLD_SIZE / 5))
    message = str(distributed._stopped_by_another_rank(RuntimeError("Connection closed by peer"), 3, "ckpt.pt"))
    assert f"rank {rank} of {WORLD_SIZE} stopped in epoch 3" in message and "the last checkpoint is ckpt.pt" in message
    assert "Connection closed by peer" in message


def _check_multi_similarity(data, weights, rank):
    """MultiSimilarityLoss on two processes: the loss and gradients of one process on the global batch."""
    for n_classes, n_samples in [(4, 4), (3, 3)]:
        batch = next(iter(BalancedBatchSampler(LABELS, n_classes, n_samples, seed=3)))
        share = next(iter(DistributedBalancedBatchSampler(LABELS, n_classes, n_samples, seed=3)))
        results = []
        for module, rows, gather in ((lambda model: model, batch, False), (DistributedDataParallel, share, True)):
            model = nn.Linear(6, 3)
            model.load_state_dict(weights)
            wrapped = module(model)
            loss = losses.MultiSimilarityLoss(beta=10.0, gather=gather)(wrapped(data[rows]), LABELS[rows])
            loss.backward()
            results.append((loss, [parameter.grad for parameter in model.parameters()]))
        (expected, expected_gradients), (got, gradients) = results
        context = f"multi-similarity, {n_classes} x {n_samples}, rank {rank}"
        assert expected.item() > 0, context
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0, msg=lambda m: f"{context}: loss: {m}")
        scale = max(float(gradient.abs().max()) for gradient in expected_gradients)
        for gradient, expected_gradient in zip(gradients, expected_gradients):
            torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m: f"{context}: gradient: {m}")


def _check_cross_batch_memory(data, weights, rank):
    """Three steps of losses mining a CrossBatchMemory: on two processes (each pushing the global batch) the
    losses, gradients and memories of one process training on the global batches."""
    makes = {"triplet-hardest": lambda memory: losses.OnlineTripletLoss(
                 1.0, utils.HardestNegativeTripletSelector(1.0), memory=memory),
             "contrastive-balanced": lambda memory: losses.OnlineContrastiveLoss(
                 1.0, utils.AllPositivePairSelector(generator=_seeded()), memory=memory),
             "multi-similarity": lambda memory: losses.MultiSimilarityLoss(beta=10.0, memory=memory)}
    sampler = iter(BalancedBatchSampler(LABELS, 3, 3, seed=5))
    shares = iter(DistributedBalancedBatchSampler(LABELS, 3, 3, seed=5))
    steps = [(next(sampler), next(shares)) for _ in range(3)]
    for name, make in makes.items():
        runs = []
        for module, gather, pick in ((lambda model: model, False, 0), (DistributedDataParallel, True, 1)):
            model = nn.Linear(6, 3)
            model.load_state_dict(weights)
            wrapped, loss_fn = module(model), make(CrossBatchMemory(12, 3))
            loss_fn.gather = gather  # off: one process's loss on the global batch, though a group is up
            outputs = []
            for step in steps:
                rows = step[pick]
                loss = _value(loss_fn(wrapped(data[rows]), LABELS[rows]))
                model.zero_grad()
                loss.backward()
                outputs.append((loss.detach(), [parameter.grad.clone() for parameter in model.parameters()]))
            runs.append((outputs, loss_fn.memory.state_dict()))
        (expected, expected_memory), (got, memory) = runs
        for step, ((loss, gradients), (expected_loss, expected_gradients)) in enumerate(zip(got, expected)):
            context = f"{name} with a memory, step {step}, rank {rank}"
            torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0, msg=lambda m: f"{context}: {m}")
            scale = max(float(gradient.abs().max()) for gradient in expected_gradients)
            for gradient, expected_gradient in zip(gradients, expected_gradients):
                torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{context}: gradient: {m}")
        for key, value in expected_memory.items():
            torch.testing.assert_close(memory[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {key}: {m}")


def _check_gather_off_and_non_finite(data, weights, rank):
    model = nn.Linear(6, 3)
    model.load_state_dict(weights)
    share = next(iter(DistributedBalancedBatchSampler(LABELS, 4, 4, seed=3)))
    embeddings, labels = model(data[share]).detach(), LABELS[share]
    # gather=False: each rank mines its own share, as a single process would
    local = losses.OnlineTripletLoss(1.0, utils.AllTripletSelector(), gather=False)(embeddings, labels)
    expected = losses.OnlineTripletLoss(1.0, utils.AllTripletSelector())
    expected.gather = False
    assert local == expected(embeddings, labels)
    # a non-finite embedding on rank 1 makes the loss non-finite on every rank
    if rank == 1:
        embeddings = embeddings.clone()
        embeddings[0, 0] = float("nan")
    for loss in (losses.OnlineTripletLoss(1.0, utils.HardestNegativeTripletSelector(1.0)),
                 losses.OnlineContrastiveLoss(1.0, utils.HardNegativePairSelector()), losses.MultiSimilarityLoss()):
        assert not torch.isfinite(_value(loss(embeddings, labels))), f"{type(loss).__name__}, rank {rank}"


def test_global_batch_mining_on_two_processes_matches_one_process():
    context = mp.spawn(_worker, args=(free_port(),), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the 2-process run did not finish in 120 s")
